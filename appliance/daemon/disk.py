"""The free-space floor: file-writing outputs stop before the audit database runs out of disk.

The audit log is the record of every inspection; overlays (and later stored frames) are nice
to have. ``DiskGuard`` watches the file systems the daemon writes to; below ``min_free_mb`` a
file system is *low*: writers that ask ``allows(path)`` (the overlay output) write nothing there,
so the space left belongs to the audit database, and the daemon raises a ``disk_low`` alarm
that every status reader shows (``appliance status``, ``/healthz``, the live page, the Modbus
Error bit, the MQTT camera status). The alarm clears once free space is back above the floor
plus a margin (hysteresis: no flapping around the floor).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class DiskConfig(BaseModel):
    """The ``[disk]`` section: the free-space floor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_free_mb: float = Field(256.0, ge=0, description="below this many MiB free on a file system, overlay files "
                                                        "(and other nice-to-have files) are no longer written "
                                                        "there and a disk_low alarm is raised; the audit "
                                                        "database keeps the rest")
    clear_margin_mb: float = Field(32.0, ge=0, description="the alarm clears once free space is this much above "
                                                           "the floor again")
    check_s: float = Field(2.0, gt=0, le=60, description="how often free space is measured")


@dataclass(frozen=True)
class Volume:
    """One watched file system: a folder on it, what the daemon keeps there, and its free space."""

    path: Path
    uses: tuple[str, ...]
    free_mb: float
    total_mb: float
    low: bool
    since: float | None

    def describe(self) -> str:
        """``<path>: 12 MiB free of 30 MiB (floor 64 MiB)``-style detail for the alarm."""
        return f"{self.path} ({', '.join(self.uses)}): {self.free_mb:,.0f} MiB free of {self.total_mb:,.0f} MiB"


#: ``on_change(volume)``: a file system went low or came back.
OnChange = Callable[[Volume], None]


class DiskGuard:
    """Free space of the daemon's folders against the floor, re-measured every ``check_s`` (thread-safe)."""

    def __init__(self, config: DiskConfig, folders: Iterable[tuple[str, Path]], on_change: OnChange | None = None,
                 statvfs: Callable[[str], Any] = os.statvfs) -> None:
        self.config = config
        self._statvfs = statvfs
        self._on_change = on_change
        self._lock = threading.Lock()
        self._volumes: dict[int, Volume] = {}  # st_dev -> volume
        self._device_of: dict[Path, int] = {}
        self._uses: dict[int, list[str]] = {}
        self._paths: dict[int, Path] = {}
        for use, folder in folders:
            self._watch(use, Path(folder))
        self._checked_at = 0.0
        self.check()

    def _watch(self, use: str, folder: Path) -> None:
        existing = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
        dev = existing.stat().st_dev
        self._device_of[folder] = dev
        self._uses.setdefault(dev, []).append(use)
        self._paths.setdefault(dev, existing)

    def check(self) -> list[Volume]:
        """Measure every watched file system now; report (``on_change``) the ones that went low or came back."""
        changed = [v for v in (self._measure(dev) for dev in list(self._paths)) if v is not None]
        self._checked_at = time.monotonic()
        self._report(changed)
        return changed

    def maybe_check(self) -> None:
        """``check()`` if the last one is older than ``check_s`` (called from the daemon's loop)."""
        if time.monotonic() - self._checked_at >= self.config.check_s:
            self.check()

    def allows(self, path: Path) -> bool:
        """Whether a nice-to-have file may be written under ``path``: its file system, measured now, is above the floor.

        Measured at every call (one ``statvfs``, microseconds): a writer at line rate fills megabytes
        between two periodic checks. A path on a file system the guard does not watch is allowed.
        """
        path = Path(path)
        dev = self._device_of.get(path)
        if dev is None:
            probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
            try:
                dev = probe.stat().st_dev
            except OSError:
                return True
            if dev not in self._paths:
                return True
        changed = self._measure(dev)
        if changed is not None:
            self._report([changed])
        with self._lock:
            return not self._volumes[dev].low

    def _measure(self, dev: int) -> Volume | None:
        """Measure one file system; the volume if it went low or came back, else ``None``."""
        path = self._paths[dev]
        try:
            st = self._statvfs(str(path))
        except OSError as exc:
            log.warning("disk: cannot measure %s: %s", path, exc)
            return None
        free = st.f_bavail * st.f_frsize / 2**20
        total = st.f_blocks * st.f_frsize / 2**20
        floor, margin = self.config.min_free_mb, self.config.clear_margin_mb
        with self._lock:
            before = self._volumes.get(dev)
            was_low = before.low if before else False
            low = free < (floor + margin if was_low else floor)
            since = (before.since if before and was_low else time.time()) if low else None
            volume = Volume(path, tuple(self._uses[dev]), free, total, low, since)
            self._volumes[dev] = volume
        return volume if was_low != low else None

    def _report(self, changed: list[Volume]) -> None:
        for volume in changed:
            (log.error if volume.low else log.warning)(
                "disk %s: %s (floor %.0f MiB)", "low" if volume.low else "ok again", volume.describe(),
                self.config.min_free_mb)
            if self._on_change is not None:
                try:
                    self._on_change(volume)
                except Exception:
                    log.exception("disk: reporting a change failed")

    def low(self) -> list[Volume]:
        """The file systems below the floor now."""
        with self._lock:
            return [v for v in self._volumes.values() if v.low]

    def snapshot(self) -> dict[str, Any]:
        """Per watched folder: free and total MiB, low or not, and the floor (for status)."""
        with self._lock:
            volumes = list(self._volumes.values())
        return {"min_free_mb": self.config.min_free_mb,
                "volumes": {str(v.path): {"uses": list(v.uses), "free_mb": round(v.free_mb, 1),
                                          "total_mb": round(v.total_mb, 1), "low": v.low} for v in volumes}}
