"""The daemon's sustained throughput and frame-to-result latency, beside the bare engine in the same run.

    .venv/bin/python bench/daemon_bench.py --data ../shared/data/bsdata/ball_screw --out bench/results/daemon \
        [--scorers padim,patchcore] [--size 256x624] [--seconds 40] [--fps 25]

For each scorer it fits a bundle at the working size (once; reused from ``--out``), then measures:

- **bare engine**: ``Engine.predict_stream`` over the test images, as fast as it goes (2 streams),
  in this process: the ceiling the daemon is compared with;
- **daemon, 1 and 2 cameras at ``--fps``**: ``appliance run`` as a subprocess, replay sources
  (looping over the same images) paced at ``--fps`` each, every output on (overlay PNG at
  1024x600 with EXIF for every NG and two OK parts a second per camera, as the example config
  ships (``ok_per_s``), HTTP live page, SQLite audit with ``synchronous=FULL``, plus MQTT /
  Modbus when those outputs are installed and ``--plc`` is given); rates and drops from the
  daemon's own status, latency (capture to verdict) from the audit rows of the steady window;
- **daemon, 1 camera unpaced**: the replay as fast as it reads (a camera far faster than the
  engine: most frames are decoded and dropped, which costs CPU a real camera's driver would not).

The daemon's overhead is its CPU time per inspected frame (``/proc/PID/stat``, every thread)
against the bare engine's (``time.process_time``) on the same frames, pre-decoded, and decoding
each frame from its bytes as the daemon (and ``appliance predict``) must. The replayed mix is good
test images with ``--defect-share`` (5 %) defect images: NG frames always get an overlay PNG, so
the test split's own share (half) would overstate a line's overlay work.

Everything is measured on the machine it runs on (described in the report); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import tomli_w

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe, one_line  # noqa: E402

from appliance.daemon.control import request  # noqa: E402
from appliance.errors import ApplianceError  # noqa: E402

APPLIANCE = Path(sys.executable).parent / "appliance"


def fit_bundle(data: Path, out: Path, scorer: str, size: str, cache: Path, precision: str) -> tuple[Path, float]:
    """A bundle fitted with the CLI's defaults at ``size`` and ``precision`` (reused if already there)."""
    bundle = out / f"bundle_{scorer}_{size}" if precision == "f32" else out / f"bundle_{scorer}_{size}_{precision}"
    if (bundle / "manifest.json").exists():
        return bundle, float("nan")
    t0 = time.perf_counter()
    subprocess.run([str(APPLIANCE), "fit", str(data), "--out", str(bundle), "--scorer", scorer, "--size", size,
                    "--resize", "stretch", "--precision", precision, "--cache-dir", str(cache / "openvino"), "-q"],
                   check=True, env=dict(os.environ, NUMBA_CACHE_DIR=str(cache / "numba")))
    return bundle, time.perf_counter() - t0


