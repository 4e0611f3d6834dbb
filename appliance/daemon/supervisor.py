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
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(message))
    return _notify_socket(message)  # pragma: no cover


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


def setup_logging(level: str = "INFO") -> None:
    """Journald with structured fields when started by systemd (``JOURNAL_STREAM`` set), else stderr."""
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
    root.addHandler(handler)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it loaded, at every start
