"""Which threshold is in force for a camera at a given time, and why: pure functions, no I/O, no clock.

Precedence, highest first (the second element of ``resolve``'s answer names the winner):

1. ``operator:shift:<name>``: an operator override for the shift running now;
2. ``operator``: an operator override for the camera (an operator's pin: nothing learned overrides it);
3. ``learned:shift:<name>``: a threshold recalibrated from operator labels for the shift running now;
4. ``learned``: a threshold recalibrated from operator labels for the camera;
5. ``shift:<name>``: the configured threshold of the shift running now;
6. ``camera``: the camera's configured ``value``;
7. ``bundle``: the bundle's calibrated threshold, 0.5 on the normalised scale.

Shifts follow the local wall clock of the daemon's time zone (a top-level setting): a range
``"22:00-06:00"`` means 22:00 to 06:00 as the clocks on the shop floor show it. Across DST
changes the wall clock decides: on the spring-forward day local times in the skipped hour never
occur (a range inside it does not happen that day, a shift spanning it is an hour shorter); on
the fall-back day the repeated hour is lived twice by whichever shift covers it (an hour longer).

Operator overrides are a plain mapping, set at run time through the control socket:
``{"camera": 0.6, "shifts": {"A": 0.55}}``; both keys are optional, ``"camera": None`` means no
camera override. Check them once with ``check_overrides`` where they come in.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..errors import ConfigError

#: The bundle's calibrated threshold on the normalised scale: the last fallback.
BUNDLE_THRESHOLD = 0.5
MINUTES_PER_DAY = 24 * 60

_RANGE = re.compile(r"^\s*(\d{2}):(\d{2})\s*-\s*(\d{2}):(\d{2})\s*$")
_RANGE_HINT = "write it as 'HH:MM-HH:MM' on a 24-hour clock, e.g. '06:00-14:00' or '22:00-06:00'"


# --------------------------------------------------------------------------- time zone


def load_timezone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``"Europe/Berlin"``, ``"UTC"``), or ``ConfigError`` saying what to write."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # ValueError: absolute or '..' paths, empty names
        raise ConfigError(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin' or 'UTC' "
                          "(timedatectl list-timezones shows them)") from exc


def _check_timezone_name(name: str) -> str:
    try:
        load_timezone(name)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return name


#: A config field type for the daemon's time zone: a string checked against the zone database.
TimeZoneName = Annotated[str, AfterValidator(_check_timezone_name)]


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class TimeRange:
    """One schedule entry: minutes of the local day, start inclusive, end exclusive; wraps midnight if end <= start.

    Attributes:
        start: first minute of the day in the range (0-1439).
        end: first minute after the range (1-1440; ``1440`` is written ``24:00``).
        shift: the shift this range belongs to.
        text: the range as written in the config, for messages.

    """

    start: int
    end: int
    shift: str
    text: str

    def contains(self, minute: int) -> bool:
        """Whether ``minute`` of the local day (0-1439) falls in this range."""
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def segments(self) -> list[tuple[int, int]]:
        """The range as non-wrapping half-open ``(start, end)`` pieces of ``[0, 1440)``."""
        if self.start < self.end:
            return [(self.start, self.end)]
        return [(s, e) for s, e in ((self.start, MINUTES_PER_DAY), (0, self.end)) if s < e]


def parse_range(text: str, shift: str = "") -> TimeRange:
    """Parse ``"HH:MM-HH:MM"`` (end may be ``24:00``); ``ValueError`` naming the range if it is not one."""
    m = _RANGE.match(text)
    if not m:
        raise ValueError(f"schedule range {text!r} is not a time range; {_RANGE_HINT}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        raise ValueError(f"schedule range {text!r} has an impossible time; hours run 00-23 (24:00 only as an end), "
                         "minutes 00-59")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError(f"schedule range {text!r} is empty or ambiguous (start equals end); "
                         "write '00:00-24:00' for the whole day")
    return TimeRange(start, end, shift, text)


def _overlap(ranges: list[TimeRange]) -> tuple[TimeRange, TimeRange] | None:
    """The first two ranges that share a minute, or ``None``."""
    pieces = sorted(((s, e, r) for r in ranges for s, e in r.segments()), key=lambda p: p[:2])
    for (_, end, a), (start, _, b) in itertools.pairwise(pieces):
        if start < end:
            return a, b
    return None


class ThresholdsConfig(BaseModel):
    """One camera's thresholds: a fixed value and optional per-shift values on a daily schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    value: float | None = Field(None, ge=0.0, le=1.0, description=(
        "the camera's threshold on the normalised scale [0, 1]; unset = the bundle's calibrated 0.5"))
    schedule: dict[str, str] = Field(default_factory=dict, description=(
        "local time ranges 'HH:MM-HH:MM' (start inclusive, end exclusive, may wrap midnight, must not overlap) "
        "-> shift name; gaps are allowed and have no shift"))
    shifts: dict[str, float] = Field(default_factory=dict, description=(
        "shift name -> threshold in [0, 1] while that shift runs; every name must appear in 'schedule'"))

    _ranges: tuple[TimeRange, ...] = PrivateAttr(default=())

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, schedule: dict[str, str]) -> dict[str, str]:
        ranges = []
        for text, shift in schedule.items():
            if not shift.strip() or shift != shift.strip():
                raise ValueError(f"schedule range {text!r} names the shift {shift!r}; a shift name must be non-empty "
                                 "without leading or trailing spaces")
            ranges.append(parse_range(text, shift))
        clash = _overlap(ranges)
        if clash:
            a, b = clash
            raise ValueError(f"schedule ranges {a.text!r} (shift {a.shift!r}) and {b.text!r} (shift {b.shift!r}) "
                             "overlap; a time of day may belong to one shift only")
        return schedule

    @field_validator("shifts")
    @classmethod
    def _check_shifts(cls, shifts: dict[str, float]) -> dict[str, float]:
        for name, value in shifts.items():
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"shift {name!r} has threshold {value}; thresholds are on the normalised scale "
                                 "[0, 1] (0.5 = the bundle's calibrated threshold)")
        return shifts

    @model_validator(mode="after")
    def _check_shift_names(self) -> ThresholdsConfig:
        named = set(self.schedule.values())
        unknown = sorted(set(self.shifts) - named)
        if unknown:
            raise ValueError(f"shifts {', '.join(map(repr, unknown))} have a threshold but no schedule range; "
                             f"add a range for them to 'schedule' (named now: {sorted(named) or 'none'})")
        return self

    def model_post_init(self, context: Any, /) -> None:
        """Parse the schedule once, so that ``shift_at`` per frame does no text work."""
        self._ranges = tuple(parse_range(text, shift) for text, shift in self.schedule.items())

    @property
    def ranges(self) -> tuple[TimeRange, ...]:
        """The parsed schedule."""
        return self._ranges


