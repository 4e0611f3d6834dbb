r"""Reliability harness: the real daemon through outages, kills, stops, a full disk, bad inputs and a long run.

    .venv/bin/python bench/reliability.py --data ../shared/data/bsdata/ball_screw --out bench/results/reliability \\
        [--only outage,sigterm,disk,hotfolder,fuzz,soak] [--quick]

Every scenario drives ``appliance run`` as a subprocess (a real sd_notify socket), a real
Mosquitto on a loopback port (started and stopped by its PID), a paho subscriber, a pymodbus
client and raw sockets, and reads the audit database with plain sqlite3. For each it prints
its counts: sent (frames/files/messages given to the daemon, where knowable), audited
(inspection rows), delivered (results a consumer received), lost, duplicated, out of order,
crashed (an exit we did not cause or with a bad status, or 'terminate called' / 'Traceback' in
the daemon's log), then what the scenario itself measures. Scenarios:

- **outage**: 2 replay cameras at 10 fps, MQTT; the broker stopped for ``--outage-s`` and the
  daemon killed (-9) and restarted halfway through; broker back; outbox drained; received ids
  against audited ids.
- **sigterm**: ``--stops`` start / inspect ``--stop-after`` frames / SIGTERM cycles, 2 unpaced
  cameras, queue 2, 1920x1080 overlays of every part, HTTP; exit status, stop time, pending
  deliveries of non-durable outputs, overlay paths naming no file.
- **disk**: (root) the state folder on a 40 MB tmpfs pushed under ``[disk] min_free_mb``; the
  disk_low alarm in status, /healthz, Modbus, the retained MQTT status; results still delivered;
  alarm cleared when space comes back; SIGTERM while low loses no shown result's audit row.
- **hotfolder**: ``--files`` valid and broken files dropped at once into a folder source; rows,
  errors, done/failed, frame_dropped (must be 0), lost files; peak RSS around a 20000x20000 PNG.
- **fuzz**: ``--mqtt-commands`` hostile MQTT command payloads (one reply each) and
  ``--modbus-frames`` malformed Modbus TCP frames plus every unsupported function code.
- **soak**: 2 cameras x 10 fps, every output on, ``--soak-s``; RSS slope after warm-up.

Nothing is asserted: counts are printed and written to ``<out>/reliability.json``. The machine is
described in the report (``machine.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from daemon_bench import fit_bundle, test_images  # noqa: E402
from machine import describe, one_line  # noqa: E402
from rel_delivery import outage, soak  # noqa: E402
from rel_inputs import fuzz, hotfolder  # noqa: E402
from rel_kit import Bench, replay_folder  # noqa: E402
from rel_stops import disk, sigterm  # noqa: E402

SCENARIOS = ("outage", "sigterm", "disk", "hotfolder", "fuzz", "soak")
#: ``--quick``: every scenario in a few minutes in all (each value replaces the option's default).
QUICK = {"outage_s": 20.0, "outage_lead_s": 5.0, "stops": 5, "stop_after": 10, "disk_low_s": 10.0, "files": 60,
         "mqtt_commands": 200, "modbus_frames": 1000, "soak_s": 120.0}


def run(name: str, bench: Bench, args: argparse.Namespace) -> dict:
    if name == "outage":
        return outage(bench, args.outage_s, args.outage_lead_s)
    if name == "sigterm":
        return sigterm(bench, args.stops, args.stop_after)
    if name == "disk":
        return disk(bench, args.disk_low_s)
    if name == "hotfolder":
        return hotfolder(bench, args.files, args.seed)
    if name == "fuzz":
        return fuzz(bench, args.mqtt_commands, args.modbus_frames, args.seed)
    return soak(bench, args.soak_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="MVTec-style category folder (train/good, test/...)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "reliability")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--quick", action="store_true", help="a short version of every scenario (options given "
                                                         "explicitly still win)")
    ap.add_argument("--scorer", default="padim")
    ap.add_argument("--size", default="256x624")
    ap.add_argument("--outage-s", type=float, default=300.0, help="outage: seconds the broker is down")
    ap.add_argument("--outage-lead-s", type=float, default=30.0, help="outage: seconds delivering before it")
    ap.add_argument("--stops", type=int, default=50, help="sigterm: start/stop cycles")
    ap.add_argument("--stop-after", type=int, default=20, help="sigterm: inspections of a run before its SIGTERM")
    ap.add_argument("--disk-low-s", type=float, default=60.0, help="disk: seconds inspecting below the floor")
    ap.add_argument("--files", type=int, default=400, help="hotfolder: files dropped at once")
    ap.add_argument("--mqtt-commands", type=int, default=2000, help="fuzz: MQTT command payloads")
    ap.add_argument("--modbus-frames", type=int, default=10_000, help="fuzz: malformed Modbus TCP frames")
    ap.add_argument("--soak-s", type=float, default=3600.0, help="soak: seconds")
    ap.add_argument("--seed", type=int, default=20240615)
    args = ap.parse_args()
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    info = describe()
    print(one_line(info), flush=True)
    cache = args.out / "cache"
    bundle, fit_s = fit_bundle(args.data.resolve(), args.out, args.scorer, args.size, cache, "f32")
    replay = replay_folder(args.out / "replay", test_images(args.data.resolve(), 60, 0.05))
    bench = Bench(out=args.out, bundle=bundle.resolve(), cache=cache, replay=replay, data=args.data.resolve())
    fitted = f"fitted in {fit_s:.0f} s" if fit_s == fit_s else "reused"  # NaN: reused
    print(f"bundle {bundle} ({fitted}); "
          f"scenarios {', '.join(only)}{' (quick)' if args.quick else ''}", flush=True)
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "scenarios": {}}
    for name in only:
        t0 = time.monotonic()
        try:
            result = run(name, bench, args)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                      "line": f"{name}: did not complete: {type(exc).__name__}: {str(exc)[:1500]}"}
        result["wall_s"] = round(time.monotonic() - t0, 1)
        report["scenarios"][name] = result
        print(result["line"], flush=True)
        for extra in result.get("notes", []):
            print(f"    {extra}", flush=True)
        (args.out / "reliability.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {args.out / 'reliability.json'}")


if __name__ == "__main__":
    main()
