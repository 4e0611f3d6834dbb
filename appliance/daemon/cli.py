"""The daemon's commands: run, config, status, reload, threshold, trigger, doctor and audit.

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

from ..errors import ApplianceError
from .audit_cli import audit
from .defaults import DEFAULT_CONFIG, DEFAULT_SOCKET

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="config file")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
SocketOption = Annotated[Path | None, typer.Option(help="control socket (default: the config's [control].socket)")]

config_app = typer.Typer(no_args_is_help=True, help="Check the daemon's config file or print a commented example.")


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
    from .supervisor import setup_logging

    setup_logging(log_level.upper())
    cfg = _load(config)
    numba_cache = cfg.paths.cache / "numba"
    os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache))  # before numba is imported (it reads it once)
    import asyncio

    from .service import Daemon

    daemon = Daemon(cfg, config.resolve())
    try:
        asyncio.run(daemon.run())
    except ApplianceError as exc:
        _fail(str(exc))


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="config file")] = DEFAULT_CONFIG) -> None:
    """Validate a config file: every problem with its key and reason; exit 2 if there is one."""
    cfg = _load(path)
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
    """Per camera: state, fps, latency, queue, drops, last verdict, bundle, threshold; each output's state."""
    s = _request(config, socket, {"cmd": "status"})
    d = s["daemon"]
    lines = [f"appliance {d['version']}  pid {d['pid']}  up {d['uptime_s']:.0f} s  "
             f"{'healthy' if d['healthy'] else 'UNHEALTHY: ' + '; '.join(d['unhealthy'])}"]
    for cam, c in s["cameras"].items():
        last = c.get("last") or {}
        lat = c.get("latency_ms") or {}
        lines.append(f"camera {cam}: {c['state']} ({c.get('state_detail', '')}), {c['fps']:.1f} fps, latency p50 "
                     f"{lat.get('p50')} / p99 {lat.get('p99')} ms, queue {c['queue_depth']}, drops {c['drops']}, "
                     f"counts {c['counts']}, last {last.get('verdict', '-')} {last.get('score', '')}, "
                     f"threshold {c['threshold']['value']} ({c['threshold']['source']}), "
                     f"model {c['bundle']['model_id']}")
    for name, o in s["outputs"].items():
        backlog = o.get("backlog", o.get("queued", 0))
        err = f", last error: {o['last_error']}" if o.get("last_error") else ""
        lines.append(f"output {name}: {o['state']}, backlog {backlog}{err}")
    _print(s, as_json, "\n".join(lines))


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


def doctor(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False,
           golden: Annotated[bool, typer.Option(help="also score each bundle's golden images")] = True) -> None:
    """Check sources, bundles, output endpoints, disk space and folders; exit 1 if anything fails."""
    from .doctor import run_checks

    cfg = _load(config)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cfg.paths.cache / "numba"))  # as `run` does: never beside the code
    checks = run_checks(cfg, golden=golden)
    failed = [c for c in checks if c["status"] == "fail"]
    text = "\n".join(f"{c['status'].upper():<4}  {c['check']}: {c['detail']}" for c in checks)
    _print({"ok": not failed, "checks": checks}, as_json, text)
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the daemon's commands to the ``appliance`` command line."""
    app.command()(run)
    app.add_typer(config_app, name="config")
    for command in (status, reload, threshold, trigger, doctor, audit):
        app.command()(command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the 'appliance' command")
