"""MQTT output: delivery latency and backlog drain rate, on a real Mosquitto and a real audit outbox.

Usage::

    .venv/bin/python bench/mqtt_bench.py [--rate 20] [--n 600] [--backlog 5000] [--inflight 32 128] [--json out.json]

Latency: inspections are recorded at ``--rate`` per second exactly as the daemon records them
(audit row and outbox payload in one transaction, fsync as configured, then the wake-up); the
time from each record's ``finished_at`` to its arrival at a paho subscriber on the same machine
is reported as p50/p99/max. It covers the audit commit, the sender, the broker and the subscriber.

Drain: ``--backlog`` results are recorded while the broker is down; the broker is started and
the time from the publisher's reconnect to the last result at the subscriber gives rows/s, once
per ``--inflight`` window.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "daemon"))  # the broker and subscriber the tests use
from machine import describe, one_line  # noqa: E402
from mqtt_broker import Broker, Subscriber, wait_until  # noqa: E402

from appliance.daemon.audit import Recorder  # noqa: E402
from appliance.daemon.publishers import OutputContext  # noqa: E402
from appliance.daemon.publishers.mqtt import MqttConfig, MqttPublisher  # noqa: E402
from appliance.daemon.records import Inspection, new_inspection_id  # noqa: E402


def record(recorder: Recorder, publisher: MqttPublisher, seq: int) -> Inspection:
    """One inspection, recorded as the daemon records it (outbox payload in the same transaction)."""
    now = time.time()
    rec = Inspection(id=new_inspection_id(now), camera=f"cam{seq % 2}", seq=seq, captured_at=now - 0.03,
                     finished_at=now, verdict="ok", model_id="bench", bank_hash="0", threshold=0.5,
                     threshold_source="bundle", raw_score=1.0, score=0.2, latency_ms={"total": 30.0})
    recorder.record(rec, ["mqtt"], outbox={"mqtt": publisher.payload(rec)}, then=lambda _c: publisher.publish(rec))
    return rec


def setup(root: Path, port: int, inflight: int, synchronous: str) -> tuple[Recorder, MqttPublisher]:
    recorder = Recorder(root / "audit.db", synchronous=synchronous)
    recorder.start()
    context = OutputContext(state_dir=root, status=lambda: {"cameras": {}}, registry=CollectorRegistry(),
                            outbox=recorder)
    config = MqttConfig(port=port, client_id=f"bench-{inflight}", prefix="bench", inflight=inflight,
                        reconnect_min_s=1, reconnect_max_s=1, commands=False)
    return recorder, MqttPublisher(config, context)


def latency(root: Path, rate: float, n: int, synchronous: str) -> dict:
    broker = Broker(root / "broker")
    broker.start()
    try:
        sub = Subscriber(broker.port, ["bench/+/result"])
        recorder, publisher = setup(root / "lat", broker.port, 32, synchronous)
        publisher.start()
        wait_until(lambda: publisher.state()["connected"], 10, "connected")
        t0 = time.perf_counter()
        for i in range(n):
            record(recorder, publisher, i)
            time.sleep(max(0.0, t0 + (i + 1) / rate - time.perf_counter()))
        sub.wait_for(lambda ms: len(ms) >= n, 60, f"{n} results")
        ms = np.array([(m.at - m.json()["finished_at_epoch"]) * 1e3 for m in sub.messages])
        publisher.close()
        recorder.close()
        sub.close()
    finally:
        broker.stop()
    return {"n": n, "rate_per_s": rate, "synchronous": synchronous, "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def drain(root: Path, backlog: int, inflight: int, synchronous: str) -> dict:
    broker = Broker(root / "broker", persistence=True)
    broker.start()
    sub = Subscriber(broker.port, ["bench/+/result"], persistent=True, client_id=f"bench-sub-{inflight}")
    broker.stop()
    recorder, publisher = setup(root / "drain", broker.port, inflight, synchronous)
    try:
        publisher.start()
        recorded = [record(recorder, publisher, i).id for i in range(backlog)]
        recorder.flush(120)
        wait_until(lambda: publisher.state()["backlog"] == backlog, 30, "the backlog")
        broker.start()
        wait_until(lambda: publisher.state()["connected"], 30, "reconnect")
        t0 = time.time()
        sub.wait_for(lambda ms: len(ms) >= backlog, 600, f"{backlog} results")
        received_s = max(m.at for m in sub.messages) - t0
        wait_until(lambda: publisher.state()["backlog"] == 0, 60, "every row marked sent")
        marked_s = time.time() - t0
        ids = [m.json()["id"] for m in sub.messages]
        in_order = list(dict.fromkeys(ids)) == recorded
    finally:
        publisher.close()
        recorder.close()
        sub.close()
        broker.stop()
    return {"backlog": backlog, "inflight": inflight, "synchronous": synchronous,
            "received_s": round(received_s, 2), "rows_per_s": round(backlog / received_s, 1),
            "all_marked_sent_s": round(marked_s, 2), "all_in_order": in_order, "duplicates": len(ids) - len(set(ids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="inspections per second for the latency run")
    parser.add_argument("--n", type=int, default=600, help="inspections in the latency run")
    parser.add_argument("--backlog", type=int, default=5000, help="results waiting when the broker comes back")
    parser.add_argument("--inflight", type=int, nargs="+", default=[32, 128], help="windows to drain with")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full", help="audit fsync level")
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    report: dict = {"machine": describe()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report["latency"] = latency(root / "latency", args.rate, args.n, args.synchronous)
        print(f"latency finished_at -> subscriber: {report['latency']}", flush=True)
        report["drain"] = []
        for window in args.inflight:
            result = drain(root / f"drain-{window}", args.backlog, window, args.synchronous)
            report["drain"].append(result)
            print(f"drain: {result}", flush=True)
    print(one_line(report["machine"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
