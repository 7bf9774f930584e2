"""A full or read-only state_dir (SPEC §7): nothing stops, nothing acknowledged is lost.

Unit tests of the outbox (a failed append leaves no garbage) and of the publisher (results
wait in memory, unacknowledged, and are written once the outbox takes writes again); then
the real service with state_dir on a small tmpfs in its own mount namespace (root only),
filled up and made read-only from the test with nsenter.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import msgspec
import pytest

from conftest import REPO, control_status, make_plugin, spec, wait_for
from supervisor.publisher import outbox as outbox_module
from supervisor.publisher.outbox import Outbox

# -- the outbox ---------------------------------------------------------------------------


def _failing_write(after: int, err: int = errno.ENOSPC):
    """os.write that writes `after` bytes in all, then fails (a disk that fills mid-batch)."""
    real = os.write
    left = [after]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(err, os.strerror(err))
        n = real(fd, bytes(data[:left[0]]))
        left[0] -= n
        return n
    return write


def test_a_failed_append_is_cut_back_and_the_next_one_succeeds(tmp_path, monkeypatch):
    box = Outbox(str(tmp_path / "o"), 1 << 20, sinks=["a"])
    box.append_many([b"one", b"two"])
    size = os.path.getsize(box._segments[-1].path)
    monkeypatch.setattr(outbox_module.os, "write", _failing_write(10))
    with pytest.raises(OSError):
        box.append_many([b"x" * 100, b"y" * 100])
    assert os.path.getsize(box._segments[-1].path) == size  # the partial record is gone
    assert box.pending("a") == 2
    monkeypatch.undo()
    box.append_many([b"three"])
    assert [p for _, p in box.read("a", 10)] == [b"one", b"two", b"three"]
    box.close()
    again = Outbox(str(tmp_path / "o"), 1 << 20, sinks=["a"])
    assert [p for _, p in again.read("a", 10)] == [b"one", b"two", b"three"]
    again.close()


def test_a_failed_append_that_began_segments_removes_them(tmp_path, monkeypatch):
    box = Outbox(str(tmp_path / "o"), 1 << 20, segment_bytes=64, sinks=["a"])
    box.append_many([b"a" * 50])
    before = sorted(os.listdir(tmp_path / "o"))
    monkeypatch.setattr(outbox_module.os, "write", _failing_write(150))
    with pytest.raises(OSError):
        box.append_many([b"b" * 50, b"c" * 50, b"d" * 50, b"e" * 50])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "o")) == before
    box.append_many([b"f" * 50, b"g" * 50])
    assert [p[:1] for _, p in box.read("a", 10)] == [b"a", b"f", b"g"]
    box.close()


def test_a_cursor_that_cannot_be_saved_is_retried_and_keeps_its_segment(tmp_path, monkeypatch):
    box = Outbox(str(tmp_path / "o"), 1 << 20, segment_bytes=64, sinks=["a"])
    box.append_many([b"a" * 60, b"b" * 60, b"c" * 60])
    segments = len(box._segments)

    def refuse(path, data, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(outbox_module, "write_atomic", refuse)
    records = box.read("a", 10)
    box.advance("a", records[-1][0])  # does not raise: kept in memory
    assert box.cursor_error and "Read-only" in box.cursor_error
    assert len(box._segments) == segments  # nothing deleted while the cursor is unsaved
    monkeypatch.undo()
    box.save_cursors()
    assert box.cursor_error is None
    saved = json.loads((tmp_path / "o" / "cursor.a").read_text())
    assert saved["next_seq"] == records[-1][0] + 1
    box.close()


# -- the publisher ------------------------------------------------------------------------


class _Conn:
    pass


def _publisher(tmp_path, memory_max: int):
    from supervisor.publisher import process

    p = object.__new__(process.PublisherProcess)
    p.outbox = Outbox(str(tmp_path / "o"), 1 << 20, sinks=[])
    p.job_titles = None
    p.workers = []
    p.received = []
    p.runners = set()
    p.tallies = process.defaultdict(process.JobTally)
    p.digest_due = float("inf")
    p.commit_at = float("inf")
    p.memory_max = memory_max
    p.outbox_error = None
    p.outbox_write_errors = 0
    p.waiting_bytes = 0
    p.memory_dropped = 0
    p.forgot_from = set()
    p.dropped_runners = []
    p.drop_runner = lambda conn: p.dropped_runners.append(conn)
    p._flush_briefly = lambda conn: None
    p.wakeup = process.threading.Condition()
    p.acked = []
    p.ack = lambda conn, uuids: p.acked.extend(uuids)
    return p, process


def test_publisher_keeps_results_in_memory_while_the_outbox_fails(tmp_path, monkeypatch):
    from runner import wire
    p, process = _publisher(tmp_path, memory_max=1000)
    conn = _Conn()
    p.runners.add(conn)

    def message(i):
        last = wire.LastResult(uuid=f"run-{i}", status="satisfied", reason=None, end="2026-01-01T00:00:00Z")
        return wire.Publish(job_uuid="j", last=last, duration=0.1, next_run_at=None, result=msgspec.Raw(b"r" * 300))
    real = Outbox.append_many

    def full(self, payloads):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Outbox, "append_many", full)
    for i in range(5):
        p.received.append((conn, message(i)))
        p.waiting_bytes += 300
        if p.waiting_bytes > p.memory_max:
            p._forget_oldest()
        p.commit()
    assert p.acked == []
    assert p.outbox_error and "No space" in p.outbox_error
    assert p.memory_dropped == 2 and len(p.received) == 3  # 3 x 300 bytes fit in 1000
    assert p.commit_at > time.monotonic()  # retried later, not at once
    monkeypatch.setattr(Outbox, "append_many", real)
    p.commit()
    assert p.outbox_error is None and p.received == [] and p.waiting_bytes == 0
    assert p.acked == ["run-2", "run-3", "run-4"]
    assert p.dropped_runners == [conn]  # reconnects, and sends run-0 and run-1 again
    assert p.outbox.next_seq == 4
    p.outbox.close()


# -- the real service on a small tmpfs ----------------------------------------------------

MARKING_PLUGIN = """
#!/bin/sh
cat >/dev/null
touch {marks}/"$ASSESSMENT_RUN_UUID"  # one file per run: each job runs as its own uid
echo '{{"status": "satisfied", "title": "all good"}}'
"""


def _can_namespace() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a private mount namespace with a tmpfs)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if r.returncode != 0:
        return f"unshare -m does not work here: {r.stderr.decode(errors='replace').strip()}"
    return None


def _metrics(svc) -> str:
    from supervisor.control import request
    code, body = request(str(svc.root / "run" / "control.sock"), "GET", "/metrics")
    assert code == 200
    return body.decode() if isinstance(body, bytes) else body


def _in_ns(pid: int, script: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=30)
    if check:
        assert r.returncode == 0, f"{script}: {r.stderr}"
    return r


def test_full_and_read_only_state_dir(service_factory, area):
    why = _can_namespace()
    if why:
        pytest.skip(why)
    marks = area / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    out = area / "out"
    out.mkdir()
    svc = service_factory("", sink_file=False)
    svc.results_file = out / "results.jsonl"
    # memory_max small enough that the full episode goes past it: the publisher forgets the
    # oldest, and their runners send them again once the outbox takes writes
    svc.config_text += ('[publisher]\nflush_interval = "0.2s"\nmemory_max = "2KiB"\n'
                        f'[[publisher.sink]]\nname = "archive"\nkind = "file"\npath = "{svc.results_file}"\n')
    svc.config.write_text(svc.config_text)
    make_plugin(svc.plugins, "mark", MARKING_PLUGIN.format(marks=marks))
    jobs = [spec(plugin="mark", interval="1s") for _ in range(2)]
    for i, doc in enumerate(jobs):
        svc.write_spec(f"j{i}.json", doc)
    svc.state.mkdir()
    state = str(svc.state)

    # start it in its own mount namespace, state_dir a tmpfs of 8 MiB
    svc.grant_marks()
    svc._logf = open(svc.log, "ab")
    command = (f"mount -t tmpfs -o size=8m tmpfs {state} && exec {sys.executable} -m supervisor run "
               f"--config {svc.config}")
    svc.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", command],
                                stdout=svc._logf, stderr=subprocess.STDOUT, cwd=REPO)
    wait_for(lambda: svc.proc.poll() is not None or svc.try_status() is not None, 20, what="the control socket")
    assert svc.proc.poll() is None, svc.log_text()
    pid = svc.proc.pid
    assert _in_ns(pid, f"grep -q ' {state} tmpfs ' /proc/self/mounts").returncode == 0
    for doc in jobs:
        svc.wait_result(doc["uuid"], 2)
    publisher_pid = control_status(svc)["publisher"]["pid"]

    def runs() -> set[str]:
        return set(os.listdir(marks))

    def delivered() -> list[str]:
        return [r["uuid"] for r in svc.results()]

    # -- full --------------------------------------------------------------------------
    before = runs()
    _in_ns(pid, f"dd if=/dev/zero of={state}/fill bs=64k 2>/dev/null; true")
    full_at = time.monotonic()
    st = wait_for(lambda: (lambda s: s if s["publisher"]["outbox_error"] else None)(control_status(svc)), 15,
                  what="the outbox error in status")
    assert "No space left" in st["publisher"]["outbox_error"], st["publisher"]
    # results keep coming while the disk is full: past memory_max (2 KiB here) the oldest are dropped
    st = wait_for(lambda: (lambda s: s if s["publisher"]["dropped"] >= 1 else None)(control_status(svc)), 30,
                  what="results past memory_max dropped")
    assert svc.proc.poll() is None
    assert st["publisher"]["pid"] == publisher_pid, "the publisher was restarted"
    assert st["publisher"]["outbox_error"] and st["publisher"]["waiting"] >= 1, st["publisher"]
    assert st["publisher"]["waiting_bytes"] <= 2048 and st["publisher"]["dropped"] >= 1, st["publisher"]
    metrics = _metrics(svc)
    assert "assessment_runtime_outbox_up 0" in metrics
    assert "assessment_runtime_outbox_write_errors_total 0" not in metrics
    produced_full = runs() - before
    assert len(produced_full) >= 6, "the jobs did not keep their schedule"
    full_seconds = time.monotonic() - full_at
    _in_ns(pid, f"rm -f {state}/fill")
    wait_for(lambda: not control_status(svc)["publisher"]["outbox_error"], 10, what="the outbox error to clear")
    episode = runs() - before
    wait_for(lambda: episode <= set(delivered()), 15, what="every result of the full episode at the sink")
    assert control_status(svc)["publisher"]["pid"] == publisher_pid

    # -- read-only (a read-only bind mount over state_dir, as a failing disk gets) -------------
    _in_ns(pid, f"mount --bind {state} {state} && mount -o remount,bind,ro {state}")
    before_ro = runs()
    new = spec(plugin="mark", interval="1s")
    svc.write_spec("new.json", new)
    src = wait_for(lambda: (lambda s: s if s and s["last_error"] else None)(
        next((s for s in control_status(svc)["sources"] if s["kind"] == "dir"), None)), 15,
        what="the read-only error in sources[].last_error")
    assert "Read-only" in src["last_error"], src
    time.sleep(3)  # a resync or two: still not applied
    st = control_status(svc)
    assert new["uuid"] not in {j["uuid"] for j in st["jobs"]}, "a spec that could not be stored was applied"
    assert {d["uuid"] for d in jobs} <= {j["uuid"] for j in st["jobs"]}
    assert svc.proc.poll() is None and st["publisher"]["pid"] == publisher_pid
    _in_ns(pid, f"mount -o remount,bind,rw {state}")
    svc.wait_result(new["uuid"], 1, timeout=20)  # applied after the next rescan
    src = next(s for s in control_status(svc)["sources"] if s["kind"] == "dir")
    assert src["last_error"] is None, src
    ro_runs = runs() - before_ro
    wait_for(lambda: ro_runs <= set(delivered()), 15, what="every result of the read-only episode at the sink")

    # -- after: nothing lost, the publisher never restarted, the outbox reads back ----------
    got = delivered()
    everything = runs()
    lost = everything - set(got)
    # runs that were still in flight at the last look may not have reached the sink yet
    assert not (lost & (episode | ro_runs)), f"lost: {lost & (episode | ro_runs)}"
    duplicates = len(got) - len(set(got))
    st = control_status(svc)
    assert st["publisher"]["pid"] == publisher_pid
    assert svc.proc.poll() is None
    log = svc.log_text()
    assert "Traceback" not in log, log[-3000:]
    print(f"\nfull for {full_seconds:.1f}s: {len(episode)} results produced during the episode, all delivered "
          f"after; read-only: {len(ro_runs)} results, all delivered; {len(got)} delivered in all, "
          f"{duplicates} duplicates; publisher.dropped={st['publisher']['dropped']}, "
          f"outbox_write_errors={st['publisher']['outbox_write_errors']}")
    assert svc.stop() == 0


# -- the spec store and runtime_uuid ------------------------------------------------------


def test_a_spec_change_that_cannot_be_stored_is_not_applied(tmp_path, monkeypatch):
    from test_store import fresh, make
    from supervisor import store as store_module
    store = fresh(tmp_path)
    a, b = make("11111111-1111-4111-8111-111111111111"), make("22222222-2222-4222-8222-222222222222")
    store.replace("dir", {a.job.uuid: a})
    folder = tmp_path / "specs" / "dir"
    files = sorted(os.listdir(folder))

    def full(path, data, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(data[:3])  # a partial temp file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store_module, "write_synced", full)
    with pytest.raises(OSError):
        store.replace("dir", {a.job.uuid: a, b.job.uuid: b})
    assert set(store.specs["dir"]) == {a.job.uuid}  # memory follows the disk
    assert sorted(os.listdir(folder)) == files  # no temp file left behind
    monkeypatch.undo()
    assert store.replace("dir", {a.job.uuid: a, b.job.uuid: b})
    assert set(fresh(tmp_path).specs["dir"]) == {a.job.uuid, b.job.uuid}


def test_a_runtime_uuid_that_cannot_be_written_is_kept_in_memory(tmp_path, monkeypatch, caplog):
    from supervisor import config as config_module
    from supervisor.config import Config, load_runtime_uuid, save_runtime_uuid
    cfg = Config(state_dir=str(tmp_path))

    def refuse(path, data, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(config_module, "write_atomic", refuse)
    value = load_runtime_uuid(cfg)
    assert value and not (tmp_path / "runtime_uuid").exists()
    assert "Read-only" in caplog.text
    monkeypatch.undo()
    assert save_runtime_uuid(cfg, value)
    assert load_runtime_uuid(cfg) == value


def test_memory_max_is_a_size_with_a_default_of_64_mib(tmp_path):
    from supervisor.config import Publisher, load_config
    assert Publisher().memory_max == 64 << 20
    from test_config import minimal
    path = minimal(tmp_path)
    path.write_text(path.read_text().replace("[[publisher.sink]]", '[publisher]\nmemory_max = "1MiB"\n[[publisher.sink]]', 1))
    assert load_config(str(path)).publisher.memory_max == 1 << 20
