"""The zygote's warm-up: run a runner's code paths before forking any runner.

CPython 3.11 specialises ("quickens") hot code in place, fills its type and method caches,
and allocates its first objects of each kind as code runs. Done in each runner, every one of
those writes lands in the runner's own copy of a page it shares with the zygote. Done once
here, before `gc.freeze()`, runners share the result. Measured: idle runner USS -0.5 MB,
active -0.8 MB.

What runs is the real thing: a RunnerConfig frame, Runner setup, a connection to a results
socket of our own, `start_run` of a small trusted sh plugin in a temporary folder, all in
Python (as a plugin that outlasts the C fast path's wait runs), the event loop until the run
ends, a second run through the C fast path (`run_fast`), the result frames to the
"publisher", their acks. Measured with the fast path, against warming it alone: active runner
USS 1.79 -> 1.75 MB with a quick plugin, 2.03 -> 1.92 MB with one that takes 0.1 s. Nothing is
left open, no signal handler is installed, nothing is logged; the plugin runs as the zygote's
user (run_as None). An optimisation only: the zygote starts without it if anything goes wrong.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

import msgspec

from runner.framing import MAX_FRAME, Channel
from runner import main as runner_main
from runner.main import Runner, _remove_tree
from runner.wire import (Acked, PluginInfo, RunLimits, RunnerConfig, RunnerToPublisher, SupervisorToRunner)

PLUGIN = b"#!/bin/sh\ncat >/dev/null\necho '{\"status\":\"satisfied\",\"observations\":[{\"title\":\"warm\"}]}'\n"


def warm_up(rounds: int = 10) -> None:
    # not tempfile: it imports random (another fork handler), shutil, bz2, lzma...
    tmp = f"/tmp/ar-warm-{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(tmp, 0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        folder = os.path.join(tmp, "plugins", "warm", "1")
        os.makedirs(folder, 0o755)
        with open(os.path.join(folder, "plugin.toml"), "w") as f:
            f.write('name = "warm"\nversion = "1"\nentrypoint = "warm"\nprotocol = "assessment/1"\n')
        with open(os.path.join(folder, "warm"), "wb") as f:
            f.write(PLUGIN)
        os.chmod(os.path.join(folder, "warm"), 0o755)
        os.mkdir(os.path.join(tmp, "scratch"), 0o700)  # made ahead: a run trusts it empty only later (SCRATCH_TICK_NS)
        time.sleep(2 * runner_main.SCRATCH_TICK_NS / 1e9)
        path = os.path.join(tmp, "results.sock")
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(5.0)
        cfg = RunnerConfig(
            job_uuid="00000000-0000-4000-8000-000000000000", revision="0",
            runtime_uuid="00000000-0000-4000-8000-000000000001", job_json=b"{}", config_json=b"{}",
            plugin=PluginInfo("warm", "1", None), plugin_url=None, plugin_dirs=[os.path.join(tmp, "plugins")],
            require_sha256=False, title="warm", labels={}, assessment_plan_uuid=None, component_uuid=None,
            control_id=None, interval=60.0, timeout=10.0, stop_grace=1.0, run_on_start=False, splay=0.0,
            limits=RunLimits(None, None, None, None, 1 << 20), scratch_dir=os.path.join(tmp, "scratch"),
            run_as=None, log_level="critical", publisher_socket=path)
        frame = msgspec.msgpack.encode(cfg)
        for _ in range(rounds):
            _one_round(frame, listener)
    finally:
        listener.close()
        _remove_tree(tmp)


def _one_round(frame: bytes, listener: socket.socket) -> None:
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    channel = Channel(to_r, from_w, SupervisorToRunner, max_frame=MAX_FRAME)
    runner = publisher = None
    try:
        os.write(to_w, len(frame).to_bytes(4, "big") + frame)
        runner = Runner(channel, channel.read()[0])
        runner.report_state()
        runner.results.connect(time.monotonic())
        conn, _ = listener.accept()
        fd = conn.detach()
        publisher = Channel(fd, fd, RunnerToPublisher)
        runner.tick(time.monotonic())  # not due: nothing starts
        fast, runner_main.FASTPATH = runner_main.FASTPATH, False
        try:  # a run all in Python, as a plugin that outlasts the fast path's wait has
            runner.start_run(time.monotonic())  # as serve() does when a run is due
        finally:
            runner_main.FASTPATH = fast
        _finish(runner)
        sent = 1
        if fast and runner._clean_scratch is not None:  # a second run, the usual way
            runner.next_run_at = time.monotonic()
            if runner.run_fast():
                _finish(runner)
                sent += 1
        uuids = []
        deadline = time.monotonic() + 10
        while len(uuids) < sent and select.select([publisher.rfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            uuids += [message.last.uuid for message in publisher.read()]
        publisher.send(Acked(uuids))
        runner.results.read_acks()
        os.read(from_r, 1 << 16)
    finally:
        if runner is not None:
            runner.close()
        if publisher is not None:
            publisher.close()
        for fd in (to_r, to_w, from_r, from_w):
            os.close(fd)


def _finish(runner: Runner) -> None:
    deadline = time.monotonic() + 10
    while runner.run is not None and time.monotonic() < deadline:
        runner.poller.poll(1.0)
        runner.tick(time.monotonic())


def fill_free_blocks() -> int:
    """Fill every free block of CPython's small-object allocator, so that what a runner
    allocates after the fork lands in pools of its own rather than in free slots scattered
    over pages it shares with us (each such object costs the runner a copy of a 4 KiB page).
    The fillers live in the zygote, never touched again. Returns how many were made."""
    keep = _FILLERS
    made = 0
    for _ in range(3):  # making the fillers frees a few blocks of its own
        counts = _free_blocks()
        for size, free in counts.items():
            if size <= 16:
                keep.extend([object() for _ in range(free)])
            elif size <= 32:
                keep.extend([float(i) + 0.5 for i in range(free)])
            else:
                n = size - 33  # a bytes object of n bytes asks for 33 + n
                keep.extend([bytes(n) for _ in range(free)])
            made += free
    return made


_FILLERS: list = []


def _free_blocks() -> dict[int, int]:
    """{block size: free blocks in pools in use}, from sys._debugmallocstats (printed on fd 2)."""
    fd = os.memfd_create("mallocstats", os.MFD_CLOEXEC)
    try:
        saved = os.dup(2)
        try:
            os.dup2(fd, 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        text = os.pread(fd, os.lseek(fd, 0, os.SEEK_CUR), 0).decode(errors="replace")
    finally:
        os.close(fd)
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and all(p.isdigit() for p in parts) and int(parts[4]):
            counts[int(parts[1])] = int(parts[4])
    return counts
