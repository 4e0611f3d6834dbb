"""The daemon's commands: run, config, status, reload, threshold, trigger, label, drift, dataset, doctor, audit.

``run`` is the service itself (systemd starts it); the others talk to it over the control
socket, or read its config and audit log. Every one has ``--json`` where it prints data, and
exits 0 on success, 1 when a check or a request failed, 2 on a bad config or arguments.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import __version__
from ..errors import ApplianceError
from .audit_cli import audit
from .defaults import DEFAULT_CONFIG, DEFAULT_SOCKET

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="config file")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
SocketOption = Annotated[Path | None, typer.Option(help="control socket (default: the config's [control].socket)")]

config_app = typer.Typer(no_args_is_help=True, help="Check the daemon's config file or print a commented example.")
dataset_app = typer.Typer(no_args_is_help=True, help="Datasets from the frames the appliance kept on the line.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(path: Path):  # noqa: ANN202 - DaemonConfig; imported lazily
    from .config import load_config

    try:
        return load_config(path)
    except ApplianceError as exc:
        _fail(str(exc))


def run(config: ConfigOption = DEFAULT_CONFIG,
        log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO") -> None:
    """Run the appliance: inspect every camera and report every result (systemd starts this)."""
    import logging
    import time

    from .supervisor import setup_logging

    started = time.monotonic()
    setup_logging(log_level.upper())
    log = logging.getLogger("appliance.daemon")
    log.info("appliance %s starting (pid %d), config %s", __version__, os.getpid(), config)
    cfg = _load(config)
    numba_cache = cfg.paths.cache / "numba"
    os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache))  # before numba is imported (it reads it once)
    import asyncio

    from .service import Daemon

    log.info("runtime libraries imported in %.1f s", time.monotonic() - started)

    daemon = Daemon(cfg, config.resolve())
    try:
        asyncio.run(daemon.run())
    except ApplianceError as exc:
        _fail(str(exc))
    if daemon.abandoned:
        # A thread still inside native code (a hung camera driver, an output stuck in a call) must not meet
        # the interpreter's teardown: that ends in "terminate called without an active exception" (SIGABRT).
        # Everything is recorded and closed by now, so leave at once.
        log.error("exiting with threads abandoned at the stop: %s",
                                          ", ".join(daemon.abandoned))
        logging.shutdown()
        os._exit(0)


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="config file")] = DEFAULT_CONFIG) -> None:
    """Validate a config file: every problem with its key and reason; exit 2 if there is one."""
    from .config import check_files

    cfg = _load(path)
    problems = check_files(cfg, str(path))
    if problems:
        _fail("invalid configuration:\n  " + "\n  ".join(problems))
    names = ", ".join(f"{c.id} ({c.source.type}, {c.trigger.mode})" for c in cfg.cameras)
    typer.echo(f"ok  {path}: {len(cfg.cameras)} camera(s): {names}; outputs: "
               f"{', '.join(o.type for o in cfg.outputs) or 'none'}")


@config_app.command("example")
def config_example() -> None:
    """Print a commented example config (it passes `appliance config check`)."""
    typer.echo(resources.files("appliance.daemon").joinpath("data/example.toml").read_text(), nl=False)


def _socket(config: Path, socket: Path | None) -> Path:
    if socket is not None:
        return socket
    if config.exists():
        return _load(config).control.socket
    return DEFAULT_SOCKET


def _request(config: Path, socket: Path | None, payload: dict[str, Any]) -> Any:
    from .control import request

    try:
        return request(_socket(config, socket), payload)
    except ApplianceError as exc:
        _fail(str(exc), 1)


def _print(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def status(config: ConfigOption = DEFAULT_CONFIG, socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Per camera: state, readiness, fps, latency, queue, drops, counts, last verdict, threshold, model; outputs."""
    from .status_text import render

    s = _request(config, socket, {"cmd": "status"})
    _print(s, as_json, render(s))


