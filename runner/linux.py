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


def has_children() -> bool:
    """Whether this single-threaded process has any child, zombies included (one open and
    one read). True when /proc cannot tell, so that the caller looks the long way."""
    try:
        fd = os.open("/proc/thread-self/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        return bool(os.read(fd, 64))
    except OSError:
        return True
    finally:
        os.close(fd)


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
