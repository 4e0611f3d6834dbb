"""Scaling of PatchCore's nearest-neighbour search with the memory-bank size, exact against approximate.

Usage::

    python bench/bank_scaling.py --data ../shared/data/bsdata/ball_screw --out bench/results/scaling \
        [--height 256] [--sizes 1e4,3e4,1e5,3e5,1e6] [--threads 2] [--latency-images 30] [--bundle DIR] \
        [--shortlist-images 100] [--flat-test-budget 60] [--max-train N] [--max-test N] [--seed 0]

What it does:

1. Fits a tiny PatchCore bundle (16 train images, 8 calibration images) only to get the
   preprocessing and the compiled backbone (or loads ``--bundle``; its working size then wins
   over ``--height``), and extracts the patch features of every train image (float16 pool,
   ``[T*h*w, C]`` per image) and every test image (float32, ``[T, C, h, w]`` as the backbone
   gives them).
2. For each bank size ``n``: the bank is a **uniform random sample** (seeded) of ``n`` training
   patches, not a coreset: this measures how *search* scales with the bank, not coreset quality.
   Indexes (the reference ones built here with fixed FAISS classes):

   * ``flat``: ``IndexFlatL2``, exact, the reference;
   * ``hnsw16`` / ``hnsw64``: ``IndexHNSWFlat`` M=32 (one build) searched with efSearch 16 / 64;
   * ``ivf``: ``IndexIVFFlat`` with 4*sqrt(n) lists (at least 39 rows per list), nprobe 8;
   * ``ours``: the PatchCore scorer's ``positional`` mode (default shortlists, L=32, radius 1, then certified
     exact refinement in the exact index ``build_index`` makes for ``index="flat"``, whatever class the
     library uses for it), called through ``PatchCore.nearest`` / ``score``; whatever further search
     structures this version's ``fit`` builds after the coreset (its own HNSW stage, a bank k-NN
     graph) are built by the scorer's own ``set_bank``.
     Its shortlists come from ``build_shortlists`` over the nearest bank row of every patch of
     ``--shortlist-images`` training images, found with the ``hnsw`` index at efSearch 64 (so they
     are built the way ``fit`` builds them, but from approximate NN rows instead of the coreset's
     assignment).

   Per index: build time and memory (bytes FAISS serialises; for ``ours`` every FAISS index and
   array the scorer holds: its float32 bank copy, shortlists, and any graph or HNSW); search
   latency per image (median and p95 over ``--latency-images`` seeded-random test images, one
   image at a time, all its patches as one batch of queries, query transposition included, after
   two warm-up searches, or one when a search takes over a second); recall@1 against ``flat`` on
   those images (same row, or a distance within 1e-5 relative); the relative error of the image
   score (max patch NN distance) against ``flat``; and the image AUROC (good vs defect) over the
   whole test set with its change against exact.

Exact test-set scores: ``flat`` on every test image costs seconds per image at 10^6, so it runs on
the whole test set only when its measured latency says that takes at most ``--flat-test-budget``
seconds; otherwise the exact scores are those of ``ours``, whose image scores are first checked to
equal ``flat``'s on the latency images (the script stops if they do not). Approximate indexes are
always scored on the whole test set.

Writes ``scaling.json`` (machine, settings, one row per (n, index)), ``scaling.md``,
``latency_vs_bank.png`` (median search latency against n, log-log, with the backbone-only median
on the same input as a reference line) and ``recall_vs_bank.png`` (recall@1 and image-score error).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, one_line

from appliance import runtime
from appliance.bundle import load_bundle
from appliance.datasets import Dataset, Sample, load_mvtec
from appliance.engine import Engine
from appliance.imaging import read_image
from appliance.metrics import image_auroc
from appliance.preprocess import round_to
from appliance.scorers import PatchCore, create
from appliance.scorers.patchcore_bank import build_shortlists
from appliance.training import FitOptions, fit

#: Search function: features ``[T, C, h, w]`` -> squared NN distance ``[T*h*w]`` and bank row ``[T*h*w]``.
Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

INDEXES = ("flat", "hnsw16", "hnsw64", "ivf", "ours")
LABELS = {"flat": "flat (exact)", "hnsw16": "HNSW32 ef16", "hnsw64": "HNSW32 ef64", "ivf": "IVF nprobe 8",
          "ours": "ours (positional + certified)"}
#: Distances within this relative difference count as ties for recall@1.
TIE_RTOL = 1e-5
#: Largest relative image-score difference accepted between ``ours`` and ``flat`` (float32 rounding:
#: FAISS computes batched distances as |x|^2 + |y|^2 - 2 x.y, the shortlist kernel directly).
EXACT_RTOL = 1e-4
FIT_TRAIN_IMAGES = 16
FIT_CALIBRATION_IMAGES = 8
WARMUP = 2
#: Fewest latency images the exact reference covers, whatever its time budget.
MIN_TIMED = 5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parse_sizes(text: str) -> list[int]:
    return sorted({int(float(v)) for v in text.split(",") if v.strip()})


# --------------------------------------------------------------------------------------------- features
def get_engine(args: argparse.Namespace, ds: Dataset) -> Engine:
    """The bundle's engine: ``--bundle`` loaded, or a tiny fit that only provides preprocessing + backbone."""
    if args.bundle:
        log(f"loading bundle {args.bundle}")
        return load_bundle(args.bundle, threads=args.threads)
    small = Dataset(ds.name, ds.root, ds.train[:FIT_TRAIN_IMAGES], ds.calibration[:FIT_CALIBRATION_IMAGES], ())
    options = FitOptions(scorer="patchcore", settings={"coreset_ratio": 0.01}, height=args.height,
                         threads=args.threads, cache_dir=str(args.out / "cache"))
    log(f"fitting a small bundle ({len(small.train)} train images) for preprocessing + backbone")
    return fit(small, args.out / "bundle", options).engine


