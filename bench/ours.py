"""Our side of the anomalib comparison, with the same sub-commands and JSON layout as peer_anomalib.py.

    python bench/ours.py fit --data DIR --model patchcore --height 256 --width 256 --coreset-ratio 0.01 --k 9 \
        --workdir W [--tile 224x272] [--set key=value ...] [--threads 2] [--train-list FILE]
    python bench/ours.py predict --workdir W --data DIR [--threads 2] [--max-test N] [--warmup 5]

Each command runs in its own process, so ``peak_rss_mb`` is the peak of that step alone.
``fit`` times feature extraction + the scorer's fit (what anomalib's fit does) and, separately,
the whole command (calibration, bundle writing and its verified reload included).
``predict`` times, per image, the full engine call: preprocessing, backbone, scorer and the anomaly
map at model resolution (anomalib's inferencers return that map too), one image at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe

from appliance.bundle import load_bundle
from appliance.datasets import Dataset, Sample, load_mvtec
from appliance.imaging import read_image
from appliance.training import FitOptions, fit
from appliance.types import Frame

#: One backbone-only timing per this many images of the latency loop.
FLOOR_EVERY = 3


def cpu_seconds() -> float:
    """User + system CPU time of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def contention(cpu: float, wall: float, threads: int) -> dict:
    """Load average now and the CPU share this process got (well below 1: another process competed)."""
    return {"load_average": [round(v, 2) for v in os.getloadavg()],
            "cpu_share": round(cpu / max(wall * threads, 1e-9), 3)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def latency_stats(ms: list[float]) -> dict:
    """Median, p95 and mean of per-image latencies in ms."""
    a = np.asarray(ms)
    return {"median_ms": round(float(np.median(a)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": int(a.size)}


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _settings(args: argparse.Namespace) -> dict:
    settings: dict = {}
    if args.model == "patchcore":
        settings = {"coreset_ratio": args.coreset_ratio, "num_neighbors": args.k, "reweight": True}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def cmd_fit(args: argparse.Namespace) -> None:
    """Fit on train/good (or the files of --train-list), calibrate on the held-out rest, write the bundle."""
    data = args.data.resolve()
    ds = load_mvtec(data)
    if args.train_list:
        chosen = {Path(line.strip()).resolve() for line in args.train_list.read_text().splitlines() if line.strip()}
        pool = [*ds.train, *ds.calibration]
        train = tuple(s for s in pool if s.path.resolve() in chosen)
        calib = tuple(s for s in pool if s.path.resolve() not in chosen)
        ds = Dataset(ds.name, ds.root, train, calib, ds.test)
    tile = tuple(int(v) for v in args.tile.lower().split("x")) if args.tile else None
    options = FitOptions(scorer=args.model, settings=_settings(args), height=args.height, width=args.width,
                         tile=tile, overlap=args.overlap, precision=args.precision, threads=args.threads,
                         interpolation=args.interpolation, position_norm=not args.no_position_norm,
                         cache_dir=str(args.workdir / "cache"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    report = fit(ds, args.workdir / "bundle", options)
    total = time.perf_counter() - t0
    load = contention(cpu_seconds() - c0, total, args.threads)
    m = report.engine.manifest
    stats = {
        "model": args.model, "framework": "ours", "machine": describe(),
        "settings": {"height": args.height, "width": args.width, "tile": tile, "threads": args.threads,
                     "precision": args.precision, "scorer": m["scorer"]["config"], "train_images": len(ds.train)},
        "fit_seconds": m["training"]["seconds"]["features_and_fit"],
        "command_seconds": round(total, 3),
        "fit_detail": m["training"]["fit"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "contention": load,
        "sizes_bytes": {"bundle": dir_bytes(args.workdir / "bundle"),
                        "bundle_scorer": dir_bytes(args.workdir / "bundle" / "scorer"),
                        "bundle_backbone": dir_bytes(args.workdir / "bundle" / "backbone")},
        "model_id": m["model_id"],
    }
    (args.workdir / "fit.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: stats[k] for k in ("fit_seconds", "command_seconds", "peak_rss_mb")}))


def test_samples(data: Path, max_test: int | None) -> list[Sample]:
    """test/good first, then each defect folder, each sorted; at most ``max_test`` per folder (as the peer)."""
    ds = load_mvtec(data)
    by_type: dict[str, list[Sample]] = {}
    for s in ds.test:
        if s.label != "unknown":
            by_type.setdefault(s.defect_type, []).append(s)
    order = sorted(by_type, key=lambda t: (t != "good", t))
    return [s for t in order for s in sorted(by_type[t], key=lambda s: s.path.name)[:max_test]]


def cmd_predict(args: argparse.Namespace) -> None:
    """Score the test images one at a time; write predict_ours.json and maps_ours.npy."""
    samples = test_samples(args.data.resolve(), args.max_test)
    images = [read_image(s.path) for s in samples]  # decoded before any timing
    engine = load_bundle(args.workdir / "bundle", threads=args.threads, precision=args.precision,
                         cache_dir=args.workdir / "cache")
    for img in images[: args.warmup]:
        engine.anomaly_map(engine.predict(img).score, normalised=False, in_source=False)
    # Backbone alone (the floor): every FLOOR_EVERY-th image's preprocessed batch through the compiled model,
    # timed inside the same loop, so a change in the machine's speed during the run affects both alike.
    latencies, maps, records, backbone_ms, scorer_ms, floor = [], [], [], [], [], []
    t_loop, c_loop = time.perf_counter(), cpu_seconds()
    for i, (img, s) in enumerate(zip(images, samples, strict=True)):
        if i % FLOOR_EVERY == 0:
            batch = engine.preprocessor.tiles(img).copy()
            t0 = time.perf_counter()
            engine.backbone.infer(batch)
            floor.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        pred = engine.predict(img)
        amap = engine.anomaly_map(pred.score, normalised=False, in_source=False)
        latencies.append((time.perf_counter() - t0) * 1e3)
        backbone_ms.append(pred.timings_ms["backbone"])
        scorer_ms.append(pred.timings_ms["scorer"])
        maps.append(amap.astype(np.float16))
        records.append({"path": str(s.path.relative_to(args.data.resolve())), "label": s.label,
                        "defect_type": s.defect_type, "score": pred.score.image_score,
                        "latency_ms": round(latencies[-1], 3)})
    load = contention(cpu_seconds() - c_loop, time.perf_counter() - t_loop, args.threads)
    # Throughput: the pipelined stream, backbone compiled for 2 asynchronous streams.
    stream_engine = load_bundle(args.workdir / "bundle", threads=args.threads, streams=2, precision=args.precision,
                                cache_dir=args.workdir / "cache", check_golden=False)
    frames = [Frame(image=img, seq=i) for i, img in enumerate(images)]
    for _ in stream_engine.predict_stream(frames[:4]):
        pass
    t0 = time.perf_counter()
    n = sum(1 for _ in stream_engine.predict_stream(frames))
    seconds = time.perf_counter() - t0
    np.save(args.workdir / "maps_ours.npy", np.stack(maps))
    payload = {
        "runtime": "ours", "machine": describe(),
        "settings": {"threads": args.threads, "warmup": args.warmup, "max_test": args.max_test,
                     "precision": engine.backbone.precision,
                     "timed_call": "engine.predict(array) + engine.anomaly_map(model resolution)"},
        "latency": latency_stats(latencies),
        "latency_loop_contention": load,
        "backbone_in_pipeline": latency_stats(backbone_ms),
        # Each frame's time beside its own backbone call: a ratio that drifts in the machine's speed cannot skew.
        "rest_over_backbone_per_frame": round(float(np.median(
            (np.asarray(latencies) - np.asarray(backbone_ms)) / np.asarray(backbone_ms))), 3),
        "scorer": latency_stats(scorer_ms),
        "backbone_only": latency_stats(floor),
        "throughput": {"method": "Engine.predict_stream, backbone THROUGHPUT hint with 2 async streams, "
                                 "scoring of frame N overlapped with the backbone of frame N+1",
                       "images": n, "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 3)},
        "map_shape": list(maps[0].shape),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "records": records,
    }
    if hasattr(engine.scorer, "refined_last"):
        payload["note"] = "PatchCore: positional shortlists + certified exact refinement (image score exact)"
    (args.workdir / "predict_ours.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({"latency": payload["latency"], "backbone_only": payload["backbone_only"],
                      "throughput": payload["throughput"]["images_per_second"]}))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--data", type=Path, required=True)
    f.add_argument("--model", choices=("patchcore", "padim"), required=True)
    f.add_argument("--height", type=int, default=256)
    f.add_argument("--width", type=int, default=None)
    f.add_argument("--tile", default=None)
    f.add_argument("--overlap", type=int, default=32)
    f.add_argument("--interpolation", default="linear", choices=("area", "linear"))
    f.add_argument("--coreset-ratio", type=float, default=0.01)
    f.add_argument("--k", type=int, default=9)
    f.add_argument("--set", action="append", default=[], help="extra scorer setting key=value")
    f.add_argument("--precision", default="f32")
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--train-list", type=Path, default=None)
    f.add_argument("--no-position-norm", action="store_true", help="raw patch scores, as anomalib")
    f.add_argument("--workdir", type=Path, required=True)
    q = sub.add_parser("predict")
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--workdir", type=Path, required=True)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--precision", default=None)
    q.add_argument("--max-test", type=int, default=None)
    q.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    (cmd_fit if args.cmd == "fit" else cmd_predict)(args)


if __name__ == "__main__":
    main()
