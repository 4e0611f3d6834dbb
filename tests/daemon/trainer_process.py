"""The real trainer (``appliance trainer serve``) as a subprocess, for the daemon's end-to-end tests.

Needs the trainer extra: import it after ``pytest.importorskip("fastapi")``. The catalogue is read
behind the trainer's back (``open_storage``), as an auditor would.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from harness import APPLIANCE, free_port

from appliance.trainer.config import load_trainer_config
from appliance.trainer.storage import open_storage


def trainer_config(request: pytest.FixtureRequest | None, tmp_path: Path, kind: str, **extra: Any) -> Path:
    """A trainer.toml on a free loopback port: ``embedded`` in ``tmp_path``, or ``fleet`` on the session's
    PostgreSQL and SeaweedFS (which ``request`` starts)."""
    storage: dict = {"type": "embedded", "folder": str(tmp_path / "trainer")}
    if kind == "fleet":
        assert request is not None
        s3 = request.getfixturevalue("seaweed_s3")
        storage = {"type": "fleet", "database_url": request.getfixturevalue("postgres_url"),
                   "s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "access_key": s3.access_key,
                          "secret_key": s3.secret_key.get_secret_value(), "presign": True}}
    config = tmp_path / "trainer.toml"
    config.write_text(tomli_w.dumps({"host": "127.0.0.1", "port": free_port(), "work_dir": str(tmp_path / "work"),
                                     "storage": storage, **extra}))
    return config


class Trainer:
    """``appliance trainer serve`` on its config's port; ``workers`` rebuild threads in its process."""

    def __init__(self, config: Path, workers: int = 0) -> None:
        self.config = config
        self.workers = workers
        self.port = load_trainer_config(config).port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Trainer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(APPLIANCE), "trainer", "serve", "--config", str(self.config),
                                          "--workers", str(self.workers)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("trainer not up in 60 s\n" + self.log_path.read_text()[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(APPLIANCE), "trainer", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def read(self, what: str, *args: Any, **kwargs: Any) -> Any:
        """``storage.catalogue.<what>(*args, **kwargs)`` on a fresh connection to the trainer's storage."""
        with open_storage(load_trainer_config(self.config)) as storage:
            return getattr(storage.catalogue, what)(*args, **kwargs)

    def frames(self, appliance: str) -> list:
        return self.read("frames", appliance)

    def labels(self, appliance: str) -> list:
        return self.read("labels", appliance, active_only=False)

    def blob(self, key: str) -> bytes:
        with open_storage(load_trainer_config(self.config)) as storage:
            return storage.blobs.get(key)


def register(trainer: Trainer, appliance: str, folder: Path) -> Path:
    """``appliance trainer add-appliance``; the printed token goes into a token file, as the docs say."""
    token = trainer.cli("add-appliance", appliance).splitlines()[0].strip()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trainer.token"
    path.write_text(token + "\n")
    return path
