"""Scorers, registered by type: ``patchcore`` (FAISS memory bank) and ``padim`` (per-position Gaussians)."""

from .base import SCORERS, Scorer, create, register
from .padim import Padim, PadimConfig
from .patchcore import PatchCore, PatchCoreConfig

__all__ = ["SCORERS", "Padim", "PadimConfig", "PatchCore", "PatchCoreConfig", "Scorer", "create", "register"]
