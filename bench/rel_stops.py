"""Reliability scenarios about stopping and running short: repeated SIGTERMs, and a disk below its floor.

sigterm: an orderly stop must exit 0, leave no delivery of a non-durable output ``pending``
and no audit row naming an overlay file that is not there. disk: the ``disk_low`` alarm must
reach every reader (status, /healthz, Modbus, the retained MQTT status) while results keep
flowing, clear when space is back, and a SIGTERM while low must not lose the audit row of any
result the live page or MQTT already showed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pymodbus.client import ModbusTcpClient
from rel_kit import (
    PREFIX,
    Bench,
    Daemon,
    audit,
    audit_count,
    audit_ids,
    counts_line,
    events,
    free_port,
    http_get,
    mqtt_output,
    replay_camera,
    wait_for,
    write_config,
)
from rel_mqtt import Broker, Subscriber, delivery_counts

CAMERAS = ["cam1", "cam2"]
ERROR_BIT, DISK_LOW_CODE, IR_ERROR_CODE = 64, 8, 10  # docs/modbus-register-map.md


def _inspected(daemon: Daemon) -> int:
    return sum(sum(c["counts"].values()) for c in daemon.status()["cameras"].values())


def sigterm(bench: Bench, stops: int, stop_after: int) -> dict[str, Any]:
    """``stops`` cycles of start, ``stop_after`` inspections, SIGTERM; overlays 1920x1080 of every part."""
    root = bench.fresh("sigterm")
    outputs = [{"type": "overlay", "width": 1920, "height": 1080, "ok_per_s": 0, "keep": 1_000_000,
                "max_mb": 1_000_000}, {"type": "http", "port": free_port()}]
    cameras = [replay_camera(c, bench.bundle, bench.replay, fps=1000, queue=2) for c in CAMERAS]
    daemon = Daemon(write_config(root, cameras, outputs, bench.cache))
    cycles: list[dict[str, Any]] = []
    try:
        for _ in range(stops):
            mark = daemon.log_path.stat().st_size if daemon.log_path.exists() else 0
            daemon.start()
            run_id = daemon.status()["daemon"]["run_id"]
            wait_for(lambda: _inspected(daemon) >= stop_after, 300, f"{stop_after} inspections",
                     alive=daemon.check_alive)
            done = daemon.stop()
            log = daemon.log_path.read_bytes()[mark:].decode(errors="replace")
            paths = [p for (p,) in audit(daemon.db, "SELECT overlay_path FROM inspections WHERE run_id = ? "
                                                    "AND overlay_path IS NOT NULL", (run_id,))]
            missing = [p for p in paths if not Path(p).exists()]
            pending = audit(daemon.db, "SELECT d.output, count(*) FROM deliveries d JOIN inspections i ON "
                                       "i.id = d.inspection_id WHERE i.run_id = ? AND d.status = 'pending' "
                                       "GROUP BY d.output", (run_id,))
            stop_event = audit(daemon.db, "SELECT data FROM events WHERE run_id = ? AND kind = 'stop'", (run_id,))
            cycles.append({"run_id": run_id, "exit": done.returncode, "stop_s": done.seconds,
                           "inspections": audit_count(daemon.db, "SELECT count(*) FROM inspections WHERE run_id = ?",
                                                      (run_id,)),
                           "terminate_called": "terminate called" in log, "traceback": "Traceback" in log,
                           "overlay_missing": len(missing), "missing_examples": missing[:3],
                           "pending": dict(pending), "stop_event": stop_event[0][0] if stop_event else None})
    finally:
        daemon.ensure_stopped()
    db = daemon.db
    pending_total = audit_count(db, "SELECT count(*) FROM deliveries WHERE status = 'pending' AND output != 'mqtt'")
    paths = [p for (p,) in audit(db, "SELECT overlay_path FROM inspections WHERE overlay_path IS NOT NULL")]
    missing_total = sum(not Path(p).exists() for p in paths)
    overlay_bytes = sum(f.stat().st_size for f in (daemon.state / "overlays").rglob("*.png"))
    subprocess.run(["rm", "-rf", str(daemon.state / "overlays")], check=True)  # GBs of PNGs: counted, not kept
    stop_s = sorted(c["stop_s"] for c in cycles if c["stop_s"] is not None)
    result = {"sent": None, "audited": audit_count(db, "SELECT count(*) FROM inspections"), "delivered": None,
              "lost": None, "duplicated": None, "out_of_order": None, "crashed": daemon.crashes(),
              "crash_lines": daemon.crash_lines()[:10], "cycles": cycles, "cycles_done": len(cycles),
              "nonzero_exits": sum(c["exit"] != 0 for c in cycles),
              "terminate_called": sum(c["terminate_called"] for c in cycles),
              "pending_non_durable": pending_total, "overlay_rows": len(paths), "overlay_missing": missing_total,
              "overlay_mb_written": round(overlay_bytes / 2**20, 1),
              "stop_s_median": stop_s[len(stop_s) // 2] if stop_s else None, "stop_s_max": max(stop_s, default=None),
              "deliveries": dict(audit(db, "SELECT output || ':' || status, count(*) FROM deliveries GROUP BY 1"))}
    result["line"] = counts_line("sigterm", result, (
        f"{len(cycles)}/{stops} stops, non-zero exits {result['nonzero_exits']}, 'terminate called' "
        f"{result['terminate_called']}, stop median {result['stop_s_median']} s max {result['stop_s_max']} s, "
        f"pending (non-durable) {pending_total}, overlay rows naming no file {missing_total} of {len(paths)}"))
    result["notes"] = [f"cycle {i + 1}: {c}" for i, c in enumerate(cycles) if c["exit"] != 0 or c["terminate_called"]
                       or c["traceback"] or c["overlay_missing"] or c["pending"]] + [
        f"log: {line[:300]}" for line in result["crash_lines"][:5]]
    return result


# --------------------------------------------------------------------------- disk


class PagePoller:
    """Polls the live page's ``/api/cameras/<cam>/recent`` on a thread: every inspection id the page showed."""

    def __init__(self, port: int, cameras: list[str], every: float = 0.5) -> None:
        self.port, self.cameras, self.every = port, cameras, every
        self.ids: set[str] = set()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """Read each camera's recent inspections once."""
        for cam in self.cameras:
            try:
                code, body = http_get(self.port, f"/api/cameras/{cam}/recent?n=100000", timeout=3)
            except OSError:  # the daemon is stopping or gone
                self.errors += 1
                continue
            if code == 200 and isinstance(body, dict):
                self.ids.update(item["id"] for item in body.get("items", []))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def close(self) -> None:
        """Stop polling (idempotent)."""
        self._stop.set()
        self._thread.join(5)


