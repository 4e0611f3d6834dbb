"""The OPC UA output against a real asyncua client: browse, read results, call Trigger, logins."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from plc import Plant, inspection

from appliance.daemon.publishers.opcua import OpcUaConfig, OpcUaPublisher
from appliance.errors import ConfigError

NS = "urn:anomaly-appliance"
PASSWORD_HASH = "sha256:" + hashlib.sha256(b"s3cret").hexdigest()


def start_output(tmp_path: Path, plant: Plant, **config: Any) -> OpcUaPublisher:
    cfg = OpcUaConfig(**{"endpoint": "opc.tcp://127.0.0.1:0/appliance/", "cameras": ["cam1", "cam2"],
                         "users": {"plc": PASSWORD_HASH}, "refresh_s": 0.1, **config})
    out = OpcUaPublisher(cfg, plant.context(tmp_path))
    out.start()
    return out


@pytest.fixture
def output(tmp_path: Path, plant: Plant) -> Iterator[OpcUaPublisher]:
    out = start_output(tmp_path, plant)
    yield out
    out.close()


async def camera_node(client: Client, camera: str) -> Any:
    idx = await client.get_namespace_index(NS)
    return await client.nodes.objects.get_child([f"{idx}:Cameras", f"{idx}:{camera}"])


async def read(node: Any, idx: int, name: str) -> Any:
    return await (await node.get_child(f"{idx}:{name}")).read_value()


def test_browse_read_results_and_trigger(output: OpcUaPublisher, plant: Plant) -> None:
    async def session() -> None:
        client = Client(output.endpoint, timeout=5)
        client.set_user("plc")
        client.set_password("s3cret")
        async with client:
            idx = await client.get_namespace_index(NS)
            cam = await camera_node(client, "cam1")
            names = {(await c.read_browse_name()).Name for c in await cam.get_children()}
            assert {"Ready", "Verdict", "Score", "TriggerId", "ModelId", "Error", "Trigger"} <= names
            for _ in range(50):
                if await read(cam, idx, "Ready"):
                    break
                await asyncio.sleep(0.05)
            assert await read(cam, idx, "ModelId") == "m1" and await read(cam, idx, "Ready")
            accepted = await cam.call_method(f"{idx}:Trigger", ua.Variant("T-17", ua.VariantType.String))
            assert accepted is True and plant.triggers == [("cam1", "T-17")]
            await asyncio.get_running_loop().run_in_executor(
                None, output.publish, inspection(trigger_id="T-17", verdict="ng", score=0.8125, seq=3))
            assert await read(cam, idx, "TriggerId") == "T-17" and await read(cam, idx, "Verdict") == "ng"
            assert await read(cam, idx, "VerdictCode") == 2 and await read(cam, idx, "Score") == 0.8125
            assert await read(cam, idx, "ResultSeq") == 3 and await read(cam, idx, "ResultCount") == 1
            with pytest.raises(ua.UaStatusCodeError):  # variables are read-only to clients
                await (await cam.get_child(f"{idx}:Verdict")).write_value("ok")

            def refuse() -> bool:
                raise ConfigError("camera 'cam1' is free-running")

            plant.trigger_answer = refuse
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await cam.call_method(f"{idx}:Trigger", ua.Variant("T-18", ua.VariantType.String))

    asyncio.run(session())


def test_anonymous_and_wrong_passwords_are_refused(output: OpcUaPublisher) -> None:
    async def login(user: str | None, password: str | None) -> None:
        client = Client(output.endpoint, timeout=5)
        if user:
            client.set_user(user)
            client.set_password(password or "")
        async with client:
            await camera_node(client, "cam1")

    for user, password in ((None, None), ("plc", "wrong"), ("nobody", "s3cret")):
        with pytest.raises(ua.UaStatusCodeError):
            asyncio.run(login(user, password))
    assert output.state()["refused_sessions"] == 2  # anonymous is refused earlier: the endpoint offers no such token


def test_anonymous_when_allowed(tmp_path: Path, plant: Plant) -> None:
    out = start_output(tmp_path, plant, allow_anonymous=True, users={})

    async def session() -> bool:
        async with Client(out.endpoint, timeout=5) as client:
            cam = await camera_node(client, "cam2")
            return (await cam.read_browse_name()).Name == "cam2"

    try:
        assert asyncio.run(session())
    finally:
        out.close()


def test_config_needs_a_way_in_and_certificates_for_encryption() -> None:
    with pytest.raises(ValueError, match="no one could log in"):
        OpcUaConfig(cameras=["cam1"])
    with pytest.raises(ValueError, match="need certificate"):
        OpcUaConfig(cameras=["cam1"], allow_anonymous=True, security=["Basic256Sha256_SignAndEncrypt"])
    with pytest.raises(ValueError, match=r"opc\.tcp"):
        OpcUaConfig(cameras=["cam1"], allow_anonymous=True, endpoint="http://x:1/")
