"""Overlay output: what drawing, encoding and writing one HMI overlay costs, step by step.

Usage::

    .venv/bin/python bench/overlay_bench.py [--image PATH] [--width 1024 --height 600] [--n 40]
                                            [--baseline-src DIR] [--json out.json]

The frame is a real 1130x460 RGB ball-screw image (``--image``, default: the first test image of
the shared BSData set, else a synthetic texture of that size); its anomaly map is a smooth field
around 0.25 (a good part: some heat fades in) with, for NG, a blob above the threshold.

Three tables, each a median over ``--n`` runs (wall and this process's CPU milliseconds; OpenCV
may use both cores for one call, so CPU can exceed wall):

* **before**: the steps of the path this output took before drawing at panel size, timed on the
  same primitives it called (float blend, INTER_AREA, concatenate, letterbox, Pillow's PNG at
  several levels, write, read back, write ``latest.png`` again);
* **now**: the steps of ``render_panel`` and ``encode_overlay`` (with ISA-L's deflate when
  installed, and zlib's for comparison), ``write_png`` and the ``latest.png`` hard link;
* **end to end**: ``OverlayPublisher.publish`` of an NG record (file, latest image, latest.png)
  and of an OK record that keeps no file (drawn by the latest drawer). ``--baseline-src DIR``
  (a checkout of another version, the folder holding its ``appliance/``) runs the same end-to-end
  table in a subprocess on that version, so before and after come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe, one_line  # noqa: E402

DEFAULT_IMAGE = HERE.parent.parent / "shared/data/bsdata/ball_screw/test/good/01_200831213145_430000_180_crop_2.jpg"


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``fn`` over ``n`` runs (after one warm-up)."""
    fn()
    wall, cpu = [], []
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - w0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return float(np.median(wall)), float(np.median(cpu))


def inputs(image: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frame, an OK map and an NG map (float32, frame-sized, 0.5 = threshold)."""
    if image is not None and image.exists():
        frame = cv2.cvtColor(cv2.imread(str(image), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    else:
        rng = np.random.default_rng(0)
        frame = cv2.GaussianBlur(rng.integers(0, 255, (460, 1130, 3), dtype=np.uint8), (0, 0), 2)
    h, w = frame.shape[:2]
    rng = np.random.default_rng(1)
    coarse = rng.normal(0.25, 0.05, (h // 8 + 1, w // 8 + 1)).astype(np.float32)  # a patch grid, upsampled
    ok = np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)[:h, :w], 0, 1)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = 0.75 * np.exp(-((yy - h * 0.4) ** 2 + (xx - w * 0.6) ** 2) / (2 * 18.0**2))
    ng = np.clip(ok + blob, 0, 1).astype(np.float32)
    return np.ascontiguousarray(frame), ok, ng


# --------------------------------------------------------------------------- the steps before


def before_steps(frame: np.ndarray, amap: np.ndarray, width: int, height: int, n: int, tmp: Path) -> dict:
    """The earlier path's steps on the primitives it called (1130x460 -> 1024x417 frame, banner, letterbox)."""
    import io

    from PIL import Image

    from appliance.overlay import _banner_items, _draw_banner, _exif_bytes, _fit, _write_atomic

    items = _banner_items("ng", 0.8, 0.5, "patchcore-bench")
    w, h, banner = _fit(frame.shape[1], frame.shape[0], items, max(width, height), max(width, height), grow=False)
    rgb = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    heat = cv2.resize(amap, (w, h), interpolation=cv2.INTER_AREA)
    colours = cv2.cvtColor(cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET),
                           cv2.COLOR_BGR2RGB)

    def blend() -> np.ndarray:
        t = np.clip((heat - 0.25) / 0.25, 0.0, 1.0)
        weight = (0.45 * t * t * (3.0 - 2.0 * t))[..., None]
        out = rgb.astype(np.float32) * (1.0 - weight) + colours.astype(np.float32) * weight
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    def contours() -> None:
        mask = (np.nan_to_num(amap, nan=0.0) >= 0.5).astype(np.uint8)
        cs, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(rgb.copy(), cs, -1, (255, 0, 255), 1)

    def strip() -> np.ndarray:
        out = np.empty((banner.height, w, 3), np.uint8)
        _draw_banner(out, banner)
        return out

    composed = np.concatenate([strip(), blend()], axis=0)

    def letterbox() -> np.ndarray:
        canvas = np.full((height, width, 3), 12, np.uint8)
        y0, x0 = (height - composed.shape[0]) // 2, (width - composed.shape[1]) // 2
        canvas[y0:y0 + composed.shape[0], x0:x0 + composed.shape[1]] = composed
        return canvas

    panel = letterbox()
    meta = {"score": 0.8, "threshold": 0.5, "verdict": "ng", "model_id": "m", "raw_score": 5.0,
            "timestamp": time.time(), "camera": "c", "source": None, "inspection_id": "x" * 22}
    exif = _exif_bytes(meta)

    def pil_png(level: int) -> Callable[[], bytes]:
        def run() -> bytes:
            buf = io.BytesIO()
            Image.fromarray(panel).save(buf, format="PNG", exif=exif, compress_level=level)
            return buf.getvalue()
        return run

    data = pil_png(1)()
    path, latest = tmp / "before.png", tmp / "before-latest.png"
    steps = {
        "nan_to_num (map copy)": lambda: np.nan_to_num(amap, nan=0.0, posinf=1.0, neginf=0.0),
        "resize frame INTER_AREA": lambda: cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA),
        "resize map INTER_AREA (float)": lambda: cv2.resize(amap, (w, h), interpolation=cv2.INTER_AREA),
        "colour map + BGR->RGB": lambda: cv2.cvtColor(cv2.applyColorMap(np.round(heat * 255).astype(np.uint8),
                                                                        cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB),
        "blend (float32, whole frame)": blend,
        "contours (source resolution)": contours,
        "banner": strip,
        "concatenate banner + frame": lambda: np.concatenate([strip(), rgb], axis=0),
        "letterbox to panel": letterbox,
        "EXIF (piexif.dump)": lambda: _exif_bytes(meta),
        **{f"PNG encode, Pillow level {lv}": pil_png(lv) for lv in (0, 1, 3, 6)},
        "file write (atomic, fsync)": lambda: _write_atomic(path, data),
        "read back + write latest.png": lambda: _write_atomic(latest, path.read_bytes()),
    }
    table = {name: timed(fn, n) for name, fn in steps.items()}
    table["_png_bytes_level_1"] = (len(data), len(data))
    return table


