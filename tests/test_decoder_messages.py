"""Native decoder output caught per decode: attributed to the right file across threads, other output passed on."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from appliance.decoder_messages import RateLimitedLog, captured


def test_decoder_lines_are_caught_and_other_output_is_passed_on(capfd: pytest.CaptureFixture[str]) -> None:
    with captured() as lines:
        os.write(2, b"Corrupt JPEG data: 3 extraneous bytes before marker 0xda\n")
        os.write(2, b"another thread's log line\n")
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\n")
    assert lines == ["Corrupt JPEG data: 3 extraneous bytes before marker 0xda",
                     "libpng warning: iCCP: known incorrect sRGB profile"]
    assert capfd.readouterr().err == "another thread's log line\n"
    with captured() as lines:  # the sink starts empty again
        pass
    assert lines == []


def test_rate_limit_holds_back_then_reports_the_count(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("appliance.imaging"), burst=2, window_s=0.2)
    with caplog.at_level(logging.WARNING, "appliance.imaging"):
        sent = [limited.log(logging.WARNING, "%s: decoded with warnings", f"f{i}.jpg") for i in range(5)]
        time.sleep(0.25)
        assert limited.log(logging.WARNING, "%s: decoded with warnings", "f5.jpg")
    assert sent == [True, True, False, False, False]
    assert [r.getMessage() for r in caplog.records] == [
        "f0.jpg: decoded with warnings", "f1.jpg: decoded with warnings",
        "f5.jpg: decoded with warnings (3 similar messages held back before this one)"]


_THREADS = """
import json, logging, sys
from concurrent.futures import ThreadPoolExecutor
records = []
handler = logging.Handler()
handler.emit = lambda r: records.append(r.getMessage())
logging.getLogger("appliance.imaging").addHandler(handler)
from appliance.imaging import read_image
with ThreadPoolExecutor(4) as pool:
    shapes = list(pool.map(lambda p: read_image(p).shape, sys.argv[1:]))
print(json.dumps({"shapes": [list(s) for s in shapes], "records": sorted(records)}))
"""


def test_concurrent_decodes_each_get_their_own_messages(tmp_path: Path) -> None:
    photo = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (320, 200))
    jpeg = cv2.imencode(".jpg", photo)[1].tobytes()
    padding = {f"frame{k}.jpg": 20 * k for k in range(1, 9)}  # each file's message tells it apart
    for name, size in padding.items():
        (tmp_path / name).write_bytes(jpeg[:-2] + bytes(size) + b"\xff\xd9")
    done = subprocess.run([sys.executable, "-c", _THREADS, *(str(tmp_path / n) for n in padding)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stderr == ""
    result = json.loads(done.stdout)
    assert result["shapes"] == [[200, 320, 3]] * 8
    said = {}
    for message in result["records"]:
        match = re.fullmatch(rf"{re.escape(str(tmp_path))}/(frame\d\.jpg): decoded with warnings: Corrupt JPEG data: "
                             r"(\d+) extraneous bytes before marker 0xd9", message)
        assert match, message
        said[match[1]] = int(match[2])
    assert said.keys() == padding.keys()
    # libjpeg reads a few bytes ahead of the scan's end, the same few for every file (identical scans)
    assert len({padding[name] - count for name, count in said.items()}) == 1


def test_a_clean_decode_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from appliance.imaging import decode_image

    encoded = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes()
    with caplog.at_level(logging.DEBUG, "appliance.imaging"):
        decode_image(encoded, "clean.jpg")
    assert caplog.records == []
