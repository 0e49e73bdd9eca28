"""Mish bottleneck ResNet regressor of DSC Lesion (the paper's predictors c and d).

Architecture (62 weighted layers): a 3×3 stride-2 stem convolution and a 3×3 stride-2 max-pool, four stages of (3, 4, 10, 3) bottleneck
blocks (1×1 reduce → 3×3 → 1×1 expand, each followed by batch norm; Mish activations, He et al.'s
identity or 1×1-projection shortcut), global average pooling and one linear unit with a sigmoid, so
the output is in [0, 1]. 1 + 3·(3+4+10+3) + 1 = 62 (projection shortcuts are not counted, as in the
ResNet papers). Widths are small (``ResNetConfig``) so that it trains on two CPU cores in minutes.

Input: a lesion-centred ``crop_size``² crop at the image's own pixel grid, centred on the AI mask's
centroid, with the channels named in ``channels``:

* ``ct``: HU windowed to [−1000, 400] and scaled to [0, 1];
* ``probability``: the AI ensemble-mean probability (a binary mask for mask-only cohorts);
* ``uncertainty``: the ensemble's pixel-wise std ×2 (std of values in [0, 1] is at most 0.5).

Outside the frame the crop is padded with air (ct 0), probability 0 and uncertainty 0.

Training: L1 loss (the figure of merit is the MAE), Adam, flips and 90° rotations (the target does not
depend on orientation), the output bias initialised at the logit of the training mean. Deterministic:
fixed seeds, ``torch.use_deterministic_algorithms``, a fixed thread count.

Inference (``ResNetPredictor.predict_crops``): the crops of a call go through the network in batches
(one forward per ``batch_size`` crops, not one per slice), under ``torch.inference_mode()``, as one
C-contiguous float32 array, on ``INFERENCE_THREADS`` torch threads (the previous count restored).
The network is small (64² crops, stage widths 4–32): thread start-up and synchronisation cost more
than they save, and a worker process that takes every core competes with the gate and the other
workers. On the shared 2-core build machine (load average 3.7), 100 crops in chunks of 25 (the
worker's ``ASSESS_CHUNK``) took a median 0.07 s (ResNet) / 0.10 s (ResNet with UM) on one thread
and 0.32 / 0.29 s on two, single runs up to 1.3 s (``.venv/bin/python bench/profile_resnet.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qcgate.errors import InputError

CHANNELS: tuple[str, ...] = ("ct", "probability", "uncertainty")
HU_WINDOW = (-1000.0, 400.0)
STAGE_BLOCKS = (3, 4, 10, 3)
#: torch threads of one inference call: one a worker process (see the module docstring), never more
#: than the CPUs this process may run on.
INFERENCE_THREADS = 1


@dataclass
class ResNetConfig:
    """Architecture and schedule. Defaults train the shipped phantom model in minutes on 2 cores."""

    crop_size: int = 64
    stem_width: int = 8
    stage_widths: tuple[int, ...] = (4, 8, 16, 32)  # bottleneck (inner) widths; outputs ×expansion
    expansion: int = 2
    stage_blocks: tuple[int, ...] = STAGE_BLOCKS
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 1  # two threads on a shared 2-core machine run 5-10x slower (spinning workers)
    augment: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> ResNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(payload) - known
        if unknown:
            raise ValueError(f"unknown ResNet config keys {sorted(unknown)}")
        values = dict(payload)
        for key in ("stage_widths", "stage_blocks"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)


# --------------------------------------------------------------------------------------------------
# Input crops
# --------------------------------------------------------------------------------------------------


def crop_centre(probability: np.ndarray) -> tuple[int, int]:
    """Centroid (row, col) of the AI mask (probability ≥ 0.5); of the probability mass when the
    mask is empty; the frame centre when both are empty."""
    mask = probability >= 0.5
    weights = mask.astype(np.float64) if mask.any() else np.asarray(probability, dtype=np.float64)
    total = float(weights.sum())
    if total <= 0:
        return probability.shape[0] // 2, probability.shape[1] // 2
    rows, cols = np.indices(weights.shape)
    return round(float((rows * weights).sum()) / total), round(float((cols * weights).sum()) / total)


def _crop(array: np.ndarray, centre: tuple[int, int], size: int, fill: float) -> np.ndarray:
    out = np.full((size, size), fill, dtype=np.float32)
    r0, c0 = centre[0] - size // 2, centre[1] - size // 2
    rs0, cs0 = max(r0, 0), max(c0, 0)
    rs1, cs1 = min(r0 + size, array.shape[0]), min(c0 + size, array.shape[1])
    if rs1 > rs0 and cs1 > cs0:
        out[rs0 - r0:rs1 - r0, cs0 - c0:cs1 - c0] = array[rs0:rs1, cs0:cs1]
    return out


def lesion_crop(image_hu: np.ndarray | None, probability: np.ndarray, uncertainty: np.ndarray | None,
                size: int) -> np.ndarray:
    """(3, size, size) float32: the ct, probability and uncertainty channels (absent ones are 0)."""
    probability = np.asarray(probability, dtype=np.float64)
    centre = crop_centre(probability)
    ct = np.zeros((size, size), dtype=np.float32)
    if image_hu is not None:
        low, high = HU_WINDOW
        scaled = (np.clip(np.asarray(image_hu, dtype=np.float64), low, high) - low) / (high - low)
        ct = _crop(scaled, centre, size, 0.0)
    um = np.zeros((size, size), dtype=np.float32)
    if uncertainty is not None:
        um = _crop(2.0 * np.asarray(uncertainty, dtype=np.float64), centre, size, 0.0)
    return np.stack([ct, _crop(probability, centre, size, 0.0), um])


def channel_indices(channels: Sequence[str]) -> list[int]:
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown input channels {unknown}; known {CHANNELS}")
    return [CHANNELS.index(c) for c in channels]


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def build_network(in_channels: int, config: ResNetConfig):
    """The Mish bottleneck ResNet (a ``torch.nn.Module``); see the module docstring."""
    torch = _torch()
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.act = nn.Mish()
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.act(self.bn1(self.conv1(x)))
            out = self.act(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.act(out + self.shortcut(x))

    class MishResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, config.stem_width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(config.stem_width), nn.Mish(),
                nn.MaxPool2d(3, stride=2, padding=1),  # the standard ResNet stem: /4 before the stages
            )
            blocks = []
            cin = config.stem_width
            for stage, (n_blocks, mid) in enumerate(zip(config.stage_blocks, config.stage_widths)):
                cout = mid * config.expansion
                for b in range(n_blocks):
                    stride = 2 if (b == 0 and stage > 0) else 1
                    blocks.append(Bottleneck(cin, mid, cout, stride))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(cin, 1)

        def forward(self, x):
            features = self.pool(self.blocks(self.stem(x))).flatten(1)
            return torch.sigmoid(self.head(features)).squeeze(1)

    return MishResNet()


def weighted_layer_count(network) -> int:
    """Convolutions and linear layers on the main path (projection shortcuts excluded): 62."""
    torch = _torch()
    count = 0
    for name, module in network.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and ".shortcut" not in name:
            count += 1
    return count


@contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the duration (previous settings restored)."""
    torch = _torch()
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def inference_thread_count() -> int:
    """``INFERENCE_THREADS``, at most the CPUs this process may run on (its affinity mask)."""
    import os

    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        available = os.cpu_count() or 1
    return max(1, min(INFERENCE_THREADS, available))


