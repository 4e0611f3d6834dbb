"""What the reliability scenarios share: the real daemon, its configs, the audit, a PLC, probes.

Everything here drives real processes from the outside, as an operator or systemd would: the
daemon is ``appliance run --config FILE`` with a real sd_notify socket, the PLC a real pymodbus
client, and the audit database is read with plain ``sqlite3`` (read-only), never through the
code under test. The MQTT side (Mosquitto, a paho subscriber) is in ``rel_mqtt.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from appliance.daemon.control import request
from appliance.errors import ApplianceError

APPLIANCE = Path(sys.executable).parent / "appliance"
PREFIX = "rel"
#: What in a daemon's log means it crashed or hid an exception (counted per scenario).
CRASH_MARKERS = ("terminate called", "Traceback")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2,
             alive: Callable[[], None] | None = None) -> Any:
    """Poll ``predicate`` until it returns something true; ``TimeoutError`` naming ``what`` otherwise.

    ``alive`` is called on each round and may raise (a daemon that exited while we waited).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def rss_mb(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of a process in MiB, from ``/proc/PID/status``."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1))
    hwm = int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1))
    return rss / 1024, hwm / 1024


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """``(status code, parsed JSON or text)`` of ``GET http://127.0.0.1:port/path``; 503 bodies included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            code, body = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body.decode(errors="replace")


# --------------------------------------------------------------------------- configs


def replay_folder(dest: Path, images: list[Path]) -> Path:
    """A folder of images for a replay source, named so they sort in the given order."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        target = dest / f"{i:04d}{image.suffix.lower()}"
        if not target.exists():
            target.write_bytes(image.read_bytes())
    return dest


def replay_camera(cam: str, bundle: Path, replay: Path, fps: float, queue: int = 4, **extra: Any) -> dict:
    """One ``[[cameras]]`` table with a looping replay source."""
    return {"id": cam, "bundle": str(bundle), "queue": queue,
            "source": {"type": "replay", "path": str(replay), "fps": fps, "loop": True}, **extra}


def mqtt_output(port: int, **extra: Any) -> dict:
    """The MQTT output towards our broker; reconnects within 2 s once the broker is back."""
    return {"type": "mqtt", "host": "127.0.0.1", "port": port, "prefix": PREFIX, "client_id": f"rel-{os.getpid()}",
            "reconnect_max_s": 2, "status_interval": 1.0, **extra}


