"""A rebuild's time and peak memory on the ball-screw data, through the real job path with the embedded storage.

    .venv/bin/python bench/rebuild_bench.py --data ../shared/data/bsdata/ball_screw --out bench/results/rebuild \
        [--scorers patchcore padim] [--threads N]

The data's images enter the trainer as an appliance uploads them (``TrainerService.finish_upload``:
bytes checked against their sha256, stored content-addressed, recorded in the catalogue): ``train/good``
as OK samples, ``test/good`` as OK, ``test/pitting`` rejected and labelled defect by an operator. For each
scorer (its defaults: the trainer's ``rebuild`` section left empty), a person asks for two rebuilds
(``request_rebuild``, which queues them in huey's ``jobs.db``), each run by a fresh ``appliance trainer
worker`` process:

1. the first model of the camera (no running model: the gate checks the golden images and the eval frames);
2. after the appliance reports that it runs that model and 100 more OK frames arrived: a new dataset
   version, a new fit, and the gate scores the eval frames with both bundles (the steady state).

Per rebuild: the job's own time (running -> its end, from the catalogue), the worker process's wall time
(start-up and imports included), its peak RSS (``ru_maxrss`` from ``wait4``, so only that process), the
fit's stages (from the bundle's manifest) and the gate's figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tomli_w

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe, one_line  # noqa: E402

from appliance.trainer.config import load_trainer_config  # noqa: E402
from appliance.trainer.queues import open_queue  # noqa: E402
from appliance.trainer.records import FrameMeta, Label  # noqa: E402
from appliance.trainer.service import TrainerService  # noqa: E402
from appliance.trainer.storage import open_storage  # noqa: E402

APPLIANCE, CAMERA = "bench-1", "cam-1"
#: OK frames held back for the second rebuild (they arrive between the two).
LATE = 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def upload(service: TrainerService, path: Path, inspection_id: str, at: float, verdict: str) -> None:
    """One frame as the appliance's uploader sends it (no score: the camera has no model yet)."""
    data = path.read_bytes()
    meta = FrameMeta(camera_id=CAMERA, inspection_id=inspection_id, sha256=hashlib.sha256(data).hexdigest(),
                     suffix=path.suffix.lower(), size=len(data), captured_at=at, verdict=verdict,
                     reasons=["sample" if verdict == "ok" else "reject"])
    service.finish_upload(APPLIANCE, meta, data)


def ingest(service: TrainerService, data: Path, now: float) -> list[tuple[Path, str]]:
    """Upload the dataset; returns the OK frames held back for the second rebuild."""
    good = [(p, f"train-{p.stem}") for p in sorted((data / "train" / "good").glob("*"))]
    good += [(p, f"test-{p.stem}") for p in sorted((data / "test" / "good").glob("*"))]
    late, early = good[:LATE], good[LATE:]
    t0 = time.perf_counter()
    for i, (path, iid) in enumerate(early):
        upload(service, path, iid, now - 86400 + i, "ok")
    pitting = sorted((data / "test" / "pitting").glob("*"))
    for i, path in enumerate(pitting):
        upload(service, path, f"pit-{path.stem}", now - 43200 + i, "ng")
    service.add_labels(APPLIANCE, [Label(id=f"l-{path.stem}", camera_id=CAMERA, inspection_id=f"pit-{path.stem}",
                                         label="defect", who="bench", at=now - 3600) for path in pitting])
    log(f"uploaded {len(early)} OK and {len(pitting)} labelled-defect frames in {time.perf_counter() - t0:.1f} s")
    return late


def run_worker(config: Path, service: TrainerService, job_id: int, out: Path) -> dict:
    """One ``appliance trainer worker`` process until the job ends: its wall time and peak RSS."""
    exe = Path(sys.executable).parent / "appliance"
    logfile = open(out / f"worker-{job_id}.log", "wb")  # noqa: SIM115 - the child writes it
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "trainer", "worker", "--config", str(config)], stdout=logfile,
                            stderr=subprocess.STDOUT)
    logfile.close()
    try:
        while (job := service.catalogue.job(job_id)).status in ("queued", "running"):
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}; see {out}/worker-{job_id}.log")
            time.sleep(0.5)
        done = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"job": job, "worker_wall_s": round(done - t0, 1), "worker_peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def fit_record(service: TrainerService, model_id: str, out: Path) -> dict:
    """The training record of a model's bundle (stage times, image counts, the fit's own peak RSS)."""
    archive = service.blobs.download(f"bundles/{model_id}.tar.gz", out / "bundle.tar.gz")
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/manifest.json"))
        manifest = json.load(tar.extractfile(member))
    archive.unlink()
    t = manifest["training"]
    return {"images": t["images"], "seconds": t["seconds"], "fit_peak_rss_mb": t["peak_rss_mb"],
            "size": manifest["preprocess"].get("height"), "bytes": sum(f["bytes"] for f in manifest["files"].values())}


