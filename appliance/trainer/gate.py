"""The gate: a rebuilt model is published only if it is not worse than the running one on held-out production frames.

Pure functions of scores: the rebuild job scores the dataset version's eval frames (``eval_good`` and
``eval_defect``) with both models and hands the normalised scores here, with each model's threshold (the
candidate's calibrated 0.5; the running model's as the appliance applied it, frame by frame). Both models are
judged on the same frames only (the frames both have a score for), so a running model whose scores the
appliance recorded for part of the frames is not compared on a different set. Each check compares the
candidate with the running model within ``GateConfig``'s margins; the result carries every figure that
decided, for the catalogue's evaluation record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import image_auroc
from .config import GateConfig

#: Float noise allowed when a figure sits exactly at its limit.
_EPS = 1e-9


@dataclass(frozen=True)
class ModelScores:
    """One model's normalised scores on the eval frames, by inspection id, and the threshold it judges them by.

    Attributes:
        model_id: the model's id.
        good: scores of held-out good frames.
        defect: scores of frames labelled defect.
        threshold: one normalised threshold, or one per inspection id (as the appliance applied it).
        source: where the scores come from (``trainer``: scored here with its bundle; ``appliance``: as recorded).

    """

    model_id: str
    good: Mapping[str, float]
    defect: Mapping[str, float]
    threshold: float | Mapping[str, float] = 0.5
    source: str = "trainer"

    def restricted(self, good: list[str], defect: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scores and thresholds of the given frames: ``(good, good thresholds, defect, defect thresholds)``."""
        def thresholds(ids: list[str]) -> np.ndarray:
            if isinstance(self.threshold, Mapping):
                return np.array([self.threshold[i] for i in ids], np.float64)
            return np.full(len(ids), float(self.threshold))
        return (np.array([self.good[i] for i in good], np.float64), thresholds(good),
                np.array([self.defect[i] for i in defect], np.float64), thresholds(defect))


@dataclass(frozen=True)
class Golden:
    """The candidate bundle's golden images re-scored on this trainer's runtime (``load_bundle``'s check)."""

    passed: bool
    scores: list[dict[str, Any]] = field(default_factory=list)  # {"file", "recorded", "here"}
    detail: str = ""


@dataclass(frozen=True)
class Figures:
    """What one model does on the compared frames."""

    n_good: int
    n_defect: int
    false_reject_rate: float | None
    escape_rate: float | None
    auroc: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded for people (6 decimals)."""
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 6)
        return {"n_good": self.n_good, "n_defect": self.n_defect, "false_reject_rate": r(self.false_reject_rate),
                "escape_rate": r(self.escape_rate), "auroc": r(self.auroc)}


@dataclass(frozen=True)
class GateResult:
    """The verdict, why (one line per failed check or missing figure), and the metrics record."""

    passed: bool
    reasons: list[str]
    metrics: dict[str, Any]

    def summary(self) -> str:
        """One line for a job's detail: the verdict and the figures that decided."""
        cand, run = self.metrics["candidate"], self.metrics.get("running")
        parts = []
        for key, name in (("auroc", "AUROC"), ("false_reject_rate", "false rejects"), ("escape_rate", "escapes")):
            if cand.get(key) is not None:
                theirs = f" vs {run[key]:.3f}" if run and run.get(key) is not None else ""
                parts.append(f"{name} {cand[key]:.3f}{theirs}")
        frames = f"on {cand['n_good']} good + {cand['n_defect']} defect frames"
        verdict = "gate passed" if self.passed else "gate refused: " + "; ".join(self.reasons)
        return f"{verdict} ({', '.join(parts)} {frames})" if parts else f"{verdict} ({frames})"


def figures(good: np.ndarray, good_thr: np.ndarray, defect: np.ndarray, defect_thr: np.ndarray,
            min_defect: int) -> Figures:
    """False-reject rate (good at or above its threshold), escape rate (defects below) and image AUROC.

    Escapes and AUROC need ``min_defect`` defect frames (and at least one); below that they are ``None``.
    """
    with_defects = defect.size >= max(min_defect, 1)
    frr = float(np.mean(good >= good_thr)) if good.size else None
    escape = float(np.mean(defect < defect_thr)) if with_defects else None
    auroc = None
    if with_defects and good.size:
        labels = np.r_[np.zeros(good.size, bool), np.ones(defect.size, bool)]
        auroc = image_auroc(labels, np.r_[good, defect])
    return Figures(int(good.size), int(defect.size), frr, escape, auroc)


