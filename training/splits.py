"""Patient-level Monte Carlo cross-validation (the paper's 10 × 70/15/15 random splits).

Splitting by patient, not by image, keeps the left and right IAN of one patient (and every slice of
them) in the same set, which is how the paper prevents leakage. Each repeat draws a fresh random
partition from its own seed, derived from the master seed and the repeat number, so a split can be
reproduced alone and recorded in the run ledger as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: The paper's protocol: 70 % training, 15 % validation, 15 % testing.
PAPER_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
PAPER_REPEATS = 10


class SplitError(ValueError):
    """Raised when the patients cannot be split as asked."""


@dataclass(frozen=True)
class Split:
    """One repeat's partition of patients; `seed` is the repeat's own derived seed."""

    repeat: int
    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Split:
        try:
            split = cls(
                repeat=int(data["repeat"]),
                seed=int(data["seed"]),
                train=tuple(str(p) for p in data["train"]),
                val=tuple(str(p) for p in data["val"]),
                test=tuple(str(p) for p in data["test"]),
            )
        except KeyError as exc:
            raise SplitError(f"split record lacks field {exc.args[0]!r}") from None
        overlap = (set(split.train) & set(split.val)) | (set(split.train) & set(split.test)) | (
            set(split.val) & set(split.test)
        )
        if overlap:
            raise SplitError(f"split record for repeat {split.repeat} puts {len(overlap)} patient(s) in two sets")
        return split


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of one repeat: independent streams per repeat, stable across numpy versions."""
    return int(np.random.SeedSequence([seed, repeat]).generate_state(1, dtype=np.uint32)[0])


def split_sizes(n_patients: int, fractions: Sequence[float] = PAPER_FRACTIONS) -> tuple[int, int, int]:
    """(train, val, test) patient counts: val and test round half up and get at least one patient each."""
    f_train, f_val, f_test = _check_fractions(fractions)
    n_val = max(1, math.floor(n_patients * f_val + 0.5))
    n_test = max(1, math.floor(n_patients * f_test + 0.5))
    n_train = n_patients - n_val - n_test
    if n_train < 1:
        raise SplitError(
            f"{n_patients} patient(s) cannot fill non-empty train/val/test sets with fractions "
            f"{tuple(fractions)}; at least 3 patients are needed (and more for these fractions)"
        )
    return n_train, n_val, n_test


def monte_carlo_splits(
    patient_ids: Iterable[str],
    repeats: int = PAPER_REPEATS,
    fractions: Sequence[float] = PAPER_FRACTIONS,
    seed: int = 0,
) -> list[Split]:
    """`repeats` independent random patient partitions into train/val/test.

    `patient_ids` may repeat (one entry per image is fine): the unique IDs are split. The result
    depends only on the set of IDs, `fractions` and `seed`, not on the input order.
    """
    if isinstance(patient_ids, str):
        raise TypeError("patient_ids must be an iterable of IDs, not a single string")
    if not isinstance(repeats, int) or repeats < 1:
        raise SplitError(f"repeats must be a positive integer, got {repeats!r}")
    patients = sorted({str(p) for p in patient_ids})
    if any(p == "" for p in patients):
        raise SplitError("patient_ids contains an empty ID")
    n_train, n_val, _ = split_sizes(len(patients), fractions)
    splits = []
    for repeat in range(repeats):
        s = repeat_seed(seed, repeat)
        order = np.random.default_rng(s).permutation(len(patients))
        chosen = [patients[i] for i in order]
        splits.append(
            Split(
                repeat=repeat,
                seed=s,
                train=tuple(sorted(chosen[:n_train])),
                val=tuple(sorted(chosen[n_train : n_train + n_val])),
                test=tuple(sorted(chosen[n_train + n_val :])),
            )
        )
    return splits


def split_indices(sample_patients: Sequence[str], split: Split) -> dict[str, list[int]]:
    """Sample indices per role, given each sample's patient ID; every sample's patient must be in `split`."""
    roles = {p: "train" for p in split.train} | {p: "val" for p in split.val} | {p: "test" for p in split.test}
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, patient in enumerate(sample_patients):
        role = roles.get(str(patient))
        if role is None:
            raise SplitError(f"sample {i} belongs to a patient that split repeat {split.repeat} does not contain")
        out[role].append(i)
    return out


def splits_to_json(splits: Sequence[Split]) -> str:
    return json.dumps([s.to_dict() for s in splits], indent=2)


def splits_from_json(text: str) -> list[Split]:
    data = json.loads(text)
    if not isinstance(data, list):
        raise SplitError("splits JSON must be a list of split records")
    return [Split.from_dict(d) for d in data]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise SplitError(f"fractions must be (train, val, test), got {tuple(fractions)}")
    f = tuple(float(x) for x in fractions)
    if any(not math.isfinite(x) or x <= 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
        raise SplitError(f"fractions must be three positive numbers summing to 1, got {tuple(fractions)}")
    return f  # type: ignore[return-value]
