"""The benchmark's settings: the protocol (what is computed) and the runtime (how), with named presets.

`Protocol` holds everything that changes results; its defaults are the paper's protocol and a run
folder's ledger stores it, so a resumed or re-evaluated benchmark can check it is continuing the same
experiment. `Runtime` holds what may change between sessions (device, threads, progress bars).

Presets:

Every preset runs every row of the registry (`model.registry.NETWORKS`): the paper's network in both
variants (`ian_net`, the paper's text with attention; `ian_net_released`, the authors' released code
without it, which suggests Table 1 came from that one), the six comparators, and the plain U-Net.
`--pretrained DIR` (the `pretrained` setting) starts the comparators whose authors used ImageNet
backbones from the user's files; the protocol records each file's SHA-256.

- `paper`: the paper (10 repeats, 70/15/15 patient-level splits, AdamW 1e-3 / 1e-4, cosine, 50
  epochs, batch 32, Focal Tversky γ 2, α 0.7, β 0.3, patience 25, all rows at full width,
  256 px, each side cropped by the oracle crop, nerve slices only: the paper's Table 1 samples). Needs
  `--data`. Three input channels, as the authors' released code and every comparator's original take
  (grey replicated); the node reads the channel count from the checkpoint.
- `smoke`: the whole pipeline in about a minute on a 2-core CPU (CI): four generated `small` phantom
  patients (64, 192, 192), each side cropped by its landmark crop (oracle), every fourth coronal slice
  of the crop (nerve-free ones included: what the node predicts), 64 px, width 0.125, one channel,
  batch 16, one repeat, one epoch.
- `phantom`: the paper's setting on paper-scale phantoms, sized for a 2-core CPU: ten `paper` phantom
  patients (the paper's acquisition: 220 mm field of view, 0.429 × 0.8 × 1.6 mm voxels, (88, 275, 512);
  about 20 s each to generate), each side cropped by its landmark crop (oracle: the paper's manual
  crop), 256 px, every sixteenth coronal slice of the crop, nerve-free ones included (about half of
  a crop's slices carry nerve, so this keeps the sample count of the earlier every-eighth-nerve-slice
  selection, about 21 per patient), width 0.125, one channel, batch 4, 8 epochs, one repeat. Measured
  with that earlier selection on this 2-core CPU (docs/benchmark.md): phantoms 3 min; training all
  seven networks 13.7-23.8 min per repeat with other jobs sharing the cores (load 2-5, one thread:
  there, 1 thread was 4 times faster than 2), an estimated 12 min on an idle machine with 2 threads
  (DS-TransUNet 42 %, DUCK-Net 26 %). In this budget only our network and DS-TransUNet learn the task
  (DSC ~0.43); the others stay undertrained.

Everything a preset does not name is the paper's value (optimiser, schedule, loss, patience, splits).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ian_node.segment.crop import CropMode
from model.networks.base import SegmentationNetwork
from model.registry import NETWORKS, PAPER_NETWORK, PRETRAINED_FILES, check_pretrained, load_pretrained, network_class
from training.data.collect import CROPS
from training.localiser import LocaliserTrainOptions
from training.settings import reject_unknown_fields
from training.splits import PAPER_FRACTIONS, PAPER_REPEATS

logger = logging.getLogger(__name__)

#: Our network's named variants (constructor options), as its class defines them.
_IAN_NET_OPTIONS: dict[str, dict[str, Any]] = network_class(PAPER_NETWORK).VARIANTS  # type: ignore[attr-defined]
IAN_NET_VARIANTS = tuple(_IAN_NET_OPTIONS)
#: The row that always runs the released variant, beside `ian_net`.
RELEASED_ROW = "ian_net_released"


@dataclass(frozen=True)
class Protocol:
    """Every setting that changes results. Defaults: the paper's protocol."""

    models: tuple[str, ...] = tuple(NETWORKS)
    repeats: int = PAPER_REPEATS
    fractions: tuple[float, float, float] = PAPER_FRACTIONS
    seed: int = 0
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    min_lr: float = 0.0
    patience: int = 25
    tversky_alpha: float = 0.7
    tversky_beta: float = 0.3
    focal_gamma: float = 2.0
    threshold: float = 0.5
    amp: bool = True  # used on CUDA only
    # deterministic torch algorithms (training.environment.Determinism); in the protocol so that every run of a
    # benchmark is trained the same way; the ops torch cannot make deterministic are recorded per run
    deterministic: bool = True
    width: float = 1.0
    size: int = 256
    in_channels: int = 3
    # 2.5D input: adjacent coronal slices per sample (odd; 1 = 2D, the paper's); with K > 1 the K slices are the
    # channels, so in_channels is K (`preset` sets it); the node reads it from the checkpoint (InputContract.context)
    context: int = 1
    # the variant of the `ian_net` row (the `ian_net_released` row is always "released-no-attention");
    # kept so that ledgers from before the two rows still rebuild their runs
    ian_net_variant: str = "paper-attention"
    # ImageNet backbone files the rows load before training ({file name: SHA-256}, from `with_pretrained`);
    # empty: every row trains from scratch. Where the files are is a runtime matter (`Runtime.pretrained_dir`).
    pretrained: dict[str, str] = field(default_factory=dict)
    # each side's crop (training.data.collect): "oracle" (the study's landmark crop, else its nerve
    # margins), "auto" (the node's localiser) or "half"; and which of its coronal slices are samples:
    # every one (what the node predicts) or, with nerve_slices_only, the paper's nerve slices
    crop: str = CropMode.ORACLE.value
    nerve_slices_only: bool = False
    slice_step: int = 1
    # generated phantom data, used when no --data is given (0 patients: --data is required)
    phantom_patients: int = 0
    phantom_preset: str = "small"  # ian_node.phantom.study.phantom_preset: "small" or "paper"
    phantom_seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in NETWORKS]
        if unknown or not self.models:
            raise ValueError(f"unknown or no models {unknown}; valid: {', '.join(NETWORKS)}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models listed twice: {list(self.models)}")
        if self.ian_net_variant not in IAN_NET_VARIANTS:
            raise ValueError(f"ian_net_variant must be one of {IAN_NET_VARIANTS}, got {self.ian_net_variant!r}")
        if (self.ian_net_variant == "released-no-attention" and PAPER_NETWORK in self.models
                and RELEASED_ROW in self.models):
            raise ValueError(f"ian_net_variant released-no-attention makes the {PAPER_NETWORK} row the same network "
                             f"as the {RELEASED_ROW} row; drop one of them from the models")
        if self.pretrained:
            needed = {f for m in self.models for f in PRETRAINED_FILES.get(m, ())}
            if set(self.pretrained) != needed:
                raise ValueError(f"pretrained files {sorted(self.pretrained)} are not those the models need: "
                                 f"{sorted(needed)}")
            if self.width != 1.0:
                raise ValueError(f"pretrained backbones need width 1.0 (the ImageNet networks), got {self.width}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        if not isinstance(self.context, int) or self.context < 1 or self.context % 2 == 0:
            raise ValueError(f"context must be a positive odd number of slices (1, 3, 5...), got {self.context!r}")
        if self.context > 1 and self.in_channels != self.context:
            raise ValueError(f"context {self.context} feeds {self.context} input channels, got in_channels "
                             f"{self.in_channels}")
        if self.context == 1 and self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {self.repeats!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        object.__setattr__(self, "crop", str(CropMode(self.crop).value))
        if self.phantom_patients and self.phantom_patients < 3:
            raise ValueError(f"phantom_patients must be 0 or at least 3 (train/val/test), got {self.phantom_patients}")

    def model_options(self, model: str) -> dict[str, Any]:
        """Constructor options of `model` beyond in_channels and width."""
        if model == PAPER_NETWORK:
            return dict(_IAN_NET_OPTIONS[self.ian_net_variant])
        return {}

    def pretrained_rows(self) -> dict[str, dict[str, str]]:
        """The rows that start from ImageNet backbones: {row: {file name: SHA-256}} (empty: none do)."""
        if not self.pretrained:
            return {}
        return {m: {f: self.pretrained[f] for f in PRETRAINED_FILES[m]} for m in self.models if m in PRETRAINED_FILES}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        data = _upgrade(data)
        reject_unknown_fields(cls, data, "protocol")
        tuples = {"models", "fractions"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})

    def differences(self, other: Protocol) -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]


