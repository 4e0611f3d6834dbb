"""``appliance status`` for a person at a terminal: the status snapshot as short aligned lines.

Works on the JSON form of ``status.Status`` (what the control socket returns), so it renders a
snapshot from any daemon of this version; a missing value shows as ``-``, never as ``None``.
"""

from __future__ import annotations

import time
from typing import Any


def _v(value: Any, fmt: str = "") -> str:
    if value is None or value == "":
        return "-"
    if fmt and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def _ago(epoch: float | None) -> str:
    if epoch is None:
        return ""
    s = max(0.0, time.time() - epoch)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def _uptime(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(status: dict[str, Any]) -> str:
    """The snapshot as lines: the daemon, its alarms, each camera (two lines), each output."""
    d = status["daemon"]
    health = "healthy" if d.get("healthy") else "UNHEALTHY: " + "; ".join(d.get("unhealthy") or [])
    lines = [f"appliance {d['version']}  pid {d['pid']}  run {_v(d.get('run_id'))}  up {_uptime(d['uptime_s'])}  "
             f"{health}{'  (stopping)' if d.get('stopping') else ''}"]
    lines += [f"ALARM {a['kind']}: {a['detail']}" for a in d.get("alarms") or []]
    for cam, c in status["cameras"].items():
        lat = c.get("latency_ms") or {}
        counts = c.get("counts") or {}
        state = c["state"] + (f" ({c['state_detail']})" if c.get("state_detail") else "")
        lines.append(f"camera {cam}: {state}, {'READY' if c.get('ready') else 'NOT READY'}"
                     f"{'' if c.get('enabled', True) else ', disabled'}, {_v(c.get('fps'), '.1f')} fps, "
                     f"latency p50 {_v(lat.get('p50'), '.0f')} / p99 {_v(lat.get('p99'), '.0f')} ms, "
                     f"queue {_v(c.get('queue_depth'))}, drops {_v(c.get('drops'))}")
        if not c.get("healthy", True):
            lines.append(f"  unhealthy: {'; '.join(c.get('unhealthy') or [])}")
        last = c.get("last")
        shown = "-" if not last else (f"{last['verdict'].upper()} {_v(last.get('score'), '.3f')} "
                                      f"(#{last['seq']}, {_ago(last.get('finished_at'))})")
        thr = c.get("threshold") or {}
        lines.append(f"  ok {counts.get('ok', 0)}  ng {counts.get('ng', 0)}  error {counts.get('error', 0)}; "
                     f"last {shown}; threshold {_v(thr.get('value'), '.3f')} ({_v(thr.get('source'))}); "
                     f"model {_v((c.get('bundle') or {}).get('model_id'))}")
    for name, o in status["outputs"].items():
        backlog = o.get("backlog", o.get("queued"))
        parts = [f"output {name}: {_v(o.get('state'))}", f"backlog {_v(backlog)}"]
        parts += [f"{k} {o[k]}" for k in ("sent", "failed", "dropped") if isinstance(o.get(k), int) and o[k]]
        if o.get("last_error"):
            parts.append(f"last error: {o['last_error']}")
        lines.append(", ".join(parts))
    for path, v in (status.get("disk") or {}).get("volumes", {}).items():
        if v.get("low"):
            lines.append(f"disk {path}: {v['free_mb']:,.0f} MiB free, below the floor of "
                         f"{status['disk']['min_free_mb']:,.0f} MiB")
    return "\n".join(lines)
