"""Cron expressions (SPEC §4): parse once, then compute next fire times field by field.

    cron = parse("0 3 * * mon-fri")          # ValueError naming the field on a bad expression
    cron.next_after(time.time(), "Europe/London")  # -> epoch seconds (float) of the next fire

5 fields (minute hour day-of-month month day-of-week) or 6 with a leading seconds field;
`*`, lists, ranges, steps (also on ranges: `1-10/3`, and `a/n` = `a-max/n`), month and day
names (case-insensitive), 0 and 7 for Sunday, and the macros @hourly @daily @weekly @monthly
@yearly @annually. When both day fields are restricted (neither starts with `*`), either one
matching is enough (Vixie cron).

Wall times are read in a time zone. Across DST changes, as in Vixie cron / cronie: a wall time
that a spring-forward jump skips fires once, at the first instant after the jump; a wall time
that a fall-back repeats fires once, at its first occurrence.

The next matching wall time is found by jumping to the next matching month, day, hour,
minute and second in turn, never by stepping second by second.
"""

from __future__ import annotations

import datetime as _dt
import os
from bisect import bisect_left
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["Cron", "parse", "next_after", "zone", "check_zone"]

MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# (name, low, high, names) for the 6 fields; a 5-field expression has no seconds
_FIELDS = (("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
           ("day of month", 1, 31, None), ("month", 1, 12, MONTHS), ("day of week", 0, 7, DAYS))
_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most a month can have
_SEARCH_YEARS = 9  # Feb 29 can be 8 years away (2096 -> 2104)
_UTC = _dt.timezone.utc
_EPOCH = _dt.datetime(1970, 1, 1)
_ONE_SECOND = _dt.timedelta(seconds=1)


def _leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def _days_in(y: int, m: int) -> int:
    if m == 2:
        return 29 if _leap(y) else 28
    return _MONTH_DAYS[m]


def _next_table(values: frozenset[int], low: int, high: int) -> tuple:
    """table[v] = the smallest allowed value >= v, or None."""
    table, best = [None] * (high + 2), None
    for v in range(high, low - 1, -1):
        if v in values:
            best = v
        table[v] = best
    return tuple(table)


class Cron:
    """A compiled cron expression."""

    __slots__ = ("text", "seconds", "minutes", "hours", "doms", "months", "dows", "dom_star", "dow_star",
                 "_sec", "_min", "_hour", "_month")

    def __init__(self, text: str, fields: list[frozenset[int]], dom_star: bool, dow_star: bool):
        self.text = text
        self.seconds, self.minutes, self.hours, self.doms, self.months, self.dows = fields
        self.dom_star, self.dow_star = dom_star, dow_star
        self._sec = _next_table(self.seconds, 0, 59)
        self._min = _next_table(self.minutes, 0, 59)
        self._hour = _next_table(self.hours, 0, 23)
        self._month = _next_table(self.months, 1, 12)

    def __repr__(self) -> str:
        return f"Cron({self.text!r})"

    # -- matching ------------------------------------------------------------------------

    def day_matches(self, y: int, m: int, d: int) -> bool:
        dom = d in self.doms
        dow = (_dt.date(y, m, d).weekday() + 1) % 7 in self.dows  # Sunday = 0
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow

    def matches(self, wall: _dt.datetime) -> bool:
        """Whether a wall time (naive, or its fields as read) matches every field."""
        return (wall.second in self.seconds and wall.minute in self.minutes and wall.hour in self.hours
                and wall.month in self.months and self.day_matches(wall.year, wall.month, wall.day))

    def next_wall(self, w: _dt.datetime) -> _dt.datetime:
        """The first matching wall time at or after the naive datetime `w` (whole seconds)."""
        y, mo, d, h, mi, s = w.year, w.month, w.day, w.hour, w.minute, w.second
        last_year = y + _SEARCH_YEARS
        while y <= last_year:
            m2 = self._month[mo]
            if m2 is None:
                y, mo, d, h, mi, s = y + 1, 1, 1, 0, 0, 0
                continue
            if m2 != mo:
                mo, d, h, mi, s = m2, 1, 0, 0, 0
            dim = _days_in(y, mo)
            while d <= dim and not self.day_matches(y, mo, d):
                d, h, mi, s = d + 1, 0, 0, 0
            if d > dim:
                y, mo, d, h, mi, s = (y + 1, 1, 1, 0, 0, 0) if mo == 12 else (y, mo + 1, 1, 0, 0, 0)
                continue
            h2 = self._hour[h]
            if h2 is None:
                d, h, mi, s = d + 1, 0, 0, 0
                if d > dim:
                    y, mo, d = (y + 1, 1, 1) if mo == 12 else (y, mo + 1, 1)
                continue
            if h2 != h:
                h, mi, s = h2, 0, 0
            mi2 = self._min[mi]
            if mi2 is None:
                h, mi, s = h + 1, 0, 0
                if h > 23:
                    d, h = d + 1, 0
                    if d > dim:
                        y, mo, d = (y + 1, 1, 1) if mo == 12 else (y, mo + 1, 1)
                continue
            if mi2 != mi:
                mi, s = mi2, 0
            s2 = self._sec[s]
            if s2 is None:
                mi, s = mi + 1, 0
                if mi > 59:
                    h, mi = h + 1, 0
                    if h > 23:
                        d, h = d + 1, 0
                        if d > dim:
                            y, mo, d = (y + 1, 1, 1) if mo == 12 else (y, mo + 1, 1)
                continue
            return _dt.datetime(y, mo, d, h, mi, s2)
        raise ValueError(f"{self.text!r} matches no time in the next {_SEARCH_YEARS} years")

    # -- next fire -----------------------------------------------------------------------

    def next_after(self, t: float | _dt.datetime, tz: str | _dt.tzinfo = "UTC") -> float:
        """The first fire time strictly after `t` (epoch seconds, or an aware datetime), read
        in the time zone `tz`, as epoch seconds."""
        if isinstance(t, _dt.datetime):
            if t.tzinfo is None:
                raise ValueError("next_after needs an aware datetime or epoch seconds")
            t = t.timestamp()
        tzinfo = zone(tz) if isinstance(tz, str) else tz
        if tzinfo is _UTC:
            w = _dt.datetime(1970, 1, 1) + _dt.timedelta(seconds=int(t // 1))
            return (self.next_wall(w + _ONE_SECOND) - _EPOCH).total_seconds()
        local = _dt.datetime.fromtimestamp(t // 1, tzinfo)
        w = local.replace(tzinfo=None, fold=0)
        if local.fold == 1 and _offset(local.replace(fold=0)) != _offset(local):
            # in the second pass of a repeated hour: its wall times fired on the first pass
            w = _fold_end(t, tzinfo)
        else:
            w += _ONE_SECOND
        for _ in range(100_000):
            c = self.next_wall(w)
            at = _instant(c, tzinfo)
            if at > t:
                return at
            w = c + _ONE_SECOND  # a time in a gap that maps to the jump at or before t
        raise AssertionError("unreachable")  # pragma: no cover


def _offset(d: _dt.datetime) -> _dt.timedelta:
    return d.utcoffset()


def _instant(c: _dt.datetime, tz: _dt.tzinfo) -> float:
    """The instant a matching wall time fires: its first occurrence, or if the wall clock
    skipped it, the first instant after the jump."""
    aware = c.replace(tzinfo=tz)
    at = aware.timestamp()  # fold=0: the first occurrence of a repeated time
    if _dt.datetime.fromtimestamp(at, tz).replace(tzinfo=None) == c:
        return at
    # c is in a gap: fold=0 read it with the offset before the jump, which lands after it;
    # fold=1 with the offset after, which lands before it. The jump is in between.
    lo, hi = int(aware.replace(fold=1).timestamp()), int(at)
    before = _offset(_dt.datetime.fromtimestamp(lo, tz))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(_dt.datetime.fromtimestamp(mid, tz)) == before:
            lo = mid
        else:
            hi = mid
    return float(hi)


def _fold_end(t: float, tz: _dt.tzinfo) -> _dt.datetime:
    """During the second pass of a repeated hour: the wall time at which it ends."""
    local = _dt.datetime.fromtimestamp(t // 1, tz)
    delta = int((_offset(local.replace(fold=0)) - _offset(local)).total_seconds())
    lo, hi = int(t // 1), int(t // 1) + delta  # fold 1 at lo, past the repeat at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _dt.datetime.fromtimestamp(mid, tz).fold == 1:
            lo = mid
        else:
            hi = mid
    return _dt.datetime.fromtimestamp(hi, tz).replace(tzinfo=None)


# -- parsing ------------------------------------------------------------------------------

def _number(token: str, index: int, name: str, low: int, high: int, names) -> int:
    key = token.lower()
    if names is not None and key in names:
        return names[key]
    if not token.isdigit():
        raise ValueError(f"field {index} ({name}): {token!r} is not a number" +
                         (" or a name" if names else ""))
    value = int(token)
    if not low <= value <= high:
        raise ValueError(f"field {index} ({name}): {value} is out of range {low}-{high}")
    return value


def _field(text: str, index: int, name: str, low: int, high: int, names) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"field {index} ({name}): empty list item in {text!r}")
        rng, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"field {index} ({name}): step {step_text!r} must be a whole number of at least 1")
            step = int(step_text)
        if rng == "*":
            a, b = low, high
        elif "-" in rng:
            first, _, last = rng.partition("-")
            a = _number(first, index, name, low, high, names)
            b = _number(last, index, name, low, high, names)
            if a > b:
                raise ValueError(f"field {index} ({name}): range {rng} runs backwards")
        else:
            a = _number(rng, index, name, low, high, names)
            b = high if slash else a  # "a/n" is "a-max/n"
        values.update(range(a, b + 1, step))
    if name == "day of week" and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values)


def parse(text: str) -> Cron:
    """Compile a cron expression. A ValueError names the bad field and part:
    `field 2 (hour): 25 is out of range 0-23` (fields counted as written, from 1)."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    source = text.strip()
    if source.startswith("@"):
        expanded = MACROS.get(source.lower())
        if expanded is None:
            raise ValueError(f"unknown macro {source!r} (known: {', '.join(MACROS)})")
        parts = expanded.split()
    else:
        parts = source.split()
    if len(parts) not in (5, 6):
        raise ValueError(f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 "
                         f"(with a leading seconds field), got {len(parts)}")
    specs = _FIELDS if len(parts) == 6 else _FIELDS[1:]
    fields = [_field(part, i, *spec) for i, (part, spec) in enumerate(zip(parts, specs), 1)]
    if len(parts) == 5:
        fields.insert(0, frozenset({0}))
    dom_star, dow_star = parts[-3].startswith("*"), parts[-1].startswith("*")
    cron = Cron(source, fields, dom_star, dow_star)
    if dow_star and not any(d <= _MONTH_DAYS[m] for m in cron.months for d in cron.doms):
        dom_index = len(parts) - 2
        raise ValueError(f"field {dom_index} (day of month): no month in the month field has day "
                         f"{min(cron.doms)}: the expression never fires")
    return cron


def next_after(expr: str | Cron, t: float | _dt.datetime, tz: str | _dt.tzinfo = "UTC") -> float:
    cron = expr if isinstance(expr, Cron) else parse(expr)
    return cron.next_after(t, tz)


# -- time zones ---------------------------------------------------------------------------

def _host_zone() -> _dt.tzinfo:
    """The host's zone as a zoneinfo zone: TZ, else the /etc/localtime link, else its file,
    else UTC."""
    key = os.environ.get("TZ", "").lstrip(":")
    if key:
        try:
            return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        target = os.readlink("/etc/localtime")
    except OSError:
        target = ""
    if "zoneinfo/" in target:
        try:
            return ZoneInfo(target.split("zoneinfo/", 1)[1])
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return _UTC


def zone(name: str) -> _dt.tzinfo:
    """A time zone by IANA name, `UTC`, or `local` (the host's). Raises ValueError."""
    if name in ("UTC", "Etc/UTC"):
        return _UTC
    if name == "local":
        return _host_zone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}") from None


def check_zone(name: str) -> None:
    zone(name)
