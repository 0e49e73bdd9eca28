"""The per-group feature container shared by every descriptor family.

A :class:`FeatureVector` is what trained models consume: an ordered, stable list of names and a finite
float64 vector. Undefined descriptors (an empty ring, a constant crop, a zero denominator) are never
allowed to leak NaN/inf; they are replaced by a documented fallback and their names listed in ``flags``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FeatureVector:
    """Ordered descriptors of one feature group for one lesion slice.

    ``names`` are fully qualified (``f"{group}.{descriptor}"``), ``values`` is a read-only finite float64
    array of the same length, and ``flags`` lists the names whose value is a fallback.
    """

    group: str
    names: tuple[str, ...]
    values: np.ndarray
    flags: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=np.float64, copy=True).reshape(-1)
        if values.shape[0] != len(self.names):
            raise ValueError(f"{self.group}: {len(self.names)} names but {values.shape[0]} values")
        if not np.all(np.isfinite(values)):
            bad = [n for n, v in zip(self.names, values) if not math.isfinite(v)]
            raise ValueError(f"{self.group}: non-finite values for {bad}")
        prefix = f"{self.group}."
        if any(not n.startswith(prefix) for n in self.names):
            raise ValueError(f"all names must start with {prefix!r}")
        unknown_flags = set(self.flags) - set(self.names)
        if unknown_flags:
            raise ValueError(f"flags name unknown features: {sorted(unknown_flags)}")
        values.setflags(write=False)  # frozen means frozen: no in-place edits of a shared vector
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "flags", tuple(self.flags))

    def as_dict(self) -> dict[str, float]:
        """Name -> value, in the vector's order."""
        return {name: float(value) for name, value in zip(self.names, self.values)}

    def __len__(self) -> int:
        return len(self.names)


def qualified_names(group: str, descriptors: Sequence[str]) -> tuple[str, ...]:
    """``("a", "b")`` -> ``("group.a", "group.b")``."""
    return tuple(f"{group}.{d}" for d in descriptors)


def build_vector(
    group: str,
    descriptors: Sequence[str],
    raw_values: Mapping[str, float | None],
    *,
    fallbacks: Mapping[str, float] | None = None,
    default_fallback: float = 0.0,
    extra_flags: Sequence[str] = (),
) -> FeatureVector:
    """Assemble a :class:`FeatureVector` in the fixed ``descriptors`` order.

    A descriptor missing from ``raw_values``, ``None`` or non-finite takes its fallback
    (``fallbacks[d]`` or ``default_fallback``) and is flagged; ``extra_flags`` (bare descriptor names)
    flags values that the producer already replaced by a fallback itself.
    """
    fallbacks = fallbacks or {}
    values = np.empty(len(descriptors), dtype=np.float64)
    flagged: list[str] = []
    extra = set(extra_flags)
    for index, descriptor in enumerate(descriptors):
        raw = raw_values.get(descriptor)
        value = float(raw) if raw is not None else math.nan
        if not math.isfinite(value):
            value = float(fallbacks.get(descriptor, default_fallback))
            flagged.append(descriptor)
        elif descriptor in extra:
            flagged.append(descriptor)
        values[index] = value
    return FeatureVector(
        group=group,
        names=qualified_names(group, descriptors),
        values=values,
        flags=qualified_names(group, flagged),
    )