def _free_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 2**20


def _fill(ballast: Path, mount: Path, leave_mb: float) -> None:
    """Grow ``ballast`` so that ``leave_mb`` MiB stay free on ``mount``."""
    size = ballast.stat().st_size if ballast.exists() else 0
    grow = int((_free_mb(mount) - leave_mb) * 2**20)
    if grow > 0:
        with ballast.open("ab") as f:
            os.posix_fallocate(f.fileno(), size, grow)


def _alarms(daemon: Daemon) -> list[dict[str, Any]]:
    return daemon.status()["daemon"]["alarms"]


def _plc(port: int) -> dict[int, Any]:
    """Status register, Error bit and ErrorCode of each unit, read by a real pymodbus client."""
    plc = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    try:
        plc.connect()
        out: dict[int, Any] = {}
        for unit in (1, 2):
            regs = plc.read_input_registers(0, count=17, device_id=unit)
            out[unit] = None if regs.isError() else {"status": regs.registers[0],
                                                     "error_bit": bool(regs.registers[0] & ERROR_BIT),
                                                     "error_code": regs.registers[IR_ERROR_CODE]}
        return out
    finally:
        plc.close()


def _plc_until(port: int, alarm: bool, timeout: float = 10.0) -> dict[str, Any]:
    """Read the units until both show the disk alarm (Error bit, code 8) or both do not; how long that took."""
    t0 = time.monotonic()

    def shows() -> dict[int, Any] | None:
        regs = _plc(port)
        on = [bool(r and r["error_bit"] and r["error_code"] == DISK_LOW_CODE) for r in regs.values()]
        return regs if all(x == alarm for x in on) else None

    try:
        regs = wait_for(shows, timeout, "the Modbus registers", every=0.1)
        return {"units": regs, "after_s": round(time.monotonic() - t0, 2), "as_expected": True}
    except TimeoutError:
        return {"units": _plc(port), "after_s": None, "as_expected": False}


