"""Built backbone IRs shipped with the appliance (installed as ``appliance_models``).

Each backbone is a folder ``<name>/`` holding ``<name>.xml``, ``<name>.bin`` and
``backbone.json`` (what the graph computes and the sha256 of both files). The
folder is written by ``build_backbone.py`` (torch, build time only); nothing here
imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DEFAULT_BACKBONE = "efficientnet_lite0_patch"
_HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the backbones shipped here."""
    return sorted(p.parent.name for p in _HERE.glob("*/backbone.json"))


def backbone_dir(name: str = DEFAULT_BACKBONE) -> Path:
    """The folder of a shipped backbone, after checking its files against ``backbone.json``.

    Raises:
        FileNotFoundError: no such backbone, or a file is missing.
        ValueError: a file does not match its recorded sha256.

    """
    folder = _HERE / name
    info_path = folder / "backbone.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"no backbone {name!r} in {_HERE} (available: {available()})")
    info = json.loads(info_path.read_text())
    for file, digest in info["files"].items():
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(f"backbone file missing: {path}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"backbone file {path} does not match its sha256 in {info_path}; rebuild it")
    return folder
