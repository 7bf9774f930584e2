"""The plugin protocols of SPEC §6: what a plugin is handed, and how its output is read.

`assessment/1`: JSON document on stdin, one JSON object on stdout.
`nagios`: exit code is the status; first output line "text | perfdata" is one observation.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import time
from typing import Any, Literal

import msgspec

from runner.units import format_duration, format_size

MEMORY_ERROR_MARKS = (b"MemoryError", b"Cannot allocate memory", b"bad_alloc", b"out of memory")
# what shells and libcs print when fork() fails with EAGAIN under RLIMIT_NPROC / pids.max
PROCESS_LIMIT_MARKS = (b"fork: Resource temporarily unavailable", b"fork: retry", b"Cannot fork", b"can't fork",
                       b"BlockingIOError: [Errno 11]")
CPU_LIMIT_MARK = b"CPU time limit exceeded"


class PluginOutput(msgspec.Struct):
    """stdout of an assessment/1 plugin. The lists are passed through unchanged."""

    status: Literal["satisfied", "not-satisfied"]
    title: str | None = None
    observations: list[Any] = []
    findings: list[Any] = []
    risks: list[Any] = []
    subjects: list[Any] = []
    logs: list[Any] = []


_output_decoder = msgspec.json.Decoder(PluginOutput)


class OutputError(ValueError):
    """The plugin's output does not parse; the message is the result's reason."""


def iso_time(t: float) -> str:
    """2026-11-27T12:00:00.123456Z (UTC, microseconds)."""
    whole = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((t - whole) * 1e6):06d}Z"


def new_uuid() -> str:
    """A random (version 4) UUID without importing the uuid module in every runner."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class StdinFile:
    """The plugin's stdin: one memfd per runner, rewritten before each run (two system calls,
    where a memfd per run costs four and an inode, a dentry and a file made and freed).

    The document is the same for every run but its run_uuid, so it is built once around it.
    Every run gets the same read-only open file, rewound. The document's length never changes
    (a run uuid is always 36 characters), so the memfd's size is sealed; it is mode 0400, so a
    plugin of another uid cannot open it for writing through /proc; and each run rewrites all
    of it, so nothing one run could change reaches the next."""

    def __init__(self, job_json: bytes, config_json: bytes):
        self._head = b'{"protocol":"assessment/1","run_uuid":"'
        self._tail = b'","job":' + job_json + b',"config":' + config_json + b"}"
        self._rw = self._ro = -1
        self._size = -1

    def render(self, run_uuid: str) -> bytes:
        return self._head + run_uuid.encode() + self._tail

    def prepare(self, run_uuid: str) -> int:
        """The fd to give the plugin as its stdin, holding this run's document."""
        doc = self.render(run_uuid)
        if self._rw >= 0 and len(doc) == self._size:
            os.pwrite(self._rw, doc, 0)  # never short: the pages are there and the size is fixed
            os.lseek(self._ro, 0, os.SEEK_SET)
            return self._ro
        self.close()
        rw = os.memfd_create("stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(doc)
            while view:
                view = view[os.write(rw, view):]
            fcntl.fcntl(rw, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            os.fchmod(rw, 0o400)
            try:
                self._ro = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # no /proc: the plugin gets our open file (still rewritten each run)
                self._ro = os.dup(rw)
        except BaseException:
            os.close(rw)
            raise
        self._rw, self._size = rw, len(doc)
        return self._ro

    def close(self) -> None:
        for fd in (self._rw, self._ro):
            if fd >= 0:
                os.close(fd)
        self._rw = self._ro = -1


def parse_assessment_output(stdout: bytes) -> PluginOutput:
    if not stdout.strip():
        raise OutputError("invalid output: empty, expected one JSON object")
    try:
        return _output_decoder.decode(stdout)
    except msgspec.ValidationError as e:
        text = str(e)
        message, _, where = text.rpartition(" - at `")
        where = where.rstrip("`") if message else "$"
        message = message or text
        if where == "$.status" and message.startswith("Invalid enum value"):
            got = message.removeprefix("Invalid enum value").strip()
            message = f'expected one of "satisfied", "not-satisfied", got {got}'
        return _raise(f"invalid output: {where}: {message}")
    except msgspec.DecodeError as e:
        return _raise(f"invalid output: not one JSON object: {e}")


def _raise(reason: str):
    raise OutputError(reason)


def parse_nagios_output(stdout: bytes, exit_code: int, plugin_name: str, collected: str,
                        run_uuid: str) -> tuple[str, str | None, list[Any]]:
    """(status, reason, observations) for a monitoring-plugins style run."""
    text = stdout.decode("utf-8", errors="replace")
    first = text.split("\n", 1)[0]
    summary, _, perf = first.partition("|")
    props = [{"name": label.replace("''", "'") if quoted else label, "value": item}
             for item, quoted, label in _split_perfdata(perf)]
    observation: dict[str, Any] = {
        "uuid": run_uuid,
        "title": plugin_name,
        "description": summary.strip(),
        "methods": ["TEST"],
        "collected": collected,
    }
    if props:
        observation["props"] = props
    if exit_code == 0:
        return "satisfied", None, [observation]
    if exit_code in (1, 2):
        return "not-satisfied", None, [observation]
    return "error", f"exit code {exit_code}" + (f": {summary.strip()}" if summary.strip() else ""), [observation]


_PERF_ITEM = re.compile(r"('((?:[^']|'')*)'|[^\s=']+)=\S*")


def _split_perfdata(perf: str) -> list[tuple[str, bool, str]]:
    """(item, quoted, label) for each `label=value;warn;crit;min;max` ('quoted labels' may hold spaces)."""
    out = []
    for m in _PERF_ITEM.finditer(perf):
        quoted = m.group(2) is not None
        out.append((m.group(0), quoted, m.group(2) if quoted else m.group(1)))
    return out

def failure_reason(status: int, rusage, limits, stderr_tail: bytes, oom_killed: bool = False,
                   pids_exhausted: bool = False) -> str:
    """Why a run that ended abnormally failed, naming the limit it hit when it hit one.

    `oom_killed` and `pids_exhausted` come from the job's cgroup (memory.events, pids.events)
    when cgroups are in use; under rlimits the signal, the CPU used and stderr tell.
    """
    cpu_used = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
    if oom_killed and limits.memory:
        return f"killed: memory limit {format_size(limits.memory)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if limits.cpu_time and (sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= limits.cpu_time - 0.05)):
            return f"killed: cpu limit {format_duration(limits.cpu_time)}"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"killed by signal {sig} ({name})"
    code = os.WEXITSTATUS(status)
    if limits.cpu_time and (code == 128 + signal.SIGXCPU or CPU_LIMIT_MARK in stderr_tail):
        return f"killed: cpu limit {format_duration(limits.cpu_time)}"  # a child of the plugin hit it
    if limits.memory and any(mark in stderr_tail for mark in MEMORY_ERROR_MARKS):
        return f"memory limit {format_size(limits.memory)} reached: allocation failed, exit code {code}"
    if limits.processes and (pids_exhausted or any(mark in stderr_tail for mark in PROCESS_LIMIT_MARKS)):
        return f"process limit {limits.processes} reached: exit code {code}"
    return f"exit code {code}"
