"""The appliance's one exception hierarchy.

Every error a user can cause (a bad file, a bad config, a tampered bundle) is an
``ApplianceError`` whose message says what went wrong, where, and what to do.
This module imports nothing from the package.
"""

from __future__ import annotations

from pathlib import Path


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """A setting is missing, unknown, out of range or inconsistent with another."""


class ImageError(ApplianceError):
    """An image (or mask) cannot be read or does not fit what is expected of it."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class DatasetError(ApplianceError):
    """A dataset folder is missing, empty or laid out in a way we cannot read."""


class BundleError(ApplianceError):
    """A model bundle is missing, truncated, tampered with, incompatible or fails its golden check."""


class BackboneError(ApplianceError):
    """The OpenVINO backbone cannot be read, compiled or run."""


class ScorerError(ApplianceError):
    """A scorer is used before it is fitted, or fed features of the wrong shape."""


class SourceError(ApplianceError):
    """A camera, folder or stream cannot be opened or has gone away (retried with backoff)."""


class PublishError(ApplianceError):
    """An output could not deliver a result (it is counted, audited and, for durable outputs, retried)."""


class AuditError(ApplianceError):
    """The audit database cannot be opened or written (a full disk, a read-only folder)."""