def _check(name: str, ours: float | None, theirs: float | None, margin: float, higher_is_better: bool
           ) -> tuple[dict[str, Any], str | None]:
    """One comparison within a margin: its record, and the reason it failed (or ``None``)."""
    limit = theirs - margin if higher_is_better else theirs + margin
    ok = ours >= limit - _EPS if higher_is_better else ours <= limit + _EPS
    record = {"passed": ok, "candidate": round(ours, 6), "running": round(theirs, 6), "margin": margin,
              "limit": round(limit, 6)}
    word = "below" if higher_is_better else "above"
    return record, None if ok else f"{name} {ours:.4f} is {word} the running model's {theirs:.4f} by more than {margin}"


def decide(candidate: ModelScores, running: ModelScores | None, config: GateConfig, golden: Golden,
           running_model_id: str | None = None) -> GateResult:
    """Whether ``candidate`` may replace the running model, with the figures that decided.

    Args:
        candidate: the rebuilt model's scores (every eval frame).
        running: the running model's scores, or ``None`` when they are unknown.
        config: the margins and the frame counts needed.
        golden: the candidate's golden-image parity on this runtime.
        running_model_id: the camera's running model; when it is set but ``running`` is ``None`` the
            candidate cannot be compared and is refused (an unknown model is not beaten by default).

    """
    reasons: list[str] = []
    notes: list[str] = []
    good_ids = sorted(candidate.good)
    defect_ids = sorted(candidate.defect)
    if running is not None:
        good_ids = [i for i in good_ids if i in running.good]
        defect_ids = [i for i in defect_ids if i in running.defect]
        if len(good_ids) < len(candidate.good) or len(defect_ids) < len(candidate.defect):
            notes.append(f"compared on the {len(good_ids)} good and {len(defect_ids)} defect eval frames the running "
                         f"model has scores for (of {len(candidate.good)} and {len(candidate.defect)})")
        if running.source == "appliance":
            notes.append("the running model's scores are those the appliance recorded (its bundle is not here)")
    ours = figures(*candidate.restricted(good_ids, defect_ids), config.min_eval_defect)
    theirs = figures(*running.restricted(good_ids, defect_ids), config.min_eval_defect) if running else None

    checks: dict[str, Any] = {}
    if not golden.passed:
        reasons.append(f"golden images do not score as recorded on this runtime: {golden.detail}")
    if len(good_ids) < config.min_eval_good:
        reasons.append(f"{len(good_ids)} held-out good frames, {config.min_eval_good} needed to evaluate")
    if ours.escape_rate is None:
        notes.append(f"{len(defect_ids)} labelled defect frames ({config.min_eval_defect} needed): AUROC and escape "
                     "rate not compared")
    if running is None and running_model_id is not None:
        reasons.append(f"the running model {running_model_id}'s scores on the eval frames are unknown (its bundle "
                       "is not here and the appliance recorded none)")
    elif running is None:
        notes.append("the camera has no running model: nothing to compare with")
    elif theirs is not None and good_ids:
        comparisons = [("false_reject_rate", "false-reject rate", config.false_reject_margin, False)]
        if ours.escape_rate is not None:
            comparisons += [("auroc", "image AUROC", config.auroc_margin, True),
                            ("escape_rate", "escape rate", config.escape_margin, False)]
        for key, name, margin, higher in comparisons:
            checks[key], reason = _check(name, getattr(ours, key), getattr(theirs, key), margin, higher)
            if reason:
                reasons.append(reason)
    metrics = {
        "candidate": ours.as_dict() | {"model_id": candidate.model_id},
        "running": None if theirs is None else theirs.as_dict() | {"model_id": running.model_id,
                                                                   "scores_from": running.source},
        "checks": checks,
        "golden": {"passed": golden.passed, "scores": golden.scores, "detail": golden.detail},
        "margins": config.model_dump(),
        "notes": notes,
        "reasons": reasons,
    }
    return GateResult(not reasons, reasons, metrics)
