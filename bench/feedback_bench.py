"""Operator feedback into a PatchCore bank: label -> effect latency, rows per label, forget, scores that move.

    .venv/bin/python bench/feedback_bench.py --data ../shared/data/bsdata/ball_screw --out bench/results/feedback \
        [--labels 100] [--threads 2]

A PatchCore bundle is fitted at 256x624 with the defaults (coreset 10 %: about 125k rows) once and
reused from ``--out``. Three parts, on one engine:

1. *How scores move*: good test images under a lighting change (gain 1.15) that the model rejects
   (false rejects) are learned one at a time with the daemon's target (0.45, the bundle's threshold
   less a margin); each one's score and its near-duplicates' (3 % brighter or darker, moved 2 px,
   sensor noise, gains 1.12 and 1.18) before and after, and how many other lit images stop being
   rejected; then it is forgotten again (forget time with nothing else learned).
2. *Label to effect*: a thread runs ``predict_stream`` (depth 2) over good frames without pause, the
   labelled part's frame every other one. Each label is ``learn_good`` on a good test image under the
   lighting change: with target 0.45 when it is a false reject at the time, otherwise with a target
   one logit below its score. The effect is the first frame of that part the stream thread judges
   below the target (frames scored before the rows went in score above it): the time from the call
   to that result, over ``--labels`` labels, which accumulate as they would in a day.
3. *Forget* at the end (an entry from the middle: the others are replayed), and the defects: test
   images with pitting that are still rejected, and image AUROC, before and after the labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe, one_line  # noqa: E402

from appliance.bundle import load_bundle  # noqa: E402
from appliance.datasets import load_mvtec  # noqa: E402
from appliance.engine import Engine  # noqa: E402
from appliance.imaging import read_image  # noqa: E402
from appliance.metrics import image_auroc  # noqa: E402
from appliance.training import FitOptions, fit  # noqa: E402
from appliance.types import Frame  # noqa: E402

#: The daemon's target: the bundle's threshold (0.5) less a margin.
TARGET = 0.45
GAIN = 1.15


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bundle_at(args: argparse.Namespace) -> Path:
    """The bench's bundle, fitted once at 256x624 with the defaults."""
    path = args.out / "bundle"
    if not (path / "manifest.json").is_file():
        log(f"fitting a PatchCore bundle at 256 px high (defaults) into {path}: about a minute")
        t0 = time.perf_counter()
        fit(load_mvtec(args.data), path, FitOptions(height=256, threads=args.threads,
                                                   cache_dir=str(args.out / "cache")))
        log(f"  fitted in {time.perf_counter() - t0:.0f} s")
    return path


def lit(image: np.ndarray, gain: float = GAIN) -> np.ndarray:
    return np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def near_duplicates(good: np.ndarray) -> dict[str, np.ndarray]:
    """The labelled frame's part a moment later (from the good image ``good`` under the lighting change)."""
    image = lit(good)
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    moved = cv2.warpAffine(image, np.float32([[1, 0, 2], [0, 1, 1]]), (w, h), borderMode=cv2.BORDER_REPLICATE)
    return {"brighter 3%": lit(image, 1.03), "darker 3%": lit(image, 0.97), "moved 2 px": moved,
            "noise": np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8),
            "gain 1.12": lit(good, 1.12), "gain 1.18": lit(good, 1.18)}


def normalised(engine: Engine, image: np.ndarray) -> float:
    return float(engine.calibration.normalise(engine.score(image).image_score))


