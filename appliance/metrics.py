"""Evaluating anomaly detection the way the MVTec AD benchmark does.

Image level: exact ROC AUC (Mann-Whitney U, ties counted half), the ROC curve, the
F1-optimal threshold and the confusion counts at a threshold. Pixel level:
``PixelMetrics``, a streaming accumulator of pixel AUROC and PRO (Bergmann et al.,
IJCV 2021) at full mask resolution whose memory does not grow with the images.

Pure NumPy. OpenCV is imported lazily, only for connected components, with a NumPy
fallback, and nothing is imported from the package: a benchmark running in another
environment can load this file by path (``importlib.util.spec_from_file_location``).
Every input error is a ``ValueError`` whose message says what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

LABELS = ("good", "defect", "unknown")
DEFAULT_MAX_FPR = 0.3

_FLOAT16_MAX = 65504.0
_N_KEYS = 1 << 16
_MINUS_ZERO_KEY = 0x7FFF  # key of float16 -0.0; folded onto +0.0 so equal values share a key
_PLUS_ZERO_KEY = 0x8000


# --------------------------------------------------------------------------- image level


def _binary_inputs(labels: Any, scores: Any, *, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.size != s.size:
        raise ValueError(f"labels and scores differ in length: {y.size} labels, {s.size} scores")
    if y.size == 0 and not allow_empty:
        raise ValueError("labels and scores are empty; there is nothing to evaluate")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0/1 or False/True (1 = defect), got values {np.unique(y)[:6]}")
        y = y.astype(bool)
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN (first at index {int(np.flatnonzero(np.isnan(s))[0])}); fix the scorer")
    return y, s


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_defect = int(y.sum())
    if n_defect == 0 or n_defect == y.size:
        raise ValueError(
            f"{what} needs both good and defect samples, got {y.size - n_defect} good and {n_defect} defect"
        )


def _grouped_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores ascending, and how many defect and good samples have each."""
    values, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.ravel()
    pos = np.bincount(inverse[y], minlength=values.size)
    neg = np.bincount(inverse[~y], minlength=values.size)
    return values, pos, neg


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC from per-value counts ordered by ascending value; ties count half.

    Exact: the numerator ``2U`` is summed in integers (Python ints if int64 could overflow)
    and divided once.
    """
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    below = np.cumsum(neg) - neg
    weight = 2 * below + neg  # twice the negatives each positive at this value beats
    den = 2 * n_pos * n_neg
    if den < 2**63:
        num = int(np.dot(pos.astype(np.int64), weight.astype(np.int64)))
    else:
        nz = np.flatnonzero(pos)
        num = sum(int(p) * int(w) for p, w in zip(pos[nz], weight[nz], strict=True))
    return num / den


def image_auroc(labels: Any, scores: Any) -> float:
    """Exact ROC AUC of ``scores`` for ``labels`` (1/True = defect), ties counted half.

    Raises:
        ValueError: if only one class is present, the lengths differ or a score is NaN.

    """
    y, s = _binary_inputs(labels, scores)
    _require_both_classes(y, "image AUROC")
    _, pos, neg = _grouped_counts(y, s)
    return _auc_from_counts(pos, neg)


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` for plots, one per distinct score.

    Point ``i`` predicts defect for ``score >= thresholds[i]``; thresholds descend, and the
    first point is ``(0, 0)`` at ``+inf``. Joining the points linearly gives ``image_auroc``.
    """
    y, s = _binary_inputs(labels, scores)
    _require_both_classes(y, "a ROC curve")
    values, pos, neg = _grouped_counts(y, s)
    tps = np.cumsum(pos[::-1])
    fps = np.cumsum(neg[::-1])
    fpr = np.concatenate(([0.0], fps / fps[-1]))
    tpr = np.concatenate(([0.0], tps / tps[-1]))
    return fpr, tpr, np.concatenate(([np.inf], values[::-1]))


