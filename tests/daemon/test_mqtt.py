"""The MQTT output against a real Mosquitto and a real audit outbox (SQLite): order, outages, bound, commands."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from harness import free_port
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mqtt_broker import Subscriber, needs_mosquitto, running_broker, wait_until
from prometheus_client import CollectorRegistry
from snapshots import snapshot

from appliance.daemon.audit import Recorder
from appliance.daemon.config import parse_config
from appliance.daemon.publishers import OutputContext
from appliance.daemon.publishers.mqtt import MqttConfig, MqttPublisher
from appliance.daemon.publishers.mqtt_wire import result_payload
from appliance.daemon.records import Inspection, new_inspection_id
from appliance.errors import ConfigError

SCHEMA = json.loads((Path(__file__).parents[2] / "schemas" / "inspection-result.v1.json").read_text())
CAMERAS = ("cam1", "cam2")

pytestmark = needs_mosquitto


def inspection(camera: str = "cam1", seq: int = 0, verdict: str = "ok", **extra: Any) -> Inspection:
    now = time.time()
    fields: dict[str, Any] = dict(
        id=new_inspection_id(), camera=camera, seq=seq, captured_at=now - 0.05, finished_at=now, verdict=verdict,
        model_id="ball_screw-padim", bank_hash="ab12", threshold=0.5, threshold_source="bundle",
        raw_score=3.2, score=0.81 if verdict == "ng" else 0.2, latency_ms={"backbone": 11.2, "total": 20.5},
        source=f"/data/{seq:04d}.jpg", image_sha256="0" * 64)
    if verdict == "error":
        fields.update(score=None, raw_score=None, threshold=None, error="cannot read frame")
    fields.update(extra)
    return Inspection(**fields)


class Harness:
    """A real audit Recorder, the daemon's asyncio loop in a thread, a control handler, and the publisher."""

    def __init__(self, root: Path, port: int, **config: Any) -> None:
        self.recorder = Recorder(root / "audit.db")
        self.recorder.start()
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._loop_thread.start()
        self.requests: list[dict[str, Any]] = []
        self.alarms: list[dict[str, Any]] = []
        self.config = MqttConfig(port=port, client_id="test-appliance", prefix="plant/line", reconnect_max_s=1,
                                 status_interval=1.0, **config)
        self.context = OutputContext(state_dir=root, status=self.status, registry=CollectorRegistry(),
                                     loop=self.loop, control=self.control, outbox=self.recorder)
        self.publisher = MqttPublisher(self.config, self.context)
        self.sent: list[Inspection] = []

    def status(self) -> Any:
        return snapshot({c: {"fps": 2.0, "frames": 3} for c in CAMERAS}, alarms=self.alarms)

    async def control(self, command: Any) -> Any:
        """Stands where the daemon's dispatcher is: records the command's fields, refuses an unknown shift."""
        request = {"cmd": command.cmd, **command.model_dump(exclude_unset=True)}
        self.requests.append(request)
        if request.get("shift") not in (None, "A"):
            raise ConfigError(f"no shift {request['shift']!r}")
        return {"accepted": True} if request["cmd"] == "trigger" else {"done": request["cmd"]}

    def emit(self, n: int, start: int = 0) -> list[Inspection]:
        """Record ``n`` inspections as the daemon does: outbox payload in the same transaction, then a wake-up."""
        made = []
        for i in range(start, start + n):
            rec = inspection(CAMERAS[i % 2], seq=i, verdict=("ok", "ng", "error")[i % 3])
            self.recorder.record(rec, ["mqtt"], outbox={"mqtt": self.publisher.payload(rec)},
                                 then=lambda committed, r=rec: self.publisher.publish(r) if committed
                                 else self.publisher.publish_uncommitted(r))
            made.append(rec)
        self.recorder.flush()
        self.sent += made
        return made

    def rows(self, where: str = "1") -> list[dict[str, Any]]:
        conn = sqlite3.connect(f"file:{self.recorder.path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM deliveries WHERE {where} ORDER BY id")]
        finally:
            conn.close()

    def events(self, kind: str) -> list[dict[str, Any]]:
        self.recorder.flush()
        conn = sqlite3.connect(f"file:{self.recorder.path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM events WHERE kind = ? ORDER BY id", [kind])]
        finally:
            conn.close()

    def close(self) -> None:
        self.publisher.close()
        self.recorder.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(5)


@pytest.fixture
def broker(tmp_path):
    with running_broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def persistent_broker(tmp_path):
    with running_broker(tmp_path / "broker", persistence=True) as b:
        yield b


