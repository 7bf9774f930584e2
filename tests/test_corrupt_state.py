"""Damaged state at start (issue 13): every kind of file the service keeps under state_dir,
truncated to half, zero-filled, overwritten with random bytes of the same size, or emptied.

The start never crashes with a traceback, sets aside (quarantines) what it cannot read with
one log line naming the file, and keeps every record it can still read. One pristine state
(two folder specs, two Configuration-service specs and a rejected one, a file sink and a ccf
sink at a dead port) is made once per module; each case damages a copy and starts on it.

The runtime identity: an unreadable `runtime_uuid` cannot be recovered (nothing else holds it
for sure), so the start logs an error naming the file, moves it to `quarantine/` and
generates a new uuid (the status shows it): a restart on an unreadable file does not fail, and
the old file stays for an operator to put back.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import psutil
import pytest

from conftest import OK_PLUGIN, RunningService, control_status, make_plugin, spec, wait_for
from supervisor.publisher.outbox import HEADER, Outbox, segment_name
from test_confsync import ConfigService, conf

DAMAGES = ("half", "zero", "random", "empty")


def damage(path: Path, how: str, seed: int = 13) -> None:
    data = path.read_bytes()
    if how == "half":
        new = data[:len(data) // 2]
    elif how == "zero":
        new = b"\0" * len(data)
    elif how == "random":
        new = random.Random(seed).randbytes(len(data))
    else:
        new = b""
    path.write_bytes(new)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the pristine state, made once -----------------------------------------------------------

class Pristine:
    def __init__(self, root: Path, extra: str, server: ConfigService, uuids: dict[str, str], results: list[dict],
                 runtime_uuid: str, titles: dict, identities: dict):
        self.root, self.extra, self.server, self.uuids = root, extra, server, uuids
        self.results, self.runtime_uuid, self.titles = results, runtime_uuid, titles
        self.identities = identities


@pytest.fixture(scope="module")
def pristine():
    area = Path(tempfile.mkdtemp(prefix="ar-corrupt-", dir="/tmp"))
    area.chmod(0o755)
    uuids = {name: spec()["uuid"] for name in ("dir1", "dir2", "http1", "http2", "bad")}
    server = ConfigService(prefix="revision-", initial=[
        spec(uuids["http1"]), spec(uuids["http2"]), spec(uuids["bad"], interval="sometimes")])
    extra = (conf(server) + '\n[publisher]\nflush_interval = "100ms"\n'
             f'\n[[publisher.sink]]\nname = "ccf"\nkind = "ccf"\nurl = "http://127.0.0.1:{dead_port()}"\n'
             'allow_http = true\ntimeout = "1s"\nretry_max = "1s"\n')
    root = area / "pristine"
    root.mkdir()
    root.chmod(0o755)
    svc = RunningService(root, extra)
    try:
        make_plugin(svc.plugins, "ok", OK_PLUGIN)
        svc.write_spec("dir1.json", spec(uuids["dir1"]))
        svc.write_spec("dir2.json", spec(uuids["dir2"]))
        svc.start()
        for name in ("dir1", "dir2", "http1", "http2"):
            svc.wait_result(uuids[name])
        state = svc.state
        wait_for(lambda: all((state / p).exists() for p in (
            "specs/http/revision", "specs/http/location", "specs/http/rejected", "identities.json",
            "job-titles.json", "runtime_uuid", "outbox/cursor.archive")), what="every state file")
        assert svc.stop() == 0
        runtime_uuid = (state / "runtime_uuid").read_text().strip()
        titles = json.loads((state / "job-titles.json").read_text())
        identities = json.loads((state / "identities.json").read_text())
        results = svc.results()
    finally:
        svc.kill_all()
    server.fault = ("status", 503)  # from now on the stored specs are all there is
    yield Pristine(root, extra, server, uuids, results, runtime_uuid, titles, identities)
    server.close()
    shutil.rmtree(area, ignore_errors=True)


@pytest.fixture
def copy(pristine):
    """A service on a copy of the pristine state."""
    root = Path(tempfile.mkdtemp(prefix="ar-corrupt-", dir="/tmp"))
    root.chmod(0o755)
    for name in ("state", "jobs.d", "plugins"):  # as they are, owners too (scratch folders are the jobs')
        subprocess.run(["cp", "-a", str(pristine.root / name), str(root / name)], check=True)
    svc = RunningService(root, pristine.extra)
    yield svc
    svc.kill_all()
    shutil.rmtree(root, ignore_errors=True)


def _last_segment(state: Path) -> str:
    return "outbox/" + sorted(p.name for p in (state / "outbox").glob("*.seg"))[-1]


KINDS = {  # kind: the file, relative to state_dir (a callable for names known only later)
    "spec-dir": lambda p, s: f"specs/dir/{p.uuids['dir1']}.json",
    "spec-http": lambda p, s: f"specs/http/{p.uuids['http1']}.json",
    "rejected": lambda p, s: "specs/http/rejected",
    "revision": lambda p, s: "specs/http/revision",
    "location": lambda p, s: "specs/http/location",
    "segment": lambda p, s: _last_segment(s),
    "cursor": lambda p, s: "outbox/cursor.archive",
    "runtime_uuid": lambda p, s: "runtime_uuid",
    "identities": lambda p, s: "identities.json",
    "job-titles": lambda p, s: "job-titles.json",
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_damaged_file_is_set_aside_and_the_rest_recovered(pristine, copy, kind, how):
    svc = copy
    rel = KINDS[kind](pristine, svc.state)
    path = svc.state / rel
    damage(path, how)
    svc.start()
    uuids = pristine.uuids
    # every job whose spec is readable (or comes back from its folder) runs again
    expected = {uuids[n] for n in ("dir1", "dir2", "http1", "http2")}
    if kind == "spec-http":
        expected.discard(uuids["http1"])  # only the Configuration service (down) can give it back
    for uuid in expected:
        svc.wait_result(uuid, count=2)
    doc = control_status(svc)
    running = {j["uuid"] for j in doc["jobs"]}
    assert running == expected
    log = svc.log_text()
    assert "Traceback" not in log, log
    naming = [line for line in log.splitlines() if str(path) in line]
    assert len(naming) == 1, f"lines naming {path}:\n" + "\n".join(naming) + "\n--- log:\n" + log
    # quarantined: out of the way, kept for an operator
    quarantined = list((svc.state / "quarantine").glob("*")) if (svc.state / "quarantine").exists() else []
    if kind not in ("cursor", "segment"):  # a segment's cut tail is kept, when there is one
        assert quarantined, f"nothing in quarantine/ for {rel}"
    [http] = [s for s in doc["sources"] if s["kind"] == "http"]
    if kind in ("spec-http", "rejected", "revision", "location", "runtime_uuid"):
        # the stored revision no longer vouches for the store (or is for another runtime uuid, which
        # the endpoint names): the next sync asks for the full set
        assert http["revision"] is None
    else:
        assert http["revision"] is not None
    # each job keeps its uid (from its scratch folder's owner when identities.json is unreadable)
    identities = json.loads((svc.state / "identities.json").read_text())
    assert {u: identities.get(u) for u in expected} == {u: pristine.identities[u] for u in expected}
    if kind == "runtime_uuid":
        assert doc["runtime_uuid"] != pristine.runtime_uuid
    else:
        assert doc["runtime_uuid"] == pristine.runtime_uuid
    # at least once: nothing the archive had is lost; a damaged cursor only re-delivers
    after = {r["uuid"] for r in svc.results()}
    assert {r["uuid"] for r in pristine.results} <= after
    if kind == "cursor":
        counts = [r["uuid"] for r in svc.results()]
        assert all(counts.count(r["uuid"]) >= 2 for r in pristine.results)  # delivered again, not skipped
    # (no graceful stop: the fixture kills it; a stop waits ~5 s on the ccf sink's dead port)


# -- outbox segments, one level down: which records survive -------------------------------------

def payload(i: int) -> bytes:
    return f"result-{i:06d}-".encode().ljust(100, b".")


def _record(i: int) -> bytes:
    p = payload(i)
    return HEADER.pack(len(p), zlib.crc32(p)) + p


RECORD = len(_record(1))


@pytest.mark.parametrize("how", DAMAGES + ("tail",))
@pytest.mark.parametrize("which", ["first", "last"])
def test_outbox_segment_damage_keeps_every_record_before_it(tmp_path, caplog, which, how):
    """30 records in segments of 10; one segment damaged. Every record before the damage is
    read; a sink never stalls; numbering goes on; nothing is read twice or out of order. Sink
    "b" took everything before the damage: its cursor tells that a cut last segment lost results."""
    folder = tmp_path / "outbox"
    with Outbox(str(folder), 10 << 20, segment_bytes=10 * RECORD, sinks=["a", "b"]) as box:
        box.append_many([payload(i) for i in range(1, 31)])
        box.advance("b", 30)
    names = sorted(p.name for p in folder.glob("*.seg"))
    assert names == [segment_name(1), segment_name(11), segment_name(21)]
    first = 1 if which == "first" else 21
    path = folder / segment_name(first)
    if how == "tail":  # the segment's last record changed on disk
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        kept = 9
    else:
        kept = {"half": 5, "zero": 0, "random": 0, "empty": 0}[how]
        damage(path, how)
    caplog.set_level(logging.WARNING)
    with Outbox(str(folder), 10 << 20, segment_bytes=10 * RECORD, sinks=["a", "b"]) as box:
        taken = []
        while records := box.read("a", 7):
            taken += records
            box.advance("a", records[-1][0])
        box.append_many([b"after"])
        more = box.read("a", 100)
    seqs = [s for s, _ in taken]
    assert seqs == sorted(set(seqs))
    assert all(p == payload(s) for s, p in taken)
    lost = set(range(first + kept, first + 10))
    assert set(seqs) == set(range(1, 31)) - lost
    assert [p for _, p in more] == [b"after"]
    if lost:
        assert any(str(path) in r.getMessage() or segment_name(first) in r.getMessage() for r in caplog.records)


def test_outbox_segments_removed_under_a_running_service_are_skipped_not_stalled_on(area):
    """Someone deletes the outbox's segment files while the service runs and a sink has results
    pending: the publisher says what was lost, goes on writing in a new segment, and the sink
    delivers what comes next, without spinning on the missing files."""
    root = area / "svc"
    root.mkdir()
    root.chmod(0o755)
    out = root / "out"  # a file at first, not a folder: the file sink fails, and its results wait in the outbox
    out.write_text("")
    svc = RunningService(root, f"""
        [publisher]
        batch_max = 2
        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "{out / 'results.jsonl'}"
        retry_max = "1s"
        """, sink_file=False)
    try:
        make_plugin(svc.plugins, "ok", OK_PLUGIN)
        job = spec(interval="1s")
        svc.write_spec("job.json", job)
        svc.start()
        wait_for(lambda: control_status(svc)["publisher"]["sinks"][0]["pending"] >= 3, 30, what="pending results")
        for seg in (svc.state / "outbox").glob("*.seg"):
            seg.unlink()
        out.unlink()
        out.mkdir()
        lines = wait_for(lambda: (lambda t: t if t.count("\n") >= 3 else None)(
            (out / "results.jsonl").read_text() if (out / "results.jsonl").exists() else ""), 30,
            what="results delivered after the removal")
        assert all(json.loads(line)["job_uuid"] == job["uuid"] for line in lines.splitlines())
        log = svc.log_text()
        assert "segment removed from disk" in log or "was removed from disk; going on in a new segment" in log
        publisher = psutil.Process(control_status(svc)["publisher"]["pid"])
        before = sum(publisher.cpu_times()[:2])
        time.sleep(3)
        # a sink stalled on a missing file used to retry at once, forever: about a core
        assert sum(publisher.cpu_times()[:2]) - before < 1.0
        # the sink keeps up (with a job a second, "nothing pending" may last only milliseconds):
        # nothing it holds is older than its flush timer allows
        wait_for(lambda: (lambda s: s["pending"] == 0 or (s["oldest_pending_age"] or 0) < 2.5)(
            control_status(svc)["publisher"]["sinks"][0]), 15, what="the sink keeping up")
    finally:
        svc.kill_all()
