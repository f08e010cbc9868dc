import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.splits import (
    Split,
    SplitError,
    monte_carlo_splits,
    split_indices,
    split_sizes,
    splits_from_json,
    splits_to_json,
)

patient_sets = st.sets(st.text(alphabet="ABCDEFGHIJ0123456789", min_size=1, max_size=6), min_size=3, max_size=60)


@settings(max_examples=150, deadline=None)
@given(patients=patient_sets, seed=st.integers(0, 2**32 - 1))
def test_no_patient_is_shared_across_sets_and_all_are_used(patients, seed):
    for split in monte_carlo_splits(patients, repeats=3, seed=seed):
        train, val, test = set(split.train), set(split.val), set(split.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == patients
        assert train and val and test


@settings(max_examples=50, deadline=None)
@given(patients=patient_sets, seed=st.integers(0, 2**32 - 1))
def test_splits_depend_only_on_patient_set_and_seed(patients, seed):
    ordered = sorted(patients)
    a = monte_carlo_splits(ordered, repeats=2, seed=seed)
    b = monte_carlo_splits(list(reversed(ordered)) * 2, repeats=2, seed=seed)
    assert a == b


def test_paper_fractions_give_70_15_15_sizes():
    assert split_sizes(100) == (70, 15, 15)
    assert split_sizes(26) == (18, 4, 4)


def test_repeats_differ_and_seeds_differ():
    splits = monte_carlo_splits([f"P{i:02d}" for i in range(40)], repeats=10, seed=7)
    assert len({s.test for s in splits}) > 1
    assert len({s.seed for s in splits}) == 10
    assert [s.repeat for s in splits] == list(range(10))
    assert monte_carlo_splits([f"P{i:02d}" for i in range(40)], repeats=10, seed=8) != splits


def test_too_few_patients_raises_clear_error():
    with pytest.raises(SplitError, match="2 patient"):
        monte_carlo_splits(["a", "b", "a"], repeats=1)


def test_bad_fractions_are_rejected():
    with pytest.raises(SplitError, match="summing to 1"):
        monte_carlo_splits(["a", "b", "c", "d"], fractions=(0.5, 0.3, 0.3))
    with pytest.raises(SplitError, match="summing to 1"):
        monte_carlo_splits(["a", "b", "c", "d"], fractions=(1.0, 0.0, 0.0))


def test_splits_round_trip_through_json():
    splits = monte_carlo_splits([f"P{i}" for i in range(12)], repeats=3, seed=1)
    assert splits_from_json(splits_to_json(splits)) == splits


def test_json_with_overlapping_sets_is_rejected():
    bad = Split(repeat=0, seed=1, train=("a", "b"), val=("b",), test=("c",)).to_dict()
    with pytest.raises(SplitError, match="two sets"):
        Split.from_dict(bad)


def test_split_indices_maps_samples_by_patient():
    split = Split(repeat=0, seed=1, train=("a", "b"), val=("c",), test=("d",))
    idx = split_indices(["a", "d", "c", "a", "b"], split)
    assert idx == {"train": [0, 3, 4], "val": [2], "test": [1]}
    with pytest.raises(SplitError, match="does not contain"):
        split_indices(["a", "zz"], split)
