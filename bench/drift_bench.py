"""Drift watch on real data: false alarms on unchanged frames, detection delay of lighting and focus shifts, CPU.

One bundle per dataset, fitted with the defaults (``appliance fit --scorer padim``, reused from
``--out`` when it is there); its drift baseline is the held-out calibration images of
``train/good``. Frames are ``test/good`` only (never a training image), each scored once per
condition: unchanged, brighter by 1, 2, 3, 5, 10 and 20 % (pixels multiplied, clipped) and
blurred (Gaussian, sigma 0.5, 1 and 2 px). A window is ``--window`` frames drawn at random, without repetition,
from one condition's frames; windows are tested with ``window_test`` (KS on the scores and KS
per PCA component, or MMD on the components) and fed to ``step`` (raised after 2 significant
windows in a row).

* false alarms: ``--null-windows`` windows of unchanged frames, in sequence: the share flagged
  significant and the alarms the hysteresis raises. All windows come from one pool of frames, so
  they are not independent: the share is that of this pool against this baseline.
* detection delay: ``--trials`` runs of windows, unchanged before window ``--onset``, shifted
  from it on: windows from the onset until the alarm is raised (2 is the least with ``raise_after=2``).
* CPU: thread CPU time of one ``window_test``, median.

    .venv/bin/python bench/drift_bench.py --data ../shared/data/bsdata/ball_screw --out bench/results/drift
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe, one_line  # noqa: E402

from appliance import runtime  # noqa: E402
from appliance.bundle import load_bundle, load_drift_baseline  # noqa: E402
from appliance.datasets import list_images  # noqa: E402
from appliance.drift import DEFAULT_ALPHA, DEFAULT_WINDOW, DriftBaseline, DriftState, step, window_test  # noqa: E402
from appliance.imaging import read_image  # noqa: E402

APPLIANCE = Path(sys.executable).parent / "appliance"
#: The issue's shifts (+5, +10, +20 %, blur sigma 2 px) and smaller ones, to find where detection stops.
CONDITIONS = ("none", "bright+1%", "bright+2%", "bright+3%", "bright+5%", "bright+10%", "bright+20%",
              "blur0.5", "blur1", "blur2")
METHODS = ("ks", "mmd")


def shifted(image: np.ndarray, condition: str) -> np.ndarray:
    """The frame as the camera would see it under ``condition``."""
    if condition == "none":
        return image
    if condition.startswith("bright+"):
        top = np.iinfo(image.dtype).max
        gain = 1 + float(condition.removeprefix("bright+").rstrip("%")) / 100
        return np.clip(np.rint(image.astype(np.float32) * gain), 0, top).astype(image.dtype)
    if condition.startswith("blur"):
        return cv2.GaussianBlur(image, (0, 0), sigmaX=float(condition.removeprefix("blur")))
    raise ValueError(condition)


def fitted_bundle(data: Path, out: Path) -> Path:
    """The dataset's bundle with the defaults (PaDiM), fitted once and reused."""
    bundle = out / "bundle"
    if (bundle / "manifest.json").is_file() and json.loads((bundle / "manifest.json").read_text()).get("drift"):
        return bundle
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (out / "fit.log").open("w") as log:
        code = subprocess.run([str(APPLIANCE), "fit", str(data), "--out", str(bundle), "--scorer", "padim", "-q"],
                              stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code:
        raise SystemExit(f"fit exited {code}; see {out / 'fit.log'}")
    print(f"fitted {bundle} in {time.perf_counter() - t0:.0f} s", flush=True)
    return bundle


def frames(bundle: Path, data: Path, out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Pooled embeddings and raw scores of ``test/good`` under every condition (cached in ``out``)."""
    cache = out / "frames.npz"
    if cache.is_file() and all(f"{c}/scores" in (stored := np.load(cache)) for c in CONDITIONS):
        return {c: {"embeddings": stored[f"{c}/embeddings"], "scores": stored[f"{c}/scores"]} for c in CONDITIONS}
    engine = load_bundle(bundle, check_golden=False)
    images = [read_image(p) for p in list_images(data / "test" / "good")]
    result = {}
    t0 = time.perf_counter()
    for condition in CONDITIONS:
        scored = [engine.score(shifted(image, condition)) for image in images]
        result[condition] = {"embeddings": np.stack([s.embedding for s in scored]),
                             "scores": np.array([s.image_score for s in scored])}
    print(f"scored {len(images)} frames x {len(CONDITIONS)} conditions in {time.perf_counter() - t0:.0f} s",
          flush=True)
    np.savez(cache, **{f"{c}/{k}": v for c, d in result.items() for k, v in d.items()})
    return result


def draw(pool: dict[str, np.ndarray], window: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rows = rng.choice(len(pool["scores"]), window, replace=False)
    return pool["embeddings"][rows], pool["scores"][rows]


def false_alarms(baseline: DriftBaseline, pool: dict[str, np.ndarray], method: str, args: argparse.Namespace
                 ) -> dict:
    """Unchanged windows in sequence: share flagged (by each part too), alarms raised, CPU per window."""
    rng = np.random.default_rng(args.seed)
    state, raised, alarms, results = DriftState(), 0, 0, []
    for _ in range(args.null_windows):
        result = window_test(baseline, *draw(pool, args.window, rng), alpha=args.alpha, method=method)
        state = step(state, result)
        results.append(result)
        raised += state.raised
        alarms += state.changed and state.raised
    return {"windows": args.null_windows, "flagged": float(np.mean([r.significant for r in results])),
            "flagged_by_scores": float(np.mean([2 * r.score_p <= args.alpha for r in results])),
            "flagged_by_embedding": float(np.mean([2 * r.embedding_p <= args.alpha for r in results])),
            "raised_share": raised / args.null_windows, "alarms": alarms,
            "median_p": float(np.median([r.p_value for r in results])),
            "cpu_ms_median": float(np.median([r.cpu_ms for r in results])),
            "cpu_ms_p95": float(np.percentile([r.cpu_ms for r in results], 95))}


def delays(baseline: DriftBaseline, pools: dict[str, dict[str, np.ndarray]], condition: str, method: str,
           args: argparse.Namespace) -> dict:
    """Windows from the onset until raised, over ``args.trials`` runs; per-window power after the onset."""
    rng = np.random.default_rng(args.seed + 1)
    found, early, power, score_power, embedding_power = [], 0, [], [], []
    for _ in range(args.trials):
        state = DriftState()
        for w in range(1, args.onset + args.horizon):
            after = w >= args.onset
            result = window_test(baseline, *draw(pools[condition if after else "none"], args.window, rng),
                                 alpha=args.alpha, method=method)
            state = step(state, result)
            if after:
                power.append(result.significant)
                score_power.append(2 * result.score_p <= args.alpha)
                embedding_power.append(2 * result.embedding_p <= args.alpha)
            if state.raised:
                if after:
                    found.append(w - args.onset + 1)
                else:
                    early += 1
                break
    missed = args.trials - len(found) - early
    return {"trials": args.trials, "median_delay": float(np.median(found)) if found else None,
            "p90_delay": float(np.percentile(found, 90)) if len(found) > missed else None,
            "missed": missed, "raised_before_onset": early, "window_power": float(np.mean(power)),
            "score_power": float(np.mean(score_power)), "embedding_power": float(np.mean(embedding_power))}


def run_dataset(data: Path, args: argparse.Namespace) -> dict:
    out = args.out / data.name
    bundle = fitted_bundle(data, out)
    manifest = json.loads((bundle / "manifest.json").read_text())
    baseline = load_drift_baseline(bundle, manifest)
    pools = frames(bundle, data, out)
    n = len(pools["none"]["scores"])
    report = {"data": str(data), "frames": n, "baseline": baseline.describe(), "window": args.window,
              "score_median": {"baseline": float(np.median(baseline.scores)),
                               **{c: float(np.median(p["scores"])) for c, p in pools.items()}},
              "methods": {}}
    for method in METHODS:
        row = {"null": false_alarms(baseline, pools["none"], method, args)}
        for condition in CONDITIONS[1:]:
            row[condition] = delays(baseline, pools, condition, method, args)
        report["methods"][method] = row
        print(json.dumps({"data": data.name, "method": method, **row}), flush=True)
    return report


def markdown(reports: list[dict], machine: dict, args: argparse.Namespace) -> str:
    fmt = (lambda v: "-" if v is None else f"{v:g}")  # noqa: E731
    lines = [f"Machine: {one_line(machine)}", "",
             f"Window {args.window} frames, alpha {args.alpha} (Bonferroni over scores and embedding), raised after "
             f"2 significant windows, cleared after 2 clean ones; {args.null_windows} unchanged windows; "
             f"{args.trials} runs per shift from window {args.onset}, followed for {args.horizon} windows.", ""]
    for rep in reports:
        lines += [f"**{Path(rep['data']).name}**: {rep['frames']} test/good frames; baseline {rep['baseline']}; "
                  "median raw score " + ", ".join(f"{k} {v:.3g}" for k, v in rep["score_median"].items()), "",
                  "| method | condition | windows flagged (scores / embedding) | alarms raised | delay median (p90) "
                  "| missed | CPU ms / window (p95) |", "|---|---|---|---|---|---|---|"]
        for method, row in rep["methods"].items():
            null = row["null"]
            lines.append(f"| {method} | unchanged | {null['flagged']:.3f} ({null['flagged_by_scores']:.3f} / "
                         f"{null['flagged_by_embedding']:.3f}) | {null['alarms']} ({null['raised_share']:.3f} of "
                         f"windows raised) | - | - | {null['cpu_ms_median']:.2f} ({null['cpu_ms_p95']:.2f}) |")
            for condition in CONDITIONS[1:]:
                d = row[condition]
                lines.append(f"| {method} | {condition} | {d['window_power']:.3f} ({d['score_power']:.3f} / "
                             f"{d['embedding_power']:.3f}) | {d['trials'] - d['missed'] - d['raised_before_onset']}"
                             f" of {d['trials']} ({d['raised_before_onset']} before onset) | "
                             f"{fmt(d['median_delay'])} ({fmt(d['p90_delay'])}) | {d['missed']} | - |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, nargs="+", required=True, help="MVTec-layout folders")
    p.add_argument("--out", type=Path, default=HERE / "results" / "drift")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--null-windows", type=int, default=500)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--onset", type=int, default=3, help="first shifted window")
    p.add_argument("--horizon", type=int, default=10, help="windows followed from the onset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runtime.configure(None)  # BLAS single-threaded, as in the appliance: a window's thread CPU time is all of it
    reports = [run_dataset(data.resolve(), args) for data in args.data]
    machine = describe()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"report-w{args.window}.json").write_text(json.dumps({"machine": machine, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "data"},
        "reports": reports}, indent=2) + "\n")
    text = markdown(reports, machine, args)
    (args.out / f"report-w{args.window}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