def best_f1_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """Find the threshold ``t`` (defect when ``score >= t``) that maximises F1; return ``(t, F1)``.

    Every cut between adjacent distinct scores is tried. The winning cut (the highest one
    if several tie) is returned as the midpoint of the gap between the lowest score it
    flags and the next lower score, so new data near either side is treated alike. When
    the winner flags every sample, or the midpoint is not representable, the lowest
    flagged score itself is returned.

    Raises:
        ValueError: if there is no defect sample (F1 is then undefined).

    """
    y, s = _binary_inputs(labels, scores)
    n_defect = int(y.sum())
    if n_defect == 0:
        raise ValueError("best F1 threshold needs at least one defect sample, got none")
    values, pos, neg = _grouped_counts(y, s)
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    f1 = 2 * tp / (2 * tp + fp + (n_defect - tp))
    best = int(np.argmax(f1))
    descending = values[::-1]
    threshold = float(descending[best])
    if best + 1 < descending.size:
        lower = float(descending[best + 1])
        mid = 0.5 * threshold + 0.5 * lower
        if math.isfinite(mid) and lower < mid <= threshold:
            threshold = mid
    return threshold, float(f1[best])


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def binary_stats(labels: Any, scores: Any, threshold: float) -> dict[str, int | float | None]:
    """Confusion counts and rates when ``score >= threshold`` is predicted defect.

    Returns ``tp, fp, tn, fn, precision, recall, f1, false_reject_rate`` (good predicted
    defect / good) and ``escape_rate`` (defect predicted good / defects). A rate whose
    denominator is zero is ``None``.
    """
    y, s = _binary_inputs(labels, scores, allow_empty=True)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    flagged = s >= threshold
    tp = int(np.sum(flagged & y))
    fp = int(np.sum(flagged & ~y))
    fn = int(np.sum(~flagged & y))
    tn = int(np.sum(~flagged & ~y))
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "false_reject_rate": _ratio(fp, fp + tn),
        "escape_rate": _ratio(fn, tp + fn),
    }


# --------------------------------------------------------------------------- pixel level


def _float16_keys(values: Any) -> np.ndarray:
    """Round to float16 (clipped to its finite range) and map to uint16 keys that sort like the values.

    Non-negative values get the sign bit set, negative ones have all bits flipped; -0.0 is
    folded onto +0.0. Equal keys mean equal float16 values, so histograms over the keys
    represent the rounded values exactly.
    """
    a = np.asarray(values)
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any():
            raise ValueError("anomaly map contains NaN; fix the scorer (NaN cannot be ranked)")
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64)
    else:
        raise ValueError(f"anomaly map must be a real-valued array, got dtype {a.dtype}")
    bits = np.clip(a, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16).view(np.uint16)
    keys = np.where((bits & 0x8000) != 0, ~bits, bits | 0x8000).astype(np.uint16)
    keys[keys == _MINUS_ZERO_KEY] = _PLUS_ZERO_KEY
    return keys


def _keys_to_values(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys).astype(np.uint16)
    bits = np.where(keys >= 0x8000, keys & 0x7FFF, ~keys).astype(np.uint16)
    return bits.view(np.float16).astype(np.float64)