def movement(engine: Engine, goods: list[np.ndarray], count: int) -> dict:
    """Learn lit false rejects one at a time (forgetting each after): their scores, their twins', the other lit."""
    rejected = [i for i, g in enumerate(goods) if normalised(engine, lit(g)) > 0.5]
    log(f"part 1: {len(rejected)} of {len(goods)} good test images are false rejects under gain {GAIN}")
    cases, forget_s = [], []
    for i in rejected[:count]:
        twins = near_duplicates(goods[i])
        twin_before = {k: normalised(engine, v) for k, v in twins.items()}
        learned = engine.learn_good(lit(goods[i]), f"move-{i}", TARGET)
        case = {"image": i, "rows": int(learned.rows.shape[0]), "before": learned.score_before,
                "after": learned.score_after, "seconds": learned.seconds,
                "twins": {k: [twin_before[k], normalised(engine, v)] for k, v in twins.items()}}
        if not cases:  # the other lit images: how far one label reaches
            others = [j for j in rejected if j != i]
            case["other_false_rejects_after"] = sum(normalised(engine, lit(goods[j])) > 0.5 for j in others)
            case["other_false_rejects_before"] = len(others)
        t0 = time.perf_counter()
        engine.forget(f"move-{i}")
        forget_s.append(time.perf_counter() - t0)
        cases.append(case)
    return {"false_rejects": len(rejected), "of": len(goods), "cases": cases, "forget_alone_s": forget_s}


class Stream:
    """A thread running ``predict_stream`` (depth 2) over a live source: ``fps`` frames a second (0: no pause).

    Background frames are good test images; while ``probe`` is set, every frame is that part's.
    """

    def __init__(self, engine: Engine, background: list[np.ndarray], fps: float) -> None:
        self.engine = engine
        self.background = background
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.probe: tuple[str, np.ndarray] | None = None
        self.results: list[tuple[float, str, float]] = []  # (done at, frame tag, normalised score)
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def _frames(self) -> Iterator[Frame | None]:
        i, due = 0, time.perf_counter()
        while not self.stop.is_set():
            wait = due - time.perf_counter()
            if wait > 0:  # a live camera between two frames
                time.sleep(min(wait, 0.002))
                yield None
                continue
            probe = self.probe
            if probe is not None:
                yield Frame(image=probe[1], seq=i, source=probe[0])
            else:
                yield Frame(image=self.background[i % len(self.background)], seq=i, source="background")
            i += 1
            due = max(due + self.period, time.perf_counter() - self.period)

    def _run(self) -> None:
        for pred in self.engine.predict_stream(self._frames(), depth=2):
            with self.cond:
                self.results.append((time.perf_counter(), pred.frame.source, pred.decision.score))
                self.cond.notify_all()

    def first_below(self, tag: str, target: float, since: float, timeout: float = 10.0) -> float | None:
        """When the first frame ``tag`` finished below ``target`` after ``since`` (``None``: not within ``timeout``)."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                for t, source, score in self.results:
                    if source == tag and score < target and t >= since:
                        return t
                left = deadline - time.perf_counter()
                if left <= 0 or not self.cond.wait(left):
                    return None


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def in_force_clock(engine: Engine) -> list[float]:
    """Times at which the scorer's ``add_rows`` returned (the rows in force), recorded by a wrapper (bench only)."""
    times: list[float] = []
    add_rows = engine.scorer.add_rows

    def timed(*args: object) -> None:
        add_rows(*args)
        times.append(time.perf_counter())

    engine.scorer.add_rows = timed
    return times