# --------------------------------------------------------------------------- the steps now


def now_steps(frame: np.ndarray, amap: np.ndarray, width: int, height: int, n: int, tmp: Path) -> dict:
    """The steps of ``render_panel`` + ``encode_overlay`` + ``write_png`` + the latest.png link."""
    from appliance import png
    from appliance.daemon.publishers.overlay import _link_atomic
    from appliance.overlay import (
        PAD_RGB,
        _banner_items,
        _blend_heat,
        _draw_banner,
        _draw_contours,
        _exif_bytes,
        _fit,
        _interpolation,
        _pad,
        encode_overlay,
        render_panel,
        write_png,
    )

    items = _banner_items("ng", 0.8, 0.5, "patchcore-bench")
    src_h, src_w = amap.shape
    w, h, banner = _fit(src_w, src_h, items, width, height, grow=True)
    interp = _interpolation(min(w / src_w, h / src_h))
    canvas = np.full((height, width, 3), PAD_RGB, np.uint8)
    view = canvas[banner.height:banner.height + h, :w]
    heat8 = cv2.resize(cv2.multiply(amap, 255.0, dtype=cv2.CV_8U), (w, h), interpolation=interp)
    kw = {"score": 0.8, "threshold": 0.5, "verdict": "ng", "model_id": "patchcore-bench"}
    panel = render_panel(frame, amap, width, height, **kw)
    meta = {"score": 0.8, "threshold": 0.5, "verdict": "ng", "model_id": "m", "raw_score": 5.0,
            "timestamp": time.time(), "camera": "c", "source": None, "inspection_id": "x" * 22}
    exif = _exif_bytes(meta)
    data = encode_overlay(panel, meta)
    path, latest = tmp / "now.png", tmp / "now-latest.png"
    write_png(path, data)

    def blend() -> None:
        _blend_heat(view, heat8, 0.5, 0.45)

    steps = {
        "layout (fit + banner lines)": lambda: _fit(src_w, src_h, items, width, height, grow=True),
        "canvas (pad around the box)": lambda: _pad(np.empty((height, width, 3), np.uint8), 0, 0,
                                                   banner.height + h, w, PAD_RGB),
        "resize frame into canvas": lambda: cv2.resize(frame, (w, h), dst=view, interpolation=interp),
        "map -> uint8 + resize": lambda: cv2.resize(cv2.multiply(amap, 255.0, dtype=cv2.CV_8U), (w, h),
                                                    interpolation=interp),
        "finite check (sum)": lambda: np.isfinite(float(amap.sum())),
        "blend (LUT weights, heat's box)": blend,
        "contours (source resolution)": lambda: _draw_contours(view, amap, 0.5, (w / src_w, h / src_h)),
        "banner": lambda: _draw_banner(canvas[:banner.height, :w], banner),
        "render_panel (all of the above)": lambda: render_panel(frame, amap, width, height, **kw),
        "EXIF (piexif.dump)": lambda: _exif_bytes(meta),
        f"PNG encode, Sub + {png.DEFLATE} level 1": lambda: png.encode_png(panel, exif, 1),
        "PNG encode, Sub + zlib level 1": lambda: png.encode_png(panel, exif, 1, compress=zlib.compress),
        "encode_overlay (EXIF + PNG)": lambda: encode_overlay(panel, meta),
        "file write (atomic, fsync)": lambda: write_png(path, data),
        "latest.png (hard link)": lambda: _link_atomic(path, latest),
    }
    table = {name: timed(fn, n) for name, fn in steps.items()}
    table["_png_bytes_level_1"] = (len(data), len(png.encode_png(panel, exif, 1, compress=zlib.compress)))
    return table


