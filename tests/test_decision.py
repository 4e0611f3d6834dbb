"""``decide``: a pure function of the normalised score and the threshold in force."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.decision import DEFAULT_THRESHOLD, decide


def test_at_the_threshold_is_ng_and_below_is_ok() -> None:
    assert decide(0.5).anomalous and decide(0.5).verdict == "ng"
    assert not decide(0.4999).anomalous and decide(0.4999).verdict == "ok"
    assert decide(0.7, 0.8).verdict == "ok" and decide(0.3, 0.2).verdict == "ng"


def test_the_threshold_and_its_source_are_recorded() -> None:
    d = decide(0.61, 0.6, "shift:A")
    assert (d.score, d.threshold, d.threshold_source) == (0.61, 0.6, "shift:A")
    assert decide(0.1).threshold == DEFAULT_THRESHOLD == 0.5 and decide(0.1).threshold_source == "bundle"


@pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan")])
def test_a_threshold_outside_0_1_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        decide(0.5, threshold)


@given(st.floats(0, 1), st.floats(0, 1))
def test_verdict_is_score_at_or_above_threshold(score: float, threshold: float) -> None:
    assert decide(score, threshold).anomalous == (score >= threshold)