#: Crop names of ledgers written before the crop modes were the node's (`ian_node.segment.crop.CropMode`).
_OLD_CROPS = {"halves": CropMode.HALF.value, "boxes": CropMode.ORACLE.value}


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A protocol read from an older ledger in today's terms, so that its reports can be rebuilt.

    Old ledgers named the crops "halves" and "boxes" (the landmark boxes of each study's summary.json,
    today's oracle crop) and drew samples by `empty_ratio` (0: nerve slices only). A ratio above 0
    drew a random share of empty slices, which no setting reproduces any more: refused.
    """
    data = dict(data)
    if data.get("crop") in _OLD_CROPS:
        data["crop"] = _OLD_CROPS[data["crop"]]
    if "empty_ratio" in data:
        ratio = data.pop("empty_ratio")
        if ratio:
            raise ValueError(f"protocol empty_ratio {ratio!r} (random nerve-free slices) is no longer supported; "
                             "samples are every slice of the crop or, with nerve_slices_only, nerve slices only")
        data.setdefault("nerve_slices_only", True)
    return data


@dataclass(frozen=True)
class Runtime:
    """Settings that may differ between sessions of one benchmark without changing what is computed."""

    device: str = "auto"
    threads: int | None = None  # torch CPU threads; None: torch's default
    num_workers: int | None = None  # data loader workers; None: the loop's choice (min(8, CPUs) on CUDA)
    eval_batch_size: int | None = None
    progress: bool = True
    pretrained_dir: str | None = None  # the folder of the protocol's `pretrained` files (--pretrained)


PRESETS: dict[str, Protocol] = {
    "paper": Protocol(nerve_slices_only=True),
    "smoke": Protocol(repeats=1, epochs=1, batch_size=16, width=0.125, size=64, in_channels=1, slice_step=4,
                      phantom_patients=4, phantom_preset="small"),
    "phantom": Protocol(repeats=1, epochs=8, batch_size=4, width=0.125, size=256, in_channels=1, slice_step=16,
                        phantom_patients=10, phantom_preset="paper"),
}


#: The crop localiser each preset trains after its runs (`training.localiser_run`): `paper` and
#: `phantom` the bundled localiser's recipe (3 mm grid, 2400 iterations), `smoke` a token one (6 mm
#: grid, small channels and canvas, 20 iterations: seconds on a CPU) that only proves the path runs.
#: `--localiser-iterations` overrides the iterations (0: no localiser). Kept out of `Protocol`:
#: the localiser changes no run, so changing it must not refuse to resume a benchmark.
LOCALISER_PRESETS: dict[str, LocaliserTrainOptions] = {
    "paper": LocaliserTrainOptions(),
    "smoke": LocaliserTrainOptions(spacing_mm=6.0, channels=(4, 8, 8, 8), canvas=(16, 16, 16), iterations=20),
    "phantom": LocaliserTrainOptions(),
}


def localiser_preset(name: str, iterations: int | None = None) -> LocaliserTrainOptions:
    """A preset's localiser settings, with `iterations` replaced unless None (0: train none)."""
    try:
        base = LOCALISER_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(LOCALISER_PRESETS)}") from None
    if iterations is None:
        return base
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"localiser iterations must be a whole number >= 0, got {iterations!r}")
    return replace(base, iterations=iterations)