def _label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected regions of a bool mask: ``(labels, n)`` with 0 = background, 1..n."""
    if not mask.any():
        return np.zeros(mask.shape, np.int32), 0
    try:
        import cv2
    except ImportError:
        return _label_regions_numpy(mask)
    n, labels = cv2.connectedComponents(np.ascontiguousarray(mask).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return labels, n - 1


def _label_regions_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Fallback without OpenCV: union-find over horizontal runs, joining runs 8-adjacent across rows."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; runs come in row-major order, so they pair up
    labels = np.zeros((h, w), np.int32)
    if rows.size == 0:
        return labels, 0
    first = np.searchsorted(rows, np.arange(h + 1)).tolist()
    st, en = starts.tolist(), ends.tolist()
    parent = list(range(rows.size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, h):
        p, p_end = first[r - 1], first[r]
        for i in range(first[r], first[r + 1]):
            while p < p_end and en[p] < st[i]:  # previous-row run entirely left of this one
                p += 1
            k = p
            while k < p_end and st[k] <= en[i]:  # overlaps or touches diagonally
                a, b = find(i), find(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
    _, run_label = np.unique([find(i) for i in range(rows.size)], return_inverse=True)
    for r, s, e, lab in zip(rows.tolist(), st, en, (run_label.ravel() + 1).tolist(), strict=True):
        labels[r, s:e] = lab
    return labels, int(run_label.max()) + 1


def _as_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(
            f"mask shape {m.shape} does not match anomaly map shape {shape}; "
            "resize the map (or the mask, nearest-neighbour) to the same size first"
        )
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"mask must be bool or integer (nonzero = defect), got {m.dtype}; threshold it first")
        m = m != 0
    return m


def _partial_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` from ``x[0]`` to ``x_max``, interpolating ``y`` at ``x_max``.

    ``x`` is non-decreasing and ends at or beyond ``x_max``.
    """
    i = int(np.searchsorted(x, x_max, side="right"))  # x[:i] <= x_max
    area = float(np.sum(np.diff(x[:i]) * (y[1:i] + y[: i - 1]) / 2))
    if i < x.size and x[i - 1] < x_max:
        width = x_max - x[i - 1]
        y_at = y[i - 1] + (y[i] - y[i - 1]) * width / (x[i] - x[i - 1])
        area += float(width * (y[i - 1] + y_at) / 2)
    return area


class PixelCounts(NamedTuple):
    """What a ``PixelMetrics`` has seen: images, good and defect pixels, connected defect regions.

    A named tuple rather than a dataclass: dataclasses with string annotations fail in a module
    loaded by path without being registered in ``sys.modules``.
    """

    images: int
    good_pixels: int
    defect_pixels: int
    regions: int


