"""The trainer's page for the people who run it: what every appliance runs, what waits, what was built and why.

Rendered on the server from the service's lists, so it reads without script and without a token
(everything on it is also in the admin API; the page shows no token, frame or bundle). The one
write, approving or cancelling a job, is ``web/page.js`` calling the admin API with a token the
person types in (kept in the tab's sessionStorage). Every value is escaped; the CSP allows no
inline script or style.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from .. import __version__
from .records import Camera, Dataset, Evaluation, Job, Model
from .service import OPEN, TrainerService

#: Newest jobs shown (the admin API lists them all).
JOBS_SHOWN = 100
MODELS_SHOWN = 50


def esc(value: Any) -> str:
    """``value`` as HTML text (None as an empty cell)."""
    return "" if value is None else html.escape(str(value), quote=True)


def when(at: float | None) -> str:
    """A time as a ``<time>`` element in the trainer's local zone (empty when there is none)."""
    if at is None:
        return ""
    moment = datetime.fromtimestamp(at).astimezone()
    return f'<time datetime="{moment.isoformat()}">{moment.strftime("%Y-%m-%d %H:%M")}</time>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str, table_id: str) -> str:
    """A table of already-escaped cells, or a line saying there is nothing yet."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty" id="{table_id}">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def badge(text: str | None, kind: str | None = None) -> str:
    """A coloured label (the class picks the colour in page.css)."""
    if not text:
        return ""
    return f'<span class="badge {esc(kind or text)}">{esc(text)}</span>'


def _camera_row(c: Camera) -> list[str]:
    drift = badge(c.drift_state, "drift" if c.drift_state == "drift" else "calm")
    return [esc(c.appliance_id), esc(c.camera_id), f"<code>{esc(c.model_id)}</code>" if c.model_id else "",
            f"{drift} {when(c.drift_at)}", badge(c.policy), esc(c.backend) or "<i>as its model</i>",
            f"<code>{esc(c.schedule)}</code>" if c.schedule else "", when(c.updated_at)]


def _job_row(j: Job) -> list[str]:
    actions = []
    if j.status == "awaiting_approval":
        actions.append(f'<button type="button" class="admin" data-job="{j.id}" data-action="approve" disabled>'
                       f"Approve</button>")
    if j.status in ("awaiting_approval", "queued"):
        actions.append(f'<button type="button" class="admin quiet" data-job="{j.id}" data-action="cancel" '
                       f"disabled>Cancel</button>")
    times = when(j.created_at)
    if j.started_at:
        times += f"<br>started {when(j.started_at)}"
    if j.finished_at:
        times += f"<br>ended {when(j.finished_at)}"
    produced = " ".join(x for x in (f"dataset {j.dataset_id}" if j.dataset_id else "",
                                    f"<code>{esc(j.model_id)}</code>" if j.model_id else "") if x)
    detail = esc(j.detail) + (f"<br>approved by {esc(j.approved_by)}" if j.approved_by else "")
    status = badge(j.status.replace("_", " "), j.status)
    return [str(j.id), f"{esc(j.appliance_id)}/{esc(j.camera_id)}", esc(j.reason), status, times, str(j.attempts),
            produced, detail, " ".join(actions)]


def _dataset_row(d: Dataset) -> list[str]:
    counts = ", ".join(f"{esc(k)} {v}" for k, v in sorted(d.counts.items()))
    window = f"{when(d.rule.since) or 'start'} to {when(d.rule.until)}"
    return [str(d.id), f"{esc(d.appliance_id)}/{esc(d.camera_id)}", f"v{d.version}", counts,
            f'<code title="{esc(d.digest)}">{esc(d.digest[:12])}</code>', window, when(d.created_at)]


def _metrics(metrics: dict[str, Any]) -> str:
    """The numbers that decided, as a definition list (nested values as compact JSON)."""
    items = []
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else (
            value if isinstance(value, str | int | bool) or value is None else json.dumps(value, sort_keys=True))
        items.append(f"<dt>{esc(key)}</dt><dd>{esc(shown)}</dd>")
    return f'<dl class="metrics">{"".join(items)}</dl>'


def _model_row(m: Model, evaluations: list[Evaluation]) -> list[str]:
    gates = []
    for e in evaluations:
        verdict = badge("passed" if e.passed else "failed")
        gates.append(f"<div class=\"evaluation\">{verdict} against <code>{esc(e.baseline_model_id or 'nothing')}"
                     f"</code> on dataset {e.dataset_id}, {when(e.created_at)}{_metrics(e.metrics)}</div>")
    return [f"<code>{esc(m.id)}</code>", f"{esc(m.appliance_id)}/{esc(m.camera_id)}", badge(m.status),
            when(m.created_at), esc(m.job_id), esc(m.dataset_id), esc(m.detail), "".join(gates)]


def render(service: TrainerService) -> str:
    """The whole page as HTML."""
    appliances = service.appliances()
    cameras = service.cameras()
    jobs = service.jobs(limit=JOBS_SHOWN)
    waiting = service.jobs(status=OPEN)
    datasets = service.datasets()
    models = service.models()[:MODELS_SHOWN]
    evaluations: dict[str, list[Evaluation]] = defaultdict(list)
    for e in service.evaluations():
        evaluations[e.model_id].append(e)
    per_appliance = defaultdict(int)
    for c in cameras:
        per_appliance[c.appliance_id] += 1

    appliance_rows = [[esc(a.id), esc(a.name), when(a.created_at), when(a.last_seen), str(per_appliance[a.id]),
                       str(service.catalogue.frame_count(a.id))] for a in appliances]
    awaiting = sum(1 for j in waiting if j.status == "awaiting_approval")
    summary = (f"{len(appliances)} appliance(s), {len(cameras)} camera(s), {service.catalogue.frame_count()} "
               f"frame(s); {len(waiting)} open job(s), {awaiting} awaiting approval")
    sections = [
        ("appliances", "Appliances", table(["appliance", "name", "registered", "last seen", "cameras", "frames"],
                                           appliance_rows, "No appliance registered yet "
                                                           "(appliance trainer add-appliance ID).", "appliances")),
        ("cameras", "Cameras", table(["appliance", "camera", "running model", "drift", "policy", "backend",
                                      "schedule", "reported"], map(_camera_row, cameras),
                                     "No camera has reported yet.", "cameras-table")),
        ("jobs", "Rebuild jobs", table(["job", "camera", "reason", "status", "when", "attempts", "produced",
                                        "detail", ""], map(_job_row, jobs), "No rebuild job yet.", "jobs-table")),
        ("datasets", "Datasets", table(["id", "camera", "version", "frames", "digest", "frames from", "created"],
                                       map(_dataset_row, datasets), "No dataset drawn yet.", "datasets-table")),
        ("models", "Models and the gate", table(["model", "camera", "status", "built", "job", "dataset", "detail",
                                                 "evaluations"],
                                                (_model_row(m, evaluations[m.id]) for m in models),
                                                "No model built yet.", "models-table")),
    ]
    body = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>' for sid, title, content in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Trainer</title><link rel="stylesheet" href="/static/page.css"><script src="/static/page.js" defer></script>
</head><body>
<header><h1>Trainer</h1><p id="summary">{esc(summary)}</p>
<form id="signin"><label>Admin token <input id="token" type="password" autocomplete="off" required></label>
<button type="submit">Sign in</button></form>
<p id="signed-in" hidden>Signed in: approving and cancelling jobs is enabled. <button type="button" id="signout">
Sign out</button></p><p id="message" role="status"></p></header>
<main>{body}</main>
<footer>anomaly-appliance {esc(__version__)} &middot; storage: {esc(service.storage.description)} &middot;
API: <a href="/openapi.json">/openapi.json</a></footer>
</body></html>
"""
