"""Durations ("500ms", "30s", "5m", "1h" or seconds) and sizes ("512KiB", "1GiB" or bytes).

Config and specs declare fields as `Duration` or `Size`; `dec_hook` turns the text into a
number while msgspec validates, so a bad value is reported with its field path.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
    "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}


class Duration(float):
    """Seconds, as a float."""


class Size(int):
    """Bytes, as an int."""


def parse_duration(value: object) -> Duration:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return Duration(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
    raise ValueError(f"invalid duration {value!r}: expected e.g. \"500ms\", \"30s\", \"5m\", \"1h\" or seconds")


def parse_size(value: object) -> Size:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return Size(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return Size(int(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"invalid size {value!r}: expected e.g. \"512KiB\", \"256MiB\", \"1GiB\" or bytes")


def dec_hook(type_: type, obj: object) -> object:
    if type_ is Duration:
        return parse_duration(obj)
    if type_ is Size:
        return parse_size(obj)
    raise NotImplementedError(type_)


def enc_hook(obj: object) -> object:
    if isinstance(obj, Duration):
        return float(obj)
    if isinstance(obj, Size):
        return int(obj)
    raise NotImplementedError(type(obj))


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 30 -> "30s", 0.5 -> "500ms", 300 -> "5m"."""
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and float(seconds / factor).is_integer():
            return f"{int(seconds // factor)}{unit}"
    if float(seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"