@contextmanager
def inference_threads() -> Iterator[None]:
    """torch on ``inference_thread_count()`` threads for the duration (the previous count restored)."""
    torch = _torch()
    previous = torch.get_num_threads()
    wanted = inference_thread_count()
    if wanted != previous:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != previous:
            torch.set_num_threads(previous)


@dataclass
class ResNetPredictor:
    """A trained network with its input definition."""

    network: object
    config: ResNetConfig
    channels: tuple[str, ...]
    training_log: list[float] = field(default_factory=list)

    def predict_crops(self, crops: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Predicted DSC Lesion for (N, 3, S, S) crops (all three channels; the model picks its own)."""
        torch = _torch()
        crops = np.asarray(crops, dtype=np.float32)
        if crops.ndim != 4 or crops.shape[1] != len(CHANNELS) or crops.shape[2:] != (self.config.crop_size,) * 2:
            raise ValueError(f"expected crops (N, {len(CHANNELS)}, {self.config.crop_size}, {self.config.crop_size}), got {crops.shape}")
        selected = np.ascontiguousarray(crops[:, channel_indices(self.channels)])
        network = self.network
        network.eval()  # type: ignore[attr-defined]
        outputs = []
        with inference_threads(), torch.inference_mode():
            for start in range(0, len(selected), batch_size):
                outputs.append(network(torch.from_numpy(selected[start:start + batch_size])).numpy())  # type: ignore[operator]
        if not outputs:
            return np.zeros(0)
        return np.clip(np.concatenate(outputs).astype(np.float64), 0.0, 1.0)

    def save(self, path: Path) -> None:
        """Weights as safetensors (tensors only: nothing executable, nothing unpickled on load)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.network.state_dict().items()}  # type: ignore[attr-defined]
        # One metadata key: safetensors writes a multi-key metadata map in no fixed order, which would
        # make identical weights hash differently (the channels are in the manifest).
        save_file(state, str(path), metadata={"format": "qcgate.resnet"})

    @classmethod
    def load(cls, path: Path, config: ResNetConfig, channels: Sequence[str]) -> ResNetPredictor:
        """Build the network from ``config`` and load the safetensors weights (strict: every tensor of
        the right name and shape); InputError otherwise."""
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on truncated/garbled files
            raise InputError(f"{path}: not readable ResNet weights ({type(exc).__name__}: {exc})") from exc
        network = build_network(len(channels), config)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise InputError(f"{path}: weights do not fit the architecture in the manifest ({first})") from exc
        network.eval()
        return cls(network, config, tuple(channels))