@pytest.fixture
def harness_at(tmp_path):
    made: list[Harness] = []

    def make(port: int, **config: Any) -> Harness:
        h = Harness(tmp_path / f"h{len(made)}", port, **config)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def result_ids(sub: Subscriber) -> list[str]:
    return [m.json()["id"] for m in sub.messages if m.topic.endswith("/result")]


# ---------------------------------------------------------------- payload and config


def test_result_payloads_validate_against_the_schema_and_the_schema_rejects_broken_ones():
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    records = [inspection(verdict="ok"), inspection(verdict="ng", trigger_id="T7"), inspection(verdict="error"),
               inspection(raw_score=float("nan"), latency_ms={"total": float("inf"), "queue": 1.0})]
    for rec in records:
        body = json.loads(result_payload(rec))
        validator.validate(body)
        assert (body["id"], body["camera"], body["seq"], body["verdict"]) == (rec.id, rec.camera, rec.seq, rec.verdict)
        assert body["captured_at_epoch"] == rec.captured_at and body["captured_at"].endswith("Z")
    assert json.loads(result_payload(records[3]))["raw_score"] is None  # JSON has no NaN
    good = json.loads(result_payload(records[0]))
    for broken in ({**good, "verdict": "maybe"}, {k: v for k, v in good.items() if k != "id"},
                   {**good, "error": "but it said ok"}, {**good, "score": 1.5}, {**good, "schema": "inspection/v0"}):
        assert not validator.is_valid(broken), broken


def test_config_defaults_and_refusals(tmp_path):
    cfg = MqttConfig()
    assert (cfg.port, cfg.qos, cfg.prefix) == (1883, 1, "appliance")
    assert cfg.resolved_client_id().startswith("anomaly-appliance-")
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert MqttConfig(username="u", password_file=secret).read_password() == "s3cret"
    with pytest.raises(ConfigError, match="password_file"):
        MqttConfig(username="u", password_file=tmp_path / "missing").read_password()
    for bad, why in (({"prefix": "a/+/b"}, "wildcards"), ({"prefix": "/a"}, "topic levels"),
                     ({"password": "x", "password_file": str(secret)}, "not both"),
                     ({"cert_file": "c.pem", "key_file": "k.pem"}, "tls = true"), ({"qos": 2}, "qos"),
                     ({"tls": True, "cert_file": "c.pem"}, "go together"), ({"inflight": 0}, "inflight"),
                     ({"allow": ["shutdown"]}, "allow"), ({"colour": "red"}, "unknown key")):
        doc = {"cameras": [{"id": "c", "bundle": "b", "source": {"type": "replay", "path": str(tmp_path)}}],
               "outputs": [{"type": "mqtt", **bad}]}
        with pytest.raises(ConfigError, match=why):
            parse_config(doc)


def test_doctor_check_connects_or_says_why(broker):
    assert MqttPublisher.check(MqttConfig(port=broker.port), Path("."))[0] == "ok"
    status, detail = MqttPublisher.check(MqttConfig(port=free_port()), Path("."))
    assert status == "fail" and "cannot connect" in detail
    status, detail = MqttPublisher.check(MqttConfig(port=broker.port, tls=True, ca_file="/nonexistent/ca.pem"),
                                         Path("."))
    assert status == "fail" and "not readable" in detail


def test_recorder_outbox_reads_after_a_row_counts_and_drops_the_oldest_unsent(tmp_path):
    rec = Recorder(tmp_path / "audit.db")
    rec.start()
    made = [inspection(seq=i) for i in range(10)]
    for r in made:
        rec.record(r, ["mqtt", "other"], outbox={"mqtt": result_payload(r)})
    rec.flush()
    rows = rec.pending("mqtt", 100)
    assert [r["inspection_id"] for r in rec.pending("mqtt", 100, after=rows[2]["id"])] == [r.id for r in made[3:]]
    assert (rec.pending_count("mqtt"), rec.pending_count("other")) == (10, 10)
    # rows 0-1 are in flight (after=); of the 8 behind them, keep the newest 4
    assert rec.drop_pending("mqtt", keep=4, detail="full", after=rows[1]["id"]) == 4
    assert rec.drop_pending("mqtt", keep=4, detail="full", after=rows[1]["id"]) == 0
    left = [r["inspection_id"] for r in rec.pending("mqtt", 100)]
    assert left == [r.id for r in made[:2] + made[6:]]
    assert (rec.pending_count("mqtt"), rec.pending_count("other")) == (6, 10)
    rec.close()


