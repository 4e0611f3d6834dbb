"""Thresholds per camera, shift and operator override: pure decisions tested on real clocks and time zones."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from appliance.daemon.thresholds import (
    BUNDLE_THRESHOLD,
    ThresholdsConfig,
    TimeZoneName,
    check_overrides,
    load_timezone,
    resolve,
    shift_at,
)
from appliance.errors import ConfigError

UTC_TZ = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
THREE_SHIFTS = {"22:00-06:00": "N", "06:00-14:00": "A", "14:00-22:00": "B"}


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def shifts_over(config, tz, start, hours):
    """Minutes per shift over ``hours`` real hours from ``start``, sampled every real minute."""
    counts = {}
    for i in range(hours * 60):
        name = shift_at(config, tz, (start + timedelta(minutes=i)).timestamp())
        counts[name] = counts.get(name, 0) + 1
    return counts


# --------------------------------------------------------------------------- shifts


def test_a_night_shift_wraps_midnight():
    config = ThresholdsConfig(schedule=THREE_SHIFTS)
    expected = {(21, 59): "B", (22, 0): "N", (23, 30): "N", (0, 0): "N", (5, 59): "N", (6, 0): "A", (13, 59): "A",
                (14, 0): "B"}
    for (h, m), shift in expected.items():
        assert shift_at(config, UTC_TZ, utc(2025, 1, 15, h, m)) == shift, (h, m)


def test_start_is_inclusive_and_end_exclusive():
    config = ThresholdsConfig(schedule={"06:00-14:00": "A", "18:00-24:00": "E"})
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 5, 59, 59)) is None
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 6, 0, 0)) == "A"
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 13, 59, 59, 999999)) == "A"
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 14, 0, 0)) is None
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 23, 59, 59)) == "E"  # "24:00" ends the day
    assert shift_at(config, UTC_TZ, utc(2025, 1, 16, 0, 0, 0)) is None


def test_gaps_have_no_shift_and_fall_back_to_the_camera_value():
    config = ThresholdsConfig(value=0.42, schedule={"06:00-14:00": "A"}, shifts={"A": 0.6})
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 15, 0)) is None
    assert resolve(config, UTC_TZ, utc(2025, 1, 15, 15, 0)) == (0.42, "camera")
    assert resolve(config, UTC_TZ, utc(2025, 1, 15, 7, 0)) == (0.6, "shift:A")
    assert shift_at(ThresholdsConfig(), UTC_TZ, 0.0) is None


def test_local_time_decides_epoch_seconds_and_aware_datetimes_agree():
    config = ThresholdsConfig(schedule=THREE_SHIFTS)
    # 05:30 UTC on a winter day is 06:30 in Berlin (CET, UTC+1): the morning shift there, the night shift in UTC.
    when = utc(2025, 1, 15, 5, 30)
    assert shift_at(config, BERLIN, when) == "A"
    assert shift_at(config, BERLIN, when.timestamp()) == "A"
    assert shift_at(config, BERLIN, when.astimezone(ZoneInfo("Asia/Tokyo"))) == "A"
    assert shift_at(config, UTC_TZ, when) == "N"
    with pytest.raises(ValueError, match="naive datetime"):
        shift_at(config, BERLIN, datetime(2025, 1, 15, 5, 30))


def test_spring_forward_in_berlin_shortens_the_night_and_skips_the_missing_hour():
    # 2024-03-31: clocks jump from 02:00 CET to 03:00 CEST (01:00 UTC). The local day lasts 23 hours,
    # from 2024-03-30 23:00 UTC to 2024-03-31 22:00 UTC.
    config = ThresholdsConfig(schedule=THREE_SHIFTS)
    assert shifts_over(config, BERLIN, utc(2024, 3, 30, 23, 0), 23) == {"N": 5 * 60 + 2 * 60, "A": 480, "B": 480}
    assert shift_at(config, BERLIN, utc(2024, 3, 31, 4, 59)) == "A"  # 06:59 CEST
    assert shift_at(config, BERLIN, utc(2024, 3, 30, 4, 59)) == "N"  # 05:59 CET, the day before

    missing = ThresholdsConfig(schedule={"02:00-03:00": "X"})
    assert shifts_over(missing, BERLIN, utc(2024, 3, 30, 23, 0), 23) == {None: 23 * 60}
    assert shifts_over(missing, BERLIN, utc(2024, 3, 29, 23, 0), 24)["X"] == 60  # an ordinary day


def test_fall_back_in_berlin_lengthens_the_night_and_repeats_the_hour():
    # 2024-10-27: clocks go back from 03:00 CEST to 02:00 CET (01:00 UTC). The local day lasts 25 hours,
    # from 2024-10-26 22:00 UTC to 2024-10-27 23:00 UTC.
    config = ThresholdsConfig(schedule=THREE_SHIFTS)
    assert shifts_over(config, BERLIN, utc(2024, 10, 26, 22, 0), 25) == {"N": 7 * 60 + 2 * 60, "A": 480, "B": 480}

    repeated = ThresholdsConfig(schedule={"02:00-03:00": "X"})
    assert shift_at(repeated, BERLIN, utc(2024, 10, 27, 0, 30)) == "X"  # 02:30 CEST
    assert shift_at(repeated, BERLIN, utc(2024, 10, 27, 1, 30)) == "X"  # 02:30 CET, an hour later
    assert shifts_over(repeated, BERLIN, utc(2024, 10, 26, 22, 0), 25)["X"] == 120


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(("value", "shifts", "overrides", "expected"), [
    (None, {}, None, (BUNDLE_THRESHOLD, "bundle")),
    (0.4, {}, None, (0.4, "camera")),
    (0.4, {"A": 0.55}, None, (0.55, "shift:A")),
    (0.4, {"A": 0.55}, {"camera": 0.7}, (0.7, "operator")),
    (0.4, {"A": 0.55}, {"camera": 0.7, "shifts": {"A": 0.66}}, (0.66, "operator:shift:A")),
    (None, {}, {"shifts": {"A": 0.66}}, (0.66, "operator:shift:A")),
    (0.4, {"A": 0.55}, {"camera": 0.7, "shifts": {"B": 0.9}}, (0.7, "operator")),  # B is not running
    (0.4, {"B": 0.35}, {}, (0.4, "camera")),  # B's threshold does not apply during A
    (0.4, {"A": 0.55}, {"camera": None, "shifts": {}}, (0.55, "shift:A")),
    (0.4, {"A": 0.0}, None, (0.0, "shift:A")),  # a zero threshold is a threshold, not "unset"
])
def test_precedence(value, shifts, overrides, expected):
    config = ThresholdsConfig(value=value, schedule=THREE_SHIFTS, shifts=shifts)
    assert resolve(config, UTC_TZ, utc(2025, 1, 15, 9, 0), overrides) == expected


def test_shift_overrides_follow_the_clock():
    config = ThresholdsConfig(value=0.4, schedule=THREE_SHIFTS, shifts={"A": 0.55})
    overrides = check_overrides({"shifts": {"N": 0.8}}, config)
    assert resolve(config, UTC_TZ, utc(2025, 1, 15, 23, 0), overrides) == (0.8, "operator:shift:N")
    assert resolve(config, UTC_TZ, utc(2025, 1, 15, 7, 0), overrides) == (0.55, "shift:A")
    assert resolve(config, UTC_TZ, utc(2025, 1, 15, 15, 0), overrides) == (0.4, "camera")


def test_check_overrides_normalises_and_names_the_bad_key():
    config = ThresholdsConfig(schedule=THREE_SHIFTS)
    assert check_overrides({}) == {"camera": None, "shifts": {}}
    assert check_overrides({"camera": 1, "shifts": {"A": 0.25}}, config) == {"camera": 1.0, "shifts": {"A": 0.25}}
    with pytest.raises(ConfigError, match="'camra'"):
        check_overrides({"camra": 0.5})
    with pytest.raises(ConfigError, match=r"'camera' is 1\.5"):
        check_overrides({"camera": 1.5})
    with pytest.raises(ConfigError, match="'camera' is True"):
        check_overrides({"camera": True})
    with pytest.raises(ConfigError, match=r"'shifts\.A' is '0\.5'"):
        check_overrides({"shifts": {"A": "0.5"}})
    with pytest.raises(ConfigError, match="shift 'Z' is not in this camera's schedule"):
        check_overrides({"shifts": {"Z": 0.5}}, config)
    with pytest.raises(ConfigError, match="'shifts' must map"):
        check_overrides({"shifts": [0.5]})


# --------------------------------------------------------------------------- validation


def test_adjacent_and_split_ranges_are_fine():
    config = ThresholdsConfig(schedule={"06:00-12:00": "A", "12:00-14:00": "A", "14:00-22:00": "B",
                                        "22:00-00:00": "N"}, shifts={"A": 0.6, "N": 0.5})
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 13, 0)) == "A"
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 23, 0)) == "N"
    assert shift_at(config, UTC_TZ, utc(2025, 1, 15, 3, 0)) is None


@pytest.mark.parametrize("schedule", [
    {"22:00-06:00": "N", "05:00-14:00": "A"},  # the wrapped range's morning part
    {"22:00-24:00": "N", "23:00-01:00": "M"},
    {"06:00-14:00": "A", "06:00 - 14:00": "B"},  # the same range written twice
    {"00:00-24:00": "D", "12:00-12:30": "L"},
    {"20:00-04:00": "N", "03:59-05:00": "E"},
])
def test_overlapping_ranges_are_rejected(schedule):
    with pytest.raises(ValidationError, match="overlap") as info:
        ThresholdsConfig(schedule=schedule)
    first, second = list(schedule)
    assert repr(first) in str(info.value) and repr(second) in str(info.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": {"6-14": "A"}}, "'6-14' is not a time range"),
    ({"schedule": {"06:00-14:00h": "A"}}, "'06:00-14:00h' is not a time range"),
    ({"schedule": {"25:00-06:00": "A"}}, "'25:00-06:00' has an impossible time"),
    ({"schedule": {"06:60-08:00": "A"}}, "'06:60-08:00' has an impossible time"),
    ({"schedule": {"20:00-24:30": "A"}}, "'20:00-24:30' has an impossible time"),
    ({"schedule": {"06:00-06:00": "A"}}, "'06:00-06:00' is empty or ambiguous"),
    ({"schedule": {"00:00-00:00": "A"}}, "write '00:00-24:00' for the whole day"),
    ({"schedule": {"06:00-14:00": ""}}, "'06:00-14:00' names the shift ''"),
    ({"schedule": {"06:00-14:00": "A"}, "shifts": {"A": 1.2}}, "shift 'A' has threshold 1.2"),
    ({"schedule": {"06:00-14:00": "A"}, "shifts": {"Z": 0.5}}, "shifts 'Z' have a threshold but no schedule range"),
    ({"value": 1.5}, "value\n"),
    ({"value": -0.1}, "value\n"),
    ({"value": True}, "value\n"),
    ({"value": "0.5"}, "value\n"),
    ({"shifts": {"A": float("nan")}}, "shift 'A' has threshold nan"),
    ({"thresold": 0.5}, "thresold\n"),
])
def test_bad_config_is_rejected_with_a_message_naming_the_key(kwargs, message):
    with pytest.raises(ValidationError) as info:
        ThresholdsConfig(**kwargs)
    assert message in str(info.value)


def test_time_zone_names_are_checked():
    assert load_timezone("Europe/Berlin") == BERLIN
    for bad in ("Europe/Berln", "", "../etc/passwd", "/etc/localtime"):
        with pytest.raises(ConfigError, match="unknown time zone"):
            load_timezone(bad)

    class Daemon(BaseModel):
        timezone: TimeZoneName

    assert Daemon(timezone="UTC").timezone == "UTC"
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        Daemon(timezone="Mars/Olympus")


# --------------------------------------------------------------------------- properties


def hhmm(minute):
    return f"{minute // 60:02d}:{minute % 60:02d}"


def minutes_of(start, end):
    """The minutes a range covers, walked one by one (a reference independent of the module's arithmetic)."""
    covered, m = set(), start
    while True:
        covered.add(m)
        m = (m + 1) % 1440
        if m == end % 1440:
            return covered


ranges_st = st.lists(st.tuples(st.integers(0, 1439), st.integers(1, 1440)).filter(lambda r: r[0] != r[1]),
                     min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(ranges=ranges_st, day=st.integers(0, 20_000))
def test_schedules_are_accepted_exactly_when_no_minute_has_two_shifts(ranges, day):
    entries = {f"{hhmm(s)}-{'24:00' if e == 1440 else hhmm(e)}": (s, e, f"S{i}") for i, (s, e) in enumerate(ranges)}
    schedule = {text: name for text, (_, _, name) in entries.items()}
    owners = {}
    for s, e, name in entries.values():
        for m in minutes_of(s, e):
            owners.setdefault(m, []).append(name)
    if any(len(v) > 1 for v in owners.values()):
        with pytest.raises(ValidationError, match="overlap"):
            ThresholdsConfig(schedule=schedule)
        return
    config = ThresholdsConfig(schedule=schedule)
    midnight = day * 86400.0
    for m in range(1440):
        expected = owners.get(m, [None])[0]
        assert shift_at(config, UTC_TZ, midnight + m * 60 + 30) == expected


@st.composite
def whole_day(draw):
    """Consecutive ranges that cover the day, rotated so that one of them usually wraps midnight."""
    cuts = sorted(draw(st.sets(st.integers(1, 1439), max_size=6)))
    bounds = [0, *cuts, 1440]
    shift = draw(st.integers(0, 1439))
    schedule = {}
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        s, e = (a + shift) % 1440, (b + shift) % 1440
        text = "00:00-24:00" if (a, b) == (0, 1440) else f"{hhmm(s)}-{hhmm(e)}"
        schedule[text] = draw(st.sampled_from(["A", "B", "C"])) if i else "A"
    return schedule


@settings(max_examples=100, deadline=None)
@given(schedule=whole_day(), when=st.floats(0, 4e9),
       tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Pacific/Chatham"]))
def test_a_schedule_covering_the_day_always_names_a_shift(schedule, when, tz):
    config = ThresholdsConfig(schedule=schedule)
    assert shift_at(config, ZoneInfo(tz), when) in set(schedule.values())
    assert resolve(config, ZoneInfo(tz), when)[1] == "bundle"
