"""End to end: the real daemon, externally triggered replay cameras, a pymodbus client as the PLC, asyncua."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from asyncua import Client, ua
from harness import Daemon, audit_rows, camera, free_port, replay_folder, write_config
from plc import EN, S, control, score_of, wait_bits
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from appliance.daemon import modbus_map as mm


def run_trigger(plc: ModbusTcpClient, unit: int) -> tuple[int, int, int, float]:
    """One full handshake; returns (TriggerID, ResultID, verdict code, score)."""
    control(plc, EN | mm.TRIGGER, unit)
    trigger_id = wait_bits(plc, on=S.TRIGGER_ACK, unit=unit, timeout=60)[mm.IR_TRIGGER_ID]
    control(plc, EN, unit)
    regs = wait_bits(plc, on=S.RESULT_VALID, unit=unit, timeout=60)
    control(plc, EN | mm.RESULT_ACK, unit)
    wait_bits(plc, off=S.RESULT_VALID, unit=unit, timeout=60)
    control(plc, EN, unit)
    return trigger_id, regs[mm.IR_RESULT_ID], regs[mm.IR_VERDICT], score_of(regs)


@pytest.mark.slow
def test_plc_triggers_get_their_results_in_order_and_ready_dies_with_the_daemon(
        tmp_path: Path, sample_bundle: Path, daemon_cache: Path, daemons: list[Daemon]) -> None:
    port = free_port()
    replay = {"type": "replay", "path": str(replay_folder(tmp_path / "replay")), "fps": 50, "loop": True}
    cams = [camera(cam, sample_bundle, replay, trigger={"mode": "external"}) for cam in ("left", "right")]
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/appliance/"
    config = write_config(tmp_path / "config.toml", cams, cache=daemon_cache,
                          outputs=[{"type": "modbus", "port": port, "cameras": {"left": 1, "right": 2}},
                                   {"type": "opcua", "endpoint": endpoint, "cameras": ["left", "right"],
                                    "allow_anonymous": True, "refresh_s": 0.1}])
    daemon = Daemon(config)
    daemons.append(daemon)
    daemon.wait_ready()
    plc = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    assert plc.connect()
    for unit in (1, 2):
        wait_bits(plc, on=S.READY | S.MODEL_LOADED, unit=unit, timeout=60)
        control(plc, EN, unit)
    seen: dict[str, list[tuple[int, int, int, float]]] = {"left": [], "right": []}
    for _ in range(4):
        for cam, unit in (("left", 1), ("right", 2)):
            seen[cam].append(run_trigger(plc, unit))
    for cam, results in seen.items():
        rows = audit_rows(daemon.db, where=f"camera = '{cam}'")
        assert [r["trigger_id"] for r in rows] == [str(i) for i in range(1, 5)]
        codes = {"ok": 1, "ng": 2, "error": 3}
        for (trigger_id, result_id, verdict, score), row in zip(results, rows, strict=True):
            assert result_id == trigger_id == int(row["trigger_id"])
            assert verdict == codes[row["verdict"]] and abs(score - row["score"]) < 1e-6
    assert daemon.status()["outputs"]["modbus"]["requests"] > 40

    # The same daemon over OPC UA: the last result as the PLC saw it, then a trigger by method call.
    async def opcua_session() -> tuple[tuple, tuple]:
        async with Client(endpoint, timeout=10) as client:
            idx = await client.get_namespace_index("urn:anomaly-appliance")
            cam = await client.nodes.objects.get_child([f"{idx}:Cameras", f"{idx}:left"])

            async def result() -> tuple:
                names = ("TriggerId", "Verdict", "Score", "Ready")
                return tuple([await (await cam.get_child(f"{idx}:{n}")).read_value() for n in names])

            before = await result()
            assert await cam.call_method(f"{idx}:Trigger", ua.Variant("OPC-1", ua.VariantType.String)) is True
            for _ in range(600):
                after = await result()
                if after[0] == "OPC-1":
                    break
                await asyncio.sleep(0.05)
            return before, after

    before, after = asyncio.run(opcua_session())
    rows = audit_rows(daemon.db, where="camera = 'left'")
    assert before[:3] == (rows[3]["trigger_id"], rows[3]["verdict"], pytest.approx(rows[3]["score"]))
    assert before[3] is True  # Ready
    assert rows[-1]["trigger_id"] == "OPC-1"
    assert after[:3] == ("OPC-1", rows[-1]["verdict"], pytest.approx(rows[-1]["score"]))
    daemon.kill()
    plc.close()
    with pytest.raises((ModbusException, ConnectionError, AssertionError)):
        assert plc.connect(), "refused"
        plc.read_input_registers(0, count=1, device_id=1)