def test_images(data: Path, limit: int, defect_share: float) -> list[Path]:
    """Good test images with defect images mixed in at ``defect_share`` (a line's NG rate, not the test set's)."""
    files = sorted(p for p in (data / "test").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    good = [p for p in files if p.parent.name == "good"]
    bad = [p for p in files if p.parent.name != "good"]
    n_bad = round(limit * defect_share)
    picked = (good[:: max(1, len(good) // (limit - n_bad))][: limit - n_bad]
              + bad[:: max(1, len(bad) // max(n_bad, 1))][:n_bad])
    return sorted(picked, key=lambda p: zlib.crc32(p.name.encode()))  # defects spread through the loop


def bare_engine(bundle: Path, images: list[Path], frames: int, cache: Path, decode: bool) -> dict:
    """``predict_stream`` throughput and CPU per frame, on pre-decoded frames or decoding each one.

    ``decode``: every frame is decoded from its file's bytes (held in memory) inside the stream, as
    ``appliance predict`` and the daemon's sources must; without it decoding is left out.
    """
    from appliance.bundle import load_bundle
    from appliance.imaging import decode_image, read_image
    from appliance.types import Frame

    engine = load_bundle(bundle, streams=2, cache_dir=cache / "openvino")
    pixels = [read_image(p) for p in images]
    data = [p.read_bytes() for p in images]

    def frame(i: int) -> Frame:
        k = i % len(images)
        return Frame(image=decode_image(data[k], images[k]) if decode else pixels[k], seq=i)

    list(engine.predict_stream(frame(i) for i in range(min(4, len(pixels)))))  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in engine.predict_stream(frame(i) for i in range(frames)))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    engine.close()
    return {"frames": n, "seconds": round(seconds, 2), "fps": round(n / seconds, 2),
            "cpu_ms_per_frame": round(cpu / n * 1000, 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root: Path, bundle: Path, replay: Path, cameras: int, fps: float | None, cache: Path,
                 plc: bool) -> Path:
    """Every output on; ``fps=None``: the replay's own cap far above the engine (unpaced)."""
    outputs: list[dict] = [{"type": "overlay", "width": 1024, "height": 600, "ok_per_s": 2},
                           {"type": "http", "port": free_port()}]
    if plc:
        outputs += [{"type": "mqtt", "host": "127.0.0.1", "port": int(os.environ["BENCH_MQTT_PORT"])},
                    {"type": "modbus", "port": free_port()}]
    doc = {"timezone": "UTC", "paths": {"state": str(root / "state"), "cache": str(cache)},
           "control": {"socket": str(root / "control.sock")}, "runtime": {"streams": 2}, "outputs": outputs,
           "cameras": [{"id": f"cam{i + 1}", "bundle": str(bundle), "queue": 4,
                        "source": {"type": "replay", "path": str(replay), "loop": True, "fps": fps or 1000.0}}
                       for i in range(cameras)]}
    path = root / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def run_daemon(root: Path, bundle: Path, replay: Path, cameras: int, fps: float | None, seconds: float,
               cache: Path, plc: bool) -> dict:
    """Start the daemon, let it settle, measure a steady window of ``seconds``, stop it."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cfg = write_config(root, bundle, replay, cameras, fps, cache, plc)
    log = open(root / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(APPLIANCE), "run", "--config", str(cfg), "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, NUMBA_CACHE_DIR=str(cache / "numba")))
    sock = root / "control.sock"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {(root / 'daemon.log').read_text()[-2000:]}")
            try:
                request(sock, {"cmd": "status"})
                break
            except ApplianceError:  # no socket yet: still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        time.sleep(5.0)  # settle: warm caches, fill the pipeline
        before, cpu0 = request(sock, {"cmd": "status"}), cpu_seconds(proc.pid)
        t0 = time.time()
        time.sleep(seconds)
        after, cpu1 = request(sock, {"cmd": "status"}), cpu_seconds(proc.pid)
        t1 = time.time()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        log.close()
    conn = sqlite3.connect(root / "state" / "audit.db")
    rows = conn.execute("SELECT camera, captured_at, finished_at, verdict FROM inspections "
                        "WHERE captured_at >= ? AND captured_at < ?", [t0, t1]).fetchall()
    conn.close()
    latency = np.array([(f - c) * 1000 for _, c, f, _ in rows])
    per_camera = {}
    for cam, b in before["cameras"].items():
        a = after["cameras"][cam]
        done = sum(a["counts"].values()) - sum(b["counts"].values())
        per_camera[cam] = {"fps": round(done / (t1 - t0), 2), "drops": a["drops"] - b["drops"],
                           "errors": a["counts"].get("error", 0) - b["counts"].get("error", 0)}
    outputs = {k: {"state": v.get("state"), "backlog": v.get("backlog", v.get("queued")),
                   "dropped": v.get("dropped")} for k, v in after["outputs"].items()}
    inspected = sum(sum(a["counts"].values()) - sum(before["cameras"][c]["counts"].values())
                    for c, a in after["cameras"].items())
    return {"cameras": cameras, "paced_fps": fps, "window_s": round(t1 - t0, 1), "per_camera": per_camera,
            "cpu_ms_per_frame": round((cpu1 - cpu0) / max(inspected, 1) * 1000, 2),
            "total_fps": round(sum(c["fps"] for c in per_camera.values()), 2),
            "drops": sum(c["drops"] for c in per_camera.values()),
            "latency_ms": {"p50": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
                           "p99": round(float(np.percentile(latency, 99)), 1) if len(latency) else None,
                           "n": len(latency)},
            "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="MVTec category folder (train/good, test/...)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "daemon")
    ap.add_argument("--scorers", default="padim,patchcore")
    ap.add_argument("--size", default="256x624")
    ap.add_argument("--seconds", type=float, default=40.0, help="steady measuring window per daemon run")
    ap.add_argument("--fps", type=float, default=25.0, help="paced rate per camera")
    ap.add_argument("--images", type=int, default=60, help="test images replayed (looping)")
    ap.add_argument("--defect-share", type=float, default=0.05, help="share of defect images among them")
    ap.add_argument("--precision", default="f32", help="backbone precision of the fitted bundles: f32 or bf16")
    ap.add_argument("--plc", action="store_true", help="also MQTT (BENCH_MQTT_PORT) and Modbus outputs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    images = test_images(args.data, args.images, args.defect_share)
    replay = args.out / "replay"
    if replay.exists():
        shutil.rmtree(replay)
    replay.mkdir()
    for i, p in enumerate(images):
        shutil.copy(p, replay / f"{i:04d}{p.suffix.lower()}")
    report = {"machine": describe(), "data": str(args.data), "size": args.size, "precision": args.precision,
              "images": len(images),
              "defect_share": args.defect_share, "runs": {}}
    print(one_line(report["machine"]))
    for scorer in args.scorers.split(","):
        bundle, fit_s = fit_bundle(args.data, args.out, scorer, args.size, cache, args.precision)
        bare = bare_engine(bundle, images, max(200, int(args.seconds * 10)), cache, decode=False)
        decoding = bare_engine(bundle, images, max(200, int(args.seconds * 10)), cache, decode=True)
        print(f"{scorer}: bare engine predict_stream {bare['fps']} fps, CPU {bare['cpu_ms_per_frame']} ms/frame; "
              f"decoding each frame too: {decoding['fps']} fps, CPU {decoding['cpu_ms_per_frame']} ms/frame")
        runs = {"fit_seconds": round(fit_s, 1), "bare_engine": bare, "bare_engine_decoding": decoding}
        for cameras, fps in ((1, args.fps), (2, args.fps), (1, None)):
            name = f"daemon_{cameras}cam_{'unpaced' if fps is None else f'{fps:g}fps'}"
            result = run_daemon(args.out / name, bundle, replay, cameras, fps, args.seconds, cache, args.plc)
            result["cpu_overhead_vs_bare"] = round(result["cpu_ms_per_frame"] / bare["cpu_ms_per_frame"] - 1, 3)
            result["cpu_overhead_vs_bare_decoding"] = round(
                result["cpu_ms_per_frame"] / decoding["cpu_ms_per_frame"] - 1, 3)
            runs[name] = result
            print(f"{scorer} {name}: {result['total_fps']} fps total, drops {result['drops']}, latency p50 "
                  f"{result['latency_ms']['p50']} ms p99 {result['latency_ms']['p99']} ms, CPU "
                  f"{result['cpu_ms_per_frame']} ms/frame ({result['cpu_overhead_vs_bare']:+.1%} vs bare, "
                  f"{result['cpu_overhead_vs_bare_decoding']:+.1%} vs bare with decoding)")
        report["runs"][scorer] = runs
    name = "report.json" if args.precision == "f32" else f"report_{args.precision}.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(f"report: {args.out / name}")


if __name__ == "__main__":
    main()