class PixelMetrics:
    """Streaming pixel AUROC and PRO over many images, in constant memory (about 1.5 MB).

    Each map is rounded to float16 (clipped to +-65504) and counted in 65,536-bin
    histograms keyed by value order: one of good pixels, one of defect pixels, and one of
    defect pixels weighted by 1 / (size of their 8-connected ground-truth region), whose
    cumulative sum is the PRO numerator. Results are exact for the float16-rounded maps
    (relative resolution 2**-11, so maps should not carry a large offset).
    """

    def __init__(self) -> None:
        self._good = np.zeros(_N_KEYS, np.int64)
        self._defect = np.zeros(_N_KEYS, np.int64)
        self._region_weight = np.zeros(_N_KEYS, np.float64)
        self._images = 0
        self._regions = 0

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Count one image: ``anomaly_map`` HxW, ``mask`` bool HxW (True = defect) or None if all good."""
        a = np.asarray(anomaly_map)
        if a.ndim != 2:
            raise ValueError(f"anomaly map must be 2-D (HxW), got shape {a.shape}")
        m = None if mask is None else _as_mask(mask, a.shape)
        keys = _float16_keys(a)
        if m is None or not m.any():
            self._good += np.bincount(keys.ravel(), minlength=_N_KEYS)
            self._images += 1
            return
        labels, n_regions = _label_regions(m)
        defect_keys = keys[m]
        region_of_pixel = labels[m]
        weights = 1.0 / np.bincount(region_of_pixel)[region_of_pixel]
        self._good += np.bincount(keys[~m], minlength=_N_KEYS)
        self._defect += np.bincount(defect_keys, minlength=_N_KEYS)
        self._region_weight += np.bincount(defect_keys, weights=weights, minlength=_N_KEYS)
        self._images += 1
        self._regions += n_regions

    def merge(self, other: PixelMetrics) -> PixelMetrics:
        """Add everything ``other`` has counted to this accumulator (``other`` is unchanged); return self."""
        if not isinstance(other, PixelMetrics):
            raise TypeError(f"can only merge a PixelMetrics, got {type(other).__name__}")
        self._good += other._good
        self._defect += other._defect
        self._region_weight += other._region_weight
        self._images += other._images
        self._regions += other._regions
        return self

    def copy(self) -> PixelMetrics:
        """Return an independent accumulator with the same counts."""
        return PixelMetrics().merge(self)

    @property
    def counts(self) -> PixelCounts:
        """Images, good pixels, defect pixels and connected defect regions counted so far."""
        return PixelCounts(self._images, int(self._good.sum()), int(self._defect.sum()), self._regions)

    def _require_scorable(self, what: str) -> None:
        c = self.counts
        if c.defect_pixels == 0:
            raise ValueError(
                f"{what} needs defect pixels, but none of the {c.images} images added has a non-empty mask"
            )
        if c.good_pixels == 0:
            raise ValueError(f"{what} needs good pixels, but all pixels of the {c.images} images added are defect")

    def auroc(self) -> float:
        """Exact pixel ROC AUC (ties counted half) of the float16-rounded maps."""
        self._require_scorable("pixel AUROC")
        return _auc_from_counts(self._defect, self._good)

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-region-overlap curve ``(fpr, pro, thresholds)`` for plots, one point per distinct value.

        At threshold ``t`` (pixels ``>= t`` flagged), FPR is the flagged fraction of all good
        pixels and PRO the mean over regions of each region's flagged fraction. Thresholds
        descend from ``+inf`` at ``(0, 0)`` to the smallest value at ``(1, 1)``.
        """
        self._require_scorable("PRO")
        present = np.flatnonzero((self._good > 0) | (self._defect > 0))[::-1]
        fpr = np.cumsum(self._good[present]) / self._good.sum()
        overlap = np.cumsum(self._region_weight[present])
        pro = overlap / overlap[-1]  # overlap[-1] is the number of regions up to rounding; this makes the end 1.0
        return (
            np.concatenate(([0.0], fpr)),
            np.concatenate(([0.0], pro)),
            np.concatenate(([np.inf], _keys_to_values(present))),
        )

    def pro(self, max_fpr: float = DEFAULT_MAX_FPR) -> float:
        """Normalised area under the PRO curve up to ``max_fpr``: trapezoids, interpolated at ``max_fpr``."""
        if not 0.0 < max_fpr <= 1.0:
            raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
        fpr, pro, _ = self.pro_curve()
        return _partial_trapezoid(fpr, pro, max_fpr) / max_fpr


def _merged(accumulators: Iterable[PixelMetrics | None]) -> PixelMetrics | None:
    present = [acc for acc in accumulators if acc is not None]
    if not present:
        return None
    total = PixelMetrics()
    for acc in present:
        total.merge(acc)
    return total


def _pixel_metrics_or_none(acc: PixelMetrics | None, max_fpr: float) -> tuple[float | None, float | None]:
    if acc is None:
        return None, None
    c = acc.counts
    if c.defect_pixels == 0 or c.good_pixels == 0:
        return None, None
    return acc.auroc(), acc.pro(max_fpr)


# --------------------------------------------------------------------------- reports


def _image_auroc_or_none(y: np.ndarray, s: np.ndarray) -> float | None:
    return image_auroc(y, s) if 0 < int(y.sum()) < y.size else None


