"""Benchmark 5: the Configuration service source at 1,000 specs.

A Configuration service (stdlib http.server on 127.0.0.1, in this process) answers the
runtime's first sync with a snapshot of 1,000 specs (interval 1h, run_on_start false). We time,
from the moment the answer was sent:
  stored   - until `state_dir/specs/http/revision` was written (its mtime; it is written after
             every spec file, each atomically: temp file, fsync, rename; then the folder fsynced)
  running  - until status shows all 1,000 jobs in state running with a runner pid
Then the service publishes a delta in which 1 spec of the 1,000 changed (its title): we time
the answer -> that job's new runner running, and count the runners whose pid changed (1 is
right: nothing else may be touched).
Baselines, measured in the same run: writing the same 1,000 store documents with the same
atomic write (supervisor.files.write_atomic) into a fresh folder on the same file system, and
a Python process forking 1,000 children that exit at once (fork + waitpid, sequentially).
The store itself fsyncs its folder once per batch rather than once per file, so it can beat
the first baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from benchlib import PYTHON, REPO, SH_PLUGIN, Area, BenchError, Service, install_plugin, job_spec, wait_for

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class _ConfigService:
    """Snapshots without `since`, deltas against a known revision, 304 for the latest."""

    def __init__(self):
        self.lock = threading.Lock()
        self.history: list[tuple[str, dict[str, dict]]] = []
        self.answered: list[tuple[str, float, float]] = []  # (what, monotonic and wall time it was written)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                since = parse_qs(urlsplit(self.path).query).get("since", [None])[0]
                status, doc, what = owner._answer(since)
                body = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                if status != 304:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                with owner.lock:
                    owner.answered.append((what, time.monotonic(), time.time()))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def publish(self, docs: list[dict]) -> str:
        with self.lock:
            rev = f"r{len(self.history) + 1}"
            self.history.append((rev, {d["uuid"]: d for d in docs}))
            return rev

    def first(self, what: str, wall: bool = False) -> float | None:
        with self.lock:
            return next(((t_wall if wall else t) for w, t, t_wall in self.answered if w == what), None)

    def _answer(self, since):
        with self.lock:
            rev, docs = self.history[-1]
            if since is None:
                return 200, {"revision": rev, "complete": True, "upserted": list(docs.values()), "deleted": []}, \
                    "snapshot"
            if since == rev:
                return 304, None, "not_modified"
            base = next((d for r, d in self.history if r == since), None)
            if base is None:
                return 410, None, "gone"
            upserted = [d for u, d in docs.items() if base.get(u) != d]
            deleted = [u for u in base if u not in docs]
            return 200, {"revision": rev, "complete": False, "upserted": upserted, "deleted": deleted}, "delta"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _status(svc: Service) -> dict | None:
    from supervisor.control import NoService, request
    try:
        code, body = request(str(svc.root / "run" / "control.sock"), "GET", "/status", timeout=30)
    except NoService:
        return None
    return json.loads(body) if code == 200 else None


def _running(doc: dict | None, n: int) -> bool:
    return doc is not None and len(doc["jobs"]) == n and all(j["pid"] and j["state"] == "running" for j in doc["jobs"])


def _store_baseline(folder: Path, docs: list[dict]) -> float:
    """The same documents the store writes (source + canonical spec), with the same atomic write."""
    from supervisor.files import write_atomic
    from supervisor.spec import parse_spec
    source = "http:http://127.0.0.1"
    payloads = []
    for d in docs:
        spec = parse_spec(d, source)
        payloads.append((spec.job.uuid, b'{"source":' + json.dumps(source).encode() + b',"spec":' + spec.canonical + b"}"))
    folder.mkdir()
    t = time.perf_counter()
    for uuid, data in payloads:
        write_atomic(str(folder / f"{uuid}.json"), data)
    write_atomic(str(folder / "revision"), b"r1")
    return time.perf_counter() - t


_FORK_LOOP = """
import os, sys, time
n = int(sys.argv[1])
t = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(time.perf_counter() - t)
"""


def _fork_baseline(n: int) -> float:
    r = subprocess.run([PYTHON, "-c", _FORK_LOOP, str(n)], capture_output=True, text=True, timeout=120, check=True)
    return float(r.stdout.strip())


def service_with_config_service(root, sync_interval: str) -> tuple[_ConfigService, Service]:
    """A Configuration service of ours, and a service (trivial plugin installed) that syncs with it."""
    server = _ConfigService()
    svc = Service(root, extra_config=f"""
        [configuration]
        url = "{server.url}"
        allow_http = true
        sync_interval = "{sync_interval}"
        timeout = "30s"
        """)
    install_plugin(svc.plugins, "trivial", script=SH_PLUGIN)
    return server, svc


def run(area: Area, jobs: int = 1000, log=print) -> dict:
    server, svc = service_with_config_service(area.sub("confsync"), "1s")
    docs = [job_spec(interval="1h", run_on_start=False, title=f"job {i}") for i in range(jobs)]
    server.publish(docs)
    revision_file = svc.state / "specs" / "http" / "revision"
    out: dict = {"jobs": jobs}
    try:
        t_start = time.monotonic()
        try:
            svc.start(timeout=30)
        except BenchError as e:
            runners = len(svc.tree()["runner"])
            raise BenchError(f"the service stopped answering with {runners} of {jobs} runners started "
                             f"(the supervisor's loop is stuck); {e}") from None
        t_answer = wait_for(lambda: server.first("snapshot"), 60, 0.005, what="the snapshot to be sent")
        wait_for(lambda: revision_file.exists(), 60, 0.01, what="the stored revision")
        stored_s = revision_file.stat().st_mtime - server.first("snapshot", wall=True)
        seen = {"running": 0}

        def all_running():
            d = _status(svc)
            if d is not None:
                seen["running"] = sum(1 for j in d["jobs"] if j["pid"] and j["state"] == "running")
            return d if _running(d, jobs) else None
        try:
            doc = wait_for(all_running, 60, 0.25, what=f"{jobs} runners running")
        except BenchError:
            raise BenchError(f"runners stalled: {seen['running']} of {jobs} running after 60s (status "
                             f"{'answers' if _status(svc) else 'does not answer'}); log tail:\n{svc.log_tail(5)}") from None
        t_running = time.monotonic()
        out["first_answer_after_start_s"] = round(t_answer - t_start, 3)
        out["snapshot_stored_s"] = round(stored_s, 3)
        out["all_running_s"] = round(t_running - t_answer, 3)
        stored_files = len(list(revision_file.parent.glob("*.json")))
        if stored_files != jobs:
            raise BenchError(f"expected {jobs} stored specs, found {stored_files}")
        before = {j["uuid"]: j["pid"] for j in doc["jobs"]}
        revision = {j["uuid"]: j["revision"] for j in doc["jobs"]}
        # one changed spec among the 1,000
        target = docs[jobs // 2]
        changed = dict(target, title="changed")
        t_publish = time.monotonic()
        server.publish([changed if d is target else d for d in docs])
        t_delta = wait_for(lambda: server.first("delta"), 30, 0.005, what="the delta to be sent")

        def replaced():
            d = _status(svc)
            if not _running(d, jobs):
                return None
            j = next(j for j in d["jobs"] if j["uuid"] == target["uuid"])
            return d if j["revision"] != revision[target["uuid"]] and j["pid"] != before[target["uuid"]] else None
        wait_for(replaced, 60, 0.05, what="the changed job's new runner")
        t_replaced = time.monotonic()
        time.sleep(2.0)  # anything else the delta wrongly touched would show by now (resync included)
        after = {j["uuid"]: j["pid"] for j in _status(svc)["jobs"]}
        out["delta_applied_s"] = round(t_replaced - t_delta, 3)
        out["delta_publish_to_running_s"] = round(t_replaced - t_publish, 3)
        out["runners_touched_by_delta"] = sum(1 for u in before if after.get(u) != before[u])
    finally:
        out["stop_exit_code"] = svc.stop(timeout=30)
        server.close()
    base = area.sub("confsync-baseline")
    out["baseline_store_write_s"] = round(sorted(_store_baseline(base / f"http-{i}", docs) for i in range(3))[1], 3)
    out["baseline_fork_s"] = round(_fork_baseline(jobs), 3)
    out["ratio_stored_to_baseline"] = round(out["snapshot_stored_s"] / out["baseline_store_write_s"], 2)
    out["ratio_running_to_fork_baseline"] = round(out["all_running_s"] / out["baseline_fork_s"], 2)
    return out


def format_result(r: dict) -> list[str]:
    n = r["jobs"]
    return [
        f"  snapshot of {n} specs (interval 1h, run_on_start false), timed from the answer being sent",
        f"    stored              {r['snapshot_stored_s'] * 1000:.0f} ms   ({n} spec files + revision, each atomic "
        f"and fsynced)",
        f"      baseline          {r['baseline_store_write_s'] * 1000:.0f} ms   the same {n} documents with the same "
        f"write_atomic (median of 3) -> {r['ratio_stored_to_baseline']:.2f}x",
        f"    all running         {r['all_running_s'] * 1000:.0f} ms   (status: {n} jobs running with a runner pid)",
        f"      baseline          {r['baseline_fork_s'] * 1000:.0f} ms   a Python process forking {n} children "
        f"that exit at once -> {r['ratio_running_to_fork_baseline']:.2f}x",
        f"    first answer        {r['first_answer_after_start_s'] * 1000:.0f} ms after `run` was started",
        f"  delta: 1 changed spec among {n}",
        f"    applied             {r['delta_applied_s'] * 1000:.0f} ms   (answer sent -> its new runner running; "
        f"publish -> running {r['delta_publish_to_running_s'] * 1000:.0f} ms with sync_interval 1s)",
        f"    runners touched     {r['runners_touched_by_delta']} of {n} (1 is right)",
    ]