# ---------------------------------------------------------------- delivery


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_results_arrive_in_outbox_order_and_are_marked_sent_on_ack(broker, harness_at, protocol):
    sub = Subscriber(broker.port, ["plant/line/#"])
    h = harness_at(broker.port, protocol=protocol, inflight=8)
    h.publisher.start()
    h.emit(150)
    sub.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/result")]) >= 150, 30, "150 results")
    assert result_ids(sub) == [r.id for r in h.sent]
    for cam in CAMERAS:
        on_topic = [m.json()["id"] for m in sub.on(f"plant/line/{cam}/result")]
        assert on_topic == [r.id for r in h.sent if r.camera == cam]
    wait_until(lambda: h.publisher.state()["backlog"] == 0, 10, "the outbox to empty")
    rows = h.rows()
    assert [r["status"] for r in rows] == ["sent"] * 150
    assert all(r["detail"].endswith("/result") and r["delivered_at"] for r in rows)
    state = h.publisher.state()
    assert (state["connected"], state["sent"], state["inflight"], state["dropped"]) == (True, 150, 0, 0)
    # retained: the appliance is online and each camera has a status
    sub.wait_for(lambda ms: {m.topic for m in ms} >= {"plant/line/cam1/status", "plant/line/cam2/status"}, 10,
                 "camera status")
    assert [m.payload for m in sub.on("plant/line/status")] == [b"online"]
    assert sub.on("plant/line/cam1/status")[-1].json()["state"] == "running"
    sub.close()


def test_broker_down_at_start_and_mid_run_nothing_lost_and_order_kept(persistent_broker, harness_at):
    broker = persistent_broker
    sub = Subscriber(broker.port, ["plant/line/+/result"], persistent=True, client_id="test-collector")
    broker.stop()  # the subscriber's session is saved; the appliance starts with no broker
    h = harness_at(broker.port, inflight=4)
    h.publisher.start()  # must not fail
    h.emit(40)
    assert h.publisher.state()["connected"] is False
    wait_until(lambda: h.publisher.state()["backlog"] == 40, 5, "40 pending")
    wait_until(lambda: (h.publisher.state()["last_error"] or "").startswith("cannot connect"), 5, "the reason")
    broker.start()
    wait_until(lambda: h.publisher.state()["backlog"] == 0, 30, "backlog drained after the broker came up")
    broker.stop()  # an outage mid-run: results wait in the outbox
    wait_until(lambda: not h.publisher.state()["connected"], 10, "disconnect noticed")
    h.emit(40, start=40)
    wait_until(lambda: h.publisher.state()["backlog"] == 40, 5, "40 pending again")
    broker.start()
    wait_until(lambda: h.publisher.state()["backlog"] == 0, 30, "backlog drained after the outage")
    sub.wait_for(lambda ms: len(ms) >= 80, 20, "80 results at the subscriber")
    assert result_ids(sub) == [r.id for r in h.sent]
    assert {r["status"] for r in h.rows()} == {"sent"}
    sub.close()


def test_results_the_audit_cannot_write_are_sent_from_memory_once(broker, harness_at):
    """A full disk: the outbox cannot take the results, the PLC still gets each of them exactly once."""
    sub = Subscriber(broker.port, ["plant/line/+/result"])
    h = harness_at(broker.port)
    h.publisher.start()
    h.emit(5)
    sub.wait_for(lambda ms: len(ms) >= 5, 20, "5 results from the outbox")
    h.recorder.on_writer(lambda db: db.execute("PRAGMA query_only = 1"))  # every write fails, as on a full disk
    during = h.emit(6, start=5)
    sub.wait_for(lambda ms: len(ms) >= 11, 20, "6 results from memory")
    assert h.recorder.state()["state"] == "error"
    h.recorder.on_writer(lambda db: db.execute("PRAGMA query_only = 0"))  # space is back
    h.recorder.nudge()
    h.emit(2, start=11)  # the next write drains the backlog first
    wait_until(lambda: h.publisher.state()["backlog"] == 0 and len(h.rows()) == 13, 20, "the backlog written")
    wait_until(lambda: {r["status"] for r in h.rows()} == {"sent"}, 20, "every row marked sent")
    assert result_ids(sub) == [r.id for r in h.sent]  # each once, in order: none sent twice after the rows came
    from_memory = [r for r in h.rows() if r["detail"] == "sent from memory while the audit log could not write"]
    assert [r["inspection_id"] for r in from_memory] == [r.id for r in during]
    sub.close()


