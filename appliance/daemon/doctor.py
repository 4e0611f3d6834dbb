"""``appliance doctor``: everything the daemon needs, checked without starting it.

Folders writable, disk space, the audit database readable, each camera's source reachable and
bundle verified (hashes, manifest, golden images), each output able to work (its own ``check``),
and whether a daemon answers on the control socket. Each check is ``ok``, ``warn`` or ``fail``
with one line of detail; a technician fixes the ``fail`` lines first.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ApplianceError
from .config import DaemonConfig
from .publishers import PUBLISHERS
from .sources import create_source

#: Free space below which the state or cache folder fails / warns (MiB).
DISK_FAIL_MB = 200
DISK_WARN_MB = 2048


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"check": name, "status": status, "detail": detail}


def _folder(name: str, path: Path) -> list[dict[str, str]]:
    existing = path if path.exists() else next((p for p in path.parents if p.exists()), path)
    if not os.access(existing, os.W_OK):
        return [_check(f"folder {name}", "fail", f"{existing} is not writable for this user")]
    out = [_check(f"folder {name}", "ok", f"{path} writable" + ("" if path.exists() else " (will be created)"))]
    free = shutil.disk_usage(existing).free / 2**20
    level = "fail" if free < DISK_FAIL_MB else "warn" if free < DISK_WARN_MB else "ok"
    out.append(_check(f"disk {name}", level, f"{free:,.0f} MiB free on {existing}"))
    return out


def _audit(cfg: DaemonConfig) -> dict[str, str]:
    path = cfg.audit.resolve_path(cfg.paths.state)
    if not path.exists():
        return _check("audit database", "ok", f"{path} will be created")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            rows = conn.execute("SELECT count(*) FROM inspections").fetchone()[0]
    except sqlite3.Error as exc:
        return _check("audit database", "fail", f"{path}: {exc}")
    status = "ok" if result == "ok" else "fail"
    return _check("audit database", status, f"{path}: {rows} inspections, quick_check {result}")


def _source(camera: Any) -> dict[str, str]:
    source = create_source(camera.source, camera.id)
    try:
        source.open()
    except ApplianceError as exc:
        return _check(f"camera {camera.id} source", "fail", str(exc))
    except Exception as exc:
        return _check(f"camera {camera.id} source", "fail", f"{type(exc).__name__}: {exc}")
    finally:
        source.close()
    return _check(f"camera {camera.id} source", "ok", f"{source.describe()} opens")


def _bundle(cfg: DaemonConfig, camera: Any, golden: bool, cache: Path) -> dict[str, str]:
    from ..bundle import load_bundle, verify_files

    path = cfg.state_path(camera.bundle)
    try:
        if golden:
            engine = load_bundle(path, threads=cfg.runtime.threads, cache_dir=cache)
            detail = f"{engine.model_id}: files, manifest and {len(engine.manifest['golden'])} golden images verified"
            engine.close()
        else:
            detail = f"{verify_files(path)['model_id']}: files and manifest verified"
    except ApplianceError as exc:
        return _check(f"camera {camera.id} bundle", "fail", str(exc))
    return _check(f"camera {camera.id} bundle", "ok", f"{path}: {detail}")


def _control(cfg: DaemonConfig) -> dict[str, str]:
    from .control import request

    try:
        status = request(cfg.control.socket, {"cmd": "status"}, timeout=5)
    except ApplianceError as exc:
        return _check("daemon", "warn", f"not answering on {cfg.control.socket} ({exc})")
    d = status["daemon"]
    health = "healthy" if d["healthy"] else "UNHEALTHY: " + "; ".join(d["unhealthy"])
    return _check("daemon", "ok" if d["healthy"] else "fail", f"pid {d['pid']} answers, {health}")


def private_cache(cfg: DaemonConfig) -> Path | None:
    """A throwaway cache folder when the doctor runs as root beside a service that runs as another user.

    Compiling into the service's cache as root would leave root-owned files there that the service
    could not replace; the doctor then compiles into its own temporary folder instead.
    """
    cache = cfg.paths.cache
    if os.geteuid() != 0 or not cache.exists() or cache.stat().st_uid == 0:
        return None
    return Path(tempfile.mkdtemp(prefix="appliance-doctor-cache-"))


def run_checks(cfg: DaemonConfig, golden: bool = True, cache: Path | None = None) -> list[dict[str, str]]:
    """Every check, in the order a technician would fix them (``cache``: where bundles compile; the config's)."""
    checks = [*_folder("state", cfg.paths.state), *_folder("cache", cfg.paths.cache), _audit(cfg)]
    for camera in cfg.cameras:
        if camera.enabled:
            checks += [_source(camera), _bundle(cfg, camera, golden, cache or cfg.paths.cache)]
    for output in cfg.outputs:
        status, detail = PUBLISHERS[output.type].check(output, cfg.paths.state)
        checks.append(_check(f"output {output.type}", status, detail))
    checks.append(_control(cfg))
    return checks
