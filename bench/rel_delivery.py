"""Reliability scenarios about delivery over time: a broker outage with a kill -9 inside it, and a soak.

Both compare what a real MQTT consumer received (result ids, ``<prefix>/<camera>/result``)
with the audit's inspection rows: lost = audited and never received, duplicated = received
more than once, out of order = per camera, ids not increasing after dropping duplicates.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rel_kit import (
    PREFIX,
    Bench,
    Daemon,
    Plc,
    audit_ids,
    counts_line,
    deliveries_by_status,
    events,
    free_port,
    http_get,
    mqtt_output,
    replay_camera,
    rss_mb,
    wait_for,
    write_config,
)
from rel_mqtt import Broker, Subscriber, delivery_counts, drain_mqtt

CAMERAS = ["cam1", "cam2"]


def outage(bench: Bench, outage_s: float, lead_s: float, fps: float = 10.0) -> dict[str, Any]:
    """2 cameras at ``fps``; the broker down for ``outage_s`` with a kill -9 and restart halfway; then drain."""
    root = bench.fresh("outage")
    broker = Broker(root / "broker")
    broker.start()
    sub = Subscriber(broker.port, [f"{PREFIX}/+/result"], "outage")
    config = write_config(root, [replay_camera(c, bench.bundle, bench.replay, fps) for c in CAMERAS],
                          [mqtt_output(broker.port)], bench.cache)
    daemon = Daemon(config)
    timeline: dict[str, Any] = {}
    try:
        daemon.start()
        wait_for(lambda: len(sub.results()) >= 20, 120, "the first results at the subscriber",
                 alive=daemon.check_alive)
        time.sleep(lead_s)  # inspecting and delivering for a while: time is the point
        t_down = time.monotonic()
        broker.stop()
        timeline["received_before_outage"] = len(sub.results())
        time.sleep(outage_s / 2)
        timeline["backlog_before_kill"] = daemon.status()["outputs"]["mqtt"]["backlog"]
        daemon.kill9()
        timeline["restart_to_ready_s"] = round(daemon.start(), 2)
        time.sleep(max(0.0, outage_s - (time.monotonic() - t_down)))
        timeline["backlog_at_broker_back"] = daemon.status()["outputs"]["mqtt"]["backlog"]
        timeline["outage_s"] = round(time.monotonic() - t_down, 1)
        broker.start()
        t_back = time.monotonic()
        wait_for(lambda: daemon.status()["outputs"]["mqtt"]["backlog"] < 50, 600, "the backlog to drain",
                 every=0.5, alive=daemon.check_alive)
        timeline["backlog_drained_s"] = round(time.monotonic() - t_back, 1)
        drain_mqtt(daemon, sub, CAMERAS)
        status = daemon.status()
        stop = daemon.stop()
        timeline["stop_exit"] = stop.returncode
    finally:
        daemon.ensure_stopped()
        sub.close()
        broker.stop()
    audited = audit_ids(daemon.db)
    result = {"sent": None, "audited": len(audited), **delivery_counts(sub.results(), set(audited)),
              "crashed": daemon.crashes(), "crash_lines": daemon.crash_lines()[:10],
              "mqtt_deliveries": deliveries_by_status(daemon.db, "mqtt"),
              "frame_dropped_events": events(daemon.db, "frame_dropped"),
              "outbox_dropped_events": events(daemon.db, "outbox_dropped"),
              "exits": [e.__dict__ for e in daemon.exits], "timeline": timeline,
              "mqtt_status_at_end": {k: status["outputs"]["mqtt"].get(k) for k in ("sent", "failed", "dropped")}}
    result["line"] = counts_line("outage", result, (
        f"outage {timeline['outage_s']} s, backlog at kill {timeline['backlog_before_kill']}, at broker back "
        f"{timeline['backlog_at_broker_back']}, drained in {timeline['backlog_drained_s']} s; mqtt deliveries "
        f"{result['mqtt_deliveries']}; frame_dropped {result['frame_dropped_events']}"))
    result["notes"] = delivery_notes(result)
    return result


def delivery_notes(result: dict[str, Any]) -> list[str]:
    """The ids behind non-zero lost / duplicated / out-of-order counts, for the printed report."""
    notes = []
    if result["duplicated"]:
        notes.append(f"duplicated ids {result['duplicated_ids']} ({result['duplicates_flagged_dup_by_broker']} "
                     "of the second copies carried the broker's DUP flag: redelivered on the broker-to-subscriber "
                     "leg after the broker restart, not re-sent by the daemon)")
    if result["lost"]:
        notes.append(f"lost ids (first 20) {result['lost_ids']}")
    if result["out_of_order"]:
        notes.append(f"out-of-order pairs (first 10) {result['out_of_order_pairs']}")
    if result.get("crash_lines"):
        notes += [f"log: {line[:300]}" for line in result["crash_lines"][:5]]
    return notes


def soak(bench: Bench, seconds: float, sample_s: float = 10.0, fps: float = 10.0) -> dict[str, Any]:
    """2 cameras at ``fps`` with every output on for ``seconds``; RSS sampled, its slope after a 20 % warm-up."""
    root = bench.fresh("soak")
    broker = Broker(root / "broker")
    broker.start()
    sub = Subscriber(broker.port, [f"{PREFIX}/+/result"], "soak")
    http_port, modbus_port = free_port(), free_port()
    outputs = [{"type": "overlay", "ok_per_s": 2}, {"type": "http", "port": http_port},
               mqtt_output(broker.port), {"type": "modbus", "port": modbus_port, "cameras": {"cam1": 1, "cam2": 2}},
               {"type": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{free_port()}/appliance/", "cameras": CAMERAS,
                "allow_anonymous": True}]
    config = write_config(root, [replay_camera(c, bench.bundle, bench.replay, fps) for c in CAMERAS], outputs,
                          bench.cache)
    daemon = Daemon(config)
    samples: list[tuple[float, float]] = []
    probes = {"healthz_not_200": 0}
    plc = None
    try:
        daemon.start()
        plc = Plc(modbus_port)
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            daemon.check_alive()
            samples.append((elapsed, rss_mb(daemon.pid)[0]))
            probes["healthz_not_200"] += http_get(http_port, "/healthz")[0] != 200
            time.sleep(min(sample_s, max(0.0, seconds - (time.monotonic() - t0))))
        status = daemon.status()
        drops = sum(c["drops"] for c in status["cameras"].values())
        drain_mqtt(daemon, sub, CAMERAS)
        time.sleep(1.0)  # the PLC acknowledges what the buffers still hold
        plc.close()
        probes["plc_acked"], probes["plc_errors"] = sum(plc.acked.values()), plc.errors
        daemon.stop()
    finally:
        if plc is not None:
            plc.close()
        daemon.ensure_stopped()
        sub.close()
        broker.stop()
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples])
    steady = t >= 0.2 * seconds
    slope = spread = None
    if steady.sum() >= 4:  # least squares over the samples after the warm-up, with the slope's standard error
        coef, cov = np.polyfit(t[steady] / 3600, rss[steady], 1, cov=True)
        slope, spread = float(coef[0]), float(np.sqrt(cov[0, 0]))
    audited = audit_ids(daemon.db)
    result = {"sent": None, "audited": len(audited), **delivery_counts(sub.results(), set(audited)),
              "crashed": daemon.crashes(), "crash_lines": daemon.crash_lines()[:10],
              "seconds": seconds, "rss_start_mb": round(float(rss[0]), 1), "rss_end_mb": round(float(rss[-1]), 1),
              "rss_slope_mb_per_h": None if slope is None else round(slope, 1),
              "rss_slope_stderr_mb_per_h": None if spread is None else round(spread, 1), "rss_samples": samples,
              "drops": drops, "frame_dropped_events": events(daemon.db, "frame_dropped"), **probes,
              "deliveries": {o: deliveries_by_status(daemon.db, o)
                             for o in ("mqtt", "overlay", "http", "modbus", "opcua")},
              "exits": [e.__dict__ for e in daemon.exits]}
    result["line"] = counts_line("soak", result, (
        f"{seconds:.0f} s, RSS {result['rss_start_mb']} -> {result['rss_end_mb']} MB, slope "
        f"{result['rss_slope_mb_per_h']} ± {result['rss_slope_stderr_mb_per_h']} MB/h after warm-up, drops {drops}, "
        f"/healthz not 200 {probes['healthz_not_200']}x; PLC acknowledged {probes['plc_acked']} results over Modbus "
        f"(request errors {probes['plc_errors']}), modbus deliveries {result['deliveries']['modbus']}"))
    result["notes"] = delivery_notes(result)
    return result
