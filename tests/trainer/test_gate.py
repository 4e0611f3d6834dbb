"""The gate's decisions on synthetic score sets: pass, refusal by each margin, and what it cannot compare."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.trainer.config import GateConfig
from appliance.trainer.gate import Golden, ModelScores, decide, figures

GOLDEN_OK = Golden(True, [{"file": "golden/00.png", "recorded": 0.1, "here": 0.1}])


def scores(model_id: str, good: list[float], defect: list[float], threshold: float | dict = 0.5,
           source: str = "trainer") -> ModelScores:
    """Scores keyed g0, g1, ... and d0, d1, ..."""
    return ModelScores(model_id, {f"g{i}": s for i, s in enumerate(good)},
                       {f"d{i}": s for i, s in enumerate(defect)}, threshold, source)


GOOD = [0.05 * i for i in range(20)]  # 0.00 .. 0.95: 10 of 20 at or above 0.5: false rejects 0.5
LOW_GOOD = [0.02 * i for i in range(20)]  # 0.00 .. 0.38: no false rejects
DEFECT = [0.6, 0.7, 0.8, 0.9, 0.4]  # one escape of five


def test_figures_match_their_definitions() -> None:
    f = figures(np.array(GOOD), np.full(20, 0.5), np.array(DEFECT), np.full(5, 0.5), min_defect=1)
    assert f.false_reject_rate == pytest.approx(0.5)
    assert f.escape_rate == pytest.approx(0.2)
    # AUROC by counting pairs: a defect above a good counts 1, a tie a half
    pairs = [(d > g) + 0.5 * (d == g) for d in DEFECT for g in GOOD]
    assert f.auroc == pytest.approx(np.mean(pairs))


def test_a_candidate_as_good_as_the_running_model_passes() -> None:
    result = decide(scores("new", LOW_GOOD, DEFECT), scores("old", LOW_GOOD, DEFECT), GateConfig(), GOLDEN_OK, "old")
    assert result.passed, result.reasons
    assert set(result.metrics["checks"]) == {"false_reject_rate", "auroc", "escape_rate"}
    assert all(c["passed"] for c in result.metrics["checks"].values())
    assert result.metrics["golden"]["scores"] == GOLDEN_OK.scores
    assert "gate passed" in result.summary()


def test_refused_by_the_false_reject_margin_and_passed_within_it() -> None:
    # candidate: 1 of 20 good frames at or above 0.5 (0.05) against 0: a margin of 0.02 refuses, 0.05 passes
    cand = scores("new", [*LOW_GOOD[:19], 0.55], DEFECT)
    run = scores("old", LOW_GOOD, DEFECT)
    refused = decide(cand, run, GateConfig(false_reject_margin=0.02), GOLDEN_OK, "old")
    assert not refused.passed
    assert refused.metrics["checks"]["false_reject_rate"] == {
        "passed": False, "candidate": 0.05, "running": 0.0, "margin": 0.02, "limit": 0.02}
    assert "false-reject rate" in refused.reasons[0]
    assert decide(cand, run, GateConfig(false_reject_margin=0.05), GOLDEN_OK, "old").passed  # exactly at the limit


def test_refused_by_the_escape_margin() -> None:
    cand = scores("new", LOW_GOOD, [0.6, 0.7, 0.8, 0.45, 0.4])  # two escapes of five
    run = scores("old", LOW_GOOD, DEFECT)  # one
    result = decide(cand, run, GateConfig(escape_margin=0.0, auroc_margin=1.0), GOLDEN_OK, "old")
    assert not result.passed
    assert [k for k, c in result.metrics["checks"].items() if not c["passed"]] == ["escape_rate"]
    assert decide(cand, run, GateConfig(escape_margin=0.2, auroc_margin=1.0), GOLDEN_OK, "old").passed


def test_refused_by_the_auroc_margin() -> None:
    # same verdicts at 0.5 (no false rejects, one escape), but the candidate ranks two defects below good frames
    cand = scores("new", LOW_GOOD, [0.6, 0.7, 0.8, 0.01, 0.0])
    run = scores("old", LOW_GOOD, [0.6, 0.7, 0.8, 0.9, 0.39])
    result = decide(cand, run, GateConfig(auroc_margin=0.01, escape_margin=1.0), GOLDEN_OK, "old")
    assert not result.passed
    assert [k for k, c in result.metrics["checks"].items() if not c["passed"]] == ["auroc"]
    assert result.metrics["candidate"]["auroc"] < result.metrics["running"]["auroc"] - 0.01
    assert decide(cand, run, GateConfig(auroc_margin=0.5, escape_margin=1.0), GOLDEN_OK, "old").passed


def test_without_enough_defects_auroc_and_escapes_are_not_compared_and_it_says_so() -> None:
    cand = scores("new", LOW_GOOD, [0.1])  # the one defect would be an escape
    run = scores("old", LOW_GOOD, [0.9])
    result = decide(cand, run, GateConfig(min_eval_defect=2), GOLDEN_OK, "old")
    assert result.passed, result.reasons
    assert set(result.metrics["checks"]) == {"false_reject_rate"}
    assert result.metrics["candidate"]["auroc"] is None and result.metrics["candidate"]["escape_rate"] is None
    assert any("AUROC and escape rate not compared" in n for n in result.metrics["notes"])
    no_defects = decide(scores("new", LOW_GOOD, []), scores("old", LOW_GOOD, []), GateConfig(), GOLDEN_OK, "old")
    assert no_defects.passed and any("not compared" in n for n in no_defects.metrics["notes"])


def test_too_few_good_frames_or_a_golden_mismatch_refuse() -> None:
    few = decide(scores("new", LOW_GOOD[:5], DEFECT), scores("old", LOW_GOOD[:5], DEFECT), GateConfig(),
                 GOLDEN_OK, "old")
    assert not few.passed and "5 held-out good frames, 10 needed" in few.reasons[0]
    bad = Golden(False, [], "golden image golden/00.png scores 0.3 here but 0.1 when built")
    golden = decide(scores("new", LOW_GOOD, DEFECT), scores("old", LOW_GOOD, DEFECT), GateConfig(), bad, "old")
    assert not golden.passed and "golden images" in golden.reasons[0]
    assert golden.metrics["golden"]["passed"] is False


def test_an_unknown_running_model_refuses_and_no_running_model_passes_alone() -> None:
    unknown = decide(scores("new", LOW_GOOD, DEFECT), None, GateConfig(), GOLDEN_OK, "old")
    assert not unknown.passed and "old" in unknown.reasons[0]
    first = decide(scores("new", LOW_GOOD, DEFECT), None, GateConfig(), GOLDEN_OK, None)
    assert first.passed and first.metrics["running"] is None
    assert "no running model" in first.metrics["notes"][-1]


def test_appliance_scores_compare_on_their_frames_with_their_own_thresholds() -> None:
    cand = scores("new", LOW_GOOD, DEFECT)
    # the appliance scored 15 of the good frames, judged by thresholds it had lowered to 0.3 for some of them
    recorded = {f"g{i}": s for i, s in enumerate(LOW_GOOD) if i < 15}
    thresholds = {k: (0.3 if k in ("g14", "g13") else 0.5) for k in [*recorded, *[f"d{i}" for i in range(5)]]}
    run = ModelScores("old", recorded, {f"d{i}": s for i, s in enumerate(DEFECT)}, thresholds, "appliance")
    result = decide(cand, run, GateConfig(), GOLDEN_OK, "old")
    assert result.metrics["candidate"]["n_good"] == result.metrics["running"]["n_good"] == 15
    assert result.metrics["running"]["false_reject_rate"] == pytest.approx(0.0)  # 0.26, 0.28 < 0.3
    assert result.metrics["running"]["scores_from"] == "appliance"
    assert any("appliance recorded" in n for n in result.metrics["notes"])
    assert any("of 20 and 5" in n for n in result.metrics["notes"])
    assert result.passed
