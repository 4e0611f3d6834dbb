"""Result output for the command line: flat records, then JSON, CSV or aligned terminal lines.

A record is a flat dict of JSON-ready values, one per input file, so the same
list can go to a JSON document, a CSV sheet or a terminal. Files that could not
be scored get an ``error`` record instead of disappearing from the output.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from .types import Prediction

#: Columns every CSV starts with, in this order (timings and any other keys follow).
CORE_FIELDS = ("path", "camera", "seq", "verdict", "score", "threshold", "threshold_source", "raw_score",
               "model_id", "overlay", "error")
#: Known stages, in pipeline order; other timing keys follow sorted.
TIMING_ORDER = ("preprocess", "backbone", "backbone_wait", "scorer", "compute", "total")
#: Verdicts always counted in a summary, even at zero (the daemon's words; on screen in capitals).
VERDICTS = ("ok", "ng", "error")


def prediction_record(path: str, prediction: Prediction, *, overlay: str | None = None) -> dict:
    """Flat, JSON-ready record of one prediction.

    Timings become ``<stage>_ms`` keys rounded to 0.01 ms; non-finite numbers become ``None``.

    Args:
        path: the input file as the user named it.
        prediction: the engine's prediction for it.
        overlay: path of the overlay image written for it, if any.

    """
    frame, decision = prediction.frame, prediction.decision
    record = {"path": str(path), "camera": frame.camera, "seq": int(frame.seq), "model_id": prediction.model_id,
              "raw_score": _number(prediction.score.image_score), "score": _number(decision.score),
              "threshold": _number(decision.threshold), "threshold_source": decision.threshold_source,
              "verdict": decision.verdict}
    for stage in _timing_order(prediction.timings_ms):
        ms = _number(prediction.timings_ms[stage])
        record[f"{stage}_ms"] = None if ms is None else round(ms, 2)
    record["overlay"] = None if overlay is None else str(overlay)
    return record


def error_record(path: str, error: str) -> dict:
    """Record of a file that could not be scored (verdict ``error``)."""
    return {"path": str(path), "verdict": "error", "error": str(error)}


def summary(records: Iterable[dict]) -> dict[str, int]:
    """Count records by verdict (``ok``, ``ng`` and ``error`` always present) and in ``total``."""
    counts = Counter(str(r.get("verdict")) for r in records)
    out = {v: counts.pop(v, 0) for v in VERDICTS}
    out |= dict(sorted(counts.items()))
    out["total"] = sum(out.values())
    return out


def write_json(records: Sequence[dict], out: IO[str] | str | os.PathLike[str]) -> None:
    """Write ``{"summary": counts by verdict, "results": records}`` as one JSON document."""
    doc = {"summary": summary(records), "results": list(records)}
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if isinstance(out, str | os.PathLike):
        Path(out).write_text(text, encoding="utf-8")
    else:
        out.write(text)


def csv_fields(records: Iterable[dict]) -> list[str]:
    """CSV columns: ``CORE_FIELDS``, then timings in pipeline order, then any other key sorted."""
    keys = {k for r in records for k in r}
    timings = [f"{s}_ms" for s in _timing_order({k[:-3] for k in keys if k.endswith("_ms")})]
    rest = sorted(keys - set(CORE_FIELDS) - set(timings))
    return [*CORE_FIELDS, *timings, *rest]


def write_csv(records: Sequence[dict], out: IO[str] | str | os.PathLike[str]) -> None:
    """Write records as CSV with a header; missing values are empty cells.

    An open stream should be opened with ``newline=""`` as the ``csv`` module asks.
    """
    fields = csv_fields(records)
    if isinstance(out, str | os.PathLike):
        with Path(out).open("w", encoding="utf-8", newline="") as f:
            _write_csv(records, fields, f)
    else:
        _write_csv(records, fields, out)


def _write_csv(records: Sequence[dict], fields: list[str], out: IO[str]) -> None:
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)


def format_lines(records: Sequence[dict]) -> str:
    """One aligned line per record for a terminal: verdict, score / threshold, time, camera, path.

    Error records show the error after the path. No trailing newline; empty for no records.
    """
    rows = []
    for r in records:
        if r.get("verdict") == "error":
            path, error = str(r.get("path")), str(r.get("error"))
            rows.append(("ERROR", "", "", "", str(r.get("camera") or ""),
                         error if error.startswith(path) else f"{path}: {error}"))  # ImageError names the file
            continue
        total = r.get("compute_ms", r.get("total_ms"))  # the frame's own work, without queueing
        path = str(r.get("path")) + (f" -> {r['overlay']}" if r.get("overlay") else "")
        rows.append((str(r.get("verdict")).upper(), _fixed(r.get("score")), f"/ {_fixed(r.get('threshold'))}",
                     "" if total is None else f"{total:.1f} ms", str(r.get("camera") or ""), path))
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    align = ("<", ">", "<", ">", "<")
    lines = ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row[:5], align, widths, strict=True)) + "  " + row[5]
             for row in rows]
    return "\n".join(lines)


def _fixed(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def _number(value: float) -> float | None:
    """Plain float, or ``None`` where JSON has no number (NaN, infinity)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _timing_order(stages: Iterable[str]) -> list[str]:
    stages = set(stages)
    return [s for s in TIMING_ORDER if s in stages] + sorted(stages - set(TIMING_ORDER))
