"""Outputs, in a registry keyed by ``type``: importing this package registers every built-in one."""

from . import frames, http, modbus, mqtt, opcua, overlay, trainer  # noqa: F401  (importing registers the outputs)
from .base import PUBLISHERS, Delivery, OutputContext, Publisher, PublisherConfig, create_publisher, register_publisher

__all__ = ["PUBLISHERS", "Delivery", "OutputContext", "Publisher", "PublisherConfig", "create_publisher",
           "register_publisher"]