def test_a_full_outbox_drops_the_oldest_unsent_results_counted_and_audited(broker, harness_at):
    port = free_port()  # no broker there yet
    h = harness_at(port, max_pending=5)
    h.publisher.start()
    made = h.emit(12)
    wait_until(lambda: h.publisher.state()["dropped"] == 7, 10, "7 dropped")
    rows = h.rows()
    assert [r["status"] for r in rows] == ["dropped"] * 7 + ["pending"] * 5
    assert [r["inspection_id"] for r in rows[:7]] == [r.id for r in made[:7]]
    assert "outbox full" in rows[0]["detail"]
    event = h.events("outbox_dropped")[-1]
    assert json.loads(event["data"])["dropped"] == 7
    assert h.publisher.state()["backlog"] == 5
    h.publisher.close()  # the same outbox, now with a broker: the newest five still go out, in order
    h.publisher = MqttPublisher(h.config.model_copy(update={"port": broker.port}), h.context)
    sub = Subscriber(broker.port, ["plant/line/+/result"])
    h.publisher.start()
    sub.wait_for(lambda ms: len(ms) >= 5, 20, "5 results")
    assert result_ids(sub) == [r.id for r in made[7:]]
    sub.close()


# ---------------------------------------------------------------- commands


def command(sub: Subscriber, client: Any, topic: str, payload: bytes | str, n_before: int) -> dict[str, Any]:
    """Publish a command and return the next reply on the response topics."""
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    msgs = sub.wait_for(lambda ms: len(ms) > n_before, 10, f"a reply to {topic} {payload!r}")
    return msgs[n_before].json()


@pytest.fixture
def commander(broker, harness_at):
    h = harness_at(broker.port, command_token="tok", allow=("trigger", "threshold"))
    h.publisher.start()
    wait_until(lambda: h.publisher.state()["commands_subscribed"], 10, "the command subscription")
    sub = Subscriber(broker.port, ["plant/line/+/cmd/response"])  # returns once its own SUBACK is in
    yield h, sub, sub.client
    sub.close()


def test_commands_run_on_the_loop_and_bad_ones_are_refused_replied_and_audited(commander):
    h, sub, client = commander
    ok = command(sub, client, "plant/line/cam1/cmd/trigger", json.dumps({"id": "T1", "token": "tok"}), 0)
    assert ok == {**ok, "id": "T1", "cmd": "trigger", "camera": "cam1", "ok": True, "result": {"accepted": True}}
    ok = command(sub, client, "plant/line/cam2/cmd/threshold",
                 json.dumps({"id": "R2", "value": 0.7, "shift": "A", "who": "alice", "token": "tok"}), 1)
    assert ok["ok"] and ok["id"] == "R2"
    assert h.requests == [{"cmd": "trigger", "camera": "cam1", "id": "T1"},
                          {"cmd": "threshold", "camera": "cam2", "value": 0.7, "shift": "A", "who": "mqtt:alice"}]
    refusals = [
        ("cam1/cmd/trigger", b"{not json", "not JSON"),
        ("cam1/cmd/trigger", b"[1, 2]", "JSON object"),
        ("cam1/cmd/threshold", json.dumps({"id": "R3", "value": "high", "token": "tok"}), "value"),
        ("cam1/cmd/threshold", json.dumps({"id": "R4", "value": 1.5, "token": "tok"}), "value"),
        ("cam1/cmd/threshold", json.dumps({"id": "R5", "token": "tok"}), "value"),
        ("cam1/cmd/trigger", json.dumps({"id": "R6", "token": "tok", "extra": 1}), "extra"),
        ("cam9/cmd/trigger", json.dumps({"id": "R7", "token": "tok"}), "unknown camera"),
        ("cam1/cmd/trigger", json.dumps({"id": "R8", "token": "wrong"}), "not authorised"),
        ("cam1/cmd/trigger", json.dumps({"id": "R9"}), "not authorised"),
        ("cam1/cmd/reload", json.dumps({"token": "tok"}), "not allowed"),
        ("cam1/cmd/shutdown", b"", "unknown command"),
        ("cam1/cmd/threshold", json.dumps({"id": "R10", "value": 0.4, "shift": "Z", "token": "tok"}), "no shift"),
    ]
    for i, (topic, payload, why) in enumerate(refusals):
        reply = command(sub, client, f"plant/line/{topic}", payload, 2 + i)
        assert reply["ok"] is False and why in reply["error"], (topic, payload, reply)
        assert reply["camera"] == topic.split("/")[0]
    assert [r.json()["id"] for r in sub.on("response")] == ["T1", "R2", None, None, "R3", "R4", "R5", "R6", "R7",
                                                            "R8", "R9", None, None, "R10"]
    state = h.publisher.state()
    assert (state["commands_ok"], state["commands_refused"]) == (2, len(refusals))
    events = h.events("command_refused")
    assert len(events) == len(refusals)
    assert json.loads(events[6]["data"])["camera"] == "cam9"
    assert len(h.requests) == 3  # only the unknown shift reached the control handler among the refusals


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=8)
_junk = (st.binary(max_size=64) | _values.map(lambda v: json.dumps(v).encode())
         | st.dictionaries(st.text(max_size=10), _values, max_size=4).map(lambda d: json.dumps(d).encode()))
