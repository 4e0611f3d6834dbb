"""Reload planning: what a new config changes, as a pure function of the old and the new config.

The daemon applies the plan (``Daemon.reload``): load every new model first (a bundle that
fails refuses the whole reload), then stop, start, restart, hot-swap or update cameras.
Sections that live for the whole process (paths, the audit log, the control socket, outputs,
runtime, time zone, metrics, disk) are not changed by a reload; the plan says they need a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Camera, DaemonConfig

#: Top-level sections a reload cannot change in a running process.
RESTART_SECTIONS = ("paths", "audit", "control", "outputs", "runtime", "timezone", "metrics", "disk", "learning",
                    "drift")


@dataclass(frozen=True)
class ReloadPlan:
    """What to do to each camera, and which sections wait for a restart.

    Attributes:
        stop: running cameras that are gone or disabled.
        start: cameras that are new or newly enabled (a model to load).
        restart: cameras whose source, trigger or queue changed (new pipeline, model loaded again).
        swap: cameras whose bundle changed only (hot swap between two frames).
        update: cameras whose thresholds, overlay or slots changed only (from the next frame).
        restart_needed: top-level sections that changed and need a restart.

    """

    stop: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    swap: tuple[str, ...] = ()
    update: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = field(default=(), compare=False)

    @property
    def loads(self) -> tuple[str, ...]:
        """Cameras whose model must be loaded before anything changes."""
        return self.start + self.restart + self.swap


def _pipeline_key(camera: Camera) -> tuple:
    """What a running pipeline is built from: a change means a new pipeline."""
    return camera.source, camera.trigger, camera.queue, camera.max_frame_megapixels


def plan_reload(old: DaemonConfig, new: DaemonConfig, running: set[str]) -> ReloadPlan:
    """The plan that takes the daemon from ``old`` (with ``running`` cameras) to ``new``."""
    restart_needed = tuple(k for k in RESTART_SECTIONS if getattr(old, k) != getattr(new, k))
    before = {c.id: c for c in old.cameras}
    stop = tuple(sorted(cam for cam in running if cam not in {c.id for c in new.cameras if c.enabled}))
    start, restart, swap, update, unchanged = [], [], [], [], []
    for cam in new.cameras:
        if not cam.enabled:
            continue
        was = before.get(cam.id)
        if cam.id not in running or was is None:
            start.append(cam.id)
        elif _pipeline_key(cam) != _pipeline_key(was):
            restart.append(cam.id)
        elif cam.bundle != was.bundle:
            swap.append(cam.id)
        elif cam != was:
            update.append(cam.id)
        else:
            unchanged.append(cam.id)
    return ReloadPlan(stop, tuple(start), tuple(restart), tuple(swap), tuple(update), restart_needed,
                      tuple(unchanged))
