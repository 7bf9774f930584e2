"""The zygote builds each runner of a batch before forking any (runner.main.prepare): every
runner then holds only its own files, with its own pid where a pid is meant, and the zygote
keeps nothing of them."""

from __future__ import annotations

import gc
import os
import signal
import time

import msgspec
import psutil
import pytest

from conftest import make_plugin, spec, wait_for
from runner.main import prepare
from runner.wire import PluginInfo, RunLimits, RunnerConfig


def open_files(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def config(folder, **changes) -> RunnerConfig:
    """A runner's config for building one in this process (no cgroup, no uid of its own)."""
    return msgspec.structs.replace(RunnerConfig(
        job_uuid="00000000-0000-4000-8000-000000000000", revision="0",
        runtime_uuid="00000000-0000-4000-8000-000000000001", job_json=b"{}", config_json=b"{}",
        plugin=PluginInfo("p", "1", None), plugin_url=None, plugin_dirs=[str(folder)],
        require_sha256=False, title="t", labels={}, assessment_plan_uuid=None, component_uuid=None,
        control_id=None, interval=60.0, timeout=10.0, stop_grace=1.0, run_on_start=False, splay=0.0,
        limits=RunLimits(None, None, None, None, 1 << 20), scratch_dir=str(folder / "scratch"),
        run_as=None, log_level="critical", publisher_socket=str(folder / "results.sock")), **changes)


def job_of(svc, runner_pid: int) -> str:
    return next(j["uuid"] for j in svc.status()["jobs"] if j["pid"] == runner_pid)


@pytest.mark.timeout(60)
def test_each_runner_of_a_batch_holds_only_its_own_files_and_the_zygote_none_of_them(service_factory):
    svc = service_factory()
    make_plugin(svc.plugins, "ok", '#!/bin/sh\necho \'{"status": "satisfied"}\'\n')
    first = spec(interval="1h")
    svc.write_spec("first.json", first)
    svc.start()
    svc.wait_result(first["uuid"])  # the zygote is warm and has forked once
    zygote = psutil.Process(svc.job(first["uuid"])["pid"]).parent()
    before = open_files(zygote.pid)
    docs = [spec(interval="1h") for _ in range(6)]
    for i, doc in enumerate(docs):  # picked up in one pass: one batch
        svc.write_spec(f"job-{i}.json", doc)
    for doc in docs:
        svc.wait_result(doc["uuid"])
    runners = [svc.job(doc["uuid"])["pid"] for doc in docs]
    files = {pid: open_files(pid) for pid in runners}
    # the zygote closed every pipe and file it had for them
    assert sorted(open_files(zygote.pid).values()) == sorted(before.values())
    pipes: dict[str, set[int]] = {}
    for pid, fds in files.items():
        uuid = job_of(svc, pid)
        for fd, target in fds.items():
            if fd > 2 and target.startswith("pipe:"):
                pipes.setdefault(target, set()).add(pid)
            if target.endswith("/children"):  # has_children reads the runner's own list
                assert target == f"/proc/{pid}/task/{pid}/children", (pid, target)
            if target.startswith("/sys/fs/cgroup"):  # its job's counters, no other job's
                assert uuid in target, (pid, target)
        assert sum(t == "anon_inode:[eventpoll]" for t in fds.values()) == 1, fds
        assert sum(t.startswith("/memfd:stdin") for t in fds.values()) == 2, fds  # its own, made in the zygote
    shared = {pipe: pids for pipe, pids in pipes.items() if len(pids) > 1}
    assert not shared, shared  # no runner holds a sibling's pipe to the supervisor
    assert len({len(fds) for fds in files.values()}) == 1, files  # the same files, each its own


@pytest.mark.timeout(60)
def test_a_plugin_dies_with_its_runner(service_factory):
    """ar-exec is given the runner's pid (not the zygote's, where the runner was built): the
    plugin's parent-death signal, checked against it, fires when the runner is killed."""
    svc = service_factory()
    make_plugin(svc.plugins, "slow", '#!/bin/sh\ncat >/dev/null\nexec sleep 30\n')
    doc = spec(plugin="slow", interval="1h", timeout="60s")
    svc.write_spec("slow.json", doc)
    svc.start()
    runner = wait_for(lambda: (svc.job(doc["uuid"]) or {}).get("pid"), what="the runner")
    plugin = wait_for(lambda: next((p for p in psutil.Process(runner).children()
                                    if p.name() == "sleep"), None), what="the plugin")
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: not plugin.is_running() or plugin.status() == psutil.STATUS_ZOMBIE, 10,
             what="the plugin to die with its runner")


def test_a_runner_built_in_the_zygote_leaves_no_cyclic_garbage_there(tmp_path):
    """What prepare built and the zygote drops after the fork goes with its last reference:
    gc.freeze() put it in the permanent generation, where a cycle would stay for good."""
    cfg = config(tmp_path)
    frame = msgspec.msgpack.encode(cfg)
    garbage = []
    for _ in range(3):  # the first in a process makes msgspec's one-time type garbage
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        os.write(to_w, len(frame).to_bytes(4, "big") + frame)
        gc.collect()
        ready = prepare(to_r, from_w, 1.0)
        assert ready.runner is not None and ready.frames[0] == cfg
        assert ready.fds and all(fd > 2 for fd in ready.fds)
        for fd in ready.fds + [to_r, to_w, from_r, from_w]:
            os.close(fd)
        del ready
        garbage.append(gc.collect())
    assert garbage[1:] == [0, 0], garbage


def test_prepare_leaves_an_incomplete_config_to_the_runner():
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    try:
        os.write(to_w, (1000).to_bytes(4, "big") + b"\x80")  # a frame's first byte of 1000
        ready = prepare(to_r, from_w, 0.05)
        assert ready.runner is None and ready.frames == [] and ready.fds == []
        ready = prepare(from_r, to_w, 0.01)  # nothing written at all: waits, then gives up
        assert ready.runner is None and ready.frames == []
    finally:
        for fd in (to_r, to_w, from_r, from_w):
            os.close(fd)


def test_a_config_the_zygote_cannot_build_from_leaves_no_file_open_there(tmp_path):
    """The runner meets the error again and reports it; the zygote must not keep what the
    failed build opened (it builds every runner the supervisor asks for, for as long as it runs)."""
    cfg = config(tmp_path, config_json=b"{not json")
    frame = msgspec.msgpack.encode(cfg)
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        os.write(to_w, len(frame).to_bytes(4, "big") + frame)
        ready = prepare(to_r, from_w, 1.0)
        assert ready.runner is None and ready.frames == [cfg] and ready.fds == []  # left to the runner
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        for fd in (to_r, to_w, from_r, from_w):
            os.close(fd)


def test_a_runner_taken_over_after_its_first_slot_passed_waits_for_the_next(tmp_path):
    """Building a batch of 200 takes the zygote a while; a runner's first run must not start
    late (at once) because the slot picked while building it has passed since."""
    cfg = config(tmp_path, interval=0.5)
    frame = msgspec.msgpack.encode(cfg)
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    try:
        os.write(to_w, len(frame).to_bytes(4, "big") + frame)
        runner = prepare(to_r, from_w, 1.0).runner
        first = runner.next_run_at
        time.sleep(max(0.0, first - time.monotonic()) + 0.1)  # its first slot passes
        runner.adopt()
        assert runner.next_run_at > time.monotonic()
        assert abs((runner.next_run_at - first) / 0.5 - round((runner.next_run_at - first) / 0.5)) < 1e-6  # on the grid
        runner.close()
    finally:
        for fd in (to_r, to_w, from_r, from_w):
            os.close(fd)