def _augment(batch, generator):
    """Random flips and 90° rotations, one draw per batch (the target is orientation-free)."""
    torch = _torch()
    k = int(torch.randint(0, 4, (1,), generator=generator))
    batch = torch.rot90(batch, k, dims=(2, 3))
    if int(torch.randint(0, 2, (1,), generator=generator)):
        batch = torch.flip(batch, dims=(3,))
    return batch.contiguous()  # rotated views have odd strides: a slow convolution path


def train_resnet(crops: np.ndarray, targets: np.ndarray, channels: Sequence[str], config: ResNetConfig,
                 *, progress=None) -> ResNetPredictor:
    """Train on (N, 3, S, S) crops and DSC Lesion targets; deterministic for a given ``config``.

    ``progress``: optional callable(epoch, epochs, mean training L1) called after each epoch.
    """
    torch = _torch()
    crops = np.asarray(crops, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.float32)
    if len(crops) != len(targets) or len(crops) == 0:
        raise ValueError(f"{len(crops)} crops for {len(targets)} targets")
    inputs = torch.from_numpy(np.ascontiguousarray(crops[:, channel_indices(channels)]))
    labels = torch.from_numpy(targets)
    log: list[float] = []
    with deterministic_torch(config.threads):
        torch.manual_seed(config.seed)
        network = build_network(len(channels), config)
        mean = float(np.clip(targets.mean(), 0.02, 0.98))
        with torch.no_grad():  # start at the global mean: the network learns the deviations
            network.head.bias.fill_(math.log(mean / (1 - mean)))
            network.head.weight.mul_(0.1)
        optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, config.epochs))
        generator = torch.Generator().manual_seed(config.seed)
        n = len(inputs)
        for epoch in range(config.epochs):
            network.train()
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, config.batch_size):
                index = order[start:start + config.batch_size]
                if len(index) < 2:  # batch norm needs two samples
                    continue
                batch = inputs[index]
                if config.augment:
                    batch = _augment(batch, generator)
                loss = torch.nn.functional.l1_loss(network(batch), labels[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(index)
            schedule.step()
            log.append(total / n)
            if progress is not None:
                progress(epoch + 1, config.epochs, log[-1])
        network.eval()
    return ResNetPredictor(network, config, tuple(channels), log)