def _retained_alarms(port: int, alarm: bool, timeout: float = 15.0) -> dict[str, Any]:
    """The retained ``<prefix>/<cam>/status`` a new subscriber gets, until its ``alarms`` are (non-)empty.

    Each try is a fresh clean-session subscriber: the first message of each camera is the retained one.
    """
    t0 = time.monotonic()
    latest: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout:
        sub = Subscriber(port, [f"{PREFIX}/{cam}/status" for cam in CAMERAS], f"retained-{time.monotonic_ns()}",
                         persistent=False)
        try:
            with contextlib.suppress(TimeoutError):
                wait_for(lambda s=sub: {m.topic for m in s.on("/status")} >= {f"{PREFIX}/{c}/status" for c in CAMERAS},
                         3, "retained status", every=0.05)
            latest = {}
            for m in sub.on("/status"):
                latest.setdefault(m.topic.split("/")[-2], {"retained": m.retain,
                                                          "alarms": json.loads(m.payload).get("alarms")})
        finally:
            sub.close()
        if len(latest) == len(CAMERAS) and all(v["retained"] and bool(v["alarms"]) == alarm for v in latest.values()):
            return {"cameras": latest, "after_s": round(time.monotonic() - t0, 2), "as_expected": True}
        time.sleep(0.5)
    return {"cameras": latest, "after_s": None, "as_expected": False}


def _seen(check: dict[str, Any]) -> str:
    return f"after {check['after_s']} s" if check["as_expected"] else "NOT SEEN"