# Well-formed commands with now and then a field off, so that many run and many are refused.
_id = st.one_of(st.text(min_size=1, max_size=64), st.uuids().map(str), _values)
_plausible = {
    "trigger": st.fixed_dictionaries({"token": st.one_of(st.just("tok"), st.just("tok"), _values)},
                                     optional={"id": _id}),
    "threshold": st.fixed_dictionaries({"token": st.just("tok"), "value": st.floats(0, 1) | st.none() | _values},
                                       optional={"id": _id, "shift": st.just("A") | _values,
                                                 "who": st.text(min_size=1, max_size=64) | _values}),
}


@st.composite
def _commands(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(["trigger", "threshold", "trigger", "threshold", "reload", "response", "x"]))
    if name in _plausible and draw(st.integers(0, 3)):
        return name, json.dumps(draw(_plausible[name])).encode()
    return name, draw(_junk)


def handled(h: Harness) -> int:
    state = h.publisher.state()
    return state["commands_ok"] + state["commands_refused"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=_commands())
def test_fuzzed_commands_never_break_the_publisher(commander, command):
    h, sub, client = commander
    name, payload = command
    before = len(sub.messages)
    counted = handled(h)
    client.publish(f"plant/line/cam1/cmd/{name}", payload, qos=1).wait_for_publish(5)
    if name == "response":  # a reply is not a command: only our own message comes back, nothing answers it
        sub.wait_for(lambda ms: len(ms) > before, 10, "our own message")
        time.sleep(0.05)
        assert len(sub.messages) == before + 1
        assert handled(h) == counted
        return
    reply = sub.wait_for(lambda ms: len(ms) > before, 10, "a reply")[before].json()
    assert handled(h) == counted + 1
    assert reply["ok"] is (reply.get("error") is None)
    event("ran" if reply["ok"] else "refused")
    assert h.publisher.state()["connected"]


def test_hostile_payloads_get_a_reply_and_a_counted_refusal(commander):
    h, sub, client = commander
    hostile = [b"[" * 5000 + b"]" * 5000, b'{"value": ' + b"[" * 3000 + b"]" * 3000 + b"}",
               json.dumps({"id": "big", "token": "tok", "value": 0.5, "who": "1" * 1_000_000}).encode(),
               b"1" * 1_000_000]
    for i, payload in enumerate(hostile):
        reply = command(sub, client, "plant/line/cam1/cmd/threshold", payload, i)
        assert reply["ok"] is False and len(json.dumps(reply)) < 2000, reply
    assert h.publisher.state()["commands_refused"] == len(hostile) and h.requests == []
    reply = command(sub, client, "plant/line/cam1/cmd/threshold",
                    json.dumps({"id": "z", "token": "tok", "value": -0.0}), len(hostile))
    assert reply["ok"] and h.requests == [{"cmd": "threshold", "camera": "cam1", "value": 0.0, "who": "mqtt"}]
    assert str(h.requests[0]["value"]) == "0.0"  # one zero: never "-0.0" in a display or the audit


def test_after_fuzzing_a_good_command_still_runs(commander):
    h, sub, client = commander
    for junk in (b"\xff\xfe", b"null", b'{"value": NaN}', b'{"id": 5}', b"1e999"):
        client.publish("plant/line/cam1/cmd/threshold", junk, qos=1)
    sub.wait_for(lambda ms: len(ms) >= 5, 10, "five refusals")
    reply = command(sub, client, "plant/line/cam1/cmd/trigger", json.dumps({"id": "ok", "token": "tok"}), 5)
    assert reply["ok"] and h.publisher.state()["commands_refused"] == 5
