"""What an output is: take one inspection record, deliver it somewhere; a registry keyed by ``type``.

Each publisher runs on its own worker with its own bounded queue (see ``outputs.py``), so a
slow or failing output never blocks inspection or the other outputs. ``publish`` is called
on that worker thread only; it returns what it delivered, or raises ``PublishError``.
Publishers never reach back into the engine: everything they need is in the record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from ...errors import PublishError
from ..records import Inspection


class PublisherConfig(BaseModel):
    """Base of every output's config: strict, with a ``type`` tag and the queue bound."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str
    queue: int = Field(256, ge=1, description="records waiting for this output before the oldest is dropped")


@dataclass(frozen=True)
class Delivery:
    """What an output did with one record: recorded in the audit log beside the inspection.

    Attributes:
        status: ``sent`` (delivered), ``skipped`` (by the output's own policy, e.g. NG-only overlays),
            ``dropped`` (not delivered by a rule that protects the device, e.g. a disk below its floor).
        detail: where it went (a path, a topic), for the audit log.
        at: when, seconds since the epoch (``None``: when ``publish`` returned).

    """

    status: str = "sent"
    detail: str | None = None
    at: float | None = None


@dataclass
class OutputContext:
    """What the daemon gives every output when it starts.

    Attributes:
        state_dir: the daemon's state folder (``/var/lib/anomaly-appliance`` on a device).
        status: the daemon's status snapshot, a ``appliance.daemon.status.Status``.
        registry: the Prometheus registry the daemon exports on ``/metrics``.
        loop: the daemon's asyncio loop, for outputs that are network servers.
        trigger: ``trigger(camera, trigger_id)`` asks the camera's pipeline for one frame.
        control: ``await control(command)`` runs a typed command (``appliance.daemon.commands``:
            ``ThresholdCommand``, ``EnableCommand``, ...) through the daemon's one dispatcher and
            returns its result or raises ``ApplianceError``; call it on ``loop``.
        outbox: the audit database's durable outbox, for ``durable`` outputs: ``outbox.pending(output,
            limit)`` lists undelivered rows oldest first (``id``, ``inspection_id``, ``payload``, ...),
            ``outbox.delivered(inspection_id, output, status, detail, at)`` records how one ended.
        disk: the free-space floor (``disk.allows(path)``): outputs that write files ask it first.
        latest: each camera's newest overlay image in memory (``latest.LatestImages``): the overlay
            output writes it, the HTTP output serves it.

    """

    state_dir: Path
    status: Callable[[], Any]
    registry: CollectorRegistry
    loop: asyncio.AbstractEventLoop | None = None
    trigger: Callable[[str, str | None], bool] | None = None
    control: Callable[[Any], Awaitable[Any]] | None = None
    outbox: Any = None
    disk: Any = None
    latest: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Publisher(ABC):
    """One output (overlay files, HTTP, MQTT, Modbus, ...)."""

    type: ClassVar[str]
    Config: ClassVar[type[PublisherConfig]]
    #: A durable output never loses a record: ``payload(record)`` is stored in the audit database's outbox
    #: in the same transaction as the inspection, and the output sends from the outbox (in order, across
    #: restarts and outages) and reports each delivery itself through ``context.outbox``. Its ``publish``
    #: is then only a wake-up call ("new rows are committed") and its return value is not recorded.
    durable: ClassVar[bool] = False

    def __init__(self, config: PublisherConfig, context: OutputContext) -> None:
        self.config = config
        self.context = context

    @property
    def name(self) -> str:
        """The output's name in status, metrics and the audit log."""
        return self.type

    def start(self) -> None:  # noqa: B027 - optional hook
        """Open files, sockets or servers; raise ``PublishError`` if the output cannot work at all."""

    @abstractmethod
    def publish(self, inspection: Inspection) -> Delivery:
        """Deliver one record (on this output's worker thread); raise ``PublishError`` on failure."""

    def publish_uncommitted(self, inspection: Inspection) -> None:  # noqa: B027 - optional hook
        """Durable outputs: a record whose audit row could not be written yet (a full disk).

        Its outbox row appears once the audit log can write again. An output that must reach the
        PLC meanwhile sends it from memory now and skips the row later (MQTT); the default waits.
        """

    def payload(self, inspection: Inspection) -> str:
        """Durable outputs: what to deliver for this record (stored in the outbox before anything is sent)."""
        raise NotImplementedError(f"output {self.type} is not durable")

    def state(self) -> dict[str, Any]:
        """Output-specific status (e.g. ``{"connected": true}``), merged into the worker's counters."""
        return {}

    @classmethod
    def check(cls, config: PublisherConfig, state_dir: Path) -> tuple[str, str]:
        """``appliance doctor``: can this output work here? ``("ok"|"warn"|"fail", detail)``, without starting it."""
        return "ok", "nothing to check"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release; must not raise."""


def run_on_loop(loop: asyncio.AbstractEventLoop | None, coro: Coroutine[Any, Any, None], timeout: float,
                output: str, what: str) -> None:
    """Run ``coro`` (``<what>_async()`` of a network output) on the daemon's loop from another thread, and wait.

    Network outputs (HTTP, Modbus, OPC UA) serve on the daemon's asyncio loop, but ``start`` and
    ``close`` are called from other threads. Before the loop runs, the coroutine runs to completion
    on it; from inside the loop, waiting would deadlock, so that is refused.

    Raises:
        PublishError: no usable loop, called on the loop itself, or not done within ``timeout``.

    """
    try:
        current = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    problem = None
    if loop is None or loop.is_closed():
        problem = "needs the daemon's running asyncio loop (OutputContext.loop)"
    elif current is loop:
        problem = f"would wait on the loop it runs on: await {what}_async() there instead"
    if problem:
        coro.close()
        raise PublishError(f"{output} output {what}: {problem}")
    assert loop is not None
    if not loop.is_running():  # started before the loop runs
        loop.run_until_complete(coro)
        return
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise PublishError(f"{output} output {what}: not done within {timeout} s; is the daemon's loop "
                           "blocked?") from None


PUBLISHERS: dict[str, type[Publisher]] = {}


def register_publisher(cls: type[Publisher]) -> type[Publisher]:
    """Class decorator: make an output available under its ``type``."""
    if cls.type in PUBLISHERS and PUBLISHERS[cls.type] is not cls:
        raise ValueError(f"publisher type {cls.type!r} is registered twice")
    PUBLISHERS[cls.type] = cls
    return cls


def create_publisher(config: PublisherConfig, context: OutputContext) -> Publisher:
    """An unstarted output for a validated config."""
    return PUBLISHERS[config.type](config, context)
