"""Trigger-to-ResultValid latency as a PLC measures it over Modbus TCP, with 1 and 2 cameras.

Starts the real daemon (``appliance run``) with externally triggered replay cameras on the
bundled sample and a modbus output; one pymodbus client per camera (a thread each, like two PLC
tasks) runs the full handshake N times and times the write of Trigger until it reads ResultValid
(polling every millisecond). Usage: ``python bench/plc_bench.py [--bundle DIR] [-n 100]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w
from pymodbus.client import ModbusTcpClient

import appliance
from appliance.daemon import modbus_map as mm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_bench import free_port

SAMPLE = Path(appliance.__file__).parent / "samples" / "ball_screw"
APPLIANCE = Path(sys.executable).parent / "appliance"


def wait_bits(plc: ModbusTcpClient, unit: int, on: int = 0, off: int = 0, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        regs = plc.read_input_registers(0, count=mm.IR_COUNT, device_id=unit).registers
        if regs[0] & on == on and not regs[0] & off:
            return regs
        if time.monotonic() > deadline:
            raise TimeoutError(f"unit {unit}: status {regs[0]:#x}")
        time.sleep(0.001)


def plc_task(port: int, unit: int, n: int, out: list[float]) -> None:
    plc = ModbusTcpClient("127.0.0.1", port=port, timeout=10, retries=0)
    plc.connect()
    wait_bits(plc, unit, on=mm.Status.READY)
    en = mm.TRIGGER_ENABLE
    plc.write_register(mm.HR_CONTROL, en, device_id=unit)
    for i in range(n + 3):
        t0 = time.perf_counter()
        plc.write_register(mm.HR_CONTROL, en | mm.TRIGGER, device_id=unit)
        wait_bits(plc, unit, on=mm.Status.RESULT_VALID)
        dt = (time.perf_counter() - t0) * 1000
        if i >= 3:  # the first frames warm caches
            out.append(dt)
        plc.write_register(mm.HR_CONTROL, en | mm.RESULT_ACK, device_id=unit)
        wait_bits(plc, unit, off=mm.Status.RESULT_VALID)
        plc.write_register(mm.HR_CONTROL, en, device_id=unit)
    plc.close()


def run(bundle: Path, cameras: int, n: int, work: Path) -> dict[str, float]:
    port = free_port()
    replay = work / "replay"
    if not replay.exists():
        replay.mkdir(parents=True)
        for i, img in enumerate(sorted((SAMPLE / "test").rglob("*.jpg"))):
            shutil.copy(img, replay / f"{i:04d}_{img.name}")
    ids = [f"cam{i + 1}" for i in range(cameras)]
    doc = {"paths": {"state": str(work / f"state{cameras}"), "cache": str(work / "cache")},
           "control": {"socket": str(work / f"c{cameras}.sock"), "mode": "0600"},
           "outputs": [{"type": "modbus", "port": port, "cameras": {c: i + 1 for i, c in enumerate(ids)}}],
           "cameras": [{"id": c, "bundle": str(bundle), "trigger": {"mode": "external"},
                        "source": {"type": "replay", "path": str(replay), "fps": 1000, "loop": True}} for c in ids]}
    config = work / f"config{cameras}.toml"
    config.write_text(tomli_w.dumps(doc))
    log = open(work / f"daemon{cameras}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(APPLIANCE), "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, NUMBA_CACHE_DIR=str(work / "cache" / "numba")))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((work / f"daemon{cameras}.log").read_text()[-3000:]) from None
                time.sleep(0.2)
        samples: list[list[float]] = [[] for _ in ids]
        threads = [threading.Thread(target=plc_task, args=(port, i + 1, n, samples[i])) for i in range(cameras)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    allv = sorted(v for s in samples for v in s)
    return {"cameras": cameras, "n": len(allv), "p50_ms": round(statistics.median(allv), 1),
            "p99_ms": round(allv[min(len(allv) - 1, int(0.99 * len(allv)))], 1), "max_ms": round(allv[-1], 1)}


def main() -> None:
    """Fit the sample bundle if none is given, then measure with 1 and 2 cameras."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, help="a bundle to use (default: fit PaDiM on the sample at 128 px)")
    parser.add_argument("-n", type=int, default=100, help="triggers per camera")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            bundle = work / "bundle"
            subprocess.run([str(APPLIANCE), "fit", str(SAMPLE), "--out", str(bundle), "--scorer", "padim", "--size",
                            "128", "--cache-dir", str(work / "cache" / "openvino"), "-q"], check=True,
                           env=dict(os.environ, NUMBA_CACHE_DIR=str(work / "cache" / "numba")))
        for cameras in (1, 2):
            print(json.dumps(run(bundle, cameras, args.n, work)), flush=True)


if __name__ == "__main__":
    main()
