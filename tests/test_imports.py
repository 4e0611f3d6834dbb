"""The runtime and the daemon never import torch (a separate interpreter sees the real import graph)."""

from __future__ import annotations

import subprocess
import sys

import pytest

RUNTIME = ["appliance.cli", "appliance.bundle", "appliance.engine", "appliance.training", "appliance.evaluation"]
DAEMON = ["appliance.daemon.records", "appliance.daemon.sources", "appliance.daemon.publishers",
          "appliance.daemon.capture", "appliance.daemon.audit", "appliance.daemon.thresholds",
          "appliance.daemon.service", "appliance.daemon.cli", "appliance.daemon.doctor"]


@pytest.mark.parametrize("modules", [RUNTIME, DAEMON], ids=["runtime", "daemon"])
def test_importing_pulls_in_no_torch(modules: list[str]) -> None:
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'torchvision'))\n"
            "print(len(sys.modules)); assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 100  # the modules really were imported (numpy, openvino, ...)
