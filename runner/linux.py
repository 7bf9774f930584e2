"""The few Linux process controls Python's os module lacks, through prctl(2)."""

from __future__ import annotations

import ctypes
import os
import signal

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MEMORY_MERGE = 67  # Linux 6.4


def prctl(option: int, arg: int = 0) -> None:
    if _prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Get `sig` when our parent dies; exit now if it already has (the race before prctl)."""
    prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != expected_parent:
        os._exit(1)


def set_child_subreaper() -> None:
    """Orphaned descendants (daemonised plugin children) are re-parented to us, not to init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def ksm_running() -> bool:
    """Whether the host's KSM merges pages (/sys/kernel/mm/ksm/run is 1)."""
    try:
        with open("/sys/kernel/mm/ksm/run", "rb") as f:
            return f.read().strip() == b"1"
    except OSError:
        return False


def set_memory_merge(on: bool) -> bool:
    """Offer every page of this process (and, inherited across fork and exec, of its children)
    to KSM, or take them back. Whether anything is merged is the host's choice
    (/sys/kernel/mm/ksm/run). False where the kernel has no such prctl (before 6.4, or no KSM)."""
    try:
        prctl(PR_SET_MEMORY_MERGE, int(on))
    except OSError:
        return False
    return True


def set_process_name(name: str) -> None:
    """What ps -o comm and top show (15 bytes at most).

    Written to /proc (what PR_SET_NAME sets): a ctypes call in a runner copies the pages of
    the ctypes objects it touches (a string buffer, a cast, the argument conversions)."""
    try:
        fd = os.open("/proc/thread-self/comm", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, name.encode()[:15])
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)


# An argument of spaces the supervisor appends when it starts the zygote and the publisher:
# room in their argv for the names set_title writes (a runner's, with its job uuid and
# plugin, is longer than the command line that started the zygote). It is dropped by
# strip_title_room before the arguments are read.
TITLE_ROOM = " " * 160


def strip_title_room(argv: list[str]) -> list[str]:
    return [a for a in argv if a != TITLE_ROOM]


_arg_area: tuple[int, int] | None = None


def set_title(title: str) -> bool:
    """What ps -o args and /proc/PID/cmdline show: `title`, written over this process's own
    argv strings (no setproctitle; comm is left alone).

    The argv area is [arg_start, arg_end) of /proc/self/stat; it is written through
    /proc/self/mem, with no ctypes call (a call in a runner copies the pages of the ctypes
    objects it touches). A title longer than the area is truncated. It ends with a NUL and
    the rest of the area is spaces: when the area's last byte is not a NUL, the kernel
    shows argv up to the first NUL (as it does for setproctitle), so cmdline is exactly the
    title. The environment strings after the area are left alone: C code may still read
    them. A runner
    inherits the zygote's stack, so the write costs it one private page. False when /proc
    cannot be used."""
    global _arg_area
    try:
        if _arg_area is None:  # found once: a forked runner has the zygote's, at the same address
            fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
            try:
                stat = os.read(fd, 4096)
            finally:
                os.close(fd)
            fields = stat[stat.rindex(b")") + 2:].split()  # fields[0] is field 3 (state)
            _arg_area = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49
        start, end = _arg_area
        room = end - start
        if room < 2:
            return False
        data = title.encode()[:room - 1]
        fd = os.open("/proc/self/mem", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data + b"\0" + b" " * (room - len(data) - 1), start)
        finally:
            os.close(fd)
        return True
    except (OSError, ValueError, IndexError):
        return False


def one_cpu_for(key: str) -> int:
    """The one CPU, of those we may use, that a runner keeps to: chosen by `key` (stable across
    restarts, spread across jobs); -1 when there is no choice to make. The zygote picks it
    before forking a batch and sets it on each runner right after forking it, before the
    runner starts anything (so that the runner allocates nothing for it).

    Why: a run's processes then start, run and wake their runner on one warm CPU. Left to
    the scheduler, a fork or an exec is often placed on another, idle CPU, and waking that
    one (a VM exit on a virtual machine) and running there cold cost about 0.15 ms a run."""
    try:
        cpus = os.sched_getaffinity(0)
    except OSError:
        return -1
    return pick_cpu(key, cpus) if len(cpus) > 1 else -1


def pick_cpu(key: str, cpus: set[int] | frozenset[int]) -> int:
    """One of `cpus`, the same for the same key (FNV-1a of it)."""
    h = 2166136261
    for b in key.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return sorted(cpus)[h % len(cpus)]


def open_children() -> int:
    """An fd on this thread's /proc children list, for has_children (-1 when there is none).
    It names the thread that opened it: a forked child opens its own."""
    try:
        return os.open("/proc/thread-self/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def has_children(fd: int) -> bool:
    """Whether this single-threaded process has any child, zombies included: one read of
    `fd` (from open_children). True when /proc cannot tell (no fd, or the read fails), so
    that the caller looks the long way."""
    if fd < 0:
        return True
    try:
        return bool(os.pread(fd, 64, 0))
    except OSError:
        return True


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (needs CONFIG_PROC_CHILDREN, else [])."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out
