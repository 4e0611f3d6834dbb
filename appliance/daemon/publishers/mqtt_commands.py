"""Commands over MQTT: ``<prefix>/<camera>/cmd/{trigger,threshold,reload}``, each answered on ``.../cmd/response``.

A command is validated here (pydantic, strict: JSON object, known fields and types, the token
when one is configured, a running camera), then run by the daemon's own control handler on its
asyncio loop, exactly as ``appliance trigger``/``threshold``/``reload`` would run it. Paho's
network thread only parses and schedules; the reply is published when the loop has answered.
Every refusal is replied (with the request id when the payload had one), counted and audited
as a ``command_refused`` event. Nothing a sender can publish stops the network thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import ApplianceError
from ..audit_db import iso_utc
from .base import OutputContext
from .mqtt_wire import RESPONSE, response_topic

log = logging.getLogger(__name__)
COMMANDS = ("trigger", "threshold", "reload")


class CommandError(ApplianceError):
    """A command that is not run: malformed, not allowed, unauthorised or for an unknown camera."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class _Command(BaseModel):
    """Fields every command may carry."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    id: str | None = Field(None, min_length=1, max_length=64, description="request id, echoed in the reply")
    token: str | None = Field(None, max_length=256, description="the shared command token, when one is configured")


class TriggerCommand(_Command):
    """Take one frame; the result carries the request ``id`` as its ``trigger_id``."""


class ThresholdCommand(_Command):
    """Set (a number in [0, 1]) or clear (null) the operator threshold of the camera or one of its shifts."""

    value: float | None = Field(ge=0.0, le=1.0, description="normalised threshold; null clears the override")
    shift: str | None = Field(None, min_length=1, max_length=64, description="a shift name of the schedule")
    who: str | None = Field(None, min_length=1, max_length=64, description="who asked, for the audit log")


class ReloadCommand(_Command):
    """Read the config file again (as ``appliance reload``)."""


_MODELS: dict[str, type[_Command]] = {"trigger": TriggerCommand, "threshold": ThresholdCommand,
                                      "reload": ReloadCommand}


def split_command_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """``(camera, name)`` of a command topic, or ``None`` for anything else (our own replies included)."""
    head = f"{prefix}/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head):].split("/")
    if len(parts) != 3 or parts[1] != "cmd" or not parts[0] or parts[2] == RESPONSE:
        return None
    return parts[0], parts[2]


def parse_command(name: str, camera: str, payload: bytes, allowed: tuple[str, ...] = COMMANDS,
                  token: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """Validate one command: ``(request id, control request)``, or ``CommandError`` saying why not.

    An empty payload is ``{}`` (a bare trigger or reload). ``token``: the one a sender must quote.
    """
    request_id = None
    try:
        data = json.loads(payload.decode("utf-8")) if payload.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError(f"payload must be a JSON object, got {type(data).__name__}")
    if isinstance(data.get("id"), str) and len(data["id"]) <= 64:
        request_id = data["id"]  # echoed even when the rest is refused, so the sender can match the reply
    if name not in _MODELS:
        raise CommandError(f"unknown command {name!r}; known: {', '.join(COMMANDS)}", request_id)
    if name not in allowed:
        raise CommandError(f"command {name!r} is not allowed here (allowed: {', '.join(allowed) or 'none'})",
                             request_id)
    try:
        command = _MODELS[name].model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in exc.errors())
        raise CommandError(f"invalid {name} command: {reasons}", request_id) from None
    if token is not None and (command.token is None or not hmac.compare_digest(command.token.encode(),
                                                                                token.encode())):
        raise CommandError("not authorised: missing or wrong token", request_id)
    if isinstance(command, ThresholdCommand):
        return command.id, {"cmd": "threshold", "camera": camera, "value": command.value, "shift": command.shift,
                            "who": f"mqtt:{command.who}" if command.who else "mqtt"}
    if isinstance(command, TriggerCommand):
        return command.id, {"cmd": "trigger", "camera": camera, "id": command.id}
    return command.id, {"cmd": "reload"}


def response_payload(name: str, camera: str, request_id: str | None, ok: bool, at: float,
                     result: Any = None, error: str | None = None) -> str:
    """The reply to one command: the request id echoed, ``ok``, and the result or the reason."""
    body: dict[str, Any] = {"id": request_id, "cmd": name, "camera": camera, "ok": ok, "at": iso_utc(at)}
    body.update({"result": result} if ok else {"error": error})
    return json.dumps(body, default=str, allow_nan=False)


class Commands:
    """The command side of the MQTT output: paho's ``on_message`` lands in ``handle``.

    ``send(topic, payload)`` publishes a reply (QoS 1); it is called on paho's thread for refusals
    and on the daemon's loop for answers, both of which paho allows.
    """

    def __init__(self, prefix: str, context: OutputContext, send: Callable[[str, str], None],
                 allowed: tuple[str, ...] = COMMANDS, token: str | None = None, output: str = "mqtt") -> None:
        self.prefix, self.context, self._send = prefix, context, send
        self.allowed, self._token, self.output = allowed, token, output
        self.ok = self.refused = 0

    def handle(self, topic: str, payload: bytes) -> None:
        """One message on the command subscription (paho's thread): never raises."""
        try:
            self._command(topic, payload)
        except Exception:  # never let a bad message end paho's network thread
            log.exception("mqtt: handling a message on %r failed", topic[:200])

    def _command(self, topic: str, payload: bytes) -> None:
        where = split_command_topic(self.prefix, topic)
        if where is None:
            return  # our own replies, or something that is not a command
        camera, name = where
        try:
            request_id, request = parse_command(name, camera, payload, self.allowed, self._token)
            known = set(self.context.status().get("cameras", {}))
            if camera not in known:
                raise CommandError(f"unknown camera {camera!r}; running: {sorted(known)}", request_id)
            if self.context.control is None or self.context.loop is None:
                raise CommandError("this daemon takes no commands (no control handler)", request_id)
        except CommandError as exc:
            self._refused(name, camera, exc.request_id, exc.reason)
            return
        future = asyncio.run_coroutine_threadsafe(self.context.control(request), self.context.loop)
        future.add_done_callback(lambda done: self._answered(name, camera, request_id, done))

    def _answered(self, name: str, camera: str, request_id: str | None, done: concurrent.futures.Future) -> None:
        try:
            result = done.result()
        except ApplianceError as exc:
            self._refused(name, camera, request_id, str(exc))
            return
        except Exception as exc:
            self._refused(name, camera, request_id, f"internal error: {type(exc).__name__}: {exc}")
            return
        self.ok += 1
        self._reply(name, camera, request_id, True, result=result)

    def _refused(self, name: str, camera: str, request_id: str | None, reason: str) -> None:
        self.refused += 1
        log.warning("mqtt: command %s for camera %s refused: %s", name[:64], camera[:64], reason)
        try:
            self.context.outbox.event("command_refused", None, reason[:500], {
                "output": self.output, "cmd": name[:64], "camera": camera[:64], "id": request_id})
        except Exception as exc:  # the audit log may be closing; the reply still goes out
            log.warning("mqtt: command refusal not audited: %s", exc)
        self._reply(name, camera, request_id, False, error=reason)

    def _reply(self, name: str, camera: str, request_id: str | None, ok: bool, result: Any = None,
               error: str | None = None) -> None:
        try:
            body = response_payload(name, camera, request_id, ok, time.time(), result, error)
        except ValueError as exc:  # a result JSON cannot carry (NaN)
            body = response_payload(name, camera, request_id, False, time.time(), error=f"reply: {exc}")
        self._send(response_topic(self.prefix, camera), body)
