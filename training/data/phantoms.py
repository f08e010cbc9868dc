"""Model-space samples from generated phantoms, made by the node's own path, without writing files.

One function, `phantom_slice_set`: generate_phantom → DICOM MR series (`build_mr_series`) →
`load_series` → the study's crop (`training.data.collect.Collector.crop`) → `prepare` (side crops,
coronal slices, the paper's slice transform) → ground truth by `to_model_space`, then the same sample
policy and `Collector` as every other input form (`training.data.collect`). The bundled model
(`training.default_model`) and the difficulty checks (`training.baselines`,
`benchmarks/phantom_difficulty.py`) take their slices from here, so what they train or score on is
what the node would feed its network for that study.

Crops: ``oracle`` is each phantom's landmark crop (`Phantom.crop_boxes`, region ``landmarks``), as in
the paper; ``auto`` runs the localiser; ``half`` is the volume's halves.
"""

from __future__ import annotations

from collections.abc import Iterable

from ian_node.phantom.mr_series import build_mr_series
from ian_node.phantom.study import Phantom, PhantomConfig, generate_phantom
from ian_node.segment.crop import CropMode
from ian_node.segment.volume import Side, load_series
from model.preprocess import DEFAULT_SIZE
from training.data.collect import Collector, LoadOptions, volume_samples
from training.data.samples import SliceSet

#: Each side's nerve is its own label in a phantom's label volume.
_SIDE_VALUES = {side: (side.label,) for side in Side}


def phantom_slice_set(
    patients: Iterable[int],
    seed: int,
    config: PhantomConfig | None = None,
    size: int = DEFAULT_SIZE,
    crop: CropMode | str = CropMode.ORACLE,
    nerve_slices_only: bool = False,
    slice_step: int = 1,
    localiser: str | None = None,
    context: int = 1,
) -> SliceSet:
    """The samples of each phantom, ordered by (patient, side, slice) like every `SliceSet`.

    By default every coronal slice of each side's landmark crop (what the node predicts);
    `nerve_slices_only` keeps the paper's samples. `localiser` is crop ``auto``'s checkpoint (None:
    the bundled one). `context` K > 1 keeps each sample's window of K adjacent coronal slices (2.5D).
    """
    options = LoadOptions(size=size, crop=crop, nerve_slices_only=nerve_slices_only, slice_step=slice_step,
                          localiser=localiser, context=context)
    collector = Collector(options)
    for index in patients:
        phantom = generate_phantom(index, seed, config)
        collector.run(phantom.study.patient_id, lambda p=phantom, i=index: _add(collector, p, i, seed))
    return collector.build("phantom", f"seed={seed}")


def _add(collector: Collector, phantom: Phantom, index: int, seed: int) -> None:
    where = phantom.study.patient_id
    series = load_series(build_mr_series(phantom.volume, phantom.study, phantom.series))
    landmarks = {Side(side): box for side, box in phantom.crop_boxes.items()} or None
    crop = collector.crop(series, phantom.labels, landmarks, where)
    sides = volume_samples(series, phantom.labels, _SIDE_VALUES, collector.options, crop.rois)
    sides = {s: v for s, v in sides.items() if v.nerve_slices > 0}
    collector.add_sides(where, where, sides, f"patient {index} of seed {seed}; {crop.detail}", crop.region)
