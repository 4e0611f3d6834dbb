"""The daemon's pure seams: typed commands and their dispatcher, reload planning, stall rules, the disk floor,
the log rate limit and the status text."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest
from snapshots import snapshot

from appliance.daemon import commands as cmd
from appliance.daemon.config import parse_config
from appliance.daemon.disk import DiskConfig, DiskGuard
from appliance.daemon.health import Progress, stall_reasons
from appliance.daemon.reload import plan_reload
from appliance.daemon.status_text import render
from appliance.daemon.supervisor import RateLimit

# ---------------------------------------------------------------- commands


def test_commands_are_typed_and_refused_with_the_field_and_reason():
    c = cmd.parse_command({"cmd": "threshold", "camera": "line1", "value": 0.6, "shift": "A", "who": "ann"})
    assert isinstance(c, cmd.ThresholdCommand) and (c.value, c.shift, c.who) == (0.6, "A", "ann")
    assert cmd.parse_command({"cmd": "threshold", "camera": "line1", "value": -0.0}).value.hex() == (0.0).hex()
    assert cmd.parse_command({"cmd": "threshold", "camera": "line1", "value": None}).value is None
    refused = [
        ({"cmd": "threshold", "camera": "line1", "value": 1.5}, "value: Input should be less than or equal to 1"),
        ({"cmd": "threshold", "camera": "line1", "value": "0.5"}, "value: Input should be a valid number"),
        ({"cmd": "threshold", "camera": "line1", "value": True}, "value"),
        ({"cmd": "threshold", "camera": "line1"}, "value: Field required"),
        ({"cmd": "enable", "camera": "line1", "enabled": "no"}, "enabled: Input should be a valid boolean"),
        ({"cmd": "trigger", "camera": "line1", "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"cmd": "trigger", "camera": ""}, "camera: String should have at least 1 character"),
        ({"cmd": "shutdown"}, "unknown command 'shutdown'"),
        ({"camera": "line1"}, "unknown command"),
        (["cmd", "status"], "JSON object"),
    ]
    for data, why in refused:
        with pytest.raises(cmd.CommandError, match=why.replace("(", r"\(")):
            cmd.parse_command(data)


def test_json_is_bounded_before_the_recursive_parser_sees_it():
    assert cmd.load_json(b'{"cmd": "status"}') == {"cmd": "status"}
    for payload, why in [(b"[" * 3000 + b"]" * 3000, "levels deep"), (b"1" * 20_000, "bytes"),
                         (b'{"value": NaN}', "NaN"), (b"{not json", "not JSON")]:
        with pytest.raises(cmd.CommandError, match=why):
            cmd.load_json(payload)


def test_one_dispatcher_table_runs_sync_and_async_handlers():
    seen = []

    async def reload(c):
        seen.append(c.who)
        return {"changes": []}

    d = cmd.Dispatcher({cmd.ReloadCommand: reload, cmd.TriggerCommand: lambda c: {"accepted": c.id == "t1"}})
    assert asyncio.run(d.run({"cmd": "reload", "who": "ann"})) == {"changes": []} and seen == ["ann"]
    assert asyncio.run(d.run({"cmd": "trigger", "camera": "c", "id": "t1"})) == {"accepted": True}
    with pytest.raises(cmd.CommandError, match="not available here"):
        asyncio.run(d.run({"cmd": "status"}))


# ---------------------------------------------------------------- reload planning

BASE = {"cameras": [
    {"id": "a", "bundle": "b1", "source": {"type": "replay", "path": "/x"}},
    {"id": "b", "bundle": "b1", "source": {"type": "replay", "path": "/y"}},
    {"id": "c", "bundle": "b1", "source": {"type": "replay", "path": "/z"}},
    {"id": "d", "bundle": "b1", "source": {"type": "replay", "path": "/w"}},
]}


def _with(**changes):
    doc = {"cameras": [dict(c) for c in BASE["cameras"]]}
    for cam_id, fields in changes.items():
        for cam in doc["cameras"]:
            if cam["id"] == cam_id:
                cam.update(fields)
    return doc


def test_reload_plan_names_what_changes_per_camera_and_what_needs_a_restart():
    old = parse_config(BASE)
    new_doc = _with(a={"bundle": "b2"}, b={"source": {"type": "replay", "path": "/y2"}},
                    c={"thresholds": {"value": 0.6}}, d={"enabled": False})
    new_doc["cameras"].append({"id": "e", "bundle": "b1", "source": {"type": "replay", "path": "/v"}})
    new_doc["timezone"] = "Europe/Berlin"
    plan = plan_reload(old, parse_config(new_doc), running={"a", "b", "c", "d"})
    assert (plan.swap, plan.restart, plan.update, plan.stop, plan.start) == (("a",), ("b",), ("c",), ("d",), ("e",))
    assert plan.restart_needed == ("timezone",) and plan.loads == ("e", "b", "a")
    same = plan_reload(old, parse_config(BASE), running={"a", "b", "c", "d"})
    assert not (same.swap or same.restart or same.update or same.stop or same.start or same.restart_needed)
    assert plan_reload(old, parse_config(BASE), running={"a"}).start == ("b", "c", "d")  # not running: started


# ---------------------------------------------------------------- stall rules


def test_stall_is_measured_from_the_oldest_waiting_frame():
    idle = Progress(True, 100.0, True, 100.0, None)
    assert stall_reasons(idle, now=100.5, stall_s=1.0) == []
    just_triggered = Progress(True, 199.9, True, 199.9, oldest_waiting=199.8)  # after an hour idle
    assert stall_reasons(just_triggered, now=200.0, stall_s=1.0) == []
    waiting = Progress(True, 201.9, True, 201.9, oldest_waiting=199.8)
    assert stall_reasons(waiting, now=202.0, stall_s=1.0) == ["a frame has waited more than 1 s for its result"]
    dead = Progress(False, 0.0, False, 0.0, None)
    assert stall_reasons(dead, now=5.0, stall_s=1.0) == ["inference thread ended"]
    silent = Progress(True, 10.0, True, 10.0, None)
    assert len(stall_reasons(silent, now=12.0, stall_s=1.0)) == 2


# ---------------------------------------------------------------- the disk floor


def test_the_disk_floor_raises_and_clears_with_hysteresis(tmp_path):
    free_mb = [500.0]

    def statvfs(path: str):
        return SimpleNamespace(f_bavail=int(free_mb[0] * 256), f_frsize=4096, f_blocks=1000 * 256)

    changes = []
    guard = DiskGuard(DiskConfig(min_free_mb=100, clear_margin_mb=20, check_s=0.01),
                      [("state", tmp_path), ("overlay", tmp_path / "overlays")], changes.append, statvfs)
    assert guard.allows(tmp_path / "overlays" / "x.png") and not guard.low()
    free_mb[0] = 90
    guard.check()
    assert [(v.low, v.uses) for v in changes] == [(True, ("state", "overlay"))]
    assert not guard.allows(tmp_path / "overlays" / "x.png")
    free_mb[0] = 110  # above the floor, not above floor + margin: still low
    guard.check()
    assert len(changes) == 1 and guard.low()
    free_mb[0] = 125
    guard.check()
    assert [v.low for v in changes] == [True, False] and guard.allows(tmp_path)
    assert guard.snapshot()["volumes"][str(tmp_path)]["free_mb"] == 125.0


# ---------------------------------------------------------------- logging and status text


def test_the_log_rate_limit_holds_back_a_flood_and_says_so():
    limit = RateLimit(burst=3, window_s=0.2)
    record = lambda: logging.LogRecord("appliance.x", logging.WARNING, __file__, 1, "bad frame %s", ("a",), None)  # noqa: E731
    let_through = [limit.filter(record()) for _ in range(10)]
    assert let_through == [True] * 3 + [False] * 7
    other = logging.LogRecord("appliance.y", logging.WARNING, __file__, 1, "another kind", (), None)
    assert limit.filter(other)
    time.sleep(0.25)
    late = record()
    assert limit.filter(late) and "7 similar messages held back" in late.getMessage()


def test_status_text_has_words_not_python_values():
    s = snapshot({"line1": {"last": {"id": "x", "seq": 7, "verdict": "ng", "score": 0.734, "finished_at": 1.0},
                            "counts": {"ok": 5, "ng": 1, "error": 0}},
                  "line2": {"ready": False, "healthy": False, "unhealthy": ["a frame has waited more than 15 s"],
                            "state": "lost", "state_detail": "camera unplugged"}},
                 alarms=[{"kind": "disk_low", "detail": "/var: 12 MiB free", "since": 1.0}],
                 outputs={"mqtt": {"state": "disconnected", "backlog": None, "last_error": "refused"}})
    text = render(s.to_json())
    assert "ALARM disk_low: /var: 12 MiB free" in text
    assert "camera line1: running, READY" in text and "last NG 0.734 (#7" in text
    assert "camera line2: lost (camera unplugged), NOT READY" in text and "unhealthy: a frame has waited" in text
    assert "output mqtt: disconnected, backlog -, last error: refused" in text
    assert "None" not in text and "{" not in text


def test_a_notify_socket_that_went_away_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    import socket

    from appliance.daemon.supervisor import notify

    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert notify("READY=1")
    assert receiver.recv(100) == b"READY=1"
    receiver.close()
    path.unlink()  # the manager is gone: the daemon goes on inspecting
    assert notify("WATCHDOG=1") is False
    assert "sd_notify" in caplog.text
