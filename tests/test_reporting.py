"""Result records and their JSON, CSV and terminal forms, parsed back."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from appliance.reporting import (
    CORE_FIELDS,
    error_record,
    format_lines,
    prediction_record,
    summary,
    write_csv,
    write_json,
)
from appliance.types import Decision, Frame, Prediction, Score


def prediction(score, raw=10.0, threshold=0.5, camera="cam-1", seq=1, timings=None):
    frame = Frame(image=np.zeros((4, 4), np.uint8), camera=camera, seq=seq, timestamp=1.0)
    decision = Decision(score=score, threshold=threshold, anomalous=score >= threshold, threshold_source="bundle")
    timings = {"preprocess": 1.23456, "backbone": 20.0, "scorer": 3.005, "total": 24.23956} if timings is None \
        else timings
    return Prediction(frame, Score(raw, np.zeros((1, 1), np.float32)), decision, "padim-1", timings)


@pytest.fixture
def records():
    stream_timings = {"preprocess": 1.0, "backbone_wait": 5.0, "scorer": 2.0, "total": 8.0}
    return [
        prediction_record("in/a.png", prediction(0.8123, raw=15.5), overlay="out/a.png"),
        prediction_record("in/b.png", prediction(0.2, camera="cam-22", seq=2)),
        error_record("in/c.png", "in/c.png: is empty (0 bytes)"),
        prediction_record("in/d.png", prediction(0.5, seq=4, timings=stream_timings)),
    ]


def test_prediction_record_is_flat_and_rounded(records):
    r = records[0]
    assert r == {"path": "in/a.png", "camera": "cam-1", "seq": 1, "model_id": "padim-1", "raw_score": 15.5,
                 "score": 0.8123, "threshold": 0.5, "threshold_source": "bundle", "verdict": "ng",
                 "preprocess_ms": 1.23, "backbone_ms": 20.0, "scorer_ms": 3.0, "total_ms": 24.24,
                 "overlay": "out/a.png"}
    assert records[1]["overlay"] is None and records[1]["verdict"] == "ok"
    assert records[3]["verdict"] == "ng"  # score == threshold is NG
    json.dumps(records, allow_nan=False)


def test_prediction_record_numpy_and_non_finite():
    r = prediction_record("x.png", prediction(np.float32(0.25), raw=np.float64(np.inf)))
    assert r["raw_score"] is None and isinstance(r["score"], float)
    json.dumps(r, allow_nan=False)


def test_error_record():
    assert error_record("x.png", "broken") == {"path": "x.png", "verdict": "error", "error": "broken"}


def test_summary_counts_by_verdict(records):
    assert summary(records) == {"ok": 1, "ng": 2, "error": 1, "total": 4}
    assert summary([]) == {"ok": 0, "ng": 0, "error": 0, "total": 0}


def test_json_round_trip_to_path_and_stream(records, tmp_path):
    path = tmp_path / "results.json"
    write_json(records, path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["results"] == records
    assert doc["summary"] == {"ok": 1, "ng": 2, "error": 1, "total": 4}

    buf = io.StringIO()
    write_json(records, buf)
    assert json.loads(buf.getvalue()) == doc


def test_csv_round_trip(records, tmp_path):
    path = tmp_path / "results.csv"
    write_csv(records, path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    assert header[: len(CORE_FIELDS)] == list(CORE_FIELDS)
    # union of keys, timings in pipeline order
    assert header[len(CORE_FIELDS):] == ["preprocess_ms", "backbone_ms", "backbone_wait_ms", "scorer_ms", "total_ms"]
    assert len(rows) == 4
    assert [r["verdict"] for r in rows] == ["ng", "ok", "error", "ng"]
    assert float(rows[0]["score"]) == 0.8123 and rows[0]["overlay"] == "out/a.png"
    assert rows[1]["overlay"] == "" and rows[1]["backbone_wait_ms"] == ""
    assert rows[2]["score"] == "" and rows[2]["error"] == "in/c.png: is empty (0 bytes)"
    assert rows[3]["backbone_wait_ms"] == "5.0" and rows[3]["backbone_ms"] == ""

    buf = io.StringIO(newline="")
    write_csv(records, buf)
    assert buf.getvalue() == path.read_text(encoding="utf-8")


def test_csv_columns_are_stable_and_extras_sorted():
    a = io.StringIO()
    write_csv([{"path": "p", "zeta": 1, "alpha": 2}], a)
    b = io.StringIO()
    write_csv([{"alpha": 2, "zeta": 1, "path": "p"}], b)
    assert a.getvalue() == b.getvalue()
    assert a.getvalue().splitlines()[0] == ",".join([*CORE_FIELDS, "alpha", "zeta"])


def test_format_lines_aligned(records):
    text = format_lines(records)
    lines = text.split("\n")
    assert len(lines) == 4 and not text.endswith("\n")
    assert lines[0].startswith("NG ") and lines[1].startswith("OK ") and lines[2].startswith("ERROR")
    assert "0.812" in lines[0] and "/ 0.500" in lines[0] and "24.2 ms" in lines[0]
    assert lines[0].endswith("in/a.png -> out/a.png")
    assert lines[2].endswith("  in/c.png: is empty (0 bytes)")  # the path once, though the error names it
    starts = {line.index("in/") for line in lines}
    assert len(starts) == 1  # paths line up
    assert format_lines([]) == ""
    assert format_lines([error_record("x.png", "broken")]).endswith("x.png: broken")


def test_format_lines_shows_a_streamed_frame_s_own_work_not_its_queueing():
    timings = {"preprocess": 1.0, "backbone": 9.0, "backbone_wait": 0.5, "scorer": 2.0, "compute": 12.0,
               "total": 118.0}
    line = format_lines([prediction_record("in/e.png", prediction(0.3, timings=timings))])
    assert "12.0 ms" in line and "118" not in line