def write_config(root: Path, cameras: list[dict], outputs: list[dict], cache: Path, state: Path | None = None,
                 **sections: Any) -> Path:
    """A daemon config under ``root`` (state, control socket), its caches in ``cache``; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "timezone": "UTC",
        "paths": {"state": str(state or root / "state"), "cache": str(cache)},
        "control": {"socket": str(root / "control.sock"), "mode": "0600"},
        "metrics": {"port": 0},
        "outputs": outputs, "cameras": cameras}
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


# --------------------------------------------------------------------------- the daemon


class Notify:
    """systemd's side of sd_notify: a datagram socket the daemon writes to, read on a thread as systemd would.

    It must outlive the daemon process (the daemon notifies ``STATUS=``, ``WATCHDOG=1`` and
    ``STOPPING=1`` until it exits), so ``Daemon`` keeps one for each process it starts.
    """

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes: keep it short and outside the (deep) results folder.
        self.path = Path(f"/tmp/rel-notify-{os.getpid()}-{time.monotonic_ns()}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.ready = threading.Event()
        self.messages = 0
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536).decode(errors="replace")
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.messages += 1
            if "READY=1" in data.splitlines():
                self.ready.set()

    def close(self) -> None:
        """Stop reading and remove the socket file."""
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)


@dataclass
class Exit:
    """How one daemon process ended: what we did to it, its exit status, how long the stop took."""

    how: str  # "sigterm", "kill9" or "unexpected"
    returncode: int
    seconds: float | None = None

    @property
    def crashed(self) -> bool:
        """A non-zero status we did not cause (kill -9's own -9 is expected) or any signal death."""
        return not (self.how == "kill9" and self.returncode == -signal.SIGKILL) and self.returncode != 0


@dataclass
class Daemon:
    """``appliance run --config FILE`` in a subprocess (its own session), log appended to ``daemon.log``."""

    config: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    exits: list[Exit] = field(default_factory=list)
    starts: int = 0
    _recorded: bool = False
    _notify: Notify | None = None

    def __post_init__(self) -> None:
        import tomllib

        doc = tomllib.loads(self.config.read_text())
        self.socket = Path(doc["control"]["socket"])
        self.state = Path(doc["paths"]["state"])
        self.cache = Path(doc["paths"]["cache"])
        self.log_path = self.config.parent / "daemon.log"

    @property
    def db(self) -> Path:
        """The audit database."""
        return self.state / "audit.db"

    @property
    def pid(self) -> int:
        """The process id of the running daemon."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait for ``READY=1`` and a control socket that answers; seconds it took."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        environ.update({"NUMBA_CACHE_DIR": str(self.cache / "numba"), **self.env})
        self._close_notify()
        self._notify = Notify()
        environ["NOTIFY_SOCKET"] = str(self._notify.path)
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(APPLIANCE), "run", "--config", str(self.config)], env=environ,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        self._recorded = False
        wait_for(self._notify.ready.is_set, timeout, "READY=1", alive=self.check_alive)
        ready = time.monotonic() - t0
        wait_for(self._answers, 30, "the control socket", alive=self.check_alive)
        return ready

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def _answers(self) -> bool:
        try:
            self.status()
            return True
        except (ApplianceError, OSError):
            return False

    def _note_exit(self) -> bool:
        """Whether the process is gone; an exit we did not cause is recorded (once) as unexpected."""
        if self.proc is None or self.proc.poll() is None:
            return False
        if not self._recorded:
            self.exits.append(Exit("unexpected", self.proc.returncode))
            self._recorded = True
        return True

    def check_alive(self) -> None:
        """Raise if the process is gone (an exit we did not cause is recorded as a crash)."""
        if self._note_exit():
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.tail()}")

    def running(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def request(self, payload: dict[str, Any], timeout: float = 30.0) -> Any:
        """One control-socket request (``ApplianceError`` on a refusal)."""
        return request(self.socket, payload, timeout)

    def status(self) -> dict[str, Any]:
        """``appliance status --json``'s document, over the control socket."""
        return self.request({"cmd": "status"}, timeout=10.0)

    def stop(self, timeout: float = 120.0) -> Exit:
        """SIGTERM and wait (kill -9 after ``timeout``, counted as a crash)."""
        assert self.proc is not None
        if self._note_exit():
            return self.exits[-1]
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            code = 999  # "did not stop": a crash for the report
        done = Exit("sigterm", code, round(time.monotonic() - t0, 2))
        self.exits.append(done)
        self._recorded = True
        return done

    def kill9(self) -> Exit:
        """SIGKILL the whole session, as a power cut or the OOM killer would."""
        assert self.proc is not None and self.proc.poll() is None
        os.killpg(self.proc.pid, signal.SIGKILL)
        done = Exit("kill9", self.proc.wait())
        self.exits.append(done)
        self._recorded = True
        return done

    def ensure_stopped(self) -> None:
        """For ``finally``: stop a daemon a failed scenario left running, and close its notify socket."""
        if self.running():
            self.stop(60)
        self._close_notify()

    def log(self) -> str:
        """The daemon's log so far (every run appends to it)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        """The end of the log, for error messages."""
        return self.log()[-chars:]

    def crash_lines(self) -> list[str]:
        """Log lines with a crash marker, and the line before each (its context)."""
        lines = self.log().splitlines()
        return [f"{lines[i - 1]} | {ln}" if i else ln for i, ln in enumerate(lines)
                if any(m in ln for m in CRASH_MARKERS)]

    def crashes(self) -> int:
        """Exits we did not cause or with a bad status, plus crash markers in the log."""
        self._note_exit()
        return sum(e.crashed for e in self.exits) + len(self.crash_lines())


# --------------------------------------------------------------------------- the audit


def audit(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of a query on the audit database, opened read-only with plain sqlite3."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def audit_count(db: Path, sql: str, args: tuple = ()) -> int:
    if not db.exists():
        return 0
    return int(audit(db, sql, args)[0][0])


def events(db: Path, kind: str) -> int:
    return audit_count(db, "SELECT count(*) FROM events WHERE kind = ?", (kind,))


def deliveries_by_status(db: Path, output: str) -> dict[str, int]:
    return dict(audit(db, "SELECT status, count(*) FROM deliveries WHERE output = ? GROUP BY status", (output,)))


# --------------------------------------------------------------------------- scenario plumbing

COUNTS = ("sent", "audited", "delivered", "lost", "duplicated", "out_of_order", "crashed")


@dataclass
class Bench:
    """What every scenario gets: the results folder, the fitted bundle, caches and replay images."""

    out: Path
    bundle: Path
    cache: Path
    replay: Path
    data: Path

    def fresh(self, name: str) -> Path:
        """An empty folder for one scenario under ``out`` (a previous run's is removed)."""
        root = self.out / name
        if root.exists():
            subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir(parents=True)
        return root


def counts_line(name: str, result: dict[str, Any], extra: str = "") -> str:
    """``outage: sent n/a audited 9338 delivered 9338 lost 0 ...``: the scenario's counts on one line."""
    parts = [f"{k.replace('_', '-')} {'n/a' if result.get(k) is None else result[k]}" for k in COUNTS]
    return f"{name}: {' '.join(parts)}" + (f" | {extra}" if extra else "")


def audit_ids(db: Path, where: str = "1", args: tuple = ()) -> dict[str, str]:
    """Inspection id -> camera of the audit rows matching ``where``."""
    return dict(audit(db, f"SELECT id, camera FROM inspections WHERE {where}", args)) if db.exists() else {}

class Plc(threading.Thread):
    """A PLC on a real pymodbus client: for each unit, reads the result registers and acknowledges every result.

    ResultValid set: count the result, write ResultAck (rising edge), then clear it, as
    docs/modbus-register-map.md's handshake says; ``errors`` counts failed requests.
    """

    RESULT_VALID, RESULT_ACK = 8, 4

    def __init__(self, port: int, units: tuple[int, ...] = (1, 2)) -> None:
        super().__init__(daemon=True)
        from pymodbus.client import ModbusTcpClient

        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
        self.units = units
        self.acked = dict.fromkeys(units, 0)
        self.errors = 0
        self._stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        """The PLC's scan loop (this thread)."""
        while not self._stop_event.is_set():
            idle = True
            for unit in self.units:
                try:
                    regs = self.client.read_input_registers(0, count=17, device_id=unit)
                    if regs.isError():
                        self.errors += 1
                        continue
                    if regs.registers[0] & self.RESULT_VALID:
                        idle = False
                        self.client.write_register(0, self.RESULT_ACK, device_id=unit)
                        self.client.write_register(0, 0, device_id=unit)
                        self.acked[unit] += 1
                except Exception:
                    self.errors += 1
                    self._stop_event.wait(0.5)
            if idle:
                self._stop_event.wait(0.02)

    def close(self) -> None:
        """Stop scanning and disconnect (idempotent)."""
        self._stop_event.set()
        self.join(5)
        self.client.close()
