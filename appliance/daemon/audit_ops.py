"""What the audit log's writer queues, and where it keeps what it could not write before closing.

The operations (a record with its deliveries, a delivery report, an event) are plain data, so the
writer can keep them in a backlog while the disk refuses writes, and ``spill`` / ``read_spills``
can put them in a JSON-lines file at the close and read them back at the next start. A spill file
is written to a temporary name, fsynced and renamed: it is whole or absent, never half.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

log = logging.getLogger(__name__)

#: Called once per record after its transaction: ``True`` committed, ``False`` kept in the backlog.
Then = Callable[[bool], None]
#: Spill files of records the log could not write before it closed: ``audit-spill-<run id>.jsonl``.
SPILL_GLOB = "audit-spill-*.jsonl"


@dataclass(slots=True)
class Record:
    """An inspection row, its ``pending`` deliveries, and what to call once it is committed (or kept)."""

    row: dict[str, Any]
    deliveries: list[dict[str, Any]]
    then: Then | None


@dataclass(slots=True)
class Delivered:
    """What an output did with an inspection."""

    inspection_id: str
    output: str
    status: str
    detail: str | None
    at: float


@dataclass(slots=True)
class Event:
    """An ``events`` row."""

    row: dict[str, Any]


@dataclass(slots=True)
class Call:
    """Run ``fn(db)`` on the writer thread after everything queued before it."""

    fn: Callable[[Database], Any]
    future: Future


Op = Record | Delivered | Event


def spill(ops: Sequence[Op], folders: Iterable[Path], run_id: str) -> Path | None:
    """Write ``ops`` as JSON lines into the first folder that takes them; the file, or ``None`` if none did."""
    lines = []
    for op in ops:
        if isinstance(op, Record):
            lines.append({"record": op.row, "deliveries": op.deliveries})
        elif isinstance(op, Delivered):
            lines.append({"delivered": [op.inspection_id, op.output, op.status, op.detail, op.at]})
        else:
            lines.append({"event": op.row})
    text = "".join(json.dumps(line, default=str) + "\n" for line in lines)
    name = f"audit-spill-{run_id}.jsonl"
    for folder in folders:
        tmp = folder / f".{name}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tmp.open("w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("audit: cannot spill to %s: %s", folder, exc)
            continue
        return folder / name
    return None


def read_spills(folders: Iterable[Path]) -> list[tuple[Path, list[Op], int]]:
    """Every spill file in ``folders`` (each once) with its operations and how many lines were unreadable."""
    found, seen = [], set()
    for folder in folders:
        for path in sorted(folder.glob(SPILL_GLOB)) if folder.is_dir() else []:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            ops: list[Op] = []
            bad = 0
            for line in path.read_text(errors="replace").splitlines():
                try:
                    item = json.loads(line)
                    if "record" in item:
                        ops.append(Record(item["record"], item["deliveries"], None))
                    elif "delivered" in item:
                        ops.append(Delivered(*item["delivered"]))
                    else:
                        ops.append(Event(item["event"]))
                except (ValueError, KeyError, TypeError):
                    bad += 1  # a line cut short when the spill itself was interrupted
            found.append((path, ops, bad))
    return found
