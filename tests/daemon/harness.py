"""The real daemon as a subprocess: configs, the control socket, notify, audit rows (imported by tests).

Kept out of conftest.py so that ``from harness import Daemon`` finds this module whatever test folders
pytest is given: two conftest modules on the path would shadow each other.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

import appliance
from appliance.daemon.control import request as control_request
from appliance.errors import ApplianceError

SAMPLE = Path(appliance.__file__).parent / "samples" / "ball_screw"
APPLIANCE = Path(sys.executable).parent / "appliance"


def free_port() -> int:
    """A TCP port free on loopback right now (for a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(kind: str = "test") -> list[Path]:
    """The bundled sample's test images (good then pitting), sorted, or its training images."""
    if kind == "train":
        return sorted((SAMPLE / "train" / "good").glob("*.jpg"))
    return sorted((SAMPLE / "test" / "good").glob("*.jpg")) + sorted((SAMPLE / "test" / "pitting").glob("*.jpg"))


def good_test_images() -> list[Path]:
    """The bundled sample's good test images (the drift bundle's calibration and baseline)."""
    return [p for p in sample_images() if p.parent.name == "good"]


def replay_folder(dest: Path, images: list[Path] | None = None) -> Path:
    """A folder of real images for a replay source (named so that they sort in the given order)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images if images is not None else sample_images()):
        shutil.copy(image, dest / f"{i:04d}_{image.name}")
    return dest


def camera(cam_id: str, bundle: Path, source: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One ``[[cameras]]`` table."""
    return {"id": cam_id, "bundle": str(bundle), "source": source, **extra}


def write_config(path: Path, cameras: list[dict[str, Any]], outputs: list[dict[str, Any]] | None = None,
                 cache: Path | None = None, **sections: Any) -> Path:
    """A daemon config file with its state under ``path``'s folder and a socket beside it."""
    root = path.parent
    doc: dict[str, Any] = {
        "timezone": "UTC",
        "paths": {"state": str(root / "state"), "cache": str(cache or root / "cache")},
        "control": {"socket": str(root / "control.sock"), "mode": "0600"},
        "runtime": {"threads": 1, "warmup_frames": 1},
        "metrics": {"port": 0},  # daemons of parallel tests must not compete for one port
        "outputs": outputs if outputs is not None else [],
        "cameras": cameras,
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(tomli_w.dumps(doc))
    return path


class NotifySocket:
    """systemd's side of the notify protocol: a datagram socket the daemon writes ``KEY=value`` lines to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self, seconds: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        """Read what arrived (waiting up to ``seconds`` for more); returns the new messages."""
        new = []
        deadline = time.monotonic() + seconds
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                if time.monotonic() >= deadline:
                    break
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            new.append((time.monotonic(), fields))
        self.messages += new
        return new

    def wait_for(self, key: str, value: str | None = None, timeout: float = 120.0,
                 contains: str = "") -> dict[str, str]:
        """The first message (already read or new) with ``key`` (equal to ``value``, containing ``contains``)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, fields in self.messages[seen:]:
                if key in fields and (value is None or fields[key] == value) and contains in fields[key]:
                    return fields
            seen = len(self.messages)
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.messages[-5:]}")
            self.drain(0.5)

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """``appliance run --config FILE`` in a subprocess, with its log in a file."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, notify: Path | None = None) -> None:
        self.config = config
        doc = _read_toml(config)
        self.socket = Path(doc["control"]["socket"])
        self.state = Path(doc["paths"]["state"])
        self.log_path = config.parent / "daemon.log"
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        environ.update(env or {})
        if notify is not None:
            environ["NOTIFY_SOCKET"] = str(notify)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([str(APPLIANCE), "run", "--config", str(config)], env=environ,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def db(self) -> Path:
        return self.state / "audit.db"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the control socket answers ``status`` (the daemon is inspecting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.request({"cmd": "status"}, timeout=5)
                return
            except AssertionError:  # no socket yet: still starting
                time.sleep(0.2)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log()[-4000:]}")

    def request(self, payload: dict[str, Any], timeout: float = 30.0) -> Any:
        """One control-socket request; returns the result, raises ``AssertionError`` on a refusal."""
        try:
            return control_request(self.socket, payload, timeout)
        except ApplianceError as exc:
            raise AssertionError(f"refused: {exc}") from None

    def status(self) -> dict[str, Any]:
        return self.request({"cmd": "status"})

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} waiting for {what}:\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain and flush) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log()[-3000:]}") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


def audit_rows(db: Path, table: str = "inspections", where: str = "1", order: str = "rowid") -> list[dict]:
    """Rows of the audit database, read with plain sqlite3 (not the code under test)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY {order}")]
    finally:
        conn.close()
