"""Recalibrating a camera's threshold from operator labels: a pure rule, no I/O, no clock of its own.

The rule: over the recent labelled frames of a camera (or of one shift), the threshold is the one
that minimises the cost ``cost_escape * escapes + cost_false_reject * false_rejects``, where an
escape is a frame labelled ``defect`` that scores below the threshold and a false reject a frame
labelled ``good`` at or above it. Ties go to the candidate nearest the current threshold. It acts
only with at least ``min_labels`` labels and only when the current threshold costs something
(a label disagrees with it). The step is bounded: the result stays within ``max_step`` of the
threshold at the start of the day, so one click, or one bad hour, cannot swing it. An operator's
own threshold is a pin: the daemon does not call the rule for a camera or shift that has one.

Frames whose false reject was already learned into the memory bank (PatchCore) are left out by
the caller: the bank fixed them, so their old score no longer says anything about the threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

GOOD, DEFECT = "good", "defect"


class LearningConfig(BaseModel):
    """The ``[learning]`` section: how labels change the model and the threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bank: bool = Field(True, description="a PatchCore false reject labelled good goes into the live memory bank")
    margin: float = Field(0.05, ge=0, le=0.45, description="a learned false reject must then score this far below "
                                                           "the threshold in force (normalised scale)")
    recalibrate: bool = Field(True, description="recalibrate thresholds per camera and shift from the labels")
    cost_escape: float = Field(10.0, gt=0, description="cost of a defect passed as OK")
    cost_false_reject: float = Field(1.0, gt=0, description="cost of a good part rejected")
    min_labels: int = Field(20, ge=2, description="labels (not learned into the bank) needed before the rule acts")
    max_step_per_day: float = Field(0.05, gt=0, le=0.5, description="how far the rule may move a threshold from "
                                                                    "where it stood at the start of the day")
    window_days: float = Field(30.0, gt=0, description="labels older than this are not used")


@dataclass(frozen=True)
class Labelled:
    """One labelled frame: its normalised score, the operator's label, and the label's id."""

    score: float
    label: str
    label_id: str


@dataclass(frozen=True)
class Proposal:
    """A new threshold, what it costs against the current one, and the labels it came from."""

    threshold: float
    previous: float
    cost_before: float
    cost_after: float
    escapes: int
    false_rejects: int
    label_ids: tuple[str, ...]


def cost(labelled: Sequence[Labelled], threshold: float, cost_escape: float, cost_false_reject: float
         ) -> tuple[float, int, int]:
    """``(cost, escapes, false rejects)`` of ``threshold`` on the labels (NG when score >= threshold)."""
    escapes = sum(1 for x in labelled if x.label == DEFECT and x.score < threshold)
    false_rejects = sum(1 for x in labelled if x.label == GOOD and x.score >= threshold)
    return cost_escape * escapes + cost_false_reject * false_rejects, escapes, false_rejects


def recalibrate(labelled: Sequence[Labelled], current: float, day_start: float, config: LearningConfig
                ) -> Proposal | None:
    """The threshold the labels ask for (see the module docstring), or ``None`` when nothing should change."""
    if len(labelled) < config.min_labels:
        return None
    before, _, _ = cost(labelled, current, config.cost_escape, config.cost_false_reject)
    if before == 0:
        return None
    scores = sorted({round(x.score, 6) for x in labelled})
    candidates = {current} | {(a + b) / 2 for a, b in itertools.pairwise(scores)}
    candidates |= {scores[0] - 1e-3, scores[-1] + 1e-3}
    low, high = max(0.0, day_start - config.max_step_per_day), min(1.0, day_start + config.max_step_per_day)
    bounded = {min(high, max(low, c)) for c in candidates}
    best = min(bounded, key=lambda t: (cost(labelled, t, config.cost_escape, config.cost_false_reject)[0],
                                       abs(t - current)))
    after, escapes, false_rejects = cost(labelled, best, config.cost_escape, config.cost_false_reject)
    if after >= before or abs(best - current) < 1e-4:
        return None
    return Proposal(min(high, max(low, round(best, 4))), current, before, after, escapes, false_rejects,
                    tuple(x.label_id for x in labelled))