def rebuild(args: argparse.Namespace, config: Path, service: TrainerService, scorer: str, step: str) -> dict:
    job = service.request_rebuild(APPLIANCE, CAMERA, who="bench")
    log(f"{scorer} {step}: job {job.id} queued; a worker process runs it")
    result = run_worker(config, service, job.id, config.parent)
    job = result.pop("job")
    row = {"scorer": scorer, "step": step, "job": job.id, "status": job.status, "attempts": job.attempts,
           "job_s": round(job.finished_at - job.started_at, 1), **result, "detail": job.detail}
    if job.model_id:
        row["fit"] = fit_record(service, job.model_id, config.parent)
        dataset = service.catalogue.dataset(job.dataset_id)
        row["dataset"] = {"version": dataset.version, "counts": dataset.counts}
        evaluation = service.catalogue.evaluations(job.model_id)[0]  # the newest: this job's
        m = evaluation.metrics
        row["gate"] = {"passed": evaluation.passed, "candidate": m["candidate"], "running": m["running"],
                       "notes": m["notes"], "reasons": m["reasons"]}
        row["stages_s"] = m["seconds"]
    log(f"  {job.status} in {row['job_s']} s (worker {row['worker_wall_s']} s, peak RSS "
        f"{row['worker_peak_rss_mb']:.0f} MB; stages {row.get('stages_s')}): {job.detail}")
    return row


def bench_scorer(args: argparse.Namespace, scorer: str, now: float) -> list[dict]:
    folder = args.out / scorer
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = {} if args.threads is None else {"threads": args.threads}
    config = folder / "trainer.toml"
    config.write_text(tomli_w.dumps({"storage": {"type": "embedded", "folder": str(folder / "store")},
                                     "work_dir": str(folder / "work"), "rebuild": settings}))
    cfg = load_trainer_config(config)
    storage, queue = open_storage(cfg), open_queue(cfg)
    try:
        service = TrainerService(storage, queue, cfg)
        service.register_appliance(APPLIANCE)
        service.configure_camera(APPLIANCE, CAMERA, backend=scorer)
        late = ingest(service, args.data, now)
        rows = [rebuild(args, config, service, scorer, "first model")]
        if rows[0]["status"] == "succeeded":
            service.report_camera(APPLIANCE, CAMERA, model_id=service.catalogue.job(rows[0]["job"]).model_id)
        for i, (path, iid) in enumerate(late):
            upload(service, path, iid, now - 600 + i, "ok")
        rows.append(rebuild(args, config, service, scorer, f"+{len(late)} OK frames, gate against the first"))
        return rows
    finally:
        queue.close()
        storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec folder (train/good, test/good, test/pitting)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rebuild")
    parser.add_argument("--scorers", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--threads", type=int, default=None, help="fit threads (default: all cores)")
    args = parser.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe()
    print(f"machine: {one_line(machine)}")
    now = time.time()
    rows = [row for scorer in args.scorers for row in bench_scorer(args, scorer, now)]
    print(f"\n{'scorer':<10} {'rebuild':<42} {'status':<10} {'job s':>7} {'worker s':>9} {'peak RSS MB':>12} "
          f"{'fit s':>7} {'train':>6} {'eval good/defect':>17}")
    for r in rows:
        seconds = r.get("fit", {}).get("seconds", {})
        fit_s = seconds.get("features_and_fit", 0) + seconds.get("calibration", 0)
        counts = r.get("dataset", {}).get("counts", {})
        print(f"{r['scorer']:<10} {r['step']:<42} {r['status']:<10} {r['job_s']:>7.1f} {r['worker_wall_s']:>9.1f} "
              f"{r['worker_peak_rss_mb']:>12.0f} {fit_s:>7.1f} {counts.get('train', 0):>6} "
              f"{counts.get('eval_good', 0):>8}/{counts.get('eval_defect', 0):<8}")
        print(f"{'':<10} stages (s): {r.get('stages_s')}")
        print(f"{'':<10} {r['detail']}")
    (args.out / "rebuild.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"\nwritten: {args.out / 'rebuild.json'}")


if __name__ == "__main__":
    main()
