"""Per-side QA: PASS / WARN / FAIL and the reasons, by the rules of `ian_node.segment.qa`."""

import numpy as np
import pytest

from ian_node.segment import qa
from ian_node.segment.qa import Verdict, judge
from ian_node.segment.tract import Tract, empty_tract


def _tract(**changes) -> Tract:
    """A tract that passes every rule, with `changes` applied."""
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[1, 1, 1] = True
    figures = dict(mask=mask, path=np.array([[1, 1, 1]]), gaps_mm=(2.0,), filled=1, components_before=2,
                   components_after=1, length_mm=60.0, mean_probability=0.8)
    return Tract(**{**figures, **changes})


def test_a_clean_tract_passes_with_no_reasons():
    result = judge("right", _tract(), 0.9, 10.0)
    assert result.verdict is Verdict.PASS and result.reasons == ()
    assert (result.gaps, result.longest_gap_mm, result.components, result.length_mm) == (1, 2.0, 2, 60.0)
    assert result.as_json()["verdict"] == "PASS" and result.as_json()["localiser_confidence"] == 0.9


def test_an_empty_side_fails_as_no_nerve_found():
    result = judge("left", empty_tract((4, 4, 4)), None, 10.0)
    assert result.verdict is Verdict.FAIL and result.reasons == ("no nerve found",)


def test_a_gap_left_open_fails_the_side():
    result = judge("left", _tract(components_after=2, gaps_mm=(14.0,), filled=0), None, 10.0)
    assert result.verdict is Verdict.FAIL and "2 pieces" in result.reasons[0]


@pytest.mark.parametrize(("changes", "words"), [
    ({"gaps_mm": (qa.GAP_WARN_MM + 1,)}, "longest gap"),
    ({"gaps_mm": (1.0,) * qa.GAPS_WARN}, "gaps along"),
    ({"components_before": qa.COMPONENTS_WARN + 1}, "components before"),
    ({"length_mm": qa.LENGTH_RANGE_MM[0] - 1}, "outside"),
    ({"length_mm": qa.LENGTH_RANGE_MM[1] + qa.ABOVE_FORAMEN_MM + 1}, "outside"),
    ({"mean_probability": qa.PROBABILITY_WARN - 0.01}, "mean probability"),
])
def test_each_warning_rule_warns_with_its_reason(changes, words):
    result = judge("right", _tract(**changes), None, 10.0)
    assert result.verdict is Verdict.WARN and len(result.reasons) == 1 and words in result.reasons[0]


@pytest.mark.parametrize(("changes", "words"), [
    ({"length_mm": qa.LENGTH_FAIL_MM - 1}, "fragment"),
    ({"mean_probability": qa.PROBABILITY_FAIL - 0.01}, "mean probability"),
])
def test_each_failure_rule_fails_with_its_reason(changes, words):
    result = judge("right", _tract(**changes), None, 10.0)
    assert result.verdict is Verdict.FAIL and words in result.reasons[0]


def test_a_doubtful_localiser_warns_and_no_localiser_is_no_rule():
    assert judge("right", _tract(), qa.CONFIDENCE_WARN - 0.05, 10.0).verdict is Verdict.WARN
    assert judge("right", _tract(), None, 10.0).verdict is Verdict.PASS


def test_failures_come_before_warnings_in_the_reasons():
    result = judge("right", _tract(mean_probability=0.1, components_before=99), 0.55, 10.0)
    assert result.verdict is Verdict.FAIL
    assert "mean probability" in result.reasons[0] and len(result.reasons) == 3


def test_the_docstring_table_states_the_constants():
    low, high = qa.LENGTH_RANGE_MM
    for text in (f"> {qa.GAP_WARN_MM:g} mm", f">= {qa.GAPS_WARN}", f"> {qa.COMPONENTS_WARN}",
                 f"< {low:g} mm or > {high + qa.ABOVE_FORAMEN_MM:g} mm", f"< {qa.LENGTH_FAIL_MM:g} mm",
                 f"< {qa.PROBABILITY_WARN:g}", f"< {qa.PROBABILITY_FAIL:g}", f"< {qa.CONFIDENCE_WARN:g}"):
        assert text in qa.__doc__
