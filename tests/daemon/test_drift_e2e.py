"""The drift watch end to end: the real daemon on a replay whose frames brighten part-way (and one that does not).

A raised drift must show on every output: the audit (events), ``appliance status`` and ``appliance drift``,
the Modbus Drift bit, the OPC UA ``Drift`` variable, a retained MQTT message, Prometheus, the live page's API.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from asyncua import Client
from harness import APPLIANCE, Daemon, audit_rows, camera, free_port, good_test_images, write_config
from mqtt_broker import Subscriber, needs_mosquitto, running_broker
from pymodbus.client import ModbusTcpClient

from appliance.daemon import modbus_map as mm

pytestmark = pytest.mark.slow
DRIFT = {"cadence_s": 3.0, "min_frames": 50, "raise_after": 2, "clear_after": 2}


def good_frames(folder: Path, count: int, gain: float = 1.0, start: int = 0) -> None:
    """``count`` frames cycling over the sample's good test images (the baseline's), brightened by ``gain``."""
    folder.mkdir(parents=True, exist_ok=True)
    images = good_test_images()
    for i in range(count):
        source = images[i % len(images)]
        target = folder / f"{start + i:05d}.png"
        if gain == 1.0:
            shutil.copy(source, target.with_suffix(source.suffix))
            continue
        bgr = cv2.imread(str(source)).astype(np.float32) * gain
        assert cv2.imwrite(str(target), np.clip(bgr, 0, 255).astype(np.uint8))


def drift_events(db: Path) -> list[str]:
    return [r["kind"] for r in audit_rows(db, "events", "kind LIKE 'drift_%'", "id")]


@needs_mosquitto
def test_a_brightening_replay_raises_drift_on_every_output(tmp_path, drift_bundle, daemon_cache, daemons):
    folder = tmp_path / "replay"
    good_frames(folder, 150)
    good_frames(folder, 450, gain=1.25, start=150)
    modbus_port, http_port = free_port(), free_port()
    with running_broker(tmp_path / "broker") as broker:
        cfg = write_config(tmp_path / "config.toml",
                           [camera("line1", drift_bundle, {"type": "replay", "path": str(folder), "fps": 25})],
                           outputs=[{"type": "http", "port": http_port},
                                    {"type": "modbus", "port": modbus_port, "cameras": {"line1": 1}},
                                    {"type": "opcua", "endpoint": "opc.tcp://127.0.0.1:0/appliance/",
                                     "cameras": ["line1"], "allow_anonymous": True},
                                    {"type": "mqtt", "port": broker.port, "prefix": "plant", "status_interval": 1.0},
                                    {"type": "frames"}],
                           cache=daemon_cache, drift=DRIFT)
        d = Daemon(cfg)
        daemons.append(d)
        d.wait_ready()
        assert d.status()["cameras"]["line1"]["drift"]["state"] == "collecting"
        d.wait_until(lambda: "drift_raised" in drift_events(d.db), 120, "the drift raised")
        windows = audit_rows(d.db, "events", "kind = 'drift_window'", "id")
        raised = audit_rows(d.db, "events", "kind = 'drift_raised'", "id")[0]
        data = json.loads(raised["data"])
        assert data["significant"] and data["p_value"] <= 0.01 and data["frames"], data
        assert all(Path(d.state / "frames" / f["frame"]).is_file() for f in data["frames"])
        # within one cadence of the shift reaching the window: the frames before the shift were the first window(s)
        shifted_at = audit_rows(d.db, where="source LIKE '%00150.png'")[0]["captured_at"]
        assert raised["at"] - shifted_at < 3 * DRIFT["cadence_s"] + 10, (raised["at"] - shifted_at, windows)

        status = d.status()["cameras"]["line1"]
        assert status["drift"]["state"] == "drift" and status["drift"]["last"]["significant"]
        report = json.loads(subprocess.run([str(APPLIANCE), "drift", "--config", str(cfg), "--json"],
                                           capture_output=True, text=True, timeout=30, check=True).stdout)
        assert report["line1"]["state"] == "drift" and report["line1"]["history"][-1]["kind"] in (
            "drift_raised", "drift_window")
        plc = ModbusTcpClient("127.0.0.1", port=modbus_port)
        assert plc.connect()
        deadline = time.monotonic() + 10
        while not plc.read_input_registers(0, count=1, device_id=1).registers[0] & mm.Status.DRIFT:
            assert time.monotonic() < deadline, "the Modbus Drift bit"
            time.sleep(0.1)
        plc.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/status", timeout=5) as answer:
            assert json.load(answer)["cameras"]["line1"]["drift"]["state"] == "drift"
        with urllib.request.urlopen(d.status()["daemon"]["metrics_url"], timeout=5) as answer:
            assert 'anomaly_appliance_drift{camera="line1"} 1.0' in answer.read().decode()
        sub = Subscriber(broker.port, ["plant/line1/drift"])
        msg = sub.wait_for(lambda ms: any(m.json()["state"] == "drift" for m in ms), 10, "the retained drift")[-1]
        assert msg.retain and msg.json()["camera"] == "line1"
        sub.close()
        endpoint = d.status()["outputs"]["opcua"]["endpoint"]

        async def opcua_drift() -> bool:
            async with Client(endpoint, timeout=5) as client:
                idx = await client.get_namespace_index("urn:anomaly-appliance")
                cam = await client.nodes.objects.get_child([f"{idx}:Cameras", f"{idx}:line1"])
                return await (await cam.get_child(f"{idx}:Drift")).read_value()

        assert asyncio.run(opcua_drift()) is True
        assert d.stop() == 0


def test_an_unshifted_replay_raises_nothing(tmp_path, drift_bundle, daemon_cache, daemons):
    folder = tmp_path / "replay"
    good_frames(folder, 420)
    cfg = write_config(tmp_path / "config.toml",
                       [camera("line1", drift_bundle, {"type": "replay", "path": str(folder), "fps": 30})],
                       cache=daemon_cache, drift=DRIFT)
    d = Daemon(cfg)
    daemons.append(d)
    d.wait_ready()
    d.wait_until(lambda: d.status()["cameras"]["line1"]["state"] == "ended", 120, "the replay ended")
    d.wait_until(lambda: len(audit_rows(d.db, "events", "kind = 'drift_window'")) >= 3, 30, "three windows")
    assert "drift_raised" not in drift_events(d.db)
    assert d.status()["cameras"]["line1"]["drift"]["state"] == "ok"
    assert d.stop() == 0
