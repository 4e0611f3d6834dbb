"""Commands over MQTT: ``<prefix>/<camera>/cmd/<name>``, each answered on ``.../cmd/response``.

The topic names the camera and the command; the payload is a JSON object (at most
``commands.MAX_COMMAND_BYTES``) with the command's fields plus an optional request ``id``
(echoed in the reply; a trigger's ``id`` becomes its result's ``trigger_id``) and ``token``
(required when one is configured). It is turned into the daemon's own typed command
(``appliance.daemon.commands``) and run by the daemon's one dispatcher on its asyncio loop,
exactly as ``appliance trigger``/``threshold``/``reload`` would run it. Paho's network thread
only parses and schedules; the reply is published when the loop has answered. Any payload gets
a reply: every refusal is replied (with the request id when the payload had one), counted and
audited as a ``command_refused`` event. Nothing a sender can publish stops the network thread.
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

from ...errors import ApplianceError
from .. import commands as cmd
from ..audit_db import iso_utc
from .base import OutputContext
from .mqtt_wire import RESPONSE, response_topic

log = logging.getLogger(__name__)
#: Commands MQTT accepts unless ``allow`` says otherwise.
COMMANDS = ("trigger", "threshold", "reload")
#: Commands MQTT may be allowed to carry (the daemon's commands that a line's machines may send).
REMOTE = ("trigger", "threshold", "reload", "enable", "bundle", "label", "unlabel")
_ENVELOPE = ("id", "token")


class CommandError(cmd.CommandError):
    """A command that is not run, with the request id to echo in the reply."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


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
                  token: str | None = None) -> tuple[str | None, Any]:
    """Validate one command: ``(request id, typed command)``, or ``CommandError`` saying why not.

    An empty payload is ``{}`` (a bare trigger or reload). ``token``: the one a sender must quote.
    """
    try:
        data = cmd.load_json(payload) if payload.strip() else {}
    except (cmd.CommandError, UnicodeDecodeError) as exc:
        raise CommandError(str(exc)) from None
    if not isinstance(data, dict):
        raise CommandError(f"payload must be a JSON object, got {type(data).__name__}")
    request_id = data.get("id") if isinstance(data.get("id"), str) and len(data["id"]) <= 64 else None
    if name not in REMOTE:
        raise CommandError(f"unknown command {name[:64]!r}; known: {', '.join(allowed)}", request_id)
    if name not in allowed:
        raise CommandError(f"command {name!r} is not allowed here (allowed: {', '.join(allowed) or 'none'})",
                           request_id)
    given = data.get("token")
    if token is not None and (not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode())):
        raise CommandError("not authorised: missing or wrong token", request_id)
    if "id" in data and request_id is None:
        raise CommandError("invalid id: a request id is a string of at most 64 characters")
    if "token" in data and (not isinstance(given, str) or len(given) > 256):
        raise CommandError("invalid token: a string of at most 256 characters", request_id)
    fields = {k: v for k, v in data.items() if k not in _ENVELOPE}
    if "cmd" in fields or "camera" in fields:
        raise CommandError("the topic names the command and the camera; the payload must not", request_id)
    fields["cmd"] = name
    if name != "reload":
        fields["camera"] = camera
    if name == "trigger":
        fields["id"] = request_id
    who = fields.get("who")
    if name != "trigger" and (who is None or isinstance(who, str)):
        fields["who"] = f"mqtt:{who}" if who else "mqtt"  # too long or not a string: the model says why
    try:
        return request_id, cmd.parse_command(fields)
    except cmd.CommandError as exc:
        raise CommandError(str(exc), request_id) from None


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
            known = set(self.context.status().cameras)
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
