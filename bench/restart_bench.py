"""Restart-to-Ready: how long the line has no inspection when the daemon starts, restarts or is killed.

    .venv/bin/python bench/restart_bench.py --data ../shared/data/bsdata/ball_screw --out bench/results/restart \
        [--scorers padim,patchcore] [--size 256x624] [--repeats 5]

For each scorer it fits a bundle (once; reused from ``--out``) and starts ``appliance run`` with a
replay camera and every output that needs no server (overlay, HTTP), then measures, from the
moment the process is started to ``READY=1`` on a real notify socket (what systemd waits for):

- **cold**: an empty cache folder (first start after install: Numba kernels and the OpenVINO blob
  are compiled and cached);
- **after a clean stop**: SIGTERM, wait for the exit, start again (warm caches); the stop's own
  duration is printed too;
- **after kill -9**: SIGKILL during inspection, start again (warm caches; the audit notices the
  unclean end).

The daemon's own log says where start-up time goes (imports, bundle verification, backbone
compile, kernels, golden images); the report prints those lines of the last warm start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from daemon_bench import fit_bundle, test_images  # noqa: E402
from machine import describe, one_line  # noqa: E402

APPLIANCE = Path(sys.executable).parent / "appliance"


class Notify:
    """systemd's side of sd_notify: a datagram socket the daemon sends READY=1 to."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 600.0) -> float:
        """Seconds until READY=1 arrives (monotonic time of arrival)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode} before READY")
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            if "READY=1" in data.splitlines():
                return time.monotonic()
        raise RuntimeError("no READY=1 within the timeout")

    def close(self) -> None:
        """Close and remove the socket."""
        self.sock.close()
        self.path.unlink(missing_ok=True)


def write_config(root: Path, bundle: Path, images: list[Path], cache: Path) -> Path:
    replay = root / "replay"
    replay.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        target = replay / f"{i:04d}{image.suffix}"
        if not target.exists():
            target.write_bytes(image.read_bytes())
    doc = {"paths": {"state": str(root / "state"), "cache": str(cache)},
           "control": {"socket": str(root / "control.sock")}, "metrics": {"port": 0},
           "outputs": [{"type": "overlay", "ok_per_s": 2.0}, {"type": "http", "port": 0}],
           "cameras": [{"id": "line1", "bundle": str(bundle), "source": {"type": "replay", "path": str(replay),
                                                                       "fps": 10, "loop": True}}]}
    path = root / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def start(config: Path, notify: Notify, log: Path) -> tuple[subprocess.Popen, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    t0 = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen([str(APPLIANCE), "run", "--config", str(config)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, notify.wait_ready(proc) - t0


def measure(bundle: Path, images: list[Path], root: Path, repeats: int) -> dict:
    cache = root / "cache"
    config = write_config(root, bundle, images, cache)
    notify = Notify(Path(f"/tmp/restart-bench-{os.getpid()}.sock"))
    log = root / "daemon.log"
    log.write_text("")
    try:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        proc, cold = start(config, notify, log)
        clean, stops, killed = [], [], []
        for _ in range(repeats):
            time.sleep(2.0)  # inspecting for a while
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            stops.append(time.monotonic() - t)
            if code != 0:
                raise RuntimeError(f"SIGTERM ended the daemon with {code}")
            proc, seconds = start(config, notify, log)
            clean.append(seconds)
        for _ in range(repeats):
            time.sleep(2.0)
            proc.kill()
            proc.wait()
            proc, seconds = start(config, notify, log)
            killed.append(seconds)
        mark = log.stat().st_size
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        proc, _ = start(config, notify, log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        lines = log.read_text(errors="replace")[mark:].splitlines()
    finally:
        notify.close()
    steps = [ln.split(": ", 1)[-1] for ln in lines if any(k in ln for k in (
        "starting (pid", "imported in", "verified in", "backbone compiled", "kernels ready", "golden images",
        "ready in"))]
    return {"cold_s": round(cold, 2), "after_sigterm_s": [round(x, 2) for x in clean],
            "after_kill9_s": [round(x, 2) for x in killed], "stop_s": [round(x, 2) for x in stops],
            "median_after_sigterm_s": round(statistics.median(clean), 2),
            "median_after_kill9_s": round(statistics.median(killed), 2),
            "median_stop_s": round(statistics.median(stops), 2), "warm_start_log": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results/restart"))
    ap.add_argument("--scorers", default="padim,patchcore")
    ap.add_argument("--size", default="256x624")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = describe()
    print(one_line(info))
    images = test_images(args.data, 40, 0.05)
    report = {"machine": info, "results": {}}
    for scorer in args.scorers.split(","):
        bundle, _ = fit_bundle(args.data, args.out, scorer, args.size, args.out / "fit-cache", "f32")
        result = measure(bundle, images, args.out / f"run-{scorer}", args.repeats)
        report["results"][scorer] = result
        print(f"{scorer} {args.size}: cold start to READY {result['cold_s']} s; after SIGTERM median "
              f"{result['median_after_sigterm_s']} s {result['after_sigterm_s']}; after kill -9 median "
              f"{result['median_after_kill9_s']} s {result['after_kill9_s']}; SIGTERM to exit median "
              f"{result['median_stop_s']} s")
        for line in result["warm_start_log"]:
            print(f"    {line}")
    (args.out / "restart.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
