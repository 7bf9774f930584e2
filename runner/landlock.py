"""Landlock confinement and ambient capabilities (SPEC §6 Confinement, Identity).

runner/ar_exec.c applies both when the exec helper is built; this module does the same from
Python for runners that fork instead (runner/sandbox.py `_exec_child`), builds the helper's
CONFINE argument, and gives the kernel's Landlock ABI for the supervisor's status. ctypes is
loaded only when one of these is called: most processes that import this never need it.

Rules, as in ar_exec.c: every filesystem right the kernel's ABI knows is handled (so what is
not granted is denied); read and execute beneath /; every right beneath the scratch folder
and each configured write path (only the file rights on a path that is not a folder); the
file rights on /dev/null, /dev/zero and /dev/full; with ABI >= 4 and no network, TCP bind and
connect handled with no rule allowing them; with ABI >= 6, signals and abstract Unix sockets
scoped to the run's own processes.
"""

from __future__ import annotations

import os

import msgspec

# the same numbers on every architecture (the unified syscall table, from 424 on)
SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
FS_FILE = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

DEVICES = ("/dev/null", "/dev/zero", "/dev/full")

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAPABILITY_VERSION_3 = 0x20080522


class Confine(msgspec.Struct, frozen=True):
    """A job's confinement: its extra write paths (absolute, without ':') and whether its
    plugin may use TCP (plugin.toml `network`; Sandbox.spawn may say so per run instead)."""

    write_paths: tuple[str, ...] = ()
    network: bool = False


class Failure(Exception):
    """A step that failed, worded as ar-exec words it: "landlock write path /x: No such file..."."""


def helper_arg(write_paths: tuple[str, ...], network: bool) -> str:
    """ar-exec's CONFINE argument (runner/ar_exec.c)."""
    for path in write_paths:
        if not path.startswith("/") or ":" in path:
            raise ValueError(f"write path {path!r}: an absolute path without ':' is needed")
    return "l" + ("n" if network else "") + "".join(":" + p for p in write_paths)


_lib = None
_abi: int | None = None


def _load():
    """libc's syscall, prctl and capset, and the kernel structures, built once per process."""
    global _lib
    if _lib is None:
        import ctypes

        class RulesetAttr(ctypes.Structure):
            _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                        ("scoped", ctypes.c_uint64)]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1  # the kernel's struct is packed: 12 bytes
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        class CapHeader(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class CapData(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        prctl = libc.prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        capset = libc.capset
        capset.argtypes = [ctypes.POINTER(CapHeader), ctypes.POINTER(CapData)]
        capset.restype = ctypes.c_int
        _lib = (ctypes, syscall, prctl, capset, RulesetAttr, PathBeneath, CapHeader, CapData)
    return _lib


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (not built in, not enabled at
    boot, or the call is filtered). One system call, once per process; creates nothing."""
    global _abi
    if _abi is None:
        ctypes, syscall = _load()[:2]
        version = syscall(ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_long(0),
                          ctypes.c_long(CREATE_RULESET_VERSION))
        _abi = version if version > 0 else 0
    return _abi


def _error(what: str) -> Failure:
    import ctypes

    err = ctypes.get_errno()
    return Failure(f"{what}: {os.strerror(err)}")


def ruleset(cwd: str, write_paths: tuple[str, ...], network: bool) -> int:
    """A ruleset for one run, as a file descriptor (close-on-exec), or -1 where the kernel has
    no Landlock. Call it while still root (the paths are opened now, as in ar-exec); enforce
    it with restrict_self after the uid change and no_new_privs."""
    version = abi()
    if version == 0:
        return -1
    ctypes, syscall, _, _, RulesetAttr, PathBeneath = _load()[:6]
    handled = FS_ABI1
    size = 8
    if version >= 2:
        handled |= FS_REFER
    if version >= 3:
        handled |= FS_TRUNCATE
    if version >= 5:
        handled |= FS_IOCTL_DEV
    attr = RulesetAttr(handled, 0, 0)
    if version >= 4:
        size = 16
        if not network:
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # and no rule allows any
    if version >= 6:
        size = 24
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    fd = syscall(ctypes.c_long(SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_long(size), ctypes.c_long(0))
    if fd < 0:
        raise _error("landlock ruleset")
    rule = PathBeneath()

    def allow(path: str, access: int, optional: bool, step: str) -> None:
        try:
            if access & ~FS_FILE:
                try:
                    target = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                except NotADirectoryError:
                    access &= FS_FILE  # the kernel refuses folder rights on anything else
                    target = os.open(path, os.O_PATH | os.O_CLOEXEC)
            else:
                target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if optional:
                return
            raise Failure(f"{step} {path}: {os.strerror(2)}") from None
        except OSError as e:
            raise Failure(f"{step} {path}: {e.strerror}") from None
        try:
            rule.allowed_access = access
            rule.parent_fd = target
            if syscall(ctypes.c_long(SYS_ADD_RULE), ctypes.c_long(fd), ctypes.c_long(RULE_PATH_BENEATH),
                       ctypes.byref(rule), ctypes.c_long(0)) < 0:
                raise _error(f"{step} {path}")
        finally:
            os.close(target)

    try:
        allow("/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR, False, "landlock read")
        allow(cwd, handled, False, "landlock scratch")
        for device in DEVICES:
            allow(device, handled & FS_FILE, True, "landlock write path")
        for path in write_paths:
            allow(path, handled, False, "landlock write path")
    except BaseException:
        os.close(fd)
        raise
    return fd


def restrict_self(fd: int) -> None:
    """Enforce a ruleset on this process and all it starts (needs no_new_privs); closes fd."""
    if fd < 0:
        return
    ctypes, syscall = _load()[:2]
    try:
        if syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_long(fd), ctypes.c_long(0)) < 0:
            raise _error("landlock restrict")
    finally:
        os.close(fd)


def _prctl(what: str, option: int, a: int = 0, b: int = 0) -> None:
    if _load()[2](option, a, b, 0, 0) != 0:
        raise _error(what)


def trim_bounding_set(grant: int) -> None:
    """Keep only the capabilities in `grant` (a bit mask) in the bounding set. Needs
    CAP_SETPCAP: before the uid change."""
    ctypes, _, prctl = _load()[:3]
    for cap in range(64):
        if grant >> cap & 1:
            continue
        if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: past the kernel's last capability
                return
            raise _error("drop capabilities")


def keep_capabilities() -> None:
    """Keep the permitted set across the coming setuid, to hand the grant on."""
    _prctl("keepcaps", PR_SET_KEEPCAPS, 1)


def grant_capabilities(grant: int) -> None:
    """After the uid change: `grant` as the effective, permitted, inheritable and ambient
    sets, so that it survives the exec of a file that has no capabilities of its own."""
    ctypes, _, prctl, capset, _, _, CapHeader, CapData = _load()
    data = (CapData * 2)()
    for i in range(2):
        word = grant >> (32 * i) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    if capset(ctypes.byref(CapHeader(CAPABILITY_VERSION_3, 0)), data) != 0:
        raise _error("capset")
    for cap in range(64):
        if grant >> cap & 1:
            _prctl("ambient capability", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
