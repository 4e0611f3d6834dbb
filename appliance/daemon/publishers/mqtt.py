"""MQTT output: every result, at least once and in order, through outages and restarts (store and forward).

A durable output: each result's JSON (``mqtt_wire.result_payload``) goes into the audit database's
outbox in the same transaction as the inspection, so nothing the daemon decided is lost to a broker
outage, a ``kill -9`` or a power cut. A sender thread publishes pending rows oldest first with
QoS 1 (fixed: QoS 0 could lose results, QoS 2 costs a second round trip for what consumers can do
themselves by dropping duplicate ids) and marks a row ``sent`` only on its PUBACK. Up to ``inflight``
results are unacknowledged at a time; paho resends those after a reconnect, and no newer result is
sent until they are acknowledged again, so the broker sees results in outbox order. After a crash,
rows acknowledged but not yet marked are sent again: at least once, consumers de-duplicate by ``id``.

The broker may be down when the daemon starts: paho connects in the background and retries with
backoff; the daemon inspects meanwhile and the outbox grows up to ``max_pending`` (then the oldest
unsent rows are marked ``dropped``, counted, and an ``outbox_dropped`` event is audited).

When the audit log cannot write (a full disk), results do not reach the outbox; they are sent
from memory instead (``publish_uncommitted``, at most ``max_pending`` waiting), after the rows
that are in the outbox, and their rows, once written, are marked sent without a second publish.
Commands (``<prefix>/<camera>/cmd/...``) are validated on paho's thread and run on the daemon's loop;
their replies never wait on paho's thread. Topics and payloads: ``mqtt_wire.py`` and docs/mqtt.md.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from pydantic import Field, SecretStr, field_validator, model_validator

from ...errors import ConfigError, PublishError
from ..records import Inspection
from . import mqtt_wire as wire
from .base import Delivery, OutputContext, Publisher, PublisherConfig, register_publisher
from .mqtt_commands import COMMANDS, Commands

log = logging.getLogger(__name__)
_TICK_S = 1.0  # the sender's longest sleep: status changes and the outbox bound are looked at this often


class MqttConfig(PublisherConfig):
    """Broker, identity, security, topics and the outbox bound of the MQTT output."""

    type: Literal["mqtt"] = "mqtt"
    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (1883; 8883 is usual with TLS)")
    client_id: str | None = Field(None, min_length=1, max_length=64,
                                  description="stable MQTT client id (default anomaly-appliance-<hostname>)")
    prefix: str = Field("appliance", description="first topic levels, e.g. 'plant1/line3'")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT version; 5 adds reason codes to PUBACK")
    username: str | None = Field(None, min_length=1, description="broker user")
    password: SecretStr | None = Field(None, description="broker password (or password_file)")
    password_file: Path | None = Field(None, description="file holding the broker password (trailing newline "
                                                         "ignored); keeps the secret out of the config")
    tls: bool = Field(False, description="connect with TLS")
    ca_file: Path | None = Field(None, description="CA certificates for the broker (default: the system's)")
    cert_file: Path | None = Field(None, description="client certificate (with key_file)")
    key_file: Path | None = Field(None, description="client private key (with cert_file)")
    insecure: bool = Field(False, description="TLS without verifying the broker's certificate (tests only)")
    keepalive: int = Field(30, ge=5, le=3600, description="seconds between pings; the broker declares us "
                                                          "offline (last will) after 1.5 times this")
    qos: Literal[1] = Field(1, description="fixed at 1: at least once; consumers drop duplicates by id")
    max_pending: int = Field(100_000, ge=1, description="unsent results kept in the outbox; beyond it the "
                                                        "oldest are marked dropped, counted and audited")
    inflight: int = Field(32, ge=1, le=1000, description="results published and not yet acknowledged")
    status_interval: float = Field(5.0, ge=0.5, le=3600, description="seconds between retained camera "
                                                                     "status messages (sooner on a change)")
    reconnect_min_s: int = Field(1, ge=1, le=3600, description="first wait before reconnecting")
    reconnect_max_s: int = Field(60, ge=1, le=3600, description="longest wait between reconnects (doubling)")
    drain_s: float = Field(3.0, ge=0, le=60, description="at an orderly stop, seconds to wait for unsent "
                                                         "results (the rest are sent after the restart)")
    commands: bool = Field(True, description="accept commands on <prefix>/<camera>/cmd/<name>")
    allow: tuple[Literal["trigger", "threshold", "reload", "enable", "bundle", "label", "unlabel"], ...] = Field(
        COMMANDS, description="the commands accepted (others are refused): trigger, threshold, reload by default; "
                              "enable, bundle, label and unlabel on request")
    command_token: SecretStr | None = Field(None, description="if set, a command must carry it as 'token'")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return wire.check_prefix(value)

    @model_validator(mode="after")
    def _together(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate needs its key)")
        if not self.tls and (self.ca_file or self.cert_file or self.insecure):
            raise ValueError("ca_file, cert_file, key_file and insecure need tls = true")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self

    def resolved_client_id(self) -> str:
        """The client id: configured, or stable per device (a new id per start would orphan sessions)."""
        return self.client_id or f"anomaly-appliance-{socket.gethostname()}"[:64]

    def read_password(self) -> str | None:
        """The password from the config or its file; ``ConfigError`` if the file cannot be read."""
        if self.password_file is None:
            return None if self.password is None else self.password.get_secret_value()
        try:
            return self.password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"outputs.mqtt.password_file: cannot read {self.password_file}: "
                              f"{exc.strerror or exc}") from None


def new_client(config: MqttConfig, client_id: str, will: bool = True) -> mqtt.Client:
    """A paho client set up from the config (credentials, TLS, last will), not yet connected."""
    v5 = config.protocol == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
    if config.username is not None:
        client.username_pw_set(config.username, config.read_password())
    if config.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(config, key)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"outputs.mqtt.{key}: {path} is not readable")
        try:
            client.tls_set(ca_certs=None if config.ca_file is None else str(config.ca_file),
                           certfile=None if config.cert_file is None else str(config.cert_file),
                           keyfile=None if config.key_file is None else str(config.key_file),
                           cert_reqs=ssl.CERT_NONE if config.insecure else ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"outputs.mqtt: TLS set-up failed: {exc}") from None
        client.tls_insecure_set(config.insecure)
    if will:
        client.will_set(wire.online_topic(config.prefix), "offline", qos=1, retain=True)
    return client


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send each small packet at once: with Nagle's algorithm a result can wait ~40 ms for an ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # not a TCP socket (a proxy, a test double)
        log.debug("mqtt: TCP_NODELAY not set: %s", exc)


@dataclass(slots=True)
class _InFlight:
    row_id: int | None  # None: sent from memory (its audit row was not written yet)
    inspection_id: str
    topic: str


@register_publisher
class MqttPublisher(Publisher):
    """Results from the outbox to the broker, retained status, commands from the broker to the daemon.

    Threads: paho's network thread runs the callbacks (they only note things and wake the sender);
    the ``mqtt-sender`` thread owns the in-flight table, reads the outbox, publishes results and the
    retained status; commands run on the daemon's asyncio loop.
    """

    type = "mqtt"
    Config = MqttConfig
    durable = True

    def __init__(self, config: MqttConfig, context: OutputContext) -> None:
        super().__init__(config, context)
        self.config: MqttConfig = config
        self.client_id = config.resolved_client_id()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: deque[tuple[int, str | None]] = deque()  # (mid, failure reason) from paho's thread
        self._inflight: dict[int, _InFlight] = {}  # mid -> outbox row; the sender thread's own
        self._memory: deque[tuple[str, str]] = deque()  # (inspection id, payload) not in the outbox yet
        self._sent_from_memory: dict[str, None] = {}  # acknowledged ids whose outbox rows come later
        self._hold: set[int] = set()  # in flight when the connection came back: wait for their acks
        self._last_id = 0  # the newest outbox row handed to paho
        self._idle = False  # nothing in flight and nothing unsent at the last look
        self._connected = False
        self._subscribed = False
        self._connections = 0  # successful connects; a change tells the sender to hold
        self._seen_connections = 0
        self._failed_connects = 0
        self._status_keys: dict[str, tuple[Any, ...]] = {}
        self._drift_keys: dict[str, tuple[Any, ...]] = {}
        self._status_due = self._status_check_at = 0.0
        self.sent = self.failed = self.dropped = 0
        token = config.command_token
        self._commands = Commands(config.prefix, context, self._send_reply, config.allow,
                                  None if token is None else token.get_secret_value(), self.name)
        self.last_error: str | None = None
        self.last_ack_at: float | None = None

    # ------------------------------------------------------------------ the output side

    def payload(self, inspection: Inspection) -> str:
        """The result JSON stored in the outbox and sent as is."""
        return wire.result_payload(inspection)

    def publish(self, inspection: Inspection) -> Delivery:
        """A new row is committed to the outbox: wake the sender."""
        self._wake.set()
        return Delivery("pending", detail="outbox")

    def publish_uncommitted(self, inspection: Inspection) -> None:
        """The audit log could not write this result: send it from memory (the PLC must still get it)."""
        self._memory.append((inspection.id, wire.result_payload(inspection)))
        while len(self._memory) > self.config.max_pending:
            self._memory.popleft()
            self.dropped += 1
        self._wake.set()

    def state(self) -> dict[str, Any]:
        """Connection, backlog (unsent rows in the outbox) and counters, for ``appliance status``."""
        try:
            backlog: int | None = self.context.outbox.pending_count(self.name)
        except Exception as exc:  # a status read must not fail for the audit log's sake
            backlog = None
            log.debug("mqtt: backlog unknown: %s", exc)
        if isinstance(backlog, int):
            backlog += len(self._memory)
        return {"state": "ok" if self._connected else "disconnected", "connected": self._connected,
                "broker": f"{self.config.host}:{self.config.port}", "client_id": self.client_id,
                "backlog": backlog, "inflight": len(self._inflight), "sent": self.sent, "failed": self.failed,
                "dropped": self.dropped, "last_error": self.last_error, "last_ack_at": self.last_ack_at,
                "last_sent_at": self.last_ack_at, "commands_subscribed": self._subscribed,
                "commands_ok": self._commands.ok,
                "commands_refused": self._commands.refused}

    @classmethod
    def check(cls, config: PublisherConfig, state_dir: Path) -> tuple[str, str]:
        """Connect to the broker (TCP, TLS, credentials) under a doctor's client id, then disconnect."""
        assert isinstance(config, MqttConfig)
        try:
            client = new_client(config, f"{config.resolved_client_id()}-doctor"[:64], will=False)
        except ConfigError as exc:
            return "fail", str(exc)
        answer: list[Any] = []
        client.on_connect = lambda c, u, flags, reason, props: answer.append(reason)
        where = f"{config.host}:{config.port}"
        try:
            client.connect(config.host, config.port, keepalive=10)
            deadline = time.monotonic() + 5.0
            while not answer and time.monotonic() < deadline:
                client.loop(0.2)
        except (OSError, ssl.SSLError) as exc:
            return "fail", f"cannot connect to the MQTT broker at {where}: {exc}"
        finally:
            client.disconnect()
        if not answer:
            return "fail", f"{where} accepts TCP but gave no MQTT answer within 5 s"
        if answer[0].is_failure:
            return "fail", f"the broker at {where} refused the connection: {answer[0]}"
        return "ok", f"connected to {where} (MQTT {config.protocol}{', TLS' if config.tls else ''})"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background (the broker may be down) and start the sender."""
        if self.context.outbox is None:
            raise PublishError("the mqtt output needs the audit outbox (it is a durable output)")
        try:
            client = new_client(self.config, self.client_id)
        except ConfigError as exc:
            raise PublishError(str(exc)) from None
        client.max_inflight_messages_set(self.config.inflight + 16)  # room for status and replies
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = _no_delay
        self._client = client
        client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        client.loop_start()
        self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._thread.start()
        log.info("mqtt output: connecting to %s:%d as %s", self.config.host, self.config.port, self.client_id)

    def close(self) -> None:
        """Give unsent results ``drain_s`` while connected, say ``offline`` and disconnect; never raises."""
        client = self._client
        if client is None:
            return
        try:
            self._stop.set()
            self._wake.set()
            if self._thread is not None:
                self._thread.join(self.config.drain_s + 10.0)
            if self._connected:
                info = client.publish(wire.online_topic(self.config.prefix), "offline", qos=1, retain=True)
                info.wait_for_publish(2.0)
            client.disconnect()
            client.loop_stop()
        except Exception as exc:  # close must not raise; unsent rows stay pending for the next start
            log.warning("mqtt output did not close cleanly: %s", exc)
        self._client = None

    # ------------------------------------------------------------------ paho's thread

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        try:
            if reason.is_failure:
                self.last_error = f"the broker refused the connection: {reason}"
                log.error("mqtt: %s", self.last_error)
                return
            log.info("mqtt: connected to %s:%d%s", self.config.host, self.config.port,
                     f" after {self._failed_connects} failed attempts" if self._failed_connects else "")
            self._failed_connects = 0
            self.last_error = None
            client.publish(wire.online_topic(self.config.prefix), "online", qos=1, retain=True)
            self._subscribed = False
            if self.config.commands:
                client.subscribe(wire.command_filter(self.config.prefix), qos=1)
            self._connections += 1
            self._connected = True
            self._wake.set()
        except Exception:  # an exception here would end paho's network thread
            log.exception("mqtt: on_connect failed")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._failed_connects += 1
        self.last_error = f"cannot connect to the broker at {self.config.host}:{self.config.port}"
        (log.warning if self._failed_connects == 1 else log.debug)("mqtt: %s (retrying with backoff)",
                                                                   self.last_error)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was, self._connected = self._connected, False
        if not self._stop.is_set():
            self.last_error = f"disconnected from the broker: {reason}"
            if was:
                log.warning("mqtt: %s; unsent results wait in the outbox", self.last_error)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # Called with paho's message lock held: note the ack, let the sender do the rest.
        self._acks.append((mid, str(reason) if reason is not None and reason.is_failure else None))
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self._subscribed = True  # the broker has the command subscription: commands reach us from now on

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._commands.handle(message.topic, message.payload)

    def _send_reply(self, topic: str, body: str) -> None:
        client = self._client
        if client is not None:
            client.publish(topic, body, qos=1)

    # ------------------------------------------------------------------ the sender thread

    def _run(self) -> None:
        next_bound = 0.0
        deadline: float | None = None
        while True:
            self._wake.wait(_TICK_S)
            self._wake.clear()
            try:
                self._take_acks()
                now = time.monotonic()
                if now >= next_bound:
                    next_bound = now + _TICK_S
                    self._bound()
                if self._connected:
                    self._submit()
                    self._publish_status(now)
            except Exception as exc:  # keep sending; the rows stay pending
                log.exception("mqtt sender")
                self.last_error = f"sender: {type(exc).__name__}: {exc}"
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + (self.config.drain_s if self._connected else 0.0)
                if (self._idle and not self._inflight) or time.monotonic() >= deadline:
                    return
                time.sleep(0.02)  # acks arrive on paho's thread; look again soon

    def _take_acks(self) -> None:
        while self._acks:
            mid, failure = self._acks.popleft()
            row = self._inflight.pop(mid, None)
            self._hold.discard(mid)
            if row is None:
                continue  # a status message or a command reply
            now = time.time()
            if row.row_id is None:  # from memory: its outbox row, once written, is marked sent without a resend
                self._sent_from_memory[row.inspection_id] = None
                while len(self._sent_from_memory) > max(self.config.max_pending, 1000):
                    self._sent_from_memory.pop(next(iter(self._sent_from_memory)))
                self.sent += failure is None
                self.last_ack_at = now
                continue
            if failure is None:
                self.sent += 1
                self.last_ack_at = now
                self.context.outbox.delivered(row.inspection_id, self.name, "sent", row.topic, now)
            else:  # MQTT 5: the broker refused it (not authorised, bad topic): resending would not help
                self.failed += 1
                self.last_error = f"the broker refused a result on {row.topic}: {failure}"
                self.context.outbox.delivered(row.inspection_id, self.name, "failed", self.last_error, now)

    def _submit(self) -> None:
        if self._connections != self._seen_connections:  # reconnected: paho resends what was in flight
            self._seen_connections = self._connections
            self._hold = set(self._inflight)
            self._status_keys.clear()
            self._drift_keys.clear()
        if self._hold:
            return  # nothing newer may overtake the resent results
        room = self.config.inflight - len(self._inflight)
        if room <= 0:
            return
        rows = self.context.outbox.pending(self.name, limit=room, after=self._last_id)
        for row in rows:
            if row["inspection_id"] in self._sent_from_memory:
                self._sent_from_memory.pop(row["inspection_id"])
                self.context.outbox.delivered(row["inspection_id"], self.name, "sent",
                                              "sent from memory while the audit log could not write")
                self._last_id = row["id"]
                continue
            try:
                topic = wire.result_topic(self.config.prefix, wire.payload_camera(row["payload"]))
            except ValueError as exc:  # not written by this output: it can never be sent
                self.failed += 1
                self.context.outbox.delivered(row["inspection_id"], self.name, "failed", str(exc))
                self._last_id = row["id"]
                continue
            info = self._client.publish(topic, row["payload"], qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self.last_error = f"paho refused a publish: {mqtt.error_string(info.rc)}"
                break  # this row stays pending; tried again on the next turn
            self._inflight[info.mid] = _InFlight(row["id"], row["inspection_id"], topic)
            self._last_id = row["id"]
            room -= 1
        while room > 0 and len(rows) < self.config.inflight and self._memory:  # the outbox is sent first
            inspection_id, payload = self._memory[0]
            topic = wire.result_topic(self.config.prefix, wire.payload_camera(payload))
            info = self._client.publish(topic, payload, qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                break
            self._memory.popleft()
            self._inflight[info.mid] = _InFlight(None, inspection_id, topic)
            room -= 1
        self._idle = not rows and not self._memory

    def _bound(self) -> None:
        """Keep at most ``max_pending`` unsent rows (besides those in flight): mark the oldest ``dropped``."""
        outbox, limit = self.context.outbox, self.config.max_pending
        if outbox.pending_count(self.name) <= limit:
            return
        detail = f"mqtt outbox full: more than {limit} results waiting for the broker; the oldest dropped"
        dropped = outbox.drop_pending(self.name, keep=limit, detail=detail, after=self._last_id)
        if dropped:
            self.dropped += dropped
            log.warning("mqtt: %s (%d now, %d in all)", detail, dropped, self.dropped)
            outbox.event("outbox_dropped", None, detail, {"output": self.name, "dropped": dropped,
                                                          "max_pending": limit, "dropped_total": self.dropped})

    def _publish_status(self, now: float) -> None:
        """Each camera's retained status: at once when it changed, else every ``status_interval``."""
        if now < self._status_check_at:
            return
        self._status_check_at = now + _TICK_S
        periodic = now >= self._status_due
        if periodic:
            self._status_due = now + self.config.status_interval
        snapshot = self.context.status()
        alarms = [a.model_dump(mode="json") for a in snapshot.daemon.alarms]
        for camera, cam in snapshot.cameras.items():
            drift = cam.drift
            key = (drift.get("state"), drift.get("windows"))
            if periodic or self._drift_keys.get(camera) != key:  # retained: a new subscriber sees the state at once
                self._drift_keys[camera] = key
                self._client.publish(wire.drift_topic(self.config.prefix, camera),
                                     json.dumps({"camera": camera, **drift, "at": wire.iso_utc(time.time())},
                                                default=str), qos=1, retain=True)
            status = wire.camera_status(camera, cam.model_dump(mode="json"), time.time(), alarms)
            key = wire.status_key(status)
            if periodic or self._status_keys.get(camera) != key:
                self._status_keys[camera] = key
                self._client.publish(wire.status_topic(self.config.prefix, camera),
                                     json.dumps(status, default=str), qos=1, retain=True)
