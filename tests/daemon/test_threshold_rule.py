"""The threshold rule from operator labels: cost minimised, bounded per day, silent without enough labels."""

from __future__ import annotations

import random

from appliance.daemon.threshold_rule import DEFECT, GOOD, Labelled, LearningConfig, cost, recalibrate

CFG = LearningConfig(min_labels=10, cost_escape=10, cost_false_reject=1, max_step_per_day=0.1)


def labels(goods: list[float], defects: list[float]) -> list[Labelled]:
    return ([Labelled(s, GOOD, f"g{i}") for i, s in enumerate(goods)]
            + [Labelled(s, DEFECT, f"d{i}") for i, s in enumerate(defects)])


def brute_force(labelled: list[Labelled], low: float, high: float) -> float:
    """The least cost over a fine grid of thresholds in [low, high] (the rule must reach it)."""
    grid = [low + (high - low) * i / 2000 for i in range(2001)]
    return min(cost(labelled, t, CFG.cost_escape, CFG.cost_false_reject)[0] for t in grid)


def test_false_rejects_raise_the_threshold_within_the_daily_step():
    data = labels(goods=[0.52, 0.55, 0.57, 0.6, 0.3, 0.35, 0.4, 0.2, 0.25, 0.45], defects=[0.9, 0.95])
    p = recalibrate(data, current=0.5, day_start=0.5, config=CFG)
    assert p is not None and 0.5 < p.threshold <= 0.6 + 1e-9
    assert p.cost_after < p.cost_before and p.cost_after == brute_force(data, 0.4, 0.6)
    assert set(p.label_ids) == {x.label_id for x in data}


def test_an_escape_lowers_the_threshold_and_costs_more_than_false_rejects():
    data = labels(goods=[0.1, 0.15, 0.2, 0.25, 0.3, 0.32, 0.33, 0.34], defects=[0.42, 0.8])
    p = recalibrate(data, current=0.5, day_start=0.5, config=CFG)
    assert p is not None and p.threshold <= 0.42 and p.escapes == 0


def test_the_step_is_bounded_from_the_start_of_the_day():
    data = labels(goods=[0.59, 0.592, 0.594, 0.596, 0.598, 0.1, 0.15, 0.2, 0.25, 0.3], defects=[0.99])
    p = recalibrate(data, current=0.58, day_start=0.5, config=CFG)  # already moved today
    assert p is not None and p.threshold == 0.6  # the optimum is higher; never past day_start + max_step
    assert recalibrate(data, current=0.6, day_start=0.5, config=CFG) is None  # at the bound: nothing more today


def test_nothing_changes_without_enough_labels_or_when_the_threshold_costs_nothing():
    assert recalibrate(labels([0.6, 0.7], [0.9]), current=0.5, day_start=0.5, config=CFG) is None
    clean = labels(goods=[0.1 * i for i in range(1, 5)], defects=[0.6, 0.7, 0.8, 0.9, 0.95, 0.97])
    assert recalibrate(clean, current=0.5, day_start=0.5, config=CFG) is None


def test_the_rule_finds_the_least_cost_on_random_labels():
    rng = random.Random(7)
    for _ in range(50):
        data = labels([rng.uniform(0, 0.8) for _ in range(rng.randint(5, 30))],
                      [rng.uniform(0.3, 1) for _ in range(rng.randint(1, 10))])
        current = rng.uniform(0.3, 0.7)
        p = recalibrate(data, current, current, CFG)
        before = cost(data, current, CFG.cost_escape, CFG.cost_false_reject)[0]
        if p is None:
            continue
        assert abs(p.threshold - current) <= CFG.max_step_per_day + 1e-9
        assert p.cost_after < before
        assert p.cost_after <= brute_force(data, max(0, current - 0.1), min(1, current + 0.1)) + 1e-9
