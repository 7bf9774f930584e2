"""Durable file writes: temp file, fsync, rename, fsync of the folder."""

from __future__ import annotations

import os
import time


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create or truncate `path`, write all of `data` and fsync it (no rename: see write_atomic)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old content or the new, never a torn file, even across a power cut."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    write_synced(tmp, data, mode)
    os.replace(tmp, path)
    fsync_dir(folder)


def remove_durably(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path) or ".")


def set_aside(path: str, state_dir: str) -> str:
    """Move a state file that does not load to state_dir/quarantine/ (kept for an operator);
    returns what happened, for the one log line that reports it."""
    folder = os.path.join(state_dir, "quarantine")
    target = os.path.join(folder, f"{os.path.basename(path)}-{time.time_ns()}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.replace(path, target)
        fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:  # a read-only state_dir: it stays, and is ignored again next time
        return f"left in place (cannot move it: {e.strerror})"
    return f"moved to {target}"
