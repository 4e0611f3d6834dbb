"""A real Mosquitto broker on a free loopback port, and a paho subscriber that collects what it sees.

The broker can be stopped (SIGTERM, by its PID) and started again on the same port to stage an
outage. With ``persistence=True`` it keeps sessions across that restart, so a subscriber with a
persistent session misses nothing published while it was reconnecting (the tests count every
message, so the subscriber's own reconnect race must not lose any).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from harness import free_port
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = Path("/usr/sbin/mosquitto")
#: Tests that need the real broker: skipped, with the reason, where Debian's mosquitto is not installed.
needs_mosquitto = pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs Debian's mosquitto at /usr/sbin/mosquitto "
                                                                     "(apt-get install mosquitto; CI installs it)")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Broker:
    """``mosquitto -c <temp config>`` on 127.0.0.1:<port>; ``stop``/``start`` keep the port."""

    def __init__(self, root: Path, port: int | None = None, persistence: bool = False) -> None:
        self.root = root
        self.port = port or free_port()
        self.persistence = persistence
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}", f"persistence_location {root}/",
            "autosave_interval 0" if persistence else "",
            # as root mosquitto drops to its own user and could not write the persistence file here
            "user root" if os.geteuid() == 0 else "",
            "max_queued_messages 0", "set_tcp_nodelay true", "log_dest stderr", "log_type error",
            "log_type warning", ""]))

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.root / "mosquitto.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited {self.proc.returncode}: "
                                     f"{(self.root / 'mosquitto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"mosquitto not listening on {self.port} within {timeout} s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (it saves persistent sessions) and wait; a no-op if not running."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextlib.contextmanager
def running_broker(root: Path, persistence: bool = False) -> Iterator[Broker]:
    """A started broker, stopped (by its PID) on the way out; for the test files' fixtures."""
    b = Broker(root, persistence=persistence)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.time() when received

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A paho client (its own network thread) collecting every message on ``topics``, QoS 1.

    ``persistent=True``: a fixed client id and a persistent session, so messages published while
    it reconnects after a broker restart are queued for it by the broker.
    """

    def __init__(self, port: int, topics: list[str], persistent: bool = False, client_id: str | None = None) -> None:
        self.topics = topics
        self.messages: list[Message] = []
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"test-sub-{os.getpid()}-"
                                  f"{time.monotonic_ns()}", clean_session=not persistent)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("subscriber did not subscribe within 10 s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Message(message.topic, message.payload, bool(message.retain), time.time()))
            self._lock.notify_all()

    def on(self, topic_suffix: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(topic_suffix)]

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 30.0, what: str = "messages"
                 ) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self.messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                         f"{len(self.messages)} messages so far")
                self._lock.wait(min(left, 0.5))
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_seen(ids: list[str]) -> list[str]:
    """Ids in the order first received (a consumer drops later duplicates by id)."""
    seen: dict[str, None] = {}
    for i in ids:
        seen.setdefault(i, None)
    return list(seen)
