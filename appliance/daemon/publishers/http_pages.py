"""The HTTP output's camera list (``/``) and the readings it shares with the live page, from the typed status.

The camera list is what a supervisor glances at: one card per camera with its latest image (a
thumbnail, marked when it shows another inspection than the verdict beside it), verdict, counts,
state, rate and whether a PLC may act on it (READY, or NOT READY and why), under a red banner
per daemon alarm. It is plain server-rendered HTML that reloads itself (no script, no inline
style: the page's CSP allows neither).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..latest import LatestImage
from ..records import VERDICTS
from ..status import Alarm, CameraStatus, DaemonInfo

#: Seconds between reloads of the camera list.
REFRESH_S = 5


def readiness(camera: CameraStatus | None, daemon: DaemonInfo | None) -> dict[str, Any]:
    """``{"ready": bool, "why": [...]}``: the daemon's ready flag and, when not ready, the reasons in words.

    ``ready`` is the daemon's (what a PLC acts on); the reasons are its ``unhealthy`` list, or the
    condition of ``ready`` that fails (state, enabled, a model, the daemon stopping).
    """
    if camera is None:
        return {"ready": False, "why": ["the daemon reports no such camera"]}
    if camera.ready:
        return {"ready": True, "why": []}
    why = list(camera.unhealthy)
    if camera.state != "running":
        why.append(f"camera {camera.state}" + (f": {camera.state_detail}" if camera.state_detail else ""))
    if not camera.enabled:
        why.append("inspection disabled")
    if not camera.bundle.model_id:
        why.append("no model loaded")
    if daemon is not None and daemon.stopping:
        why.append("the daemon is stopping")
    if daemon is not None and not why:
        why += [r for r in daemon.unhealthy if r.startswith("audit")]
    return {"ready": False, "why": why or ["not ready"]}


def alarm_title(alarm: Alarm) -> str:
    """``disk_low`` -> ``DISK LOW``: the banner's heading."""
    return alarm.kind.replace("_", " ").upper()


def image_info(image: LatestImage | None, camera: str) -> dict[str, Any] | None:
    """What ``/recent`` says about the latest image: the inspection it shows and where to get exactly that one."""
    if image is None:
        return None
    cam = quote(camera, safe="")
    key = f"id={quote(image.inspection_id, safe='')}" if image.inspection_id else f"t={image.drawn_at:.6f}"
    return {"inspection_id": image.inspection_id, "seq": image.seq, "verdict": image.verdict,
            "captured_at": image.captured_at, "drawn_at": image.drawn_at,
            "url": f"/api/cameras/{cam}/latest.png?{key}", "thumbnail": f"/api/cameras/{cam}/thumb.jpg?{key}"}


@dataclass(frozen=True)
class Card:
    """One camera on the list: its status (``None``: only seen in records), newest result and latest image."""

    camera: str
    status: CameraStatus | None
    last: dict[str, Any] | None  # the newest result: ``id``, ``seq``, ``verdict`` at least
    counts: dict[str, int]
    image: LatestImage | None


def index_page(cards: list[Card], daemon: DaemonInfo | None, problem: str | None = None) -> str:
    """The camera list: alarm banners, then one card per camera."""
    banners = [f'<div class="alarm" role="alert"><b>{html.escape(alarm_title(a))}</b> '
               f'<span>{html.escape(a.detail)}</span> <span class="since">since {_clock(a.since)}</span></div>'
               for a in (daemon.alarms if daemon else [])]
    if problem:
        banners.append(f'<div class="alarm" role="alert"><b>NO STATUS</b> <span>{html.escape(problem)}</span></div>')
    body = "\n".join(_card(c, daemon) for c in cards) or '<li class="empty">No cameras configured.</li>'
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta http-equiv="refresh" content="{REFRESH_S}"><title>Cameras</title>'
            f'<link rel="stylesheet" href="static/page.css"></head>'
            f'<body class="index"><header class="bar"><h1>Cameras</h1>'
            f'<span class="conn">updated {_clock(time.time())}</span></header>'
            f'<div id="alarms" class="alarms">{"".join(banners)}</div>'
            f'<ul class="cams">{body}</ul></body></html>')


def _card(card: Card, daemon: DaemonInfo | None) -> str:
    esc = html.escape
    cam, st, last = card.camera, card.status, card.last
    verdict = last.get("verdict") if last else None
    tag = verdict if verdict in VERDICTS else "none"
    ready = readiness(st, daemon) if st is not None else {"ready": False, "why": ["no status from the daemon"]}
    ready_html = ('<div class="ready s-good">READY</div>' if ready["ready"] else
                  f'<div class="ready s-bad">NOT READY <span class="why">{esc("; ".join(ready["why"]))}</span></div>')
    counts = " ".join(f'<span class="n n-{k}"><span class="label">{k.upper()}</span> {card.counts.get(k, 0):,}</span>'
                     for k in VERDICTS)
    meta = [esc(st.state) if st else "unknown"]
    if st is not None:
        meta.append(f"{st.fps:.1f} fps")
    return (f'<li class="card v-{tag}{"" if ready["ready"] else " not-ready"}" data-camera="{esc(cam)}">'
            f'<a class="cam" href="camera/{esc(quote(cam, safe=""))}">'
            f'{_thumb(card)}'
            f'<span class="card-head"><span class="name">{esc(cam)}</span>'
            f'<span class="last">{esc(verdict.upper()) if tag != "none" else "&#8212;"}</span></span>'
            f'{ready_html}<span class="counts-line">{counts}</span>'
            f'<span class="meta">{" &#183; ".join(meta)}</span></a></li>')


def _thumb(card: Card) -> str:
    image, last = card.image, card.last
    if image is None:
        return '<span class="thumb none">no image yet</span>'
    info = image_info(image, card.camera)
    assert info is not None
    src = html.escape(info["thumbnail"].lstrip("/"))
    alt = html.escape(f"latest image of {card.camera}")
    stale = last is not None and image.inspection_id != last.get("id")
    note = ""
    if stale:
        shows = f"#{image.seq}" if image.seq is not None else "an unknown inspection"
        word = f" ({image.verdict.upper()})" if image.verdict else ""
        note = f'<span class="thumb-note">image of {html.escape(shows + word)}, not the verdict shown</span>'
    return f'<span class="thumb{" stale" if stale else ""}"><img src="{src}" alt="{alt}">{note}</span>'


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds))
