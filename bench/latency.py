"""Per-frame latency of a bundle, stage by stage, one image at a time.

Usage::

    python bench/latency.py BUNDLE IMAGES_DIR [--threads 2] [--limit 100] [--json out.json]

Prints median and p95 per stage (preprocess, backbone, scorer, map), the
backbone-only time (the floor), and the share of the frame the non-backbone
stages take. Images are decoded before timing starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, one_line

from appliance.bundle import load_bundle
from appliance.datasets import list_images
from appliance.imaging import read_image


def percentiles(values: list[float]) -> dict:
    """Median, p95 and mean in milliseconds."""
    a = np.asarray(values) * 1e3
    return {"median_ms": round(float(np.median(a)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "mean_ms": round(float(a.mean()), 3)}


def measure(bundle: Path, images: list[np.ndarray], threads: int | None, warmup: int = 5,
            precision: str | None = None) -> dict:
    """Time every stage of the engine on each image (sync path, one image at a time)."""
    engine = load_bundle(bundle, threads=threads, precision=precision)
    scorer = engine.scorer
    stages: dict[str, list[float]] = {"preprocess": [], "backbone": [], "scorer": [], "stitch": [], "total": [],
                                      "map": []}
    refined = []
    for i, img in enumerate([*images[:warmup], *images]):
        t0 = time.perf_counter()
        batch = engine.preprocessor.tiles(img)
        t1 = time.perf_counter()
        feats = engine.backbone.infer(batch)
        t2 = time.perf_counter()
        tile_scores, _ = scorer.score(feats, engine.position_norm)
        t3 = time.perf_counter()
        engine.preprocessor.stitch(tile_scores)
        t4 = time.perf_counter()
        score = engine.score_features(feats)
        t5 = time.perf_counter()
        engine.anomaly_map(score)
        t6 = time.perf_counter()
        if i < warmup:
            continue
        for k, v in (("preprocess", t1 - t0), ("backbone", t2 - t1), ("scorer", t3 - t2), ("stitch", t4 - t3),
                     ("total", t4 - t0), ("map", t6 - t5)):
            stages[k].append(v)
        refined.append(getattr(scorer, "refined_last", 0))
    out = {k: percentiles(v) for k, v in stages.items()}
    non_backbone = np.median(np.array(stages["total"]) - np.array(stages["backbone"]))
    out["non_backbone_share_of_backbone"] = round(float(non_backbone / np.median(stages["backbone"])), 3)
    out["images"] = len(images)
    out["model_id"] = engine.model_id
    out["scorer_type"] = engine.manifest["scorer"]["type"]
    out["scorer_meta"] = engine.manifest["scorer"]["meta"]
    out["input"] = engine.manifest["preprocess"]
    out["precision"] = engine.backbone.precision
    if any(refined):
        out["refined_patches"] = {"median": float(np.median(refined)), "max": int(max(refined))}
    return out


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--precision", default=None)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    files = [f for d in a.images for f in (list_images(d) if d.is_dir() else [d])][: a.limit]
    images = [read_image(f) for f in files]
    result = {"machine": describe(), "threads": a.threads, **measure(a.bundle, images, a.threads,
                                                                      precision=a.precision)}
    print(one_line(result["machine"]))
    for k in ("preprocess", "backbone", "scorer", "stitch", "total", "map"):
        r = result[k]
        print(f"{k:<11} median {r['median_ms']:8.2f} ms   p95 {r['p95_ms']:8.2f} ms")
    print(f"everything but the backbone: {result['non_backbone_share_of_backbone']:.1%} of the backbone's time")
    if "refined_patches" in result:
        print(f"patches searched exactly per image: {result['refined_patches']}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