# --------------------------------------------------------------------------- decisions


class Resolved(NamedTuple):
    """The threshold in force and where it came from (``operator:shift:A``, ``operator``, ``shift:A``, ...)."""

    threshold: float
    source: str


def local_minute(tz: ZoneInfo, when: datetime | float) -> int:
    """Minute of the local wall-clock day (0-1439) at ``when`` (an aware datetime or seconds since the epoch)."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError(f"naive datetime {when.isoformat()}: pass an aware datetime or seconds since the epoch")
        local = when.astimezone(tz)
    else:
        local = datetime.fromtimestamp(when, tz)
    return local.hour * 60 + local.minute


def shift_at(config: ThresholdsConfig, tz: ZoneInfo, when: datetime | float) -> str | None:
    """The shift running at ``when`` in zone ``tz``, or ``None`` in a gap of the schedule (or with no schedule)."""
    if not config.ranges:
        return None
    minute = local_minute(tz, when)
    for r in config.ranges:
        if r.contains(minute):
            return r.shift
    return None


def resolve(config: ThresholdsConfig, tz: ZoneInfo, when: datetime | float,
            overrides: Mapping[str, Any] | None = None, learned: Mapping[str, Any] | None = None) -> Resolved:
    """The threshold in force for one camera at ``when``, and its source (precedence in the module docstring).

    Args:
        config: the camera's thresholds.
        tz: the daemon's time zone (``load_timezone``).
        when: capture time, an aware datetime or seconds since the epoch.
        overrides: the camera's operator overrides, ``{"camera": float | None, "shifts": {name: float}}``,
            already checked by ``check_overrides``.
        learned: thresholds recalibrated from labels, in the same shape (``threshold_rule``).

    """
    shift = shift_at(config, tz, when)
    for layer, name in ((overrides or {}, "operator"), (learned or {}, "learned")):
        by_shift = layer.get("shifts") or {}
        if shift is not None and by_shift.get(shift) is not None:
            return Resolved(float(by_shift[shift]), f"{name}:shift:{shift}")
        if layer.get("camera") is not None:
            return Resolved(float(layer["camera"]), name)
    if shift is not None and shift in config.shifts:
        return Resolved(config.shifts[shift], f"shift:{shift}")
    if config.value is not None:
        return Resolved(config.value, "camera")
    return Resolved(BUNDLE_THRESHOLD, "bundle")


def check_overrides(overrides: Mapping[str, Any], config: ThresholdsConfig | None = None) -> dict[str, Any]:
    """Validate operator overrides and return them normalised as ``{"camera": float | None, "shifts": {...}}``.

    Raises:
        ConfigError: an unknown key, a value that is not a number in [0, 1], or (given ``config``)
            a shift that no schedule range of the camera names.

    """
    unknown = sorted(set(overrides) - {"camera", "shifts"})
    if unknown:
        raise ConfigError(f"threshold overrides: unknown key(s) {', '.join(map(repr, unknown))}; "
                          "only 'camera' and 'shifts' can be overridden")
    camera = overrides.get("camera")
    if camera is not None:
        camera = _threshold("camera", camera)
    shifts_in = overrides.get("shifts") or {}
    if not isinstance(shifts_in, Mapping):
        raise ConfigError(f"threshold overrides: 'shifts' must map shift names to thresholds, got {shifts_in!r}")
    named = None if config is None else set(config.schedule.values())
    shifts = {}
    for name, value in shifts_in.items():
        if named is not None and name not in named:
            raise ConfigError(f"threshold overrides: shift {name!r} is not in this camera's schedule "
                              f"(shifts: {sorted(named) or 'none'})")
        shifts[str(name)] = _threshold(f"shifts.{name}", value)
    return {"camera": camera, "shifts": shifts}


def _threshold(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 <= value <= 1.0):
        raise ConfigError(f"threshold overrides: {key!r} is {value!r}; a threshold is a number in [0, 1] "
                          "(0.5 = the bundle's calibrated threshold)")
    return float(value)
