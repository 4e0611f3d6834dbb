"""Frame sources, in a registry keyed by ``type``: importing this package registers every built-in one."""

from . import folder, opencv, replay  # noqa: F401 - imported to register the built-in sources
from .base import SOURCES, Captured, Source, SourceConfig, create_source, register_source

__all__ = ["SOURCES", "Captured", "Source", "SourceConfig", "create_source", "register_source"]
