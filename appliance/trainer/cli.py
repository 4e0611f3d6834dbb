"""``appliance trainer ...``: run the trainer (serve, worker) and administer it from the machine it runs on.

The admin commands open the configured storage themselves (whoever can read trainer.toml is an
admin), so they work while the server is down; from elsewhere use the admin API with a token.
Nothing here imports the trainer's extra (fastapi, sqlalchemy...) until a command runs, so the
appliance's own install keeps its ``appliance`` command whole. Exit codes: 0 done, 1 refused or
failed (a job not awaiting approval, storage unreachable), 2 a bad config or arguments.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import ApplianceError, ConfigError

if TYPE_CHECKING:
    from .config import TrainerConfig
    from .queue import JobQueue
    from .service import TrainerService

DEFAULT_CONFIG = Path("/etc/anomaly-appliance/trainer.toml")
#: How long a stop waits for running jobs and the scheduler (the unit's TimeoutStopSec is longer).
STOP_S = 60.0

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="trainer config file")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
LogOption = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")]

trainer_app = typer.Typer(no_args_is_help=True, help="The central trainer: API, page, rebuild jobs, appliances.")
config_app = typer.Typer(no_args_is_help=True, help="Check the trainer's config or print a commented example.")
trainer_app.add_typer(config_app, name="config")
log = logging.getLogger("appliance.trainer")


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _setup_logging(level: str) -> None:
    from ..daemon.supervisor import setup_logging

    setup_logging(level.upper())
    for chatty in ("alembic", "huey.consumer"):  # a line per migration plugin, the consumer's banner
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))


#: What the trainer extra brings (module names); an appliance's own install has none of them.
_EXTRA = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "huey", "croniter")


def _load(path: Path) -> TrainerConfig:
    import importlib.util

    from .config import load_trainer_config

    missing = [name for name in _EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        _fail(f"the trainer is an extra of the package and this install lacks it ({', '.join(missing)} missing): "
              "pip install 'anomaly-appliance[trainer]' on the trainer's machine (the appliance's .deb does not "
              "carry it)", 2)

    try:
        return load_trainer_config(path)
    except ConfigError as exc:
        _fail(str(exc), 2)
    raise AssertionError  # pragma: no cover - _fail raised


@contextmanager
def _service(cfg: TrainerConfig, *, lazy_queue: bool = True) -> Iterator[TrainerService]:
    """The configured storage and queue behind a service, closed after; refusals exit 1, config errors 2.

    The admin commands get the queue opened on first use (most never enqueue); serve and worker at once.
    """
    storage = queue = None
    try:
        from .queues import open_queue
        from .service import TrainerService
        from .storage import open_storage

        storage = open_storage(cfg)
        queue = _lazy_queue(lambda: open_queue(cfg)) if lazy_queue else open_queue(cfg)
        yield TrainerService(storage, queue, cfg)
    except typer.Exit:
        raise
    except ConfigError as exc:
        _fail(str(exc), 2)
    except ApplianceError as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # the storage's or the queue's own errors (a database down): one line, not a trace
        log.debug("failed", exc_info=True)
        _fail(f"{type(exc).__name__}: {exc}", 1)
    finally:
        if queue is not None:
            queue.close()
        if storage is not None:
            storage.close()


def _lazy_queue(open_queue: Callable[[], JobQueue]) -> JobQueue:
    """The job queue, opened on first use: most admin commands never enqueue anything."""
    from .queue import JobQueue

    class LazyQueue(JobQueue):
        def __init__(self) -> None:
            self.queue: JobQueue | None = None

        def _open(self) -> JobQueue:
            if self.queue is None:
                self.queue = open_queue()
            return self.queue

        def enqueue(self, job_id: int, delay_s: float = 0.0) -> None:
            self._open().enqueue(job_id, delay_s)

        def work(self, handler: Callable[[int], None], stop: threading.Event, concurrency: int = 1) -> None:
            self._open().work(handler, stop, concurrency)

        def close(self) -> None:
            if self.queue is not None:
                self.queue.close()

    return LazyQueue()


def _print(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def _when(at: float | None) -> str:
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M") if at else "-"


# ---------------------------------------------------------------------- running
def _job_handler(cfg: TrainerConfig, storage: Any, queue: JobQueue) -> Callable[[int], None]:
    """The rebuild handler the queue calls with a job id (``rebuild.handler`` over its context)."""
    from . import rebuild

    return rebuild.handler(rebuild.RebuildContext(storage=storage, config=cfg, queue=queue))


def _start_workers(cfg: TrainerConfig, storage: Any, queue: JobQueue, count: int,
                   stop: threading.Event) -> threading.Thread | None:
    if count < 1:
        return None
    handler = _job_handler(cfg, storage, queue)
    thread = threading.Thread(target=queue.work, args=(handler, stop, count), name="job-workers", daemon=True)
    thread.start()
    log.info("%d in-process job worker(s)", count)
    return thread


def _scheduler(service: TrainerService, every_s: float, stop: threading.Event) -> None:
    """Tick the cron schedules every ``every_s`` until ``stop``; a failing tick is logged, the next one tried."""
    while True:
        try:
            for job in service.tick():
                log.info("scheduled rebuild: job %d for %s/%s", job.id, job.appliance_id, job.camera_id)
        except Exception:  # storage down for a moment: the next tick catches up on the same due time
            log.exception("scheduler tick failed")
        if stop.wait(every_s):
            return


@trainer_app.command()
def serve(config: ConfigOption = DEFAULT_CONFIG,
          workers: Annotated[int | None, typer.Option(min=0, help="in-process job worker threads (default: 1 with "
                                                                  "the embedded storage, 0 with the fleet's)")] = None,
          log_level: LogOption = "INFO") -> None:
    """Serve the API and the page on the config's host and port, tick schedules, run jobs in-process."""
    import uvicorn

    from ..daemon.supervisor import notify
    from .api import create_app
    from .config import EmbeddedStorageConfig

    _setup_logging(log_level)
    cfg = _load(config)
    if workers is None:
        workers = 1 if isinstance(cfg.storage, EmbeddedStorageConfig) else 0
    stop = threading.Event()
    threads: list[threading.Thread] = []
    with _service(cfg, lazy_queue=False) as service:
        try:
            app = create_app(service)
            service.recover_jobs()
            pool = _start_workers(cfg, service.storage, service.queue, workers, stop)
            threads += [pool] if pool is not None else []
            ticker = threading.Thread(target=_scheduler, args=(service, cfg.jobs.scheduler_s, stop),
                                      name="scheduler", daemon=True)
            ticker.start()
            threads.append(ticker)
            # log_config=None: uvicorn's records go through the handlers set up above (journald under systemd).
            server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None,
                                                   log_level=log_level.lower(), access_log=False,
                                                   server_header=False, proxy_headers=False))
            threading.Thread(target=_ready, args=(server, notify, stop), name="ready", daemon=True).start()
            log.info("trainer on http://%s:%d (storage: %s)", cfg.host, cfg.port, service.storage.description)
            # uvicorn takes SIGTERM and SIGINT while it serves, then hands them on to the handlers it found:
            # these, so the stop goes on below (jobs end, the queue closes) instead of killing the process.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            server.run()  # until SIGTERM or SIGINT
            if not server.started:
                _fail(f"could not listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine?)", 1)
        finally:
            notify("STOPPING=1")
            stop.set()  # running jobs end, waiting ones stay queued for the next start or another worker
            for thread in threads:
                thread.join(timeout=STOP_S)