def extract(engine: Engine, samples: tuple[Sample, ...], what: str) -> tuple[np.ndarray, float]:
    """Features of every sample, stacked ``[N, T, C, h, w]`` float32; and the seconds it took."""
    t0 = time.perf_counter()
    out = None
    for i, s in enumerate(samples):
        x = engine.features(read_image(s.path))
        if out is None:
            out = np.empty((len(samples), *x.shape), np.float32)
        out[i] = x
        if (i + 1) % 100 == 0:
            log(f"  {what}: {i + 1}/{len(samples)} images")
    return out, time.perf_counter() - t0


def extract_pool(engine: Engine, samples: tuple[Sample, ...]) -> tuple[np.ndarray, float]:
    """Training patches ``[N, T*h*w, C]`` float16 (one image's patches per row block)."""
    t0 = time.perf_counter()
    pool = None
    for i, s in enumerate(samples):
        x = engine.features(read_image(s.path))
        t, c, h, w = x.shape
        if pool is None:
            pool = np.empty((len(samples), t * h * w, c), np.float16)
        pool[i] = x.reshape(t, c, h * w).transpose(0, 2, 1).reshape(-1, c)
        if (i + 1) % 100 == 0:
            log(f"  train: {i + 1}/{len(samples)} images")
    return pool, time.perf_counter() - t0


def backbone_reference(engine: Engine, samples: list[Sample], warmup: int = 3) -> dict:
    """Backbone-only latency (``backbone.infer`` on an already preprocessed batch) on the latency images."""
    batches = [engine.preprocessor.tiles(read_image(s.path)).copy() for s in samples]
    times = []
    for i, b in enumerate([*batches[:warmup], *batches]):
        t0 = time.perf_counter()
        engine.backbone.infer(b)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {**stats_ms(times), "input": list(batches[0].shape), "precision": engine.backbone.precision}