def reload(config: ConfigOption = DEFAULT_CONFIG, socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Re-read the config file; a bad one is refused (exit 1) and the running one stays."""
    result = _request(config, socket, {"cmd": "reload"})
    text = "\n".join(result["changes"]) or "no changes"
    if result["restart_needed"]:
        text += f"\nneeds a restart to apply: {', '.join(result['restart_needed'])}"
    _print(result, as_json, text)


def threshold(camera: Annotated[str, typer.Argument(help="camera id")],
              value: Annotated[str, typer.Argument(help="threshold in [0, 1] on the normalised scale, or 'clear'")],
              shift: Annotated[str | None, typer.Option(help="only for this shift")] = None,
              who: Annotated[str, typer.Option(help="recorded in the audit log")] = os.environ.get("USER", "operator"),
              config: ConfigOption = DEFAULT_CONFIG, socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Set (or clear) an operator threshold for a camera or one of its shifts, at once and audited."""
    number: float | None = None
    if value != "clear":
        try:
            number = float(value)
        except ValueError:
            raise typer.BadParameter(f"VALUE must be a number in [0, 1] or 'clear', got {value!r}") from None
        if not 0.0 <= number <= 1.0:
            raise typer.BadParameter(f"VALUE must be a number in [0, 1] or 'clear', got {value}")
    result = _request(config, socket, {"cmd": "threshold", "camera": camera, "value": number, "shift": shift,
                                       "who": who})
    f = result["in_force"]
    _print(result, as_json, f"{camera}: threshold now {f['value']} ({f['source']})")


def trigger(camera: Annotated[str, typer.Argument(help="camera id (trigger mode external)")],
            trigger_id: Annotated[str | None, typer.Option("--id", help="carried into the result")] = None,
            config: ConfigOption = DEFAULT_CONFIG, socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Take one frame on an externally triggered camera."""
    result = _request(config, socket, {"cmd": "trigger", "camera": camera, "id": trigger_id})
    if not result["accepted"]:
        _print(result, as_json, f"{camera}: trigger refused (too many waiting)")
        raise typer.Exit(1)
    _print(result, as_json, f"{camera}: triggered{f' ({trigger_id})' if trigger_id else ''}")


def label(inspection: Annotated[str, typer.Argument(help="inspection id (or, with --undo, a label id)")],
          verdict: Annotated[str | None, typer.Argument(metavar="good|defect",
                                                        help="good: the part was fine (a false reject when it was NG); "
                                                             "defect: a confirmed defect")] = None,
          note: Annotated[str | None, typer.Option(help="why, for the audit log")] = None,
          who: Annotated[str, typer.Option(help="recorded in the audit log")] = os.environ.get("USER", "operator"),
          undo: Annotated[bool, typer.Option("--undo", help="undo the label (of this inspection, or this label id)")]
          = False,
          config: ConfigOption = DEFAULT_CONFIG, socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Label an inspection good or defect: a PatchCore false reject is learned at once; audited, undoable."""
    if undo:
        key = "label_id" if inspection.startswith("L") else "inspection"
        result = _request(config, socket, {"cmd": "unlabel", key: inspection, "who": who})
        _print(result, as_json, f"label {result['label_id']} of inspection {result['inspection']} undone"
               + (f"; {result['removed_rows']} learned rows removed from the bank" if result["removed_rows"] else ""))
        return
    if verdict not in ("good", "defect"):
        raise typer.BadParameter(f"the label is 'good' or 'defect', got {verdict!r}")
    result = _request(config, socket, {"cmd": "label", "inspection": inspection, "label": verdict, "note": note,
                                       "who": who})
    lines = [f"inspection {result['inspection']} labelled {result['label']} "
             f"({result.get('kind', '').replace('_', ' ')}) as {result['label_id']}"]
    learned = result.get("learned")
    if learned:
        lines.append(f"the memory bank learned {learned['rows']} patches: this frame scores "
                     f"{learned['score_before']:.3f} -> {learned['score_after']:.3f} (in {learned['ms']:.0f} ms)")
    if result.get("note"):
        lines.append(result["note"])
    if result.get("threshold"):
        t = result["threshold"]
        lines.append(f"threshold recalibrated from the labels: {t['previous']} -> {t['threshold']}")
    _print(result, as_json, "\n".join(lines))


def drift(camera: Annotated[str | None, typer.Option(help="only this camera")] = None,
          config: ConfigOption = DEFAULT_CONFIG, socket: SocketOption = None, as_json: JsonOption = False) -> None:
    """Each camera's drift watch: state, the last window's p-values, and the recent windows."""
    import time

    result = _request(config, socket, {"cmd": "drift", "camera": camera})
    lines = []
    for cam, d in result.items():
        head = f"camera {cam}: {d['state'].upper() if d['state'] == 'drift' else d['state']}"
        if d.get("detail"):
            head += f" ({d['detail']})"
        if d["state"] not in ("off", "no_baseline"):
            head += (f", {d['windows']} windows tested, {d['frames_in_window']} frames in this one, next test in "
                     f"{d['next_test_in_s']:.0f} s")
        lines.append(head)
        last = d.get("last")
        if last:
            lines.append(f"  last window: {last['size']} frames, p {last['p_value']:.3g} (scores "
                         f"{last['score_p']:.3g}, embedding {last['embedding_p']:.3g}), score shift "
                         f"{last['score_shift']:+.3g}, component {last['component']} shift "
                         f"{last['component_shift']:+.2f} sd")
        for h in d.get("history", [])[-10:]:
            lines.append(f"  {time.strftime('%Y-%m-%d %H:%M', time.localtime(h['at']))}  {h['kind']:<13} {h['detail']}")
    _print(result, as_json, "\n".join(lines) or "no cameras")


def doctor(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False,
           golden: Annotated[bool, typer.Option(help="also score each bundle's golden images")] = True) -> None:
    """Check sources, bundles, output endpoints, disk space and folders; exit 1 if anything fails."""
    import shutil

    from .doctor import private_cache, run_checks

    cfg = _load(config)
    cache = private_cache(cfg)  # root beside a service user: keep root-owned files out of the service's cache
    os.environ.setdefault("NUMBA_CACHE_DIR", str((cache or cfg.paths.cache) / "numba"))  # as `run`: not beside the code
    try:
        checks = run_checks(cfg, golden=golden, cache=cache)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    failed = [c for c in checks if c["status"] == "fail"]
    text = "\n".join(f"{c['status'].upper():<4}  {c['check']}: {c['detail']}" for c in checks)
    _print({"ok": not failed, "checks": checks}, as_json, text)
    if failed:
        raise typer.Exit(1)


@dataset_app.command("export")
def dataset_export(
    out: Annotated[Path, typer.Option("--out", "-o", help="a new folder for the dataset (MVTec layout)")],
    config: ConfigOption = DEFAULT_CONFIG,
    camera: Annotated[str | None, typer.Option(help="only this camera")] = None,
    since: Annotated[str | None, typer.Option(help="from this time on: 2024-05-01, ...T08:00, or an age: 2h, 7d")]
    = None,
    until: Annotated[str | None, typer.Option(help="before this time")] = None,
    label: Annotated[str | None, typer.Option(help="only frames labelled good or defect, or none (unlabelled)")]
    = None,
    verdict: Annotated[str | None, typer.Option(help="only ok, ng or error")] = None,
    holdout: Annotated[int, typer.Option(help="every N-th good frame goes to test/good (0: none)", min=0)] = 5,
) -> None:
    """Write stored frames as an MVTec folder (train/good, test/good, test/defect) that `appliance fit` takes."""
    from .audit_query import parse_time
    from .config import load_config
    from .dataset_export import export
    from .publishers.frames import FramesConfig

    if label not in (None, "good", "defect", "none"):
        raise typer.BadParameter(f"--label must be good, defect or none, got {label!r}")
    if verdict not in (None, "ok", "ng", "error"):
        raise typer.BadParameter(f"--verdict must be ok, ng or error, got {verdict!r}")
    try:
        cfg = load_config(config)
        frames = next((o for o in cfg.outputs if isinstance(o, FramesConfig)), None)
        store = frames.dir if frames is not None and frames.dir is not None else cfg.paths.state / "frames"
        counts = export(cfg.audit.resolve_path(cfg.paths.state), store, out, camera=camera,
                        since=parse_time(since), until=parse_time(until, end=True), label=label, verdict=verdict,
                        holdout=holdout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except ApplianceError as exc:
        _fail(str(exc), 1)
    typer.echo(f"wrote {sum(counts.values())} frames to {out}: "
               + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def register(app: typer.Typer) -> None:
    """Add the daemon's commands to the ``appliance`` command line."""
    app.command()(run)
    app.add_typer(config_app, name="config")
    app.add_typer(dataset_app, name="dataset")
    for command in (status, reload, trigger, label, drift, doctor, audit):
        app.command()(command)
    # A negative VALUE ("-0.1") must reach the range check, not be taken for an option.
    app.command(context_settings={"ignore_unknown_options": True})(threshold)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the 'appliance' command")