def labels(engine: Engine, goods: list[np.ndarray], count: int, fps: float) -> dict:
    """``count`` labels while the stream thread runs: latency to the rows in force and to the first frame judged."""
    load_before = os.getloadavg()[0]
    stream = Stream(engine, goods[-20:], fps)
    in_force = in_force_clock(engine)
    stream.thread.start()
    time.sleep(1.0)
    records = []
    for k in range(count):
        image = lit(goods[k % len(goods)], GAIN + 0.01 * (k // len(goods)))
        score = normalised(engine, image)
        false_reject = score > 0.5
        target = TARGET if false_reject else 1 / (1 + math.exp(-(logit(max(score, 1e-9)) - 1.0)))
        tag = f"probe-{k}"
        stream.probe = (tag, image)
        time.sleep(0.3 + float(np.random.default_rng(k).uniform(0, stream.period)))  # the part's frames flow
        t0 = time.perf_counter()
        learned = engine.learn_good(image, f"label-{k:03d}", target)
        t1 = time.perf_counter()
        effect = stream.first_below(tag, target, t0)
        stream.probe = None
        records.append({"k": k, "false_reject": false_reject, "score": score, "target": target,
                        "rows": int(learned.rows.shape[0]), "after": learned.score_after, "call_ms": (t1 - t0) * 1e3,
                        "in_force_ms": (in_force[-1] - t0) * 1e3 if in_force and in_force[-1] >= t0 else None,
                        "effect_ms": None if effect is None else (effect - t0) * 1e3})
        if (k + 1) % 20 == 0:
            log(f"  {k + 1} labels, {engine.scorer.learned_rows} rows learned")
    stream.stop.set()
    stream.thread.join(30)
    del engine.scorer.add_rows  # the wrapper goes
    frames = len(stream.results)
    span = stream.results[-1][0] - stream.results[0][0] if frames > 1 else float("nan")
    return {"records": records, "stream_fps": frames / span, "fps": fps,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def detection(engine: Engine, goods: list[np.ndarray], defects: list[np.ndarray]) -> dict:
    """Rejected good and defect test images at the bundle's threshold, and image AUROC (raw scores)."""
    g = np.array([engine.score(x).image_score for x in goods])
    d = np.array([engine.score(x).image_score for x in defects])
    labels_ = np.r_[np.zeros(g.size, bool), np.ones(d.size, bool)]
    threshold = engine.calibration.threshold
    return {"good_rejected": int((g >= threshold).sum()), "defects_rejected": int((d >= threshold).sum()),
            "goods": int(g.size), "defects": int(d.size), "image_auroc": float(image_auroc(labels_, np.r_[g, d]))}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def label_lines(run: dict) -> list[str]:
    lab = run["records"]
    effect = [x["effect_ms"] for x in lab if x["effect_ms"] is not None]
    in_force = [x["in_force_ms"] for x in lab if x["in_force_ms"] is not None]
    call = [x["call_ms"] for x in lab]
    rows = [x["rows"] for x in lab]
    pace = f"{run['fps']:g} frames/s" if run["fps"] > 0 else "without pause"
    return [f"### Stream {pace} ({run['stream_fps']:.1f} frames/s scored), {len(lab)} labels, accumulating", "",
            f"Load average (1 min) before / after the run: {run['load_average'][0]} / {run['load_average'][1]} "
            f"on {os.cpu_count()} cores (other processes share this machine).", "",
            f"- false rejects at the time of their label: {sum(x['false_reject'] for x in lab)}; the others were "
            "labelled with a target one logit below their score",
            f"- label -> rows in force (the next frame scored uses them): p50 {pct(in_force, 50):.1f} ms, "
            f"p99 {pct(in_force, 99):.1f} ms, max {max(in_force):.1f} ms",
            f"- label -> first frame of that part judged below target (includes waiting for it to arrive): p50 "
            f"{pct(effect, 50):.1f} ms, p99 {pct(effect, 99):.1f} ms, max {max(effect):.1f} ms "
            f"({len(effect)} of {len(lab)} seen)",
            f"- `learn_good` call (features, search, update, score after): p50 {pct(call, 50):.1f} ms, "
            f"p99 {pct(call, 99):.1f} ms",
            f"- rows per label: mean {np.mean(rows):.1f}, p50 {pct(rows, 50):.0f}, max {max(rows)}, "
            f"{sum(r_ == 0 for r_ in rows)} with none; {sum(rows)} in all",
            f"- every learned frame below its target after: {all(x['after'] < x['target'] for x in lab)}", ""]


def report(r: dict) -> str:
    m = r["movement"]
    lines = ["# Operator feedback into the PatchCore bank", "", f"Machine: {one_line(r['machine'])}", "",
             f"Bundle: `{r['bundle']}`, {r['bank_rows']:,} bank rows, working size {r['size']}, "
             f"{r['threads']} threads; learned rows allowed: {r['max_learned_rows']:,}.", "",
             "## How scores move (each false reject learned alone with target 0.45, then forgotten)", "",
             f"{m['false_rejects']} of {m['of']} good test images are false rejects under gain {GAIN}.", "",
             "| image | rows | score before -> after | learn (ms) | near duplicates before -> after |",
             "|---|---|---|---|---|"]
    for c in m["cases"]:
        twins = "; ".join(f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in c["twins"].items())
        lines.append(f"| {c['image']} | {c['rows']} | {c['before']:.3f} -> {c['after']:.3f} | "
                     f"{c['seconds'] * 1e3:.0f} | {twins} |")
    first = m["cases"][0] if m["cases"] else None
    if first:
        lines += ["", f"After the first label alone, {first['other_false_rejects_after']} of the "
                      f"{first['other_false_rejects_before']} other lit false rejects are still rejected."]
    lines += ["", f"Forget with nothing else learned: {', '.join(f'{s:.2f}' for s in m['forget_alone_s'])} s.", "",
              "## Label to effect", ""]
    for run in r["runs"]:
        lines += label_lines(run)
    lines += ["## Forget after the labels (first stream run's engine)", "",
              f"- an entry from the middle ({r['forget']['remaining']} others replayed, {r['forget']['rows']:,} rows "
              f"left): {r['forget']['middle_s']:.2f} s; the last entry: {r['forget']['last_s']:.2f} s", "",
              "## Detection before and after the labels (first stream run's engine)", ""]
    for when in ("before", "after"):
        d = r["detection"][when]
        lines.append(f"- {when}: image AUROC {d['image_auroc']:.4f}; good test images rejected {d['good_rejected']}"
                     f"/{d['goods']}; pitting images rejected {d['defects_rejected']}/{d['defects']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="ball-screw MVTec folder")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "feedback", help="bundle and results folder")
    parser.add_argument("--labels", type=int, default=100, help="labels timed")
    parser.add_argument("--movement", type=int, default=5, help="false rejects whose scores are shown")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--fps", type=float, nargs="+", default=[5.0, 0.0],
                        help="stream rates, one run each on a fresh engine (0: frames without pause)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = bundle_at(args)
    engine = load_bundle(path, threads=args.threads, cache_dir=args.out / "cache")
    data = load_mvtec(args.data)
    goods = [read_image(s.path) for s in data.test if s.label == "good"]
    defects = [read_image(s.path) for s in data.test if s.label == "defect"]
    log(f"{len(goods)} good and {len(defects)} defect test images; bank {engine.scorer.bank.shape[0]:,} rows")
    result = {"machine": describe(), "bundle": str(path), "bank_rows": int(engine.scorer.bank.shape[0]),
              "size": "x".join(map(str, engine.spec.size)), "threads": args.threads,
              "max_learned_rows": engine.max_learned_rows}
    result["detection"] = {"before": detection(engine, goods, defects)}
    result["movement"] = movement(engine, goods, args.movement)
    result["runs"] = []
    for i, fps in enumerate(args.fps):
        log(f"part 2: {args.labels} labels, stream at {fps:g} frames/s")
        run_engine = engine if i == 0 else load_bundle(path, threads=args.threads, cache_dir=args.out / "cache")
        result["runs"].append(labels(run_engine, goods, args.labels, fps))
        if i:
            run_engine.close()
    result["detection"]["after"] = detection(engine, goods, defects)
    entries = engine.learned
    middle = entries[len(entries) // 2]
    t0 = time.perf_counter()
    engine.forget(middle.entry_id)
    middle_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.forget(engine.learned[-1].entry_id)
    result["forget"] = {"middle_s": middle_s, "last_s": time.perf_counter() - t0, "remaining": len(entries) - 1,
                        "rows": int(engine.scorer.bank.shape[0])}
    (args.out / "feedback.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (args.out / "feedback.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
