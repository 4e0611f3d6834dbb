"""Describe the machine a benchmark ran on (CPU model, flags that matter, cores, memory, versions)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from importlib import metadata
from pathlib import Path

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")


def describe() -> dict:
    """A JSON-ready description of this machine and the library versions in use."""
    cpu, flags = platform.processor() or "unknown", []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        have = set(f.group(1).split()) if f else set()
        flags = [x for x in _FLAGS if x in have]
    mem_gb = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        m = re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text())
        mem_gb = round(int(m.group(1)) / 2**20, 1) if m else None
    versions = {}
    for pkg in ("openvino", "faiss-cpu", "numba", "numpy", "opencv-python-headless", "anomaly-appliance"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "python": platform.python_version(), "versions": versions}


def one_line(info: dict) -> str:
    """The description as one line for a report header."""
    return (f"{info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores, {info['memory_gb']} GB, "
            + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