def disk(bench: Bench, low_s: float, fps: float = 5.0, floor_mb: float = 24.0) -> dict[str, Any]:
    """The state folder on a 40 MB tmpfs, pushed below ``floor_mb``; see the module docstring."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (mount -t tmpfs)", "line": "disk: skipped: needs root to mount a tmpfs"}
    root = bench.fresh("disk")
    mount = root / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        return {"skipped": mounted.stderr.strip(), "line": f"disk: skipped: cannot mount a tmpfs: {mounted.stderr}"}
    broker = Broker(root / "broker")
    daemon = sub = page = None
    checks: dict[str, Any] = {}
    try:
        broker.start()
        sub = Subscriber(broker.port, [f"{PREFIX}/+/result"], "disk")
        http_port, modbus_port = free_port(), free_port()
        outputs = [{"type": "overlay", "ok_per_s": 2}, {"type": "http", "port": http_port}, mqtt_output(broker.port),
                   {"type": "modbus", "port": modbus_port, "cameras": {"cam1": 1, "cam2": 2}}]
        config = write_config(root, [replay_camera(c, bench.bundle, bench.replay, fps) for c in CAMERAS], outputs,
                              bench.cache, state=mount / "state",
                              disk={"min_free_mb": floor_mb, "clear_margin_mb": 4, "check_s": 0.5})
        daemon = Daemon(config)
        daemon.start()
        page = PagePoller(http_port, CAMERAS)
        wait_for(lambda: len(sub.results()) >= 10, 60, "first results", alive=daemon.check_alive)
        checks["before"] = {"healthz": http_get(http_port, "/healthz")[0], "free_mb": round(_free_mb(mount), 1)}
        ballast = mount / "ballast"

        # 1. below the floor: the alarm everywhere, results still flowing
        _fill(ballast, mount, floor_mb - 8)
        t_low = time.time()
        t0 = time.monotonic()
        wait_for(lambda: any(a["kind"] == "disk_low" for a in _alarms(daemon)), 30, "the disk_low alarm",
                 alive=daemon.check_alive)
        low: dict[str, Any] = {"alarm_after_s": round(time.monotonic() - t0, 1), "free_mb": round(_free_mb(mount), 1)}
        low["healthz"] = http_get(http_port, "/healthz")
        low["plc"] = _plc_until(modbus_port, alarm=True)
        low["mqtt_retained_status"] = _retained_alarms(broker.port, alarm=True)
        time.sleep(max(0.0, low_s - (time.monotonic() - t0)))  # inspecting while low: time is the point
        t_free = time.time()
        low_ids = audit_ids(daemon.db, "captured_at >= ? AND captured_at < ?", (t_low, t_free))
        low["overlay_deliveries"] = dict(audit(daemon.db, "SELECT d.status, count(*) FROM deliveries d JOIN "
                                                          "inspections i ON i.id = d.inspection_id WHERE "
                                                          "d.output = 'overlay' AND i.captured_at >= ? AND "
                                                          "i.captured_at < ? GROUP BY 1", (t_low, t_free)))
        checks["low"] = low

        # 2. space back: the alarm clears everywhere
        ballast.unlink()
        t0 = time.monotonic()
        wait_for(lambda: not _alarms(daemon), 30, "the disk_low alarm to clear", alive=daemon.check_alive)
        cleared = {"after_s": round(time.monotonic() - t0, 1), "healthz": http_get(http_port, "/healthz"),
                   "plc": _plc_until(modbus_port, alarm=False),
                   "mqtt_retained_status": _retained_alarms(broker.port, alarm=False)}
        checks["cleared"] = cleared
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: set(low_ids) <= {r for _, r, _ in sub.results()}, 60, "the low period's results")
        low_counts = delivery_counts([r for r in sub.results() if r[1] in low_ids], set(low_ids))

        # 3. low again, then SIGTERM: whatever the page or MQTT showed has its audit row
        _fill(ballast, mount, floor_mb - 8)
        wait_for(lambda: any(a["kind"] == "disk_low" for a in _alarms(daemon)), 30, "the disk_low alarm again",
                 alive=daemon.check_alive)
        before = _inspected(daemon)
        wait_for(lambda: _inspected(daemon) >= before + 10, 60, "inspections while low", alive=daemon.check_alive)
        page.poll()
        stop = daemon.stop()
        page.close()
        checks["sigterm_while_low"] = {"exit": stop.returncode, "stop_s": stop.seconds,
                                       "free_mb": round(_free_mb(mount), 1)}
    finally:
        if page is not None:
            page.close()
        if daemon is not None:
            daemon.ensure_stopped()
        if sub is not None:
            sub.close()
        broker.stop()
        audited = audit_ids(daemon.db) if daemon is not None else {}
        overlay_paths = [p for (p,) in audit(daemon.db, "SELECT overlay_path FROM inspections WHERE overlay_path "
                                                        "IS NOT NULL")] if daemon is not None else []
        overlay_missing = sum(not Path(p).exists() for p in overlay_paths)
        alarm_events = {k: events(daemon.db, k) for k in ("disk_low", "disk_ok")} \
            if daemon is not None else {}
        subprocess.run(["umount", str(mount)], check=False)
    shown = (page.ids if page else set()) | {r for _, r, _ in sub.results()}
    unaudited = sorted(shown - set(audited))
    result = {"sent": None, "audited": len(audited), **delivery_counts(sub.results(), set(audited)),
              "crashed": daemon.crashes(), "crash_lines": daemon.crash_lines()[:10], "checks": checks,
              "low_period": {"audited": len(low_ids), **low_counts}, "page_ids_seen": len(page.ids),
              "page_poll_errors": page.errors, "shown_without_audit_row": len(unaudited),
              "shown_without_audit_row_ids": unaudited[:20], "overlay_rows_naming_no_file": overlay_missing,
              "events": alarm_events, "exits": [e.__dict__ for e in daemon.exits]}
    low, cleared = checks["low"], checks["cleared"]
    result["verdicts"] = {
        "alarm_in_status": True,
        "healthz_503_alarm": low["healthz"][0] == 503 and low["healthz"][1].get("status") == "alarm",
        "modbus_error_bit_code_8": low["plc"]["as_expected"],
        "mqtt_retained_alarms": low["mqtt_retained_status"]["as_expected"],
        "low_period_lost_0": low_counts["lost"] == 0,
        "cleared_healthz_200": cleared["healthz"][0] == 200,
        "cleared_modbus_no_alarm": cleared["plc"]["as_expected"],
        "cleared_mqtt_retained_no_alarms": cleared["mqtt_retained_status"]["as_expected"],
        "sigterm_while_low_exit_0": checks["sigterm_while_low"]["exit"] == 0,
        "shown_results_all_audited": not unaudited}
    failed = [k for k, v in result["verdicts"].items() if not v]
    result["line"] = counts_line("disk", result, (
        f"low period: audited {len(low_ids)} delivered {low_counts['delivered']} lost {low_counts['lost']}; "
        f"alarm after {low['alarm_after_s']} s, /healthz {low['healthz'][0]} {low['healthz'][1].get('status')}, "
        f"modbus Error+code 8 {_seen(low['plc'])}, retained MQTT alarms {_seen(low['mqtt_retained_status'])}; "
        f"cleared after {cleared['after_s']} s (/healthz {cleared['healthz'][0]}, modbus {_seen(cleared['plc'])}, "
        f"MQTT {_seen(cleared['mqtt_retained_status'])}); SIGTERM while low exit "
        f"{checks['sigterm_while_low']['exit']}, shown without "
        f"audit row {len(unaudited)}; checks failed: {failed or 'none'}"))
    result["notes"] = ([f"shown on the page or MQTT without an audit row (first 20): {unaudited[:20]}"] if unaudited
                       else []) + [f"log: {line[:300]}" for line in result["crash_lines"][:5]]
    return result
