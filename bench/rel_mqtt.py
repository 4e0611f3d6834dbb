"""The MQTT side of the reliability scenarios: a real Mosquitto, a paho subscriber, delivery accounting.

The broker is ``/usr/sbin/mosquitto`` on a loopback port, started and stopped by its PID; the
subscriber is a paho client on its own thread with a persistent session, as a consumer that must
not miss results would run it (docs/mqtt.md).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rel_kit import Daemon, audit_ids, free_port, wait_for

MOSQUITTO = Path("/usr/sbin/mosquitto")


class Broker:
    """``mosquitto -c FILE`` on 127.0.0.1:PORT, started and stopped by its PID; sessions persist across restarts.

    Persistence keeps the subscriber's session (and the results queued for it) through the
    outage, so what it misses is the daemon's doing, not the subscriber's reconnect race.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence true",
            f"persistence_location {root}/", "autosave_interval 0",
            "user root" if os.geteuid() == 0 else "",  # as root it would drop to 'mosquitto' and not write here
            "max_queued_messages 0", "max_inflight_messages 0", "set_tcp_nodelay true", "log_dest stderr",
            "log_type error", "log_type warning", ""]))

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with (self.root / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)], stdout=log, stderr=log)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: "
                                   f"{(self.root / 'mosquitto.log').read_text()[-1000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
            return False

        wait_for(listening, timeout, f"mosquitto on port {self.port}", every=0.05)

    def stop(self) -> None:
        """SIGTERM by PID (it saves sessions) and wait; a no-op when not running."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Message:
    """One MQTT message as the subscriber received it (``dup``: the broker's redelivery flag)."""

    topic: str
    payload: bytes
    retain: bool
    dup: bool
    at: float


class Subscriber:
    """A paho client on its own network thread, collecting every message of ``topics`` at QoS 1.

    A fixed client id and a persistent session (``persistent``): the broker queues what is
    published while it reconnects (a broker restart), so every result reaches it.
    """

    def __init__(self, port: int, topics: list[str], name: str = "sub", persistent: bool = True) -> None:
        self.topics = topics
        self.messages: list[Message] = []
        self._results: list[tuple[str, str, bool]] = []
        self._parsed_upto = 0
        self.lock = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rel-{name}-{os.getpid()}",
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the subscriber did not subscribe within 10 s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Message(msg.topic, msg.payload, bool(msg.retain), bool(msg.dup), time.time()))
            self.lock.notify_all()

    def wait_more(self, count: int, timeout: float) -> bool:
        """Whether more than ``count`` messages have arrived (in all), waiting up to ``timeout`` seconds."""
        with self.lock:
            return self.lock.wait_for(lambda: len(self.messages) > count, timeout)

    def on(self, suffix: str, retained: bool | None = None) -> list[Message]:
        """Messages whose topic ends with ``suffix`` (only retained ones, or only live ones, if asked)."""
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)
                    and (retained is None or m.retain == retained)]

    def results(self) -> list[tuple[str, str, bool]]:
        """``(camera, id, dup flag)`` of every result received, in arrival order (parsed once, then kept)."""
        with self.lock:
            new, self._parsed_upto = self.messages[self._parsed_upto:], len(self.messages)
        for m in new:
            if not m.topic.endswith("/result"):
                continue
            try:
                doc = json.loads(m.payload)
                self._results.append((doc["camera"], doc["id"], m.dup))
            except (ValueError, KeyError, TypeError):
                self._results.append(("?", f"unparsable:{m.payload[:40]!r}", m.dup))
        return list(self._results)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def delivery_counts(received: list[tuple[str, str, bool]], audited: set[str]) -> dict[str, Any]:
    """lost, duplicated, out of order (per camera, after dropping duplicates), from received vs audited ids."""
    seen: dict[str, int] = {}
    firsts: dict[str, list[str]] = {}
    dup_flagged = 0
    for cam, rid, dup in received:
        seen[rid] = seen.get(rid, 0) + 1
        if seen[rid] == 1:
            firsts.setdefault(cam, []).append(rid)
        elif dup:
            dup_flagged += 1
    disorder = {cam: [(a, b) for a, b in itertools.pairwise(ids) if b <= a] for cam, ids in firsts.items()}
    lost = sorted(audited - seen.keys())
    return {"received_messages": len(received), "delivered": len(seen.keys() & audited),
            "lost": len(lost), "lost_ids": lost[:20],
            "duplicated": sum(n - 1 for n in seen.values() if n > 1),
            "duplicated_ids": sorted(r for r, n in seen.items() if n > 1)[:20],
            "duplicates_flagged_dup_by_broker": dup_flagged,
            "out_of_order": sum(len(v) for v in disorder.values()),
            "out_of_order_pairs": [p for v in disorder.values() for p in v][:10],
            "unknown": len(seen.keys() - audited)}



def drain_mqtt(daemon: Daemon, sub: Subscriber, cameras: list[str], timeout: float = 300.0) -> float:
    """Stop inspecting (``enable false``), wait for an empty outbox and every audited result at the subscriber.

    Returns the seconds the outbox took to empty. Waits on real conditions: the daemon's
    ``outputs.mqtt.backlog`` and ``inflight``, then the subscriber holding every audited id.
    """
    for cam in cameras:
        daemon.request({"cmd": "enable", "camera": cam, "enabled": False, "who": "reliability"})
    t0 = time.monotonic()

    def empty() -> bool:
        st = daemon.status()
        idle = all(c["in_engine"] == 0 and c["queue_depth"] == 0 for c in st["cameras"].values())
        mq = st["outputs"].get("mqtt", {})
        return idle and mq.get("connected") and mq.get("backlog") == 0 and not mq.get("inflight")

    wait_for(empty, timeout, "an empty MQTT outbox", every=0.5, alive=daemon.check_alive)
    seconds = time.monotonic() - t0
    audited = set(audit_ids(daemon.db))
    with contextlib.suppress(TimeoutError):  # what is still missing then is reported as lost
        wait_for(lambda: audited <= {r for _, r, _ in sub.results()}, 30, "every audited result at the subscriber",
                 every=0.5)
    return seconds
