"""Logging for runners, without the logging module.

`logging` imports `threading`; both register fork handlers and hold objects that every
runner forked from the zygote would touch, and so copy (about 0.1-0.2 MB per runner). A
runner logs rarely, so this writes each line itself, in the same two formats as
supervisor/log.py: text (`2026-12-01 10:00:00,123 WARNING runner <job>[pid]: ...`) or JSON.
"""

from __future__ import annotations

import os
import time

import msgspec

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class Log:
    def __init__(self, name: str, fmt: str = "text", level: str = "info"):
        self.name = name
        self.json = fmt == "json"
        self.level = _LEVELS.get(level.lower(), 20)

    def debug(self, message: str, *args) -> None:
        if self.level <= 10:
            self._emit("debug", message, args)

    def info(self, message: str, *args) -> None:
        if self.level <= 20:
            self._emit("info", message, args)

    def warning(self, message: str, *args) -> None:
        if self.level <= 30:
            self._emit("warning", message, args)

    def error(self, message: str, *args) -> None:
        if self.level <= 40:
            self._emit("error", message, args)

    def _emit(self, level: str, message: str, args: tuple) -> None:
        text = message % args if args else message
        now = time.time()
        millis = int(now % 1 * 1000)
        if self.json:
            line = msgspec.json.encode({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z",
                "level": level, "process": self.name, "pid": os.getpid(), "message": text}) + b"\n"
        else:
            line = (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))},{millis:03d} {level.upper()} "
                    f"{self.name}[{os.getpid()}]: {text}\n").encode("utf-8", errors="replace")
        try:
            os.write(2, line)
        except OSError:
            pass  # nowhere to say it
