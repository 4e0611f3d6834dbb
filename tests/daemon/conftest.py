"""The real daemon as a subprocess: a bundle fitted once per session, configs, the control socket, notify.

End-to-end tests start ``appliance run`` exactly as systemd would (a config file, a clean
environment, optionally a ``NOTIFY_SOCKET``), drive it through its control socket and read
its audit database with plain ``sqlite3``. Numba's compiled kernels are cached in one folder
for the whole session so that only the first daemon pays for compiling them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import APPLIANCE, SAMPLE, Daemon, NotifySocket, good_test_images, sample_images
from plc import Plant


@pytest.fixture(scope="session")
def daemon_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder (Numba kernels, OpenVINO blobs) shared by every daemon of the session."""
    return tmp_path_factory.mktemp("daemon-cache")


@pytest.fixture(scope="session")
def sample_bundle(tmp_path_factory: pytest.TempPathFactory, daemon_cache: Path) -> Path:
    """A PaDiM bundle fitted on the bundled ball-screw sample at 128 px (seconds), by the real CLI."""
    out = tmp_path_factory.mktemp("bundles") / "ball_screw"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(daemon_cache / "numba"))
    done = subprocess.run([str(APPLIANCE), "fit", str(SAMPLE), "--out", str(out), "--scorer", "padim", "--size",
                           "128", "--cache-dir", str(daemon_cache / "openvino"), "-q"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    return out


@pytest.fixture(scope="session")
def drift_bundle(tmp_path_factory: pytest.TempPathFactory, daemon_cache: Path) -> Path:
    """A PaDiM bundle whose calibration (and drift baseline) is the sample's good test images.

    The replays below are made of those same images, so an unshifted replay is exactly the
    baseline's distribution: this tests the daemon's wiring of the watch end to end. Its
    false-alarm rate on frames it never saw, and its detection delays, are measured on the full
    ball-screw set by bench/drift_bench.py.
    """
    root = tmp_path_factory.mktemp("drift-data")
    for image in sample_images("train"):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / "train" / "good" / image.name)
    for image in good_test_images():
        (root / "validation" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / "validation" / "good" / image.name)
    out = tmp_path_factory.mktemp("drift-bundle") / "bundle"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(daemon_cache / "numba"))
    done = subprocess.run([str(APPLIANCE), "fit", str(root), "--out", str(out), "--scorer", "padim", "--size", "128",
                           "--cache-dir", str(daemon_cache / "openvino"), "-q"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    assert json.loads((out / "manifest.json").read_text())["drift"], "the bundle records a drift baseline"
    return out


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test started; any still running at the end are killed (and their logs shown on failure)."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.kill()


@pytest.fixture
def plant() -> Iterator[Plant]:
    """A stand-in daemon for one output under test (see plc.py)."""
    p = Plant()
    yield p
    p.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    # AF_UNIX paths are limited to 108 bytes: keep it short.
    path = Path(f"/tmp/notify-{os.getpid()}-{time.monotonic_ns()}.sock")
    ns = NotifySocket(path)
    yield ns
    ns.close()
    path.unlink(missing_ok=True)
