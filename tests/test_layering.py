"""The architecture's one rule: a package imports only from the layers below it (docs/ARCHITECTURE.md).

Every import is checked, including those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qcgate"

# Lowest first. A module may import its own package and any package of a lower layer.
LAYERS: list[set[str]] = [
    {"errors"},  # the errors the command line reports as one message
    {"core"},  # the shared vocabulary: results contract, agreement, DICOM identifiers, data layout
    {"config"},  # typed settings
    {"logs"},  # logging set up from the settings
    {"store", "features", "cohort"},  # the audit database; per-slice descriptors; cohorts on disk
    {"science", "phantom", "observability"},  # the difficulty analysis; synthetic cohorts; metrics
    {"predictors", "writers", "report", "delivery", "node"},  # threshold models; outputs; outbox; the network node
    {"pipeline"},  # assembler, dispatcher, worker: the stages wired into a job
    {"console"},  # the web console and /api (served by service)
    {"service", "systemd", "commands", "demo", "cli"},  # process wiring, the systemd handshake and the command line
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def _top_level(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "qcgate" and len(parts) > 1 else None


def _unit(path: Path) -> str:
    """The package (or top-level module) a file belongs to, e.g. ``node`` or ``service``."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "qcgate":  # from qcgate import x
                found += [(node.lineno, f"qcgate.{alias.name}") for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts or p.name == "env.py")


def test_every_package_has_a_layer() -> None:
    units = {_unit(p) for p in _sources()} - {"__init__"}
    assert units <= set(LAYER_OF), f"packages without a layer in this test and ARCHITECTURE.md: {sorted(units - set(LAYER_OF))}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path: Path) -> None:
    unit = _unit(path)
    if unit == "__init__":
        return
    own = LAYER_OF[unit]
    bad = []
    for line, module in _imports(path):
        target = _top_level(module)
        if target is None or target == unit or target in ("__version__",):
            continue
        if target not in LAYER_OF:
            bad.append(f"line {line}: {module} (unknown package)")
        elif LAYER_OF[target] > own or (LAYER_OF[target] == own and own != len(LAYERS) - 1):
            bad.append(f"line {line}: {unit} (layer {own}) imports {module} (layer {LAYER_OF[target]})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted((PACKAGE / "commands").glob("*.py")), ids=lambda p: p.name)
def test_command_modules_share_only_common(path: Path) -> None:
    """Command modules never import each other (only ``commands.common``) nor ``qcgate.cli``."""
    bad = [f"line {line}: {module}" for line, module in _imports(path)
           if module == "qcgate.cli" or (module.startswith("qcgate.commands.") and module != "qcgate.commands.common")]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_command_line() -> None:
    offenders = [f"{p.relative_to(PACKAGE)}:{line}" for p in _sources() for line, module in _imports(p)
                 if module == "qcgate.cli" and _unit(p) != "cli"]
    assert not offenders, offenders
