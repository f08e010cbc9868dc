"""nnU-Net (`nnunetv2`, the optional extra ``pip install ian-node[nnunet]``) as rows of the benchmark's tables.

nnU-Net is trained and run through its own command-line entry points, on the benchmark's own samples
and patient splits, and its predictions are stored like every other network's, so the same scoring
code makes its rows (``nnunet_2d``, ``nnunet_3d_fullres``) of every table:

- `training.nnunet.export`: each (patient, side) of the benchmark's `SliceSet` (the node's crop, coronal
  slices, the paper's slice transform) becomes one nnU-Net case, its slices stacked along the first axis
  with the side's millimetres; one raw dataset per repeat, whose training cases are the repeat's training
  and validation patients (fold 0 of ``splits_final.json`` is exactly that split) and whose ``imagesTs``
  are its test patients.
- `training.nnunet.run`: plan and preprocess (``nnUNetv2_plan_and_preprocess``), train fold 0 and predict
  ``imagesTs`` (nnU-Net's trainer and predictor API, `training.nnunet.child`), with ``nnUNet_raw``,
  ``nnUNet_preprocessed`` and ``nnUNet_results`` under the benchmark's ``--out``; the run is recorded in
  the benchmark's ledger.
- `training.nnunet.score`: the predicted volumes back to the benchmark's samples, saved as the run's
  ``test_predictions.npz``, which `training.outputs` scores like any network's.

A real run needs a GPU: nnU-Net's default trainer runs 1000 epochs of 250 iterations.
"""

from __future__ import annotations

import importlib.util

#: The nnU-Net configurations the benchmark can run, and the table row each becomes.
CONFIGURATIONS: tuple[str, ...] = ("2d", "3d_fullres")
#: nnU-Net's default trainer; `training.nnunet.trainers` adds a short one for tests.
DEFAULT_TRAINER = "nnUNetTrainer"
INSTALL_HINT = "pip install ian-node[nnunet]"


class NnunetError(ValueError):
    """nnU-Net is missing, or one of its steps failed; the message says which and how to fix it."""


def row_name(configuration: str) -> str:
    """The model name of a configuration's rows in every table, e.g. ``nnunet_2d``."""
    return f"nnunet_{configuration}"


def require_nnunet() -> None:
    """Fail early, with the install command, when the optional `nnunetv2` package is absent."""
    if importlib.util.find_spec("nnunetv2") is None:
        raise NnunetError(f"nnU-Net rows need the nnunetv2 package: {INSTALL_HINT}")


def parse_configurations(text: str) -> tuple[str, ...]:
    """``"2d,3d_fullres"`` → ("2d", "3d_fullres"), refusing names nnU-Net's benchmark rows do not support."""
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [n for n in names if n not in CONFIGURATIONS]
    if not names or bad:
        raise NnunetError(f"nnU-Net configurations must be a comma-separated subset of {', '.join(CONFIGURATIONS)}, "
                          f"got {text!r}")
    return names


def configurations_argument(text: str) -> tuple[str, ...]:
    """argparse type of ``--nnunet``: the configurations, refused at once when nnU-Net is not installed."""
    import argparse

    try:
        names = parse_configurations(text)
        require_nnunet()
    except NnunetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names