# --------------------------------------------------------------------------- end to end


def end_to_end(frame: np.ndarray, ok_map: np.ndarray, ng_map: np.ndarray, width: int, height: int, n: int,
               tmp: Path) -> dict:
    """``OverlayPublisher.publish`` on this process's ``appliance`` (only APIs every version has)."""
    from prometheus_client import CollectorRegistry

    from appliance.daemon.publishers import OutputContext
    from appliance.daemon.publishers.overlay import OverlayConfig, OverlayPublisher
    from appliance.daemon.records import Inspection, LazyMap

    counter = iter(range(10**9))

    def record(verdict: str) -> Inspection:
        i = next(counter)
        amap = ng_map if verdict == "ng" else ok_map
        now = 1_780_000_000.0 + i
        return Inspection(id=f"{int(now * 1000):012x}{i:010x}", camera="line1", seq=i, captured_at=now,
                          finished_at=now + 0.02, verdict=verdict, score=0.8 if verdict == "ng" else 0.3,
                          threshold=0.5, raw_score=5.0, threshold_source="bundle", model_id="patchcore-bench",
                          image=frame, anomaly_map=LazyMap(lambda m=amap: m))

    context = OutputContext(state_dir=tmp / "state", status=dict, registry=CollectorRegistry())
    try:
        from appliance.daemon.latest import LatestImages
        context.latest = LatestImages()
    except ImportError:
        pass
    pub = OverlayPublisher(OverlayConfig(width=width, height=height, only_ng=True, keep=50), context)
    pub.start()
    drawer = getattr(pub, "drawer", None)

    def ok_latest_only() -> None:
        assert pub.publish(record("ok")).status == "skipped"
        if drawer is not None:
            drawer.wait_idle()

    table = {"publish NG (file + latest)": timed(lambda: pub.publish(record("ng")), n),
             "publish OK, no file (latest only)": timed(ok_latest_only, n)}
    pub.close()
    return table


# --------------------------------------------------------------------------- report


def show(title: str, table: dict) -> None:
    print(f"\n{title}\n{'step':<40} {'wall ms':>8} {'cpu ms':>8}")
    for name, (wall, cpu) in table.items():
        if name.startswith("_"):
            print(f"{'  PNG bytes (' + name[5:] + ')':<40} {int(wall):>8} {int(cpu):>8}")
        else:
            print(f"{name:<40} {wall:>8.2f} {cpu:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--baseline-src", type=Path, help="another version's source folder (holding appliance/)")
    parser.add_argument("--e2e-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    frame, ok_map, ng_map = inputs(args.image)
    with tempfile.TemporaryDirectory(prefix="overlay-bench-") as folder:
        tmp = Path(folder)
        if args.e2e_only:  # the baseline's subprocess
            print(json.dumps(end_to_end(frame, ok_map, ng_map, args.width, args.height, args.n, tmp)))
            return
        info = describe()
        print(f"machine: {one_line(info)}\nframe {frame.shape[1]}x{frame.shape[0]} -> panel "
              f"{args.width}x{args.height}, median of {args.n}, cv2 threads {cv2.getNumThreads()}")
        results = {"machine": info,
                   "before": before_steps(frame, ng_map, args.width, args.height, args.n, tmp),
                   "now": now_steps(frame, ng_map, args.width, args.height, args.n, tmp),
                   "end_to_end": end_to_end(frame, ok_map, ng_map, args.width, args.height, args.n, tmp)}
        show("before: the steps of the earlier path (same primitives)", results["before"])
        show("now: render_panel, encode_overlay, write_png, latest.png link", results["now"])
        show("end to end, this version", results["end_to_end"])
        if args.baseline_src:
            env = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
            done = subprocess.run([sys.executable, __file__, "--e2e-only", "--n", str(args.n), "--image",
                                   str(args.image), "--width", str(args.width), "--height", str(args.height)],
                                  capture_output=True, text=True, env=env, check=True)
            results["end_to_end_baseline"] = json.loads(done.stdout.strip().splitlines()[-1])
            show(f"end to end, baseline {args.baseline_src}", results["end_to_end_baseline"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