def _ready(server: Any, notify: Callable[..., bool], stop: threading.Event) -> None:
    while not server.started and not stop.wait(0.1):
        pass
    if server.started:
        notify("READY=1", "STATUS=serving")


@trainer_app.command()
def worker(config: ConfigOption = DEFAULT_CONFIG,
           concurrency: Annotated[int, typer.Option(min=1, help="jobs run at once")] = 1,
           log_level: LogOption = "INFO") -> None:
    """Run rebuild jobs (on any machine that reaches the storage) until SIGTERM or SIGINT."""
    from ..daemon.supervisor import notify

    _setup_logging(log_level)
    cfg = _load(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with _service(cfg, lazy_queue=False) as service:
        handler = _job_handler(cfg, service.storage, service.queue)
        service.recover_jobs()
        notify("READY=1", f"STATUS=working, {concurrency} at once")
        log.info("job worker: %d at once (storage: %s)", concurrency, service.storage.description)
        try:
            service.queue.work(handler, stop, concurrency)
        finally:
            notify("STOPPING=1")


# ---------------------------------------------------------------------- administering
@trainer_app.command("add-appliance")
def add_appliance(appliance_id: Annotated[str, typer.Argument(metavar="ID", help="the appliance's id")],
                  name: Annotated[str, typer.Option(help="a name for people")] = "",
                  config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Register an appliance and print its token (once: only its hash is kept)."""
    with _service(_load(config)) as service:
        appliance, token = service.register_appliance(appliance_id, name)
    typer.echo(token)
    typer.echo(f"registered {appliance.id}: put the token above in the appliance's token_file "
               f"([[outputs]] type = \"trainer\"); it is not shown again", err=True)


@trainer_app.command("rotate-token")
def rotate_token(appliance_id: Annotated[str, typer.Argument(metavar="ID", help="the appliance's id")],
                 config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Print a new token for an appliance; the old one stops working at once."""
    with _service(_load(config)) as service:
        _, token = service.rotate_token(appliance_id)
    typer.echo(token)
    typer.echo(f"{appliance_id}: the old token no longer works; replace the appliance's token_file", err=True)


@trainer_app.command()
def jobs(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False,
         status: Annotated[list[str] | None, typer.Option(help="only jobs in this status (repeatable)")] = None,
         limit: Annotated[int, typer.Option(min=1, help="newest jobs shown")] = 50) -> None:
    """List rebuild jobs, newest first."""
    with _service(_load(config)) as service:
        found = service.jobs(status=status or None, limit=limit)
    lines = [f"{j.id:>6}  {j.status:<17} {j.reason:<8} {j.appliance_id}/{j.camera_id}  {_when(j.created_at)}"
             + (f"  {j.detail}" if j.detail else "") for j in found]
    _print([j.model_dump() for j in found], as_json, "\n".join(lines) or "no jobs")


@trainer_app.command()
def approve(job_id: Annotated[int, typer.Argument(metavar="JOB_ID")],
            who: Annotated[str, typer.Option(help="recorded as the approver")] = "cli",
            config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Approve a rebuild that awaits approval: it is queued for the workers."""
    with _service(_load(config)) as service:
        job = service.approve(job_id, who)
    typer.echo(f"job {job.id} ({job.appliance_id}/{job.camera_id}) queued")


@trainer_app.command()
def cancel(job_id: Annotated[int, typer.Argument(metavar="JOB_ID")],
           who: Annotated[str, typer.Option(help="recorded in the job")] = "cli",
           config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Cancel a job that awaits approval or is queued."""
    with _service(_load(config)) as service:
        job = service.cancel(job_id, who)
    typer.echo(f"job {job.id} cancelled")


@trainer_app.command()
def camera(appliance_id: Annotated[str, typer.Argument(metavar="APPLIANCE")],
           camera_id: Annotated[str, typer.Argument(metavar="CAMERA")],
           policy: Annotated[str | None, typer.Option(help="approve or auto")] = None,
           backend: Annotated[str | None, typer.Option(help="scorer of rebuilds")] = None,
           schedule: Annotated[str | None, typer.Option(help="cron expression of scheduled rebuilds; '' clears it")]
           = None,
           config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Show a camera, or set its rebuild policy, backend or schedule."""
    fields: dict[str, Any] = {k: v for k, v in (("policy", policy), ("backend", backend)) if v is not None}
    if schedule is not None:
        fields["schedule"] = schedule or None
    with _service(_load(config)) as service:
        cam = (service.configure_camera(appliance_id, camera_id, **fields) if fields else
               next((c for c in service.cameras(appliance_id) if c.camera_id == camera_id), None))
    if cam is None:
        _fail(f"no camera {camera_id!r} on appliance {appliance_id!r}", 1)
    _print(cam.model_dump(), as_json, f"{cam.appliance_id}/{cam.camera_id}: policy {cam.policy}, backend "
                                      f"{cam.backend}, schedule {cam.schedule or 'none'}, model {cam.model_id}")


@trainer_app.command()
def datasets(appliance_id: Annotated[str | None, typer.Option("--appliance", help="only this appliance's")] = None,
             camera_id: Annotated[str | None, typer.Option("--camera", help="only this camera's")] = None,
             config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """List dataset versions (the rule each was drawn by, counts per split), newest first."""
    with _service(_load(config)) as service:
        found = service.datasets(appliance_id, camera_id)
    lines = [f"{d.id:>6}  {d.appliance_id}/{d.camera_id} v{d.version}  {_when(d.created_at)}  "
             + " ".join(f"{k} {v}" for k, v in d.counts.items()) + f"  {d.digest[:12]}" for d in found]
    _print([d.model_dump() for d in found], as_json, "\n".join(lines) or "no dataset versions")


@trainer_app.command()
def export(dataset_id: Annotated[int, typer.Argument(metavar="DATASET_ID")],
           out: Annotated[Path, typer.Argument(help="a new (or empty) folder")],
           config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Write a dataset version as an MVTec folder (train/good, test/good, test/defect, dataset.json) for fit."""
    from .datasets import export as export_dataset

    with _service(_load(config)) as service:
        folder = export_dataset(service.storage, dataset_id, out)
    typer.echo(f"dataset {dataset_id} written to {folder}: appliance fit {folder} --out BUNDLE")


@config_app.command("example")
def config_example() -> None:
    """Print a commented example trainer.toml (it passes `appliance trainer config check`)."""
    typer.echo(resources.files("appliance.trainer").joinpath("data/trainer.example.toml").read_text(), nl=False)


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="trainer config file")] = DEFAULT_CONFIG) -> None:
    """Validate a trainer.toml; exit 2 with every problem if it is not valid."""
    cfg = _load(path)
    s3 = getattr(cfg.storage, "s3", None)
    if s3 is not None:
        try:
            s3.secret()
        except ConfigError as exc:
            _fail(str(exc), 2)
    admins = ", ".join(cfg.admin_tokens) or "none (the page is read-only, the admin API refuses everyone)"
    typer.echo(f"ok  {path}: {cfg.storage.type} storage, http://{cfg.host}:{cfg.port}, admins: {admins}")


def register(app: typer.Typer) -> None:
    """Add ``appliance trainer ...`` to the ``appliance`` command line."""
    app.add_typer(trainer_app, name="trainer")

