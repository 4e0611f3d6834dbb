"""Our engine's own figures: fit time and peak RSS, per-image latency beside the backbone, accuracy.

    .venv/bin/python bench/engine_bench.py --data ../shared/data/bsdata/ball_screw --out bench/results/engine \
        [--configs patchcore_50k padim_256 ...] [--fresh]

Each configuration is fitted and then scored in its own processes (``bench/ours.py``), so the
peak RSS is that of the fit alone. Latency is one image at a time with 2 threads, the full engine
call (preprocessing, backbone, scorer, anomaly map); the backbone-only time of the same inputs is
measured in the same loop (every third image), and "rest / backbone" is what everything but the
backbone costs relative to it. "Same, per frame" takes each frame against its own backbone call, so
it holds even when this shared machine changes speed during a run (it does: the backbone has
measured anywhere from 43 to 90 ms per tiled frame on different runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_anomalib import quality, step  # noqa: E402
from machine import describe, one_line  # noqa: E402

#: name -> (scorer, ours.py fit arguments). Working sizes keep the 1130x460 aspect ratio unless a width is given.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "patchcore_256sq": ("patchcore", ["--height", "256", "--width", "256", "--coreset-ratio", "0.01"]),
    "patchcore_50k": ("patchcore", ["--height", "256", "--coreset-ratio", "0.04"]),
    "patchcore_tiled": ("patchcore", ["--height", "448", "--tile", "240x288", "--overlap", "16",
                                      "--coreset-ratio", "0.005"]),
    "patchcore_tiled_50k": ("patchcore", ["--height", "448", "--tile", "240x288", "--overlap", "16",
                                          "--coreset-ratio", "0.0116", "--set", "coreset_partitions=32"]),
    "padim_256sq": ("padim", ["--height", "256", "--width", "256"]),
    "padim_256": ("padim", ["--height", "256"]),
    "padim_320": ("padim", ["--height", "320"]),
    "padim_tiled": ("padim", ["--height", "448", "--tile", "240x288", "--overlap", "16"]),
}


def bench_config(args: argparse.Namespace, name: str) -> dict:
    """Fit, score and evaluate one configuration."""
    model, extra = CONFIGS[name]
    work = args.out / name
    work.mkdir(parents=True, exist_ok=True)
    fit = step(work / "fit.json", "fit", [sys.executable, str(HERE / "ours.py"), "fit", "--data", str(args.data),
                                          "--model", model, *extra, "--threads", str(args.threads),
                                          "--workdir", str(work)], args.fresh)
    pred = step(work / "predict_ours.json", "predict",
                [sys.executable, str(HERE / "ours.py"), "predict", "--data", str(args.data), "--workdir", str(work),
                 "--threads", str(args.threads)], args.fresh)
    q = quality(args.data, pred["records"], np.load(work / "maps_ours.npy"))
    lat, floor = pred["latency"], pred["backbone_only"]
    return {"name": name, "model": model, "args": extra, "fit_seconds": fit["fit_seconds"],
            "command_seconds": fit["command_seconds"], "peak_rss_mb": fit["peak_rss_mb"],
            "fit_detail": fit["fit_detail"], "bundle_mb": round(fit["sizes_bytes"]["bundle"] / 1e6, 1),
            "latency": lat, "backbone_only": floor, "scorer": pred["scorer"],
            "rest_over_backbone": round((lat["median_ms"] - floor["median_ms"]) / floor["median_ms"], 3),
            "rest_over_backbone_per_frame": pred.get("rest_over_backbone_per_frame"),
            "throughput": pred["throughput"]["images_per_second"],
            "image_auroc": q["image_auroc"], "pixel_auroc": q["pixel_auroc"], "pro": q["pro"]}


def per_frame(result: dict) -> str:
    """The median over frames of (frame time - its backbone call) / its backbone call, if measured."""
    ratio = result.get("rest_over_backbone_per_frame")
    return "-" if ratio is None else f"{ratio:.0%}"


def markdown(report: dict) -> str:
    """The results as a Markdown table."""
    lines = ["# Engine benchmark", "", f"Machine: {one_line(report['machine'])}", "",
             f"Data: `{report['data']}`, {report['threads']} threads.", "",
             "| config | bank / positions | image AUROC | pixel AUROC | PRO | fit (s) | peak RSS (MB) | "
             "latency median / p95 (ms) | backbone (ms) | rest / backbone | same, per frame | img/s | bundle (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        size = r["fit_detail"].get("bank", r["fit_detail"].get("positions"))
        lines.append(f"| {r['name']} | {size} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pro']:.4f} | "
                     f"{r['fit_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['latency']['median_ms']:.1f} / "
                     f"{r['latency']['p95_ms']:.1f} | {r['backbone_only']['median_ms']:.1f} | "
                     f"{r['rest_over_backbone']:.0%} | {per_frame(r)} | {r['throughput']:.1f} | {r['bundle_mb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=HERE / "results" / "engine")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    args.data = args.data.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": describe(), "data": str(args.data), "threads": args.threads,
              "results": [bench_config(args, c) for c in args.configs]}
    (args.out / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "engine.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
