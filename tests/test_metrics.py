"""Every metric against a slow, obviously correct reference written here."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from appliance import metrics
from appliance.metrics import (
    PixelMetrics,
    best_f1_threshold,
    binary_stats,
    format_table,
    image_auroc,
    roc_curve,
    summarise,
)

# --------------------------------------------------------------------------- references


def ref_auroc(labels, scores):
    """Fraction of (defect, good) pairs ranked right, ties half."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def ref_f1(labels, scores, t):
    labels = np.asarray(labels, bool)
    flagged = np.asarray(scores) >= t
    tp = int(np.sum(flagged & labels))
    return 2 * tp / (2 * tp + int(np.sum(flagged & ~labels)) + int(np.sum(~flagged & labels)))


def f16(a):
    return np.clip(np.asarray(a, np.float64), -65504, 65504).astype(np.float16).astype(np.float64)


def flood_fill_regions(mask):
    """8-connected regions of a small bool mask, as lists of (row, col), by breadth-first search."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    regions = []
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            seen[r0, c0] = True
            queue, region = deque([(r0, c0)]), []
            while queue:
                r, c = queue.popleft()
                region.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            queue.append((rr, cc))
            regions.append(region)
    return regions


def ref_pro(maps, masks, max_fpr):
    """PRO by explicit loops over every distinct float16 value as threshold, then trapezoids to max_fpr."""
    maps = [f16(m) for m in maps]
    masks = [np.zeros(m.shape, bool) if k is None else k for m, k in zip(maps, masks, strict=True)]
    regions = []
    for m, k in zip(maps, masks, strict=True):
        for region in flood_fill_regions(k):
            rows, cols = zip(*region, strict=True)
            regions.append(m[list(rows), list(cols)])
    good = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    thresholds = sorted(set(np.concatenate([m.ravel() for m in maps]).tolist()), reverse=True)
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        xs.append(np.mean(good >= t))
        ys.append(np.mean([np.mean(region >= t) for region in regions]))
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < max_fpr:
            y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y) / 2
        break
    return area / max_fpr


def random_images(rng, n, shape=(12, 14), *, decimals=None, offset=0.0):
    """Maps with blob-like masks (some images all good); values shifted up inside defects."""
    maps, masks = [], []
    for i in range(n):
        m = rng.normal(offset, 1.0, shape)
        if i % 3 == 0:
            mask = None
        else:
            mask = rng.random(shape) < 0.12
            r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 5)
            mask[r : r + rng.integers(1, 5), c : c + rng.integers(1, 6)] = True
            m[mask] += rng.uniform(0.0, 2.0)
        if decimals is not None:
            m = np.round(m, decimals)
        maps.append(m.astype(np.float32))
        masks.append(mask)
    return maps, masks


def accumulate(maps, masks):
    acc = PixelMetrics()
    for m, k in zip(maps, masks, strict=True):
        acc.add(m, k)
    return acc


def ref_pixel_auroc(maps, masks):
    labels = np.concatenate(
        [(np.zeros(m.shape, bool) if k is None else k).ravel() for m, k in zip(maps, masks, strict=True)]
    )
    return ref_auroc(labels, np.concatenate([f16(m).ravel() for m in maps]))


# --------------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = rng.integers(0, 6, n) + 0.5 * labels  # few distinct values: many ties
    assert image_auroc(labels, scores) == pytest.approx(ref_auroc(labels, scores), abs=1e-15)
    assert image_auroc(labels.astype(int), scores.tolist()) == image_auroc(labels, scores)


def test_image_auroc_perfect_inverted_and_all_tied():
    labels = [0, 0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.3, 0.4, 0.5]) == 1.0
    assert image_auroc(labels, [0.5, 0.4, 0.3, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [1.0] * 5) == 0.5
    assert image_auroc([False, True], [-np.inf, np.inf]) == 1.0
    assert image_auroc([0, 1], [0.0, -0.0]) == 0.5  # -0.0 ties with +0.0


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both good and defect.*0 good and 3 defect"),
        ([0, 0], [0.1, 0.2], "both good and defect.*2 good and 0 defect"),
        ([0, 1], [0.1], "differ in length"),
        ([0, 2], [0.1, 0.2], "labels must be 0/1"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_image_auroc_rejects_bad_input(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(labels, scores)


def test_mann_whitney_exact_beyond_int64():
    big = 2**40  # 2 * n_pos * n_neg = 2**81: the Python-int path
    assert metrics._auc_from_counts(np.array([big, 0]), np.array([0, big])) == 0.0
    assert metrics._auc_from_counts(np.array([0, big]), np.array([big, 0])) == 1.0
    assert metrics._auc_from_counts(np.array([big, big]), np.array([big, big])) == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_points_and_area(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.5
    scores = np.round(rng.normal(size=60) + labels, 1)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert (fpr[0], tpr[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(thresholds) < 0)
    for f, t, th in zip(fpr[1:], tpr[1:], thresholds[1:], strict=True):
        assert f == pytest.approx(np.mean(scores[~labels] >= th))
        assert t == pytest.approx(np.mean(scores[labels] >= th))
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # linear joins = ties counted half
    assert area == pytest.approx(ref_auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_best_f1_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(80) < 0.3
    labels[0] = True
    scores = np.round(rng.normal(size=80) + 1.5 * labels, 1)
    t, f1 = best_f1_threshold(labels, scores)
    best = max(ref_f1(labels, scores, c) for c in np.unique(scores))
    assert f1 == pytest.approx(best)
    assert ref_f1(labels, scores, t) == pytest.approx(best)
    below, above = scores[scores < t], scores[scores >= t]
    if below.size:  # the midpoint of the gap
        assert t == pytest.approx((below.max() + above.min()) / 2)


def test_best_f1_threshold_hand_cases():
    assert best_f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (0.5, 1.0)
    # Flagging everything wins (F1 2/3 vs 0 or 1/2): no lower score, so the lowest score itself.
    assert best_f1_threshold([1, 0], [0.1, 0.9]) == (0.1, pytest.approx(2 / 3))
    assert best_f1_threshold([1, 1], [0.3, 0.3]) == (0.3, 1.0)
    with pytest.raises(ValueError, match="at least one defect"):
        best_f1_threshold([0, 0], [0.1, 0.2])


def test_binary_stats_hand_case():
    labels = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.7, 0.4, 0.8, 0.9]
    s = binary_stats(labels, scores, 0.5)
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 2, 2, 1)
    assert s["precision"] == 0.5
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert s["false_reject_rate"] == 0.5
    assert s["escape_rate"] == pytest.approx(1 / 3)
    assert binary_stats(labels, scores, 0.7)["fp"] == 1  # score == threshold is flagged


def test_binary_stats_undefined_rates_are_none():
    s = binary_stats([0, 0], [0.1, 0.2], 0.5)
    assert s["precision"] is None and s["recall"] is None and s["f1"] is None and s["escape_rate"] is None
    assert s["false_reject_rate"] == 0.0
    assert binary_stats([], [], 0.5)["tp"] == 0


# --------------------------------------------------------------------------- float16 keys


def test_float16_keys_sort_like_every_float16_value():
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    values = values[np.isfinite(values)].astype(np.float64)  # +-inf are clipped to +-65504
    keys = metrics._float16_keys(values).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(values[order]) >= 0)
    # Equal keys exactly when equal values (+0.0 and -0.0 share one), and keys decode back.
    assert np.array_equal(keys[:, None] == keys[None, ::97], values[:, None] == values[None, ::97])
    assert np.array_equal(metrics._keys_to_values(keys), values)


def test_out_of_range_values_are_clipped():
    keys = metrics._float16_keys(np.array([1e6, np.inf, 65504.0, -1e9, -np.inf, 70000.0]))
    assert keys[0] == keys[1] == keys[2] == keys[5]
    assert keys[3] == keys[4] < keys[2]


# --------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize(("seed", "decimals", "offset"), [(0, None, 0.0), (1, 1, -3.0), (2, 0, 0.0), (3, None, 200.0)])
def test_pixel_auroc_matches_pairwise_count_on_float16_values(seed, decimals, offset):
    maps, masks = random_images(np.random.default_rng(seed), 6, decimals=decimals, offset=offset)
    acc = accumulate(maps, masks)
    assert acc.auroc() == pytest.approx(ref_pixel_auroc(maps, masks), abs=1e-15)


def test_pixel_auroc_perfect_and_inverted():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 3:6] = True
    acc = PixelMetrics()
    acc.add(np.where(mask, 1.0, -1.0), mask)
    assert acc.auroc() == 1.0
    assert acc.pro() == 1.0
    inverted = PixelMetrics()
    inverted.add(np.where(mask, -1.0, 1.0), mask)
    assert inverted.auroc() == 0.0
    assert inverted.pro() == 0.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_pro_matches_explicit_loops(seed, max_fpr):
    maps, masks = random_images(np.random.default_rng(seed), 5, decimals=1 if seed % 2 else None, offset=-0.5)
    acc = accumulate(maps, masks)
    assert acc.pro(max_fpr) == pytest.approx(ref_pro(maps, masks, max_fpr), abs=1e-12)


def test_pro_at_max_fpr_exactly_on_a_curve_point():
    maps, masks = random_images(np.random.default_rng(7), 4)
    acc = accumulate(maps, masks)
    fpr, _, _ = acc.pro_curve()
    on_point = float(fpr[len(fpr) // 3])
    assert acc.pro(on_point) == pytest.approx(ref_pro(maps, masks, on_point), abs=1e-12)


def test_pro_several_regions_of_different_sizes():
    rng = np.random.default_rng(11)
    mask = np.zeros((20, 20), bool)
    mask[1, 1] = True  # 1 pixel
    mask[5:7, 5:7] = True  # 4 pixels
    mask[10:14, 2:7] = True  # 20 pixels
    mask[16, 16] = mask[17, 17] = mask[18, 16] = True  # diagonal touches: one 3-pixel region
    m = rng.random((20, 20)) + 0.8 * mask
    good_map = rng.random((20, 20))
    acc = PixelMetrics()
    acc.add(m, mask)
    acc.add(good_map, None)
    assert acc.counts == metrics.PixelCounts(images=2, good_pixels=800 - 28, defect_pixels=28, regions=4)
    for max_fpr in (0.3, 0.1, 0.77):
        assert acc.pro(max_fpr) == pytest.approx(ref_pro([m, good_map], [mask, None], max_fpr), abs=1e-12)


def test_pro_interpolates_on_a_sloped_segment_by_hand():
    # Ten good pixels 0..9 and one region {7, 2}: the threshold 7 moves FPR 0.2 -> 0.3 and PRO 0 -> 0.5
    # together, so PRO at FPR 0.25 is 0.25; area 0.05 * (0 + 0.25) / 2 = 0.00625, / 0.25 = 0.025.
    m = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 2]], np.float32)
    mask = np.zeros_like(m, bool)
    mask[0, 10:] = True
    acc = PixelMetrics()
    acc.add(m, mask)
    assert acc.pro(0.25) == pytest.approx(0.025, abs=1e-15)
    # Up to FPR 1: pieces 0.05*0.25 + 0.3*0.5 + 0.5*0.25... computed by the reference instead.
    assert acc.pro(1.0) == pytest.approx(ref_pro([m], [mask], 1.0), abs=1e-15)


def test_pro_curve_endpoints():
    maps, masks = random_images(np.random.default_rng(3), 4)
    fpr, pro, thresholds = accumulate(maps, masks).pro_curve()
    assert (fpr[0], pro[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0) and np.all(np.diff(thresholds) < 0)


def test_merge_equals_single_accumulator():
    maps, masks = random_images(np.random.default_rng(5), 9)
    whole = accumulate(maps, masks)
    first, second = accumulate(maps[:4], masks[:4]), accumulate(maps[4:], masks[4:])
    second_before = second.counts
    merged = first.copy().merge(second)
    assert second.counts == second_before
    assert merged.counts == whole.counts
    assert merged.auroc() == whole.auroc()
    assert merged.pro() == pytest.approx(whole.pro(), abs=1e-14)
    assert first.counts.images == 4  # copy() left it alone
    with pytest.raises(TypeError, match="PixelMetrics"):
        first.merge(object())


def test_negative_maps_and_integer_masks():
    maps, masks = random_images(np.random.default_rng(9), 4, offset=-50.0)
    acc = accumulate(maps, [None if k is None else k.astype(np.uint8) * 255 for k in masks])
    assert acc.auroc() == pytest.approx(ref_pixel_auroc(maps, masks), abs=1e-15)
    assert acc.pro() == pytest.approx(ref_pro(maps, masks, 0.3), abs=1e-12)


def test_add_rejects_bad_input_and_changes_nothing():
    acc = PixelMetrics()
    with pytest.raises(ValueError, match=r"mask shape \(4, 5\).*anomaly map shape \(4, 6\)"):
        acc.add(np.zeros((4, 6)), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="2-D"):
        acc.add(np.zeros((2, 4, 6)), None)
    bad = np.zeros((4, 6))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        acc.add(bad, np.ones((4, 6), bool))
    with pytest.raises(ValueError, match="threshold it"):
        acc.add(np.zeros((4, 6)), np.full((4, 6), 0.5))
    assert acc.counts == metrics.PixelCounts(0, 0, 0, 0)


def test_no_defect_pixels_is_an_error():
    acc = PixelMetrics()
    acc.add(np.zeros((4, 4)), None)
    acc.add(np.ones((4, 4)), np.zeros((4, 4), bool))
    assert acc.counts == metrics.PixelCounts(images=2, good_pixels=32, defect_pixels=0, regions=0)
    with pytest.raises(ValueError, match="needs defect pixels"):
        acc.auroc()
    with pytest.raises(ValueError, match="needs defect pixels"):
        acc.pro()
    only_defect = PixelMetrics()
    only_defect.add(np.zeros((2, 2)), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="needs good pixels"):
        only_defect.auroc()
    with pytest.raises(ValueError, match="max_fpr"):
        accumulate(*random_images(np.random.default_rng(0), 3)).pro(0.0)


@pytest.mark.parametrize("seed", range(6))
def test_numpy_labelling_fallback_matches_opencv(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((30, 41)) < [0.05, 0.2, 0.4, 0.5, 0.6, 0.9][seed]
    labels_np, n_np = metrics._label_regions_numpy(mask)
    labels_cv, n_cv = metrics._label_regions(mask)
    assert n_np == n_cv == len(flood_fill_regions(mask))
    assert np.array_equal(labels_np > 0, mask)
    pairs = {(a, b) for a, b in zip(labels_np[mask].tolist(), labels_cv[mask].tolist(), strict=True)}
    assert len(pairs) == n_cv  # the same partition, up to renumbering


# --------------------------------------------------------------------------- standalone loading


def test_loads_by_path_without_cv2_or_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # any `import cv2` now raises ImportError
    spec = importlib.util.spec_from_file_location("metrics_standalone", Path(metrics.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.image_auroc([0, 1, 1], [0.2, 0.1, 0.3]) == 0.5
    maps, masks = random_images(np.random.default_rng(4), 5)
    standalone = module.PixelMetrics()
    for m, k in zip(maps, masks, strict=True):
        standalone.add(m, k)
    packaged = accumulate(maps, masks)
    assert standalone.auroc() == packaged.auroc()
    assert standalone.pro() == pytest.approx(packaged.pro(), abs=1e-14)
    assert "from ." not in Path(metrics.__file__).read_text()


# --------------------------------------------------------------------------- reports


def make_run(rng):
    records, pixels = [], {"good": PixelMetrics(), "scratch": PixelMetrics(), "dent": PixelMetrics()}
    for defect_type, n, shift in (("good", 8, 0.0), ("scratch", 5, 0.6), ("dent", 4, 0.3), ("crack", 3, 0.5)):
        for _ in range(n):
            label = "good" if defect_type == "good" else "defect"
            records.append({"label": label, "defect_type": defect_type, "score": float(rng.random() * 0.6 + shift)})
            if defect_type in pixels:  # "crack" has no masks
                m = rng.random((8, 9))
                mask = None if label == "good" else rng.random((8, 9)) < 0.2
                if mask is not None:
                    m = m + shift * mask
                pixels[defect_type].add(m, mask)
    records.append({"label": "unknown", "defect_type": "unknown", "score": 0.9})
    return records, pixels


def test_summarise_matches_the_metric_functions():
    records, pixels = make_run(np.random.default_rng(21))
    summary = summarise(records, pixels, 0.5)
    json.dumps(summary)  # JSON-serialisable
    known = [r for r in records if r["label"] != "unknown"]
    y = np.array([r["label"] == "defect" for r in known])
    s = np.array([r["score"] for r in known])
    overall = summary["overall"]
    assert (overall["n_good"], overall["n_defect"], overall["n_unknown"]) == (8, 12, 1)
    assert overall["image_auroc"] == pytest.approx(ref_auroc(y, s))
    stats = binary_stats(y, s, 0.5)
    for key in ("f1", "precision", "recall", "false_reject_rate", "escape_rate"):
        assert overall[key] == stats[key]
    everything = pixels["good"].copy().merge(pixels["scratch"]).merge(pixels["dent"])
    assert overall["pixel_auroc"] == everything.auroc()
    assert overall["pro"] == pytest.approx(everything.pro())

    assert sorted(summary["per_type"]) == ["crack", "dent", "scratch"]
    types = np.array([r["defect_type"] for r in known])
    for name, m in summary["per_type"].items():
        sel = types == name
        pair = sel | ~y
        assert m["n"] == sel.sum()
        assert m["image_auroc"] == pytest.approx(ref_auroc(y[pair], s[pair]))
        assert m["recall"] == pytest.approx(np.mean(s[sel] >= 0.5))
    dent = pixels["good"].copy().merge(pixels["dent"])
    assert summary["per_type"]["dent"]["pixel_auroc"] == dent.auroc()
    assert summary["per_type"]["dent"]["pro"] == pytest.approx(dent.pro())
    assert summary["per_type"]["crack"]["pixel_auroc"] is None and summary["per_type"]["crack"]["pro"] is None

    table = format_table(summary)
    lines = table.splitlines()
    assert lines[0].split() == ["type", "n", "img_auroc", "pix_auroc", "pro", "recall"]
    assert [line.split()[0] for line in lines if line.split()[0] in {"crack", "dent", "scratch", "all"}] == [
        "crack",
        "dent",
        "scratch",
        "all",
    ]
    assert "unknown 1" in table


def test_summarise_uncomputable_metrics_are_none():
    records = [
        {"label": "defect", "defect_type": "scratch", "score": 0.7},
        {"label": "unknown", "defect_type": "x", "score": 0.1},
    ]
    summary = summarise(records, None, 0.5)
    json.dumps(summary)
    overall = summary["overall"]
    assert overall["image_auroc"] is None and overall["pixel_auroc"] is None and overall["pro"] is None
    assert overall["false_reject_rate"] is None and overall["recall"] == 1.0
    assert summary["per_type"]["scratch"]["image_auroc"] is None
    assert "-" in format_table(summary)
    empty = summarise([], {}, 0.5)
    assert empty["overall"]["n_good"] == 0 and empty["per_type"] == {}
    format_table(empty)


def test_summarise_rejects_bad_records():
    with pytest.raises(ValueError, match="record 0 lacks key 'score'"):
        summarise([{"label": "good", "defect_type": "good"}], None, 0.5)
    with pytest.raises(ValueError, match="record 0: label 'ok'"):
        summarise([{"label": "ok", "defect_type": "good", "score": 0.1}], None, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        summarise([{"label": "good", "defect_type": "good", "score": float("nan")}], None, 0.5)