def summarise(
    records: Sequence[Mapping[str, Any]],
    pixel_by_type: Mapping[str, PixelMetrics] | None,
    threshold: float,
    *,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, Any]:
    """Image and pixel metrics of a test run, overall and per defect type, as a JSON-ready dict.

    ``records`` hold ``label`` (good, defect or unknown), ``defect_type`` and ``score``
    (anomalous when ``>= threshold``); unknown records are only counted. The caller keeps
    one ``PixelMetrics`` for the "good" images and one per defect type holding only that
    type's images. A type's pixel metrics use its accumulator merged with the "good" one;
    the overall ones merge all. Metrics that cannot be computed are ``None``.
    """
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    is_defect, scores, types = [], [], []
    n_unknown = 0
    for i, rec in enumerate(records):
        try:
            label, defect_type, score = rec["label"], rec["defect_type"], float(rec["score"])
        except KeyError as exc:
            raise ValueError(f"record {i} lacks key {exc}; each record needs label, defect_type and score") from None
        if label not in LABELS:
            raise ValueError(f"record {i}: label {label!r} is not one of {', '.join(LABELS)}")
        if math.isnan(score):
            raise ValueError(f"record {i}: score is NaN")
        if label == "unknown":
            n_unknown += 1
            continue
        is_defect.append(label == "defect")
        scores.append(score)
        types.append(str(defect_type))
    y = np.array(is_defect, dtype=bool)
    s = np.array(scores, dtype=np.float64)
    t = np.array(types, dtype=object)
    pixels = dict(pixel_by_type or {})

    stats = binary_stats(y, s, threshold)
    pixel_auroc, pro = _pixel_metrics_or_none(_merged(pixels.values()), max_fpr)
    overall = {
        "image_auroc": _image_auroc_or_none(y, s),
        "pixel_auroc": pixel_auroc,
        "pro": pro,
        **{k: stats[k] for k in ("f1", "precision", "recall", "false_reject_rate", "escape_rate")},
        "n_good": int((~y).sum()),
        "n_defect": int(y.sum()),
        "n_unknown": n_unknown,
    }
    per_type = {}
    for name in sorted(set(t[y].tolist())):
        of_type = y & (t == name)
        versus_good = of_type | ~y
        own = pixels.get(name)
        type_pixels = None if own is None else _merged([pixels.get("good"), own])
        type_pixel_auroc, type_pro = _pixel_metrics_or_none(type_pixels, max_fpr)
        per_type[name] = {
            "image_auroc": _image_auroc_or_none(y[versus_good], s[versus_good]),
            "pixel_auroc": type_pixel_auroc,
            "pro": type_pro,
            "recall": float(np.mean(s[of_type] >= threshold)),
            "n": int(of_type.sum()),
        }
    return {"threshold": float(threshold), "pro_max_fpr": float(max_fpr), "overall": overall, "per_type": per_type}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """Render a ``summarise`` result as plain text: one row per defect type, an "all" row, a footer."""
    overall = summary["overall"]
    rows = [
        (name, m["n"], m["image_auroc"], m["pixel_auroc"], m["pro"], m["recall"])
        for name, m in summary["per_type"].items()
    ]
    rows.append(
        (
            "all",
            overall["n_good"] + overall["n_defect"],
            overall["image_auroc"],
            overall["pixel_auroc"],
            overall["pro"],
            overall["recall"],
        )
    )
    width = max(len("type"), *(len(r[0]) for r in rows))
    header = f"{'type':<{width}}  {'n':>6}  {'img_auroc':>9}  {'pix_auroc':>9}  {'pro':>6}  {'recall':>6}"
    lines = [header, "-" * len(header)]
    for i, (name, n, img, pix, pro, recall) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(header))
        lines.append(f"{name:<{width}}  {n:>6}  {_cell(img):>9}  {_cell(pix):>9}  {_cell(pro):>6}  {_cell(recall):>6}")
    lines.append(
        f"threshold {summary['threshold']:.3f}  f1 {_cell(overall['f1'])}  precision {_cell(overall['precision'])}"
        f"  false_reject {_cell(overall['false_reject_rate'])}  escape {_cell(overall['escape_rate'])}"
        f"  good {overall['n_good']}  defect {overall['n_defect']}  unknown {overall['n_unknown']}"
        f"  (pro up to fpr {summary.get('pro_max_fpr', DEFAULT_MAX_FPR):g})"
    )
    return "\n".join(lines)
