"""Drift watch: is the line still showing the model what it was calibrated on.

A model is only as good as the resemblance of today's frames to its calibration images. A
lamp that ages, a lens that fogs or a new supplier's parts shift what the backbone sees long
before the verdicts look wrong. The watch compares a window of recent frames with a baseline
recorded at fit time, with two-sample tests that give p-values (so a false-alarm rate can be
chosen), as Rabanser et al. ("Failing Loudly", 2019) recommend: reduce the embedding (PCA),
then test.

* ``DriftBaseline``: principal axes of the training images' pooled embeddings, and the held-out
  good images' embeddings (in those axes) and raw scores; written into the bundle at fit time.
* ``window_test``: a window against the baseline, one decision at a family-wise level.
* ``DriftState`` and ``step``: hysteresis over consecutive windows.

Everything here is pure (NumPy and SciPy, no I/O), so the daemon decides and tests check
the same functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

#: Share of the training embeddings' variance the kept PCA components must explain.
VARIANCE_KEPT = 0.90
#: Most components kept: each is one more test in the KS path's Bonferroni correction, and the
#: reference sample (tens of images) describes the minor ones too poorly to help.
MAX_COMPONENTS = 16
#: Fewest held-out good images for a baseline (below it none is recorded): with 10, the scores of a
#: 100-frame window must move by a KS distance of about 0.55 (half the probability mass) to reach
#: the family-wise level; fewer images would watch for nothing but gross failures.
MIN_BASELINE = 10
#: Fewest frames ``window_test`` accepts. Power falls fast below it: against 56 reference images, a
#: shift of the scores by one standard deviation is found in 94 % of 50-frame windows, 76 % of
#: 25-frame ones (KS at 0.005, simulated).
MIN_WINDOW = 50
#: The window the daemon should test by default (the benches use it).
DEFAULT_WINDOW = 100
#: Family-wise false-alarm level of one window's decision.
DEFAULT_ALPHA = 0.01
#: Label permutations of the MMD test (its p-value cannot go below ``1 / (MMD_PERMUTATIONS + 1)``).
MMD_PERMUTATIONS = 999
#: Most window frames the MMD test uses (a fixed random subset beyond): its cost grows with the square
#: of the frames (about 45 ms at 500, 600 ms at 2000), its power hardly, since the reference's tens of
#: images bound it (effective sample ``n m / (n + m)``: 50 of at most 56 at 500 frames, 55 at 2000).
MMD_MAX_FRAMES = 500
#: Embedding tests: ``mmd`` (the default) or ``ks`` (per component, Bonferroni); see ``window_test``.
METHODS = ("mmd", "ks")


def pooled_embedding(features: np.ndarray) -> np.ndarray:
    """One frame's backbone features ``[T, C, h, w]`` averaged over every tile and patch: float32 ``[C]``.

    The same expression as ``Engine.score_features``'s ``Score.embedding`` (float32 accumulation
    included), so a baseline fitted from training features matches the embeddings of live frames.
    """
    return features.mean(axis=(0, 2, 3), dtype=np.float32)


@dataclass(frozen=True)
class DriftBaseline:
    """What the line looked like at fit time: the reference sample of every window test.

    The principal axes come from the *training* images' embeddings and the reference sample is the
    held-out calibration images, which the PCA never saw: projected alike, the reference and a
    window of unchanged frames are exchangeable, as a two-sample test assumes. Axes fitted on the
    reference itself overfit it (with tens of images in 152 channels, its in-sample projections
    spread wider than any new frame's): on synthetic data MMD then flagged 52 % of windows without
    drift at p <= 0.01, and per-component KS 0.8 %.

    Power is limited by the reference's size: the bundled sample holds out 24 good images, the
    ball-screw set 56. A KS test at 0.005 finds a shift of the scores by one standard deviation in
    99 % of 100-frame windows against 56 images, but against 24 in 72 % of 50-frame windows, 82 %
    of 100 and 86 % of 200 (simulated): past a point, small shifts need a larger calibration set,
    not a larger window.

    Attributes:
        mean: mean pooled embedding of the training images, float64 ``[C]``.
        components: their top principal axes, unit rows, float64 ``[k, C]``; each row's largest loading is positive.
        explained: share of the training embeddings' variance each component explains, ``[k]``.
        projected: the calibration images' embeddings in component coordinates, float64 ``[n, k]``.
        scores: the calibration images' raw image scores (as an unseen image gets them), float64 ``[n]``.

    """

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    projected: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        k, c = self.components.shape if self.components.ndim == 2 else (-1, -1)
        n = len(self.scores)
        if (self.mean.shape != (c,) or k < 1 or self.explained.shape != (k,) or self.projected.shape != (n, k)
                or self.scores.ndim != 1):
            raise ValueError(f"drift baseline: inconsistent shapes mean {self.mean.shape}, components "
                             f"{self.components.shape}, explained {self.explained.shape}, projected "
                             f"{self.projected.shape}, scores {self.scores.shape}")
        if n < MIN_BASELINE:
            raise ValueError(f"drift baseline: {n} images, at least {MIN_BASELINE} needed")
        for name in ("mean", "components", "explained", "projected", "scores"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"drift baseline: {name} has non-finite values")

    @classmethod
    def fit(cls, train: np.ndarray, embeddings: np.ndarray, scores: np.ndarray) -> DriftBaseline:
        """Principal axes of ``[N, C]`` training embeddings; ``[n, C]`` calibration embeddings and ``[n]`` scores.

        Keeps the fewest components that explain ``VARIANCE_KEPT`` of the training variance, at most
        ``MAX_COMPONENTS`` and at most ``N - 1`` (``N`` points span ``N - 1`` directions).
        """
        t = np.asarray(train, np.float64)
        x = np.asarray(embeddings, np.float64)
        s = np.asarray(scores, np.float64)
        if t.ndim != 2 or len(t) < 2 or x.ndim != 2 or x.shape[1] != t.shape[1] or s.shape != (len(x),):
            raise ValueError(f"drift baseline: training embeddings [N >= 2, C], calibration embeddings [n, C] and "
                             f"scores [n] expected, got {t.shape}, {x.shape} and {s.shape}")
        if len(x) < MIN_BASELINE:
            raise ValueError(f"drift baseline: {len(x)} calibration images, at least {MIN_BASELINE} needed; "
                             "hold out more good images")
        mean = t.mean(axis=0)
        _, sv, vt = np.linalg.svd(t - mean, full_matrices=False)
        variance = sv**2
        if variance.sum() <= 0:
            raise ValueError("drift baseline: the training embeddings are all identical")
        ratio = variance / variance.sum()
        k = int(np.searchsorted(np.cumsum(ratio), VARIANCE_KEPT) + 1)
        k = max(1, min(k, MAX_COMPONENTS, len(t) - 1))
        components = vt[:k]
        signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
        components = components * signs[:, None]
        return cls(mean, components, ratio[:k], (x - mean) @ components.T, s)

    @property
    def size(self) -> int:
        """Calibration images in the baseline."""
        return len(self.scores)

    @property
    def channels(self) -> int:
        """Embedding width ``C`` (the backbone's output channels)."""
        return len(self.mean)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """``[m, C]`` embeddings in the baseline's component coordinates ``[m, k]``."""
        return (np.asarray(embeddings, np.float64) - self.mean) @ self.components.T

    def arrays(self) -> dict[str, np.ndarray]:
        """The baseline as named arrays, as the bundle stores them (``drift/<name>.npy``)."""
        return {"mean": self.mean, "components": self.components, "explained": self.explained,
                "projected": self.projected, "scores": self.scores}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DriftBaseline:
        """The baseline back from ``arrays()`` (raises ``ValueError`` on a missing or inconsistent array)."""
        return cls(**{name: np.asarray(arrays[name], np.float64)
                      for name in ("mean", "components", "explained", "projected", "scores")})

    def describe(self) -> str:
        """One line for the training record."""
        return (f"{self.size} held-out good images in {len(self.explained)} PCA components of {self.channels} "
                f"channels ({self.explained.sum():.0%} of the training images' variance)")


@dataclass(frozen=True)
class WindowResult:
    """One window tested against the baseline.

    The decision is Bonferroni over the two tests (scores, embedding): ``p_value`` is
    ``min(1, 2 * min(score_p, embedding_p))`` and the window is ``significant`` when it is at most
    ``alpha``, so a window of unchanged frames is flagged with probability at most ``alpha``.

    Attributes:
        size: frames in the window.
        baseline_size: calibration images in the baseline.
        method: embedding test, ``ks`` (per component, Bonferroni over them) or ``mmd`` (permutation).
        alpha: family-wise level of the decision.
        p_value: the combined p-value.
        significant: ``p_value <= alpha``.
        score_p: KS two-sample p-value of the raw image scores.
        score_statistic: its KS statistic (largest gap between the two empirical CDFs).
        score_shift: window mean minus baseline mean of the raw scores.
        embedding_p: the embedding test's p-value (``ks``: Bonferroni over the components).
        embedding_statistic: ``ks``: the largest per-component KS statistic; ``mmd``: the squared MMD.
        component: the most shifted component (smallest KS p-value), 0 = the one that explains most.
        component_shift: that component's mean shift in baseline standard deviations.
        cpu_ms: CPU time the test took on its thread (all of it: the appliance runs BLAS single-threaded).

    """

    size: int
    baseline_size: int
    method: str
    alpha: float
    p_value: float
    significant: bool
    score_p: float
    score_statistic: float
    score_shift: float
    embedding_p: float
    embedding_statistic: float
    component: int
    component_shift: float
    cpu_ms: float = field(default=0.0, compare=False)


def window_test(baseline: DriftBaseline, embeddings: np.ndarray, scores: np.ndarray, alpha: float = DEFAULT_ALPHA,
                method: str = "mmd", min_window: int = MIN_WINDOW) -> WindowResult:
    """Test whether a window of ``[m, C]`` pooled embeddings and ``[m]`` raw scores differs from the baseline.

    The scores always get a KS two-sample test. The embedding, in the baseline's components, gets
    an MMD permutation test (whitened by the reference's spread) or, with ``method="ks"``, a KS test
    per component with a Bonferroni correction (for "any component shifted", Holm decides the same).
    MMD is the default because it found more where it mattered (``bench/drift_bench.py``, 100-frame
    windows, alpha 0.01, share of shifted windows flagged): on elpv/poly +5 % brightness 68 % against
    7 % for KS (alarm raised in 47 of 50 runs against 0), +10 % 100 % against 50 %, blur sigma 0.5 px
    92 % against 18 %; on ball screw it lost only at +3 % (83 % against 100 %; raised in 49 of 50
    runs); +20 %, blur 1 and 2 px and every ball-screw shift from +5 % on, both 100 %. It costs
    about 14 ms of CPU per window against 2 to 3 ms, and it is also more sensitive to the small real
    difference between elpv's test and train good images (3 % of unchanged windows flagged against
    0.2 %; no alarm raised with ``raise_after=2``). KS and MMD together (Bonferroni) sat in between
    on poly (48 % at +5 %) and found 99 % at ball-screw +3 %: not worth the second test.

    Raises:
        ValueError: a window shorter than ``min_window``, shapes that do not match the baseline,
            non-finite values, an unknown method or ``alpha`` outside (0, 1).

    """
    from scipy.stats import ks_2samp  # here, not at the top: scipy.stats costs ~1 s and ~70 MB to import, and
    # loading a bundle (which reads the baseline) must not pay that; the first window does, once.

    t0 = time.thread_time()
    x = np.asarray(embeddings, np.float64)
    s = np.asarray(scores, np.float64)
    m = len(s)
    if method not in METHODS:
        raise ValueError(f"unknown drift test {method!r}; use one of {METHODS}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if m < min_window:
        raise ValueError(f"a drift window needs at least {min_window} frames, got {m}; wait for more frames")
    if s.ndim != 1 or x.shape != (m, baseline.channels):
        raise ValueError(f"window: embeddings [{m}, {baseline.channels}] and scores [{m}] expected, got "
                         f"{x.shape} and {s.shape}")
    if not (np.isfinite(x).all() and np.isfinite(s).all()):
        raise ValueError("window: embeddings and scores must be finite")
    score_ks = ks_2samp(s, baseline.scores)
    projected = baseline.project(x)
    per_component = ks_2samp(projected, baseline.projected, axis=0)
    component = int(np.argmin(per_component.pvalue))
    spread = baseline.projected.std(axis=0, ddof=1)
    shift = (projected.mean(axis=0) - baseline.projected.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    if method == "ks":
        k = projected.shape[1]
        embedding_p = min(1.0, k * float(per_component.pvalue[component]))
        embedding_statistic = float(np.max(per_component.statistic))
    else:
        scale = np.where(spread > 0, spread, 1.0)
        rows = np.arange(m) if m <= MMD_MAX_FRAMES else np.sort(
            np.random.default_rng(0).choice(m, MMD_MAX_FRAMES, replace=False))
        embedding_statistic, embedding_p = mmd_test(projected[rows] / scale, baseline.projected / scale)
    p_value = min(1.0, 2.0 * min(float(score_ks.pvalue), embedding_p))
    return WindowResult(
        size=m, baseline_size=baseline.size, method=method, alpha=alpha, p_value=p_value,
        significant=p_value <= alpha, score_p=float(score_ks.pvalue), score_statistic=float(score_ks.statistic),
        score_shift=float(s.mean() - baseline.scores.mean()), embedding_p=embedding_p,
        embedding_statistic=embedding_statistic, component=component, component_shift=float(shift[component]),
        cpu_ms=(time.thread_time() - t0) * 1e3)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = MMD_PERMUTATIONS, seed: int = 0
             ) -> tuple[float, float]:
    """Squared MMD of samples ``[m, d]`` and ``[n, d]`` (Gaussian kernel) and its permutation p-value.

    The bandwidth is the median distance of the pooled sample (unchanged by relabelling, so the
    permutation null stays exact); the statistic is the biased estimate ``a' K a`` with weights
    ``1/m`` and ``-1/n``, so every permutation is one matrix product. A fixed ``seed`` keeps the
    function pure: the same window gives the same p-value.
    """
    z = np.concatenate([x, y])
    sq = np.sum(z**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    median = float(np.median(d2[np.triu_indices(len(z), 1)]))
    kernel = np.exp(-d2 / (median if median > 0 else 1.0))
    m = len(x)
    weights = np.where(np.arange(len(z)) < m, 1.0 / m, -1.0 / len(y))
    rng = np.random.default_rng(seed)
    perms = np.stack([weights] + [rng.permutation(weights) for _ in range(permutations)])
    stats = np.einsum("pi,pi->p", perms @ kernel, perms)
    return float(stats[0]), float((1 + np.sum(stats[1:] >= stats[0])) / (permutations + 1))


@dataclass(frozen=True)
class DriftState:
    """The drift alarm of one camera, after some windows.

    Attributes:
        raised: the alarm is on.
        windows: windows tested so far.
        significant_run: consecutive significant windows ending with the last one.
        clean_run: consecutive clean windows ending with the last one (one of the two runs is 0).
        since: the window (1 = the first) from which the alarm has been in its present state.
        since_time: that window's time, when the caller gave one.
        changed: the last step raised or cleared the alarm.
        last: the last window's result.

    """

    raised: bool = False
    windows: int = 0
    significant_run: int = 0
    clean_run: int = 0
    since: int = 0
    since_time: float | None = None
    changed: bool = False
    last: WindowResult | None = None


def step(state: DriftState, result: WindowResult, raise_after: int = 2, clear_after: int = 2,
         at: float | None = None) -> DriftState:
    """The alarm after one more window (``at``: its time, recorded in ``since_time`` when the alarm changes).

    Raised after ``raise_after`` significant windows in a row, cleared after ``clear_after`` clean ones in a row.

    With a window's false-alarm rate ``alpha`` and independent windows, a false alarm needs
    ``raise_after`` in a row: about ``alpha ** raise_after`` per window.
    """
    if raise_after < 1 or clear_after < 1:
        raise ValueError(f"raise_after and clear_after must be >= 1, got {raise_after} and {clear_after}")
    windows = state.windows + 1
    significant_run = state.significant_run + 1 if result.significant else 0
    clean_run = 0 if result.significant else state.clean_run + 1
    raised = significant_run >= raise_after if not state.raised else clean_run < clear_after
    changed = raised != state.raised
    return DriftState(raised=raised, windows=windows, significant_run=significant_run, clean_run=clean_run,
                      since=windows if changed else state.since, since_time=at if changed else state.since_time,
                      changed=changed, last=result)
