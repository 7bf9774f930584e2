"""Cron schedules (SPEC §4): the next-fire computation, spec validation, and real runs."""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest

from conftest import OK_PLUGIN, make_plugin, spec, wait_for
from runner.cron import parse, next_after, zone
from supervisor.manager import cron_splay
from supervisor.spec import SpecError, parse_spec

UTC = dt.timezone.utc


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def shown(t: float, tz: str) -> str:
    return dt.datetime.fromtimestamp(t, zone(tz)).isoformat()


# (expression, zone, after, expected next fire as the zone's wall time with its offset);
# each worked out by hand from the zone's rules.
CASES = [
    # America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST
    ("30 2 * * *", "America/New_York", "2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"),  # skipped: once after
    ("30 2 * * *", "America/New_York", "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"),
    ("*/15 * * * *", "America/New_York", "2026-03-08T01:50:00-05:00", "2026-03-08T03:00:00-04:00"),  # 02:xx: one run
    ("*/15 * * * *", "America/New_York", "2026-03-08T03:00:00-04:00", "2026-03-08T03:15:00-04:00"),
    ("59 1 * * *", "America/New_York", "2026-03-08T01:58:00-05:00", "2026-03-08T01:59:00-05:00"),
    ("0 3 * * *", "America/New_York", "2026-03-08T01:59:00-05:00", "2026-03-08T03:00:00-04:00"),
    ("30 1 * * *", "America/New_York", "2026-11-01T00:00:00-04:00", "2026-11-01T01:30:00-04:00"),  # first pass
    ("30 1 * * *", "America/New_York", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),  # not repeated
    ("*/20 * * * *", "America/New_York", "2026-11-01T01:50:00-04:00", "2026-11-01T02:00:00-05:00"),
    ("*/20 * * * *", "America/New_York", "2026-11-01T01:10:00-05:00", "2026-11-01T02:00:00-05:00"),  # 2nd pass
    ("0 2 * * *", "America/New_York", "2026-11-01T01:59:00-04:00", "2026-11-01T02:00:00-05:00"),
    # Europe/London: 2026-03-29 01:00 GMT -> 02:00 BST; 2026-10-25 02:00 BST -> 01:00 GMT
    ("30 1 * * *", "Europe/London", "2026-03-29T00:00:00+00:00", "2026-03-29T02:00:00+01:00"),
    ("30 1 * * *", "Europe/London", "2026-10-25T00:00:00+01:00", "2026-10-25T01:30:00+01:00"),
    ("30 1 * * *", "Europe/London", "2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"),
    ("0 9 * * mon-fri", "Europe/London", "2026-10-23T09:00:00+01:00", "2026-10-26T09:00:00+00:00"),
    # Australia/Lord_Howe (+10:30, DST +11:00, a 30-minute shift): 2026-04-05 02:00 -> 01:30;
    # 2026-10-04 02:00 -> 02:30
    ("15 2 * * *", "Australia/Lord_Howe", "2026-10-04T01:00:00+10:30", "2026-10-04T02:30:00+11:00"),
    ("45 2 * * *", "Australia/Lord_Howe", "2026-10-04T01:00:00+10:30", "2026-10-04T02:45:00+11:00"),
    ("45 1 * * *", "Australia/Lord_Howe", "2026-04-05T00:00:00+11:00", "2026-04-05T01:45:00+11:00"),
    ("45 1 * * *", "Australia/Lord_Howe", "2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"),
    ("*/10 * * * *", "Australia/Lord_Howe", "2026-04-05T01:55:00+11:00", "2026-04-05T02:00:00+10:30"),
    # month ends, Feb 29, macros
    ("0 0 31 * *", "UTC", "2026-04-15T00:00:00+00:00", "2026-05-31T00:00:00+00:00"),
    ("0 0 30 * *", "UTC", "2026-01-31T00:00:00+00:00", "2026-03-30T00:00:00+00:00"),
    ("59 23 28-31 2 *", "UTC", "2027-02-28T23:59:00+00:00", "2028-02-28T23:59:00+00:00"),
    ("0 0 29 2 *", "UTC", "2026-03-01T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),
    ("0 0 29 2 *", "UTC", "2096-03-01T00:00:00+00:00", "2104-02-29T00:00:00+00:00"),  # 2100 is no leap year
    ("@yearly", "UTC", "2026-12-31T23:59:59+00:00", "2027-01-01T00:00:00+00:00"),
    ("@annually", "Europe/London", "2026-06-01T00:00:00+01:00", "2027-01-01T00:00:00+00:00"),
    ("@monthly", "UTC", "2026-01-31T12:00:00+00:00", "2026-02-01T00:00:00+00:00"),
    ("@weekly", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-06T00:00:00+00:00"),  # a Tuesday -> Sunday
    ("@daily", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-02T00:00:00+00:00"),
    ("@hourly", "UTC", "2026-12-01T13:59:59.900000+00:00", "2026-12-01T14:00:00+00:00"),
    # both day fields restricted: either is enough; one starting with * : both must match
    ("0 0 13 * fri", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-04T00:00:00+00:00"),  # Friday the 4th
    ("0 0 13 * fri", "UTC", "2026-12-11T00:00:00+00:00", "2026-12-13T00:00:00+00:00"),  # Sunday the 13th
    ("0 0 */2 * mon", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-07T00:00:00+00:00"),  # odd day and Monday
    ("0 0 */2 * mon", "UTC", "2026-12-08T00:00:00+00:00", "2026-12-21T00:00:00+00:00"),
    # steps on ranges, a/n, names, 0 and 7 for Sunday
    ("10-30/7 * * * *", "UTC", "2026-12-01T13:25:00+00:00", "2026-12-01T14:10:00+00:00"),
    ("0 9-17/4 * * *", "UTC", "2026-12-01T13:00:00+00:00", "2026-12-01T17:00:00+00:00"),
    ("5/20 * * * *", "UTC", "2026-12-01T13:26:00+00:00", "2026-12-01T13:45:00+00:00"),
    ("0 0 * JAN,jul Sun", "UTC", "2026-12-01T00:00:00+00:00", "2027-01-03T00:00:00+00:00"),
    ("0 0 * * 5-7", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-04T00:00:00+00:00"),
    ("0 0 * * 7", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-06T00:00:00+00:00"),
    ("0 0 * * 0", "UTC", "2026-12-01T00:00:00+00:00", "2026-12-06T00:00:00+00:00"),
    ("0 0 1 mar-may/2 *", "UTC", "2026-03-01T00:00:00+00:00", "2026-05-01T00:00:00+00:00"),
    # 6 fields: seconds first
    ("*/2 * * * * *", "UTC", "2026-12-01T13:00:00.500000+00:00", "2026-12-01T13:00:02+00:00"),
    ("15,45 30 3 * * *", "Europe/London", "2026-12-01T03:30:15+00:00", "2026-12-01T03:30:45+00:00"),
]


@pytest.mark.parametrize("expr, tz, after, expected", CASES)
def test_next_fire_table(expr, tz, after, expected):
    got = next_after(expr, at(after), tz)
    assert shown(got, tz) == dt.datetime.fromisoformat(expected).isoformat()
    assert got == at(expected)


def test_next_after_takes_an_aware_datetime_and_a_tzinfo():
    start = dt.datetime(2026, 3, 8, 1, 0, tzinfo=zone("America/New_York"))
    assert parse("30 2 * * *").next_after(start, zone("America/New_York")) == at("2026-03-08T03:00:00-04:00")
    with pytest.raises(ValueError):
        parse("* * * * *").next_after(dt.datetime(2026, 1, 1), "UTC")


def test_local_is_the_hosts_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    assert next_after("0 9 * * *", at("2026-12-01T00:00:00+00:00"), "local") == at("2026-12-01T09:00:00+05:30")
    monkeypatch.setenv("TZ", ":Europe/London")
    assert str(zone("local")) == "Europe/London"


# -- properties, against a brute-force matcher ---------------------------------------------

def _field(rng: random.Random, low: int, high: int, names=None) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return "*"
    if kind == 1:
        return f"*/{rng.randint(1, max(1, (high - low) // 2))}"
    a = rng.randint(low, high)
    b = rng.randint(a, high)
    if kind == 2:
        return str(a) if names is None or rng.random() < 0.5 else names[a - low]
    if kind == 3:
        return f"{a}-{b}"
    if kind == 4:
        return f"{a}-{b}/{rng.randint(1, 5)}"
    return ",".join(str(rng.randint(low, high)) for _ in range(rng.randint(2, 4)))


def random_expression(rng: random.Random, seconds: bool = False) -> str:
    parts = [_field(rng, 0, 59), _field(rng, 0, 23), _field(rng, 1, 28), _field(rng, 1, 12),
             _field(rng, 0, 6, ["sun", "mon", "tue", "wed", "thu", "fri", "sat"])]
    if rng.random() < 0.7:  # keep most within a few days so the brute force stays short
        parts[3] = "*"
        parts[2] = rng.choice(["*", parts[2]]) if rng.random() < 0.5 else "*"
    if seconds:
        parts.insert(0, _field(rng, 0, 59))
    return " ".join(parts)


def brute_fires(cron, tz: str, start: float, end: float, step: int):
    """Every fire instant in (start, end], at `step`-second resolution, found without the
    module's search: a first-pass instant whose wall time matches, or the first instant after
    a wall-clock jump forward if a skipped wall time matches."""
    z = zone(tz)
    t = int(start // step) * step + step
    prev_wall = dt.datetime.fromtimestamp(t - step, z).replace(tzinfo=None)
    while t <= end:
        local = dt.datetime.fromtimestamp(t, z)
        wall = local.replace(tzinfo=None)
        first_pass = local.fold == 0 or local.replace(fold=0).utcoffset() == local.utcoffset()
        fires = first_pass and cron.matches(wall)
        skipped = prev_wall + dt.timedelta(seconds=step)
        while not fires and skipped < wall:  # the wall clock jumped over these
            fires = cron.matches(skipped)
            skipped += dt.timedelta(seconds=step)
        if fires:
            yield t
        prev_wall = wall
        t += step


ZONES = ["UTC", "America/New_York", "Europe/London", "Australia/Lord_Howe"]
DST_DAYS = ["2026-03-07T12:00:00+00:00", "2026-10-31T12:00:00+00:00", "2026-03-28T12:00:00+00:00",
            "2026-10-24T12:00:00+00:00", "2026-10-03T00:00:00+00:00", "2026-04-04T00:00:00+00:00"]


@pytest.mark.parametrize("seed", range(8))
def test_random_expressions_fire_exactly_when_the_brute_force_says(seed):
    rng = random.Random(seed)
    checked = 0
    while checked < 40:
        expr = random_expression(rng)
        cron = parse(expr)
        tz = rng.choice(ZONES)
        t = at(rng.choice(DST_DAYS)) + rng.randrange(0, 86400)
        window = 3 * 86400
        expected = next(brute_fires(cron, tz, t, t + window, 60), None)
        if expected is None:
            continue  # fires later than the window: nothing to compare with
        got = next_after(cron, t, tz)
        assert got > t
        assert got == expected, f"{expr!r} in {tz} after {shown(t, tz)}: {shown(got, tz)} != {shown(expected, tz)}"
        checked += 1


@pytest.mark.parametrize("seed", range(4))
def test_random_expressions_with_seconds(seed):
    rng = random.Random(100 + seed)
    for _ in range(30):
        expr = random_expression(rng, seconds=True)
        cron = parse(expr)
        t = at("2026-12-01T00:00:00+00:00") + rng.uniform(0, 86400)
        got = next_after(cron, t, "UTC")
        assert got > t and cron.matches(dt.datetime.fromtimestamp(got, UTC).replace(tzinfo=None))
        if got - t <= 6 * 3600:
            assert next(brute_fires(cron, "UTC", t, got, 1)) == got


def test_a_chain_of_fires_never_repeats_across_a_fall_back():
    cron, tz = parse("*/30 * * * *"), "America/New_York"
    t, fires = at("2026-11-01T00:00:00-04:00"), []
    while t < at("2026-11-01T03:00:00-05:00"):
        t = next_after(cron, t, tz)
        fires.append(shown(t, tz))
    walls = [f[11:16] for f in fires]
    assert walls == ["00:30", "01:00", "01:30", "02:00", "02:30", "03:00"]  # 01:00 and 01:30 once


def test_ten_thousand_next_times_take_well_under_a_second():
    cron = parse("*/7 3-20/2 * * 1-5")
    start = time.time()
    for tz in ("UTC", "America/New_York"):
        t0 = time.perf_counter()
        for i in range(10_000):
            cron.next_after(start + i * 37.0, tz)
        elapsed = time.perf_counter() - t0
        print(f"next_after in {tz}: {elapsed / 10_000 * 1e6:.1f} µs per call")
        assert elapsed < 0.5


# -- parse errors and spec validation -------------------------------------------------------

@pytest.mark.parametrize("expr, message", [
    ("0 25 * * *", "field 2 (hour): 25 is out of range 0-23"),
    ("60 * * * *", "field 1 (minute): 60 is out of range 0-59"),
    ("0 0 25 * * *", "field 3 (hour): 25 is out of range 0-23"),
    ("* * 0 * *", "field 3 (day of month): 0 is out of range 1-31"),
    ("* * * 13 *", "field 4 (month): 13 is out of range 1-12"),
    ("* * * * 8", "field 5 (day of week): 8 is out of range 0-7"),
    ("* * * foo *", "field 4 (month): 'foo' is not a number or a name"),
    ("*/0 * * * *", "field 1 (minute): step '0'"),
    ("30-10 * * * *", "field 1 (minute): range 30-10 runs backwards"),
    ("1,,2 * * * *", "field 1 (minute): empty list item"),
    ("0 0 30 feb *", "field 3 (day of month): no month"),
    ("* * * *", "expected 5 fields"),
    ("* * * * * * *", "expected 5 fields"),
    ("@midnight", "unknown macro '@midnight'"),
])
def test_parse_errors_name_the_field(expr, message):
    with pytest.raises(ValueError) as e:
        parse(expr)
    assert str(e.value).startswith(message)


BASE = {"uuid": "job-1", "plugin": {"name": "demo", "version": "1.0.0"}}


def test_a_cron_spec_validates():
    job = parse_spec(dict(BASE, schedule="0 3 * * *", time_zone="Europe/London", splay="10m"), "t").job
    assert job.schedule == "0 3 * * *" and job.interval is None and job.time_zone == "Europe/London"
    assert job.splay == 600
    assert parse_spec(dict(BASE, schedule="@daily", time_zone="local"), "t").job.time_zone == "local"


def test_defaults_do_not_change_the_revision_of_an_interval_spec():
    plain = parse_spec(dict(BASE, interval="1m"), "t")
    assert plain.job.time_zone == "UTC" and plain.job.schedule is None and plain.job.splay is None
    assert plain.canonical == b'{"interval":"1m","plugin":{"name":"demo","version":"1.0.0"},"uuid":"job-1"}'


@pytest.mark.parametrize("extra, reason", [
    ({"schedule": "0 25 * * *"}, "$.schedule: field 2 (hour): 25 is out of range 0-23"),
    ({"schedule": "0 3 * * *", "time_zone": "Mars/Olympus"}, "$.time_zone: unknown time zone 'Mars/Olympus'"),
    ({"schedule": "0 3 * * *", "time_zone": "../../etc/passwd"}, "$.time_zone: unknown time zone"),
    ({"schedule": "0 3 * * *", "interval": "1m"}, "$.schedule: give either interval or schedule, not both"),
    ({}, "$.interval: required field is missing"),
    ({"schedule": 5}, "$.schedule: Expected `str | null`, got `int`"),
    ({"schedule": "@daily", "splay": "-1s"}, "$.splay"),
])
def test_spec_validation_names_the_field(extra, reason):
    with pytest.raises(SpecError) as e:
        parse_spec(dict(BASE, **extra), "t")
    assert e.value.reason.startswith(reason) and e.value.uuid == "job-1"


def test_cron_splay_is_stable_and_within_the_splay():
    a = cron_splay("runtime-1", "job-1", 60.0)
    assert a == cron_splay("runtime-1", "job-1", 60.0) and 0 <= a < 60
    assert a != cron_splay("runtime-2", "job-1", 60.0)
    assert cron_splay("runtime-1", "job-1", None) == 0.0


# -- real runs ---------------------------------------------------------------------------

def cron_spec(schedule: str, plugin: str = "ok", **extra) -> dict:
    doc = spec(plugin=plugin, run_on_start=False, schedule=schedule, **extra)
    del doc["interval"]
    return doc


def epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(90)
def test_a_seconds_schedule_runs_on_its_grid_with_a_stable_splay(service_factory):
    svc = service_factory()
    make_plugin(svc.plugins, "ok", OK_PLUGIN)
    doc = cron_spec("*/2 * * * * *", splay="1s")
    svc.write_spec("cron.json", doc)
    svc.start()
    results = svc.wait_result(doc["uuid"], count=4, timeout=40)
    offset = cron_splay(svc.status()["runtime_uuid"], doc["uuid"], 1.0)
    for r in results:
        late = (epoch(r["start"]) - offset) % 2.0
        late = late - 2.0 if late > 1.0 else late
        assert -0.01 < late < 0.5, (r["start"], offset)  # on the grid, a little late at most
    job = svc.job(doc["uuid"])
    assert job["schedule"] == "*/2 * * * * *" and job["skipped"] == 0
    next_at = epoch(job["next_run_at"])
    assert job["next_run_at"].endswith("Z") and 0 <= next_at - time.time() <= 2.5
    assert ((next_at - offset) % 2.0) < 0.05 or ((next_at - offset) % 2.0) > 1.95


SLOW_PLUGIN = """
#!/bin/sh
cat >/dev/null
sleep 3
echo '{"status": "satisfied"}'
"""


@pytest.mark.timeout(90)
def test_fire_times_during_a_run_are_skipped_and_counted(service_factory):
    svc = service_factory()
    make_plugin(svc.plugins, "slow", SLOW_PLUGIN)
    doc = cron_spec("* * * * * *", plugin="slow")
    svc.write_spec("slow.json", doc)
    svc.start()
    results = svc.wait_result(doc["uuid"], count=2, timeout=40)
    job = wait_for(lambda: (lambda j: j if j and j["skipped"] >= 2 else None)(svc.job(doc["uuid"])),
                   what="skipped fire times")
    assert job["schedule"] == "* * * * * *"
    first, second = sorted(results, key=lambda r: r["start"])[:2]
    assert epoch(second["start"]) >= epoch(first["end"])  # never two runs at once
    assert epoch(second["start"]) - epoch(first["end"]) < 1.5  # the next fire time, not a late catch-up


# -- the runner's clock: wall-clock jumps (runner/main.py, without a process) -----------------

class FakeClocks:
    def __init__(self, wall: float, mono: float):
        self.wall, self.mono = wall, mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def cron_runner(monkeypatch, schedule: str, wall: str):
    import types
    from runner import main
    clocks = FakeClocks(at(wall), 1000.0)
    monkeypatch.setattr(main.time, "time", lambda: clocks.wall)
    monkeypatch.setattr(main.time, "monotonic", lambda: clocks.mono)
    r = types.SimpleNamespace(cron=parse(schedule), zone=zone("UTC"), cfg=types.SimpleNamespace(splay=0.0, interval=None),
                              fire_wall=None, skipped=0)
    for name in ("_due", "_next_slot", "_skip_missed"):
        setattr(r, name, getattr(main.Runner, name).__get__(r))
    r.next_run_at = r._next_slot(clocks.mono)
    return r, clocks


def fires_until(r, clocks, end_mono: float, step: float = 30.0) -> list[str]:
    """What start_run would fire, looking every `step` seconds (the runner looks at least
    once a minute)."""
    fired = []
    while clocks.mono < end_mono:
        if r._due(clocks.mono):
            fired.append(shown(r.fire_wall, "UTC")[11:16])
            r.next_run_at = r._next_slot(clocks.mono)
        clocks.advance(step)
    return fired


def test_a_wall_clock_set_back_never_repeats_a_run(monkeypatch):
    r, clocks = cron_runner(monkeypatch, "0 * * * *", "2026-12-01T10:59:00+00:00")
    assert r.next_run_at == 1060.0
    assert fires_until(r, clocks, 1200.0) == ["11:00"]
    clocks.wall -= 3600  # back to 10:01
    assert fires_until(r, clocks, 1200.0 + 2 * 3600) == ["12:00"]  # 11:00 does not run again


def test_a_wall_clock_set_forward_runs_the_missed_times_once(monkeypatch):
    r, clocks = cron_runner(monkeypatch, "0 * * * *", "2026-12-01T10:59:00+00:00")
    clocks.wall += 3.5 * 3600  # 14:29: 11:00 .. 14:00 were missed
    assert fires_until(r, clocks, 1000.0 + 1800) == ["11:00"]  # one run for them all, at once
    assert shown(r.fire_wall, "UTC")[11:16] == "15:00"
    assert fires_until(r, clocks, 1000.0 + 1800 + 120) == ["15:00"]


def test_fire_times_during_a_long_run_are_counted(monkeypatch):
    r, clocks = cron_runner(monkeypatch, "*/10 * * * *", "2026-12-01T10:59:00+00:00")
    assert fires_until(r, clocks, 1061.0) == ["11:00"]
    clocks.advance(25 * 60)  # the run lasted until 11:26: 11:10 and 11:20 came meanwhile
    r._skip_missed(clocks.mono)
    assert r.skipped == 2 and shown(r.fire_wall, "UTC")[11:16] == "11:30"
    assert r.next_run_at == clocks.mono + 270  # 11:25:30 -> 11:30


def test_an_interval_job_skips_the_slots_a_long_run_covered(monkeypatch):
    import types
    from runner import main
    clocks = FakeClocks(0.0, 1000.0)
    monkeypatch.setattr(main.time, "monotonic", lambda: clocks.mono)
    r = types.SimpleNamespace(cron=None, cfg=types.SimpleNamespace(splay=0.25, interval=10.0), skipped=0)
    for name in ("_due", "_next_slot", "_skip_missed"):
        setattr(r, name, getattr(main.Runner, name).__get__(r))
    r.next_run_at = r._next_slot(1000.0)
    assert r.next_run_at == 1000.25 and not r._due(1000.0) and r._due(1000.25)
    r.next_run_at = r._next_slot(1000.25)  # a run starts at 1000.25 and lasts 25 s
    clocks.mono = 1025.25
    r._skip_missed(clocks.mono)
    assert r.skipped == 2 and r.next_run_at == 1030.25  # 1010.25 and 1020.25 skipped, no late run
    r._skip_missed(1026.0)  # a run that ended in time skips nothing
    assert r.skipped == 2
