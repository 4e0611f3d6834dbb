"""systemd integration: readiness, a watchdog fed by real progress, a status line, journald logging.

Everything degrades to nothing without systemd: ``notify`` is a no-op when ``NOTIFY_SOCKET``
is unset, and logs go to stderr. The watchdog is never fed from a timer alone: each ping
first asks every camera pipeline whether it has made progress recently (``Daemon.health``),
and a hung pipeline stops the pings, so systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

try:  # systemd-python: the library made for this; optional so that a development install needs no libsystemd
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - exercised where systemd-python is not installed
    _sd_daemon = _sd_journal = None


def notify(*lines: str) -> bool:
    """Send ``KEY=value`` lines to systemd (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``); False if not under it."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    message = "\n".join(lines)
    try:
        if _sd_daemon is not None:
            return bool(_sd_daemon.notify(message))
        return _notify_socket(message)  # pragma: no cover
    except OSError as exc:  # the manager's socket went away or refuses: inspection must not stop for that
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def _notify_socket(message: str) -> bool:  # pragma: no cover - the fallback without systemd-python
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec``), or ``None`` when systemd wants none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Pings systemd's watchdog only while ``healthy()`` says every pipeline made progress."""

    def __init__(self, healthy: Callable[[], tuple[bool, list[str]]]) -> None:
        self._healthy = healthy
        self.interval = watchdog_interval()
        self.last_reasons: list[str] = []

    def tick(self) -> bool:
        """One check: ping if healthy; returns whether it pinged."""
        ok, reasons = self._healthy()
        if reasons != self.last_reasons:
            (log.info if ok else log.error)("health: %s", "ok" if ok else "; ".join(reasons))
            self.last_reasons = reasons
        if ok:
            notify("WATCHDOG=1")
        return ok


class _JournalFields(logging.Filter):
    """Turn ``extra={"camera": ..., "inspection_id": ...}`` into journald fields CAMERA= and INSPECTION_ID=."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in ("camera", "inspection_id"):
            value = getattr(record, key, None)
            if value is not None:
                setattr(record, key.upper(), value)
        return True


class RateLimit(logging.Filter):
    """At most ``burst`` records of one kind (logger and message template) per ``window_s``; the rest counted.

    A camera that sends a bad frame every second, or a client that fuzzes a port, must not flood
    the journal, nor go silent: the next record of that kind let through says how many were held back.
    """

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._kinds: dict[tuple[str, str], list[float]] = {}  # kind -> [window start, sent, held]

    def filter(self, record: logging.LogRecord) -> bool:
        """Let the record through unless its kind has spent its budget in this window."""
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        state = self._kinds.get(key)
        if state is None or now - state[0] >= self.window_s:
            held = int(state[2]) if state else 0
            state = self._kinds[key] = [now, 0, 0]
            if len(self._kinds) > 10_000:  # a message whose template varies: forget the oldest kinds
                for old in list(self._kinds)[:5_000]:
                    del self._kinds[old]
        else:
            held = 0
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if held:
            record.msg = f"{record.msg} ({held} similar messages held back in the last {self.window_s:.0f} s)"
        return True


#: Libraries whose routine chatter is not the appliance's business at INFO (one line per session or frame).
QUIET = {"faiss.loader": logging.WARNING, "asyncua": logging.WARNING, "pymodbus": logging.ERROR,
         "aiohttp.access": logging.WARNING, "numba": logging.WARNING}


def setup_logging(level: str = "INFO") -> None:
    """Journald with structured fields when started by systemd (``JOURNAL_STREAM`` set), else stderr.

    Every record goes through one rate limit; the libraries in ``QUIET`` log only what matters.
    """
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.environ.get("JOURNAL_STREAM") and _sd_journal is not None:
        handler: logging.Handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="anomaly-appliance")
        handler.addFilter(_JournalFields())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimit())
    root.addHandler(handler)
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(max(quiet, root.level))
