"""The daemon's ``enable`` and ``bundle`` control commands (used by the PLC outputs), on the real daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import Daemon, audit_rows, camera, replay_folder, write_config

from appliance.daemon.config import parse_config
from appliance.errors import ConfigError


def test_slot_names_must_be_numbers() -> None:
    doc = {"cameras": [{"id": "cam1", "bundle": "b", "source": {"type": "replay", "path": "/tmp"},
                        "slots": {"two": "b2"}}]}
    with pytest.raises(ConfigError, match=r"cameras\[0\]\(cam1\)\.slots: slot names must be numbers"):
        parse_config(doc)


@pytest.mark.slow
def test_enable_and_bundle_slots_are_applied_refused_and_audited(
        tmp_path: Path, sample_bundle: Path, daemon_cache: Path, daemons: list[Daemon]) -> None:
    replay = {"type": "replay", "path": str(replay_folder(tmp_path / "replay")), "fps": 50, "loop": True}
    cams = [camera("cam1", sample_bundle, replay, trigger={"mode": "external"}, slots={"2": str(sample_bundle)})]
    daemon = Daemon(write_config(tmp_path / "config.toml", cams, cache=daemon_cache))
    daemons.append(daemon)
    daemon.wait_ready()

    assert daemon.request({"cmd": "enable", "camera": "cam1", "enabled": False, "who": "test"}) == \
        {"camera": "cam1", "enabled": False}
    assert daemon.status()["cameras"]["cam1"]["enabled"] is False
    with pytest.raises(AssertionError, match="disabled"):
        daemon.request({"cmd": "trigger", "camera": "cam1", "id": "t1"})
    with pytest.raises(AssertionError, match="enabled: Input should be a valid boolean"):
        daemon.request({"cmd": "enable", "camera": "cam1", "enabled": "no"})
    daemon.request({"cmd": "enable", "camera": "cam1", "enabled": True})
    assert daemon.request({"cmd": "trigger", "camera": "cam1", "id": "t2"}) == {"accepted": True}

    with pytest.raises(AssertionError, match="no bundle slot 7"):
        daemon.request({"cmd": "bundle", "camera": "cam1", "slot": 7})
    swapped = daemon.request({"cmd": "bundle", "camera": "cam1", "slot": 2, "who": "plc"})
    assert swapped["slot"] == "2" and swapped["model_id"]
    daemon.wait_until(lambda: len(audit_rows(daemon.db)) == 1, what="the triggered inspection")
    assert audit_rows(daemon.db)[0]["trigger_id"] == "t2"
    daemon.stop()
    events = {r["kind"]: r for r in audit_rows(daemon.db, table="events")}
    assert {"camera_disabled", "camera_enabled", "bundle_selected"} <= set(events)
    assert json.loads(events["bundle_selected"]["data"])["who"] == "plc"
    assert json.loads(events["camera_disabled"]["data"])["who"] == "test"
