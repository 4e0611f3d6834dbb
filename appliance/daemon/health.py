"""When a camera counts as hung: a pure function of what its pipeline reports, no clock of its own.

A camera is stalled when one of its threads has ended or stopped turning, or when a frame has
been waiting for a result for longer than ``stall_s``. Waiting is measured from the oldest frame
that is actually waiting (queued or in the engine) — never from the last result, so an
externally triggered camera that was idle for an hour is healthy the moment its next trigger
arrives. Each camera is judged alone: one camera's trouble drops its own Ready, not the others'.
The daemon is healthy (the systemd watchdog is fed) while every camera is and the audit writer lives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """What a pipeline says about itself at one moment (monotonic seconds).

    Attributes:
        inference_alive: the inference thread runs.
        inference_beat: when the inference loop last turned.
        capture_alive: the capture thread runs (``False`` once a finite source ended and stopped).
        capture_beat: when the capture loop last turned.
        oldest_waiting: when the oldest frame now queued or in the engine was queued, ``None`` if none waits.

    """

    inference_alive: bool
    inference_beat: float
    capture_alive: bool
    capture_beat: float
    oldest_waiting: float | None


def stall_reasons(progress: Progress, now: float, stall_s: float) -> list[str]:
    """Why a camera counts as hung now (empty: it does not). Reasons carry no changing numbers but the limit."""
    reasons = []
    if not progress.inference_alive:
        reasons.append("inference thread ended")
    elif now - progress.inference_beat > stall_s:
        reasons.append(f"inference loop silent for more than {stall_s:g} s")
    if progress.capture_alive and now - progress.capture_beat > stall_s:
        reasons.append(f"capture loop silent for more than {stall_s:g} s")
    if progress.oldest_waiting is not None and now - progress.oldest_waiting > stall_s:
        reasons.append(f"a frame has waited more than {stall_s:g} s for its result")
    return reasons
