"""``appliance audit``: list or export the audit log (inspections, or the daemon's events).

Reads the database read-only, so it can run beside the daemon at any time. A missing or
unreadable database is one line on stderr and exit code 2, as elsewhere in the CLI.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ApplianceError, AuditError
from .audit_db import open_reader
from .audit_query import events as query_events
from .audit_query import flatten, write_csv, write_json
from .audit_query import inspections as query_inspections
from .defaults import DEFAULT_CONFIG
from .records import VERDICTS

FORMATS = ("table", "csv", "json")
_INSPECTION_COLUMNS = ("id", "time", "camera", "seq", "verdict", "score", "threshold", "latency_total_ms", "outputs",
                       "error")
_EVENT_COLUMNS = ("time", "kind", "camera", "detail")
_WIDEST = 60  # table cells are cut here; csv and json carry everything


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _cell(value: Any) -> str:
    text = "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
    return text if len(text) <= _WIDEST else text[: _WIDEST - 3] + "..."


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Rows as a fixed-width text table of ``columns`` (flattened, so ``latency_total_ms`` works)."""
    cells = [[_cell(flatten(row).get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def audit(
    db: Annotated[Path | None, typer.Option("--db", help="audit database file (default: the one --config names)")
                  ] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="daemon config file, to find the database")
                      ] = DEFAULT_CONFIG,
    camera: Annotated[str | None, typer.Option(help="only this camera")] = None,
    since: Annotated[str | None, typer.Option(
        help="from this time on: 2024-05-01, 2024-05-01T08:00 (local), ...Z (UTC), or an age: 90m, 2h, 1d, 1w")] = None,
    until: Annotated[str | None, typer.Option(help="before this time (a date includes that whole day)")] = None,
    verdict: Annotated[str | None, typer.Option(help="only ok, ng or error")] = None,
    events: Annotated[bool, typer.Option("--events", help="list the daemon's events instead of inspections")] = False,
    kind: Annotated[str | None, typer.Option(help="with --events: only this kind (start, reload, ...)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to this file, not stdout")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="only the N most recent rows")] = None,
) -> None:
    """List or export inspections (with what each output did) or the daemon's events."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if verdict is not None and verdict not in VERDICTS:
        raise typer.BadParameter(f"--verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if events and verdict is not None:
        raise typer.BadParameter("--verdict filters inspections; it does not apply to --events")
    if kind is not None and not events:
        raise typer.BadParameter("--kind filters events; add --events")
    if db is None:
        from .config import load_config  # the config module pulls in every plug-in: only when needed

        try:
            cfg = load_config(config)
        except ApplianceError as exc:
            _fail(f"{exc}; or pass --db PATH")
        db = cfg.audit.resolve_path(cfg.paths.state)
    try:
        conn = open_reader(db)
    except AuditError as exc:
        _fail(str(exc))
    try:
        # the N most recent, still printed oldest first
        order = "desc" if limit is not None else "asc"
        if events:
            rows = query_events(conn, kind=kind, camera=camera, since=since, until=until, limit=limit, order=order)
        else:
            rows = query_inspections(conn, camera=camera, since=since, until=until, verdict=verdict, limit=limit,
                                     order=order)
    except ValueError as exc:  # a time argument that cannot be read
        raise typer.BadParameter(str(exc)) from None
    except sqlite3.Error as exc:
        _fail(f"cannot read the audit database {db}: {exc}")
    finally:
        conn.close()
    if limit is not None:
        rows.reverse()
    _emit(rows, _EVENT_COLUMNS if events else _INSPECTION_COLUMNS, fmt, output)
    if output is not None:
        typer.echo(f"wrote {len(rows)} {'events' if events else 'inspections'} to {output}", err=True)
    elif fmt == "table" and not rows:
        typer.echo(f"no {'events' if events else 'inspections'} match", err=True)


def _emit(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, output: Path | None) -> None:
    if fmt == "table":
        text = format_table(rows, columns) if rows else ""
    else:
        buffer = io.StringIO()
        (write_csv if fmt == "csv" else write_json)(rows, buffer)
        text = buffer.getvalue()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {output}: {exc}")