# --------------------------------------------------------------------------------------------- search
def stats_ms(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"median_ms": round(float(np.median(a)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3)}


def index_bytes(index: faiss.Index) -> int:
    """Bytes FAISS writes for ``index`` (what it holds in memory, give or take headers), counted, not copied."""
    count = 0

    def sink(buf: bytes) -> int:
        nonlocal count
        count += len(buf)
        return len(buf)

    writer = faiss.PyCallbackIOWriter(sink)
    faiss.write_index(index, writer)
    del writer
    return count


def scorer_bytes(scorer: PatchCore) -> int:
    """Memory of the scorer's search state: every FAISS index and array it holds."""
    total = 0
    for value in vars(scorer).values():
        if isinstance(value, faiss.Index):
            total += index_bytes(value)
        elif isinstance(value, np.ndarray):
            total += value.nbytes
    return total


def faiss_search(index: faiss.Index) -> Search:
    def run(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t, c, h, w = features.shape
        q = np.ascontiguousarray(features.reshape(t, c, h * w).transpose(0, 2, 1).reshape(-1, c))
        d2, nn = index.search(q, 1)
        return np.maximum(d2[:, 0], 0), nn[:, 0]
    return run


@dataclass
class Run:
    """Results of one index on the test set: per-image squared distances of the timed images, scores of all."""

    seconds: list[float]
    d2: list[np.ndarray]
    nn: list[np.ndarray]
    scores: np.ndarray  # image score per test image (NaN where not searched)
    refined: list[int]
    approx: list[int]


def run_index(search: Search, test: np.ndarray, timed: np.ndarray, rest: np.ndarray | None,
              scorer: PatchCore | None = None, budget: float | None = None) -> Run:
    """Time ``search`` on the ``timed`` test images (one at a time), then score ``rest`` untimed.

    With ``budget`` (seconds), timing stops early once the budget is spent and at least
    ``MIN_TIMED`` images are done: only the first ``len(run.seconds)`` of ``timed`` are searched.
    """
    for _ in range(WARMUP):  # one warm-up is enough when a search takes seconds
        t0 = time.perf_counter()
        search(test[timed[0]])
        if time.perf_counter() - t0 > 1.0:
            break
    run = Run([], [], [], np.full(len(test), np.nan), [], [])
    for i in timed:
        t0 = time.perf_counter()
        d2, nn = search(test[i])
        run.seconds.append(time.perf_counter() - t0)
        run.d2.append(d2)
        run.nn.append(nn)
        run.scores[i] = float(np.sqrt(d2.max()))
        if scorer is not None:
            run.refined.append(scorer.refined_last)
            run.approx.append(getattr(scorer, "approx_last", 0))
        if budget is not None and len(run.seconds) >= MIN_TIMED and sum(run.seconds) > budget:
            break
    for i in rest if rest is not None else ():
        d2, _ = search(test[i])
        run.scores[i] = float(np.sqrt(d2.max()))
    return run


def recall_at_1(run: Run, ref: Run) -> float:
    """Share of the patches of the reference's images whose NN is the reference's (or as near)."""
    hits = total = 0
    k = len(ref.d2)  # the reference may have covered only the first images (its time budget)
    for d2, nn, rd2, rnn in zip(run.d2[:k], run.nn[:k], ref.d2, ref.nn, strict=True):
        d, rd = np.sqrt(d2), np.sqrt(rd2)
        hits += int(((nn == rnn) | (np.abs(d - rd) <= TIE_RTOL * np.maximum(rd, 1e-12))).sum())
        total += nn.size
    return hits / total


def rel_errors(scores: np.ndarray, exact: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(scores) & ~np.isnan(exact)
    return np.abs(scores[ok] - exact[ok]) / np.maximum(exact[ok], 1e-12)


# --------------------------------------------------------------------------------------------- one size
def reference_index(kind: str, bank: np.ndarray) -> faiss.Index:
    """The off-the-shelf FAISS index compared against: ``IndexFlatL2``, ``IndexHNSWFlat`` M=32 or ``IndexIVFFlat``.

    Built here rather than with ``build_index`` so the comparison stays fixed while the library's choice of
    index classes evolves; IVF uses the library's list rule (4*sqrt(n), at least 39 rows per list).
    """
    n, d = bank.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32)
    elif kind == "ivf":
        lists = min(max(1, int(4 * np.sqrt(n))), max(1, n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, lists)
        index.train(bank)
        index.nprobe = 8
    else:
        index = faiss.IndexFlatL2(d)
    index.add(bank)
    return index


def ours_scorer(bank: np.ndarray, hnsw: faiss.Index, pool: np.ndarray, grid: tuple[int, int, int],
                images: np.ndarray) -> tuple[PatchCore, np.ndarray, dict]:
    """A positional PatchCore over ``bank`` (its own flat index); shortlists from hnsw NN rows of ``images``.

    The scorer stores the bank in its own order: its row ``i`` is ``bank[order[i]]``.
    """
    t0 = time.perf_counter()
    hnsw.hnsw.efSearch = 64
    assign = np.empty((len(images), pool.shape[1]), np.int32)
    dmax = 0.0
    for j, i in enumerate(images):
        d2, nn = hnsw.search(pool[i].astype(np.float32), 1)
        assign[j] = nn[:, 0]
        dmax = max(dmax, float(d2.max()))
    t1 = time.perf_counter()
    scorer = create("patchcore", {"index": "flat", "candidates": "positional", "shortlist_radius": 1,
                                  "reweight": False})
    shortlist = build_shortlists(assign, grid, scorer.config.shortlist, scorer.config.shortlist_radius)
    t2 = time.perf_counter()
    order = scorer.install(bank, shortlist)  # the library's own wiring: bank order, exact index, HNSW, graph
    scorer.coverage_radius = float(np.sqrt(max(dmax, 0.0)))  # approximate (hnsw); search does not use it
    parts = {"assign_search_s": round(t1 - t0, 3), "shortlists_s": round(t2 - t1, 3),
             "index_hnsw_graph_s": round(time.perf_counter() - t2, 3)}
    return scorer, order, parts


def measure_size(n: int, pool: np.ndarray, grid: tuple[int, int, int], test: np.ndarray, labels: np.ndarray,
                 timed: np.ndarray, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """All indexes at bank size ``n``: one row each."""
    n_img, per_img, c = pool.shape
    others = np.setdiff1d(np.arange(len(test)), timed)
    t0 = time.perf_counter()
    rows_idx = np.sort(rng.choice(n_img * per_img, n, replace=False))
    bank = np.ascontiguousarray(pool.reshape(-1, c)[rows_idx], np.float32)  # float16 values, as the library's
    log(f"n={n:,}: bank sampled in {time.perf_counter() - t0:.1f} s")
    runs: dict[str, Run] = {}
    info: dict[str, dict] = {}

    def built(kind: str) -> tuple[faiss.Index, dict]:
        t0 = time.perf_counter()
        index = reference_index(kind, bank)
        return index, {"build_s": round(time.perf_counter() - t0, 3), "index_mb": index_bytes(index) / 2**20,
                       "faiss": type(index).__name__}

    # -- flat: the exact reference on the timed images (and on all of them when affordable)
    flat, meta = built("flat")
    info["flat"] = {**meta, "params": {}}
    runs["flat"] = run_index(faiss_search(flat), test, timed, None, budget=args.reference_budget)
    covered = len(runs["flat"].seconds)
    info["flat"]["reference_images"] = covered
    missing = np.flatnonzero(np.isnan(runs["flat"].scores))
    est = float(np.median(runs["flat"].seconds)) * len(missing)
    if est <= args.flat_test_budget:
        for i in missing:
            runs["flat"].scores[i] = float(np.sqrt(faiss_search(flat)(test[i])[0].max()))
        info["flat"]["test_images"] = len(test)
    else:
        info["flat"]["test_images"] = covered
        info["flat"]["note"] = f"whole test set skipped (~{est:.0f} s estimated); exact scores from ours"
    log(f"n={n:,}: flat {np.median(runs['flat'].seconds) * 1e3:.1f} ms/image on {covered} images")
    del flat
    gc.collect()

    # -- hnsw, one build, two search depths
    hnsw, meta = built("hnsw")
    for name, ef in (("hnsw16", 16), ("hnsw64", 64)):
        hnsw.hnsw.efSearch = ef
        runs[name] = run_index(faiss_search(hnsw), test, timed, others)
        info[name] = {**meta, "params": {"M": 32, "efSearch": ef}, "test_images": len(test)}
        log(f"n={n:,}: {name} built in {meta['build_s']:.1f} s, {np.median(runs[name].seconds) * 1e3:.1f} ms/image")

    # -- ours: positional shortlists + certified refinement in the scorer's exact index
    shortlist_imgs = np.sort(rng.choice(n_img, min(args.shortlist_images, n_img), replace=False))
    scorer, order, parts = ours_scorer(bank, hnsw, pool, grid, shortlist_imgs)
    del hnsw
    gc.collect()

    def ours_nearest(features: np.ndarray, scorer: PatchCore = scorer) -> tuple[np.ndarray, np.ndarray]:
        d2, nn = scorer.nearest(features)
        return d2, order[nn]  # back to ``bank`` rows, as the other indexes number them

    runs["ours"] = run_index(ours_nearest, test, timed, others, scorer)
    ours_mb = scorer_bytes(scorer) / 2**20
    info["ours"] = {"build_s": round(sum(parts.values()), 3),
                    "build_parts": {**parts, "hnsw_build_s_not_counted": info["hnsw16"]["build_s"]},
                    "index_mb": ours_mb, "faiss": type(scorer.index).__name__, "test_images": len(test),
                    "params": {"shortlist": scorer.config.shortlist, "radius": scorer.config.shortlist_radius,
                               "shortlist_images": len(shortlist_imgs),
                               "assignment": "hnsw M=32 efSearch 64", "scorer_config": dict(scorer.config.__dict__)},
                    "refined_patches": {"median": float(np.median(runs["ours"].refined)),
                                        "max": int(max(runs["ours"].refined))},
                    "approx_searched_patches": {"median": float(np.median(runs["ours"].approx)),
                                                "max": int(max(runs["ours"].approx))}}
    _, s_ours = scorer.score(test[timed[0]])  # the scorer's own image score agrees with nearest()'s
    if s_ours != runs["ours"].scores[timed[0]]:
        raise SystemExit(f"n={n}: PatchCore.score gives {s_ours} but sqrt(max(nearest)) gives "
                         f"{runs['ours'].scores[timed[0]]}")
    # The certified image scores must equal flat's (up to float32 rounding) before they stand in for exact.
    err = rel_errors(runs["ours"].scores, runs["flat"].scores)
    info["ours"]["exact_check"] = {"images": int(err.size), "max_rel_diff": float(err.max()),
                                   "bit_equal": int((err == 0).sum())}
    if err.max() > EXACT_RTOL:
        raise SystemExit(f"n={n}: the certified positional image scores differ from the flat index's by up to "
                         f"{err.max():.3g} (relative) on {err.size} images; not using them as exact")
    log(f"n={n:,}: ours ({info['ours']['faiss']}) {np.median(runs['ours'].seconds) * 1e3:.1f} ms/image, "
        f"refined {info['ours']['refined_patches']}, image scores = flat's within {err.max():.2g} "
        f"on {err.size} images ({info['ours']['exact_check']['bit_equal']} bit-equal)")
    del scorer, ours_nearest
    gc.collect()

    # -- ivf
    ivf, meta = built("ivf")
    info["ivf"] = {**meta, "params": {"nlist": int(ivf.nlist), "nprobe": 8}, "test_images": len(test)}
    runs["ivf"] = run_index(faiss_search(ivf), test, timed, others)
    log(f"n={n:,}: ivf built in {meta['build_s']:.1f} s, {np.median(runs['ivf'].seconds) * 1e3:.1f} ms/image")
    del ivf
    gc.collect()

    # -- exact reference on the whole test set, then one row per index
    exact_source = "flat" if info["flat"]["test_images"] == len(test) else "ours"
    exact = runs[exact_source].scores
    auroc_exact = image_auroc(labels, exact)
    out = []
    for name in INDEXES:
        r, ref = runs[name], runs["flat"]
        lat_err = rel_errors(r.scores[timed], ref.scores[timed])
        test_err = rel_errors(r.scores, exact)
        auroc = image_auroc(labels, r.scores) if not np.isnan(r.scores).any() else auroc_exact
        row = {"n": n, "index": name, **info[name], **stats_ms(r.seconds), "latency_images": len(timed),
               "timed_images": len(r.seconds),
               "recall_at_1": round(recall_at_1(r, ref), 5),
               "score_rel_err_mean": float(lat_err.mean()), "score_rel_err_max": float(lat_err.max()),
               "test_score_rel_err_mean": float(test_err.mean()), "test_score_rel_err_max": float(test_err.max()),
               "auroc": auroc, "auroc_delta": auroc - auroc_exact, "auroc_exact": auroc_exact,
               "auroc_exact_from": exact_source}
        row["index_mb"] = round(row["index_mb"], 2)
        out.append(row)
    log(f"n={n:,}: exact AUROC {auroc_exact:.4f} (from {exact_source}); peak RSS {peak_rss_mb():.0f} MB")
    return out


# --------------------------------------------------------------------------------------------- outputs
def params_text(row: dict) -> str:
    p = row["params"]
    if row["index"] == "flat" and row["reference_images"] < row["latency_images"]:
        return f"timed on {row['reference_images']} images (budget)"
    if row["index"] == "ivf":
        return f"{p['nlist']} lists"
    if row["index"] == "ours":
        refined = row["refined_patches"]
        cfg = p.get("scorer_config", {})
        graph = f", graph k={cfg['graph_degree']} x{cfg['graph_steps']} steps" if cfg.get("graph_degree") else ""
        return (f"L={p['shortlist']}, r={p['radius']}{graph}, {row['faiss']}; exact-searched "
                f"{refined['median']:.0f} (max {refined['max']})")
    return ""


def write_markdown(path: Path, result: dict) -> None:
    s, bb = result["settings"], result["backbone_reference"]
    lines = [
        "# Search latency and recall against memory-bank size",
        "",
        f"Machine: {one_line(result['machine'])}",
        "",
        f"Input {s['working_size'][0]}x{s['working_size'][1]} ({s['patches_per_image']} patches/image, "
        f"{s['channels']} channels), {s['threads']} threads, latency over {s['latency_images']} test images "
        f"(one at a time, all patches as one batch), AUROC over {s['test_images']} test images. Banks are uniform "
        f"random samples of {s['train_patches']:,} training patches ({s['train_images']} images): this is the "
        "scaling of search, not of coreset quality. Backbone alone on the same input: "
        f"median {bb['median_ms']:.1f} ms, p95 {bb['p95_ms']:.1f} ms. Load average at start "
        f"{s['load_average_at_start']}, at the end {result.get('load_average_now')} (the cores may be shared).",
        "",
        "| bank | index | parameters | build s | MB | median ms | p95 ms | recall@1 | score err mean "
        "| score err max | AUROC | ΔAUROC |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        dagger = "†" if r["index"] == "flat" and r["auroc_exact_from"] != "flat" else ""
        auroc, delta = f"{r['auroc']:.4f}{dagger}", f"{r['auroc_delta']:+.4f}"
        lines.append(f"| {r['n']:,} | {LABELS[r['index']]} | {params_text(r)} | {r['build_s']:.2f} "
                     f"| {r['index_mb']:.1f} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['recall_at_1']:.4f} "
                     f"| {r['score_rel_err_mean']:.2e} | {r['score_rel_err_max']:.2e} | {auroc} | {delta} |")
    lines += [
        "",
        "Score errors and recall@1: against `flat`, on the latency images it covered within its time budget "
        "(`reference_images` in the JSON); score = max patch NN distance. AUROC for `flat` is computed on the "
        "whole test set when that was affordable; otherwise (†) the exact AUROC comes from `ours`, whose image "
        "scores were checked equal to `flat`'s on those latency images "
        f"(relative difference ≤ {EXACT_RTOL:g}; see `exact_check` in the JSON). `ours` searches exactly in the "
        "index `build_index` makes for `index=\"flat\"` (class in the parameters column); its build time is that "
        "index, the shortlists (HNSW assignment search + `build_shortlists`) and whatever else `fit` builds "
        "after the coreset in this version (own HNSW, bank graph; see `build_parts`), not the benchmark's HNSW "
        "it borrowed for the assignment; its memory is every index and array the scorer holds (float32 bank "
        "copy included). Its recall@1 is over "
        "all patches: only the patches that can decide the image score are searched exactly (`exact-searched`); "
        "the others keep the shortlist's upper bound, so a low recall there is by design.",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    bb = result["backbone_reference"]["median_ms"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in INDEXES:
        pts = [(r["n"], r["median_ms"]) for r in rows if r["index"] == name]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[name])
    ax.axhline(bb, color="k", ls="--", lw=1, label=f"backbone only ({bb:.1f} ms, at start)")
    drift = sorted({(r["n"], r["backbone_median_ms_same_size"]) for r in rows if "backbone_median_ms_same_size" in r})
    if drift:
        ax.plot(*zip(*drift, strict=True), color="k", ls=":", marker="x", lw=1, label="backbone only, at each size")
    ax.set(xscale="log", yscale="log", xlabel="bank size (patches)", ylabel="search latency per image, median (ms)",
           title=f"NN search, {result['settings']['patches_per_image']} queries/image, "
                 f"{result['settings']['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_bank.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in INDEXES:
        pts = [(r["n"], r["recall_at_1"], r["score_rel_err_max"]) for r in rows if r["index"] == name]
        if pts:
            n, rec, err = zip(*pts, strict=True)
            a1.plot(n, rec, marker="o", label=LABELS[name])
            a2.plot(n, err, marker="o", label=LABELS[name])
    a1.set(xscale="log", xlabel="bank size (patches)", ylabel="recall@1 vs exact, all patches of an image")
    a2.set(xscale="log", xlabel="bank size (patches)", ylabel="image score, max relative error vs exact")
    a2.set_yscale("symlog", linthresh=1e-6)  # the exact searches' errors are 0 or float32 rounding
    a2.set_ylim(bottom=0)
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall_vs_bank.png", dpi=120)
    plt.close(fig)


def save(out: Path, result: dict) -> None:
    (out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "scaling.md", result)
    if result["rows"]:
        plot(out, result)


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--height", type=int, default=256, help="working height (aspect ratio kept)")
    p.add_argument("--sizes", default="1e4,3e4,1e5,3e5,1e6", help="bank sizes, comma separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-images", type=int, default=30)
    p.add_argument("--shortlist-images", type=int, default=100, help="training images the shortlists come from")
    p.add_argument("--reference-budget", type=float, default=300.0,
                   help="seconds flat may spend on the latency images (at least 5 are done); recall and score "
                        "errors use the images it covered")
    p.add_argument("--flat-test-budget", type=float, default=60.0,
                   help="seconds flat may take on the rest of the test set; beyond, exact scores come from ours")
    p.add_argument("--bundle", type=Path, help="reuse this bundle's preprocessing and backbone instead of fitting")
    p.add_argument("--max-train", type=int, help="use only the first N train images (development)")
    p.add_argument("--max-test", type=int, help="use only N test images, seeded (development)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runtime.configure(args.threads)  # numba.set_num_threads + faiss.omp_set_num_threads
    rng = np.random.default_rng(args.seed)

    ds = load_mvtec(args.data.resolve())
    engine = get_engine(args, ds)
    if args.bundle and engine.spec.size[0] != round_to(args.height):
        log(f"the bundle's working size {engine.spec.size} wins over --height {args.height}")
    train = ds.train[: args.max_train] if args.max_train else ds.train
    test = tuple(s for s in ds.test if s.label in ("good", "defect"))
    if args.max_test and args.max_test < len(test):
        test = tuple(test[i] for i in np.sort(rng.choice(len(test), args.max_test, replace=False)))
    runtime.configure(args.threads)

    log(f"extracting features: {len(train)} train, {len(test)} test images")
    pool, train_s = extract_pool(engine, train)
    test_feats, test_s = extract(engine, test, "test")
    t_count, c, h, w = test_feats.shape[1:]
    grid = (t_count, h, w)
    labels = np.array([s.label == "defect" for s in test])
    timed = np.sort(rng.choice(len(test), min(args.latency_images, len(test)), replace=False))
    latency_samples = [test[i] for i in timed]
    backbone = backbone_reference(engine, latency_samples)
    log(f"features: train {train_s:.0f} s ({pool.nbytes / 2**20:.0f} MB float16), test {test_s:.0f} s; "
        f"backbone alone {backbone['median_ms']:.1f} ms")

    sizes = parse_sizes(args.sizes)
    result = {
        "machine": describe(),
        "settings": {"data": str(args.data), "bundle": str(args.bundle or args.out / "bundle"),
                     "working_size": list(engine.spec.size), "grid": list(grid), "channels": int(c),
                     "patches_per_image": int(t_count * h * w), "threads": args.threads, "sizes": sizes,
                     "train_images": len(train), "train_patches": int(pool.shape[0] * pool.shape[1]),
                     "test_images": len(test), "latency_images": len(timed),
                     "shortlist_images": args.shortlist_images, "flat_test_budget_s": args.flat_test_budget,
                     "reference_budget_s": args.reference_budget,
                     "seed": args.seed, "bank": "uniform random sample of training patches (seeded)",
                     "feature_seconds": {"train": round(train_s, 1), "test": round(test_s, 1)},
                     "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "backbone_reference": backbone,
        "rows": [],
    }
    for n in sizes:
        if n > pool.shape[0] * pool.shape[1]:
            log(f"n={n:,}: more than the {pool.shape[0] * pool.shape[1]:,} training patches; skipped")
            continue
        t0 = time.perf_counter()
        size_rng = np.random.default_rng([args.seed, n])  # each size's bank is the same whatever --sizes lists
        backbone_now = backbone_reference(engine, latency_samples)["median_ms"]  # load on shared cores drifts
        rows = measure_size(n, pool, grid, test_feats, labels, timed, args, size_rng)
        result["rows"] += [{**r, "backbone_median_ms_same_size": backbone_now} for r in rows]
        log(f"n={n:,}: done in {time.perf_counter() - t0:.0f} s")
        result["seconds_total"] = round(time.perf_counter() - t_start, 1)
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        result["load_average_now"] = [round(v, 2) for v in os.getloadavg()]
        save(args.out, result)
    save(args.out, result)
    print(one_line(result["machine"]))
    print((args.out / "scaling.md").read_text())
    log(f"total {time.perf_counter() - t_start:.0f} s, peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
