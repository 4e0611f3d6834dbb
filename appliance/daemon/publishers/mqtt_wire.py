"""What the MQTT output puts on the wire: topics, the result and the status payloads.

Pure functions, no network: the publisher (``mqtt.py``) and the commands (``mqtt_commands.py``)
stand on them, and so do the tests. The result payload is the contract with every consumer on the plant network;
its JSON Schema is ``schemas/inspection-result.v1.json`` and its ``schema`` field names the version.

Topics, under a configurable ``prefix``::

    <prefix>/status                      retained "online" / "offline" (the last will)
    <prefix>/<camera>/result             one JSON result per inspection, QoS 1, not retained
    <prefix>/<camera>/status             retained JSON: camera state, fps, last verdict, threshold
    <prefix>/<camera>/cmd/<name>         commands: trigger, threshold, reload
    <prefix>/<camera>/cmd/response       the reply to each command (ok or the reason it was refused)
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..audit_db import iso_utc
from ..records import Inspection

#: The ``schema`` field of every result payload; bump it (and add a schema file) on an incompatible change.
RESULT_SCHEMA = "inspection-result/v1"
RESPONSE = "response"


def check_prefix(prefix: str) -> str:
    """A topic prefix without wildcards, empty levels or a leading ``$`` (the broker's own topics)."""
    if not prefix or prefix.startswith(("/", "$")) or prefix.endswith("/") or "//" in prefix:
        raise ValueError(f"prefix {prefix!r} must be non-empty topic levels separated by '/', e.g. 'plant1/line3'")
    if any(c in prefix for c in "+#\0"):
        raise ValueError(f"prefix {prefix!r} must not contain the wildcards '+' or '#'")
    return prefix


def online_topic(prefix: str) -> str:
    """The appliance's retained ``online``/``offline`` topic (the last will)."""
    return f"{prefix}/status"


def result_topic(prefix: str, camera: str) -> str:
    """Where a camera's results go."""
    return f"{prefix}/{camera}/result"


def status_topic(prefix: str, camera: str) -> str:
    """A camera's retained status."""
    return f"{prefix}/{camera}/status"


def drift_topic(prefix: str, camera: str) -> str:
    """A camera's retained drift state."""
    return f"{prefix}/{camera}/drift"


def command_filter(prefix: str) -> str:
    """The subscription for every camera's commands (our own replies match it too and are ignored)."""
    return f"{prefix}/+/cmd/+"


def response_topic(prefix: str, camera: str) -> str:
    """Where command replies go."""
    return f"{prefix}/{camera}/cmd/{RESPONSE}"


def _num(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return None if value is None or not math.isfinite(value) else float(value)


def result_payload(inspection: Inspection) -> str:
    """The JSON result of one inspection (``inspection-result/v1``): what the outbox stores and MQTT sends."""
    return json.dumps({
        "schema": RESULT_SCHEMA,
        "id": inspection.id,
        "camera": inspection.camera,
        "seq": inspection.seq,
        "trigger_id": inspection.trigger_id,
        "captured_at": iso_utc(inspection.captured_at),
        "captured_at_epoch": inspection.captured_at,
        "finished_at": iso_utc(inspection.finished_at),
        "finished_at_epoch": inspection.finished_at,
        "verdict": inspection.verdict,
        "score": _num(inspection.score),
        "raw_score": _num(inspection.raw_score),
        "threshold": _num(inspection.threshold),
        "threshold_source": inspection.threshold_source,
        "model_id": inspection.model_id,
        "bank_hash": inspection.bank_hash,
        "latency_ms": {k: round(v, 3) for k, v in inspection.latency_ms.items() if math.isfinite(v)},
        "error": inspection.error,
        "source": inspection.source,
        "image_sha256": inspection.image_sha256,
        "file_sha256": inspection.file_sha256,
    }, separators=(",", ":"), allow_nan=False)


def payload_camera(payload: str) -> str:
    """The camera of a stored result payload (its topic); ``ValueError`` if the payload is not one."""
    try:
        camera = json.loads(payload)["camera"]
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"not a result payload: {exc}") from None
    if not isinstance(camera, str) or not camera or any(c in camera for c in "/+#"):
        raise ValueError(f"not a result payload: camera {camera!r}")
    return camera


def camera_status(camera: str, snapshot: dict[str, Any], at: float, alarms: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """The retained status of one camera from the daemon's status snapshot (no pixels, no per-frame noise).

    ``ready`` is what a PLC may act on; ``alarms`` are the daemon's (a full disk) and concern every camera.
    """
    last = snapshot.get("last") or None
    bundle = snapshot.get("bundle") or {}
    return {
        "camera": camera, "state": snapshot.get("state"), "state_detail": snapshot.get("state_detail"),
        "ready": snapshot.get("ready"), "healthy": snapshot.get("healthy"), "unhealthy": snapshot.get("unhealthy"),
        "trigger": snapshot.get("trigger"), "fps": snapshot.get("fps"), "frames": snapshot.get("frames"),
        "counts": snapshot.get("counts"), "drops": snapshot.get("drops"),
        "latency_ms": snapshot.get("latency_ms"), "threshold": snapshot.get("threshold"),
        "model_id": bundle.get("model_id"),
        "last": None if last is None else {k: last.get(k) for k in (
            "id", "seq", "verdict", "score", "threshold", "finished_at", "trigger_id")},
        "alarms": alarms or [], "drift": (snapshot.get("drift") or {}).get("state"),
        "at": iso_utc(at), "at_epoch": at,
    }


def status_key(status: dict[str, Any]) -> tuple[Any, ...]:
    """What counts as a change worth publishing at once (not fps or counters, which change every frame)."""
    last = status.get("last") or {}
    return (status.get("state"), status.get("state_detail"), status.get("ready"), last.get("verdict"), json.dumps(
        status.get("threshold"), sort_keys=True, default=str), status.get("model_id"),
        json.dumps([a.get("kind") for a in status.get("alarms") or []]), status.get("drift"))