def preset(name: str, **overrides: Any) -> Protocol:
    """A named preset with some settings replaced (None values are ignored); a context K > 1 given without
    in_channels brings K input channels."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("context", 1) > 1:
        given.setdefault("in_channels", given["context"])
    return replace(base, **given)


def with_pretrained(protocol: Protocol, directory: str | Path | None) -> Protocol:
    """`protocol` with the backbone files its rows need from `directory` recorded by SHA-256 (None: unchanged).

    Fails, listing every expected file name, when one is missing or the width is not 1.0: before any
    training starts.
    """
    if directory is None:
        return protocol
    return replace(protocol, pretrained=check_pretrained(directory, protocol.models, protocol.width))


def load_row_pretrained(net: SegmentationNetwork, protocol: Protocol, runtime: Runtime) -> dict[str, str]:
    """Load the backbone files the protocol records for `net`'s row from `runtime.pretrained_dir`.

    Called on a freshly built network before training; returns what was loaded ({file name: SHA-256},
    {} for a row that trains from scratch). A file whose SHA-256 is not the one the protocol recorded
    (the folder changed since the benchmark began) is refused.
    """
    wanted = protocol.pretrained_rows().get(net.name, {})
    if not wanted:
        return {}
    if runtime.pretrained_dir is None:
        raise ValueError(f"{net.name} starts from pretrained backbone files {sorted(wanted)}: give --pretrained DIR")
    changed = sorted(f for f, sha in check_pretrained(runtime.pretrained_dir, [net.name]).items() if wanted[f] != sha)
    if changed:
        raise ValueError(f"pretrained files {changed} in {runtime.pretrained_dir} differ from those this benchmark "
                         "recorded (SHA-256 in its ledger)")
    loaded = load_pretrained(net, runtime.pretrained_dir)
    logger.info("%s: backbone loaded from %s", net.name, ", ".join(sorted(loaded)))
    return loaded
