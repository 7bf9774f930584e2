"""Bad input on the control socket and from the Configuration service (issue 13): the real
service keeps answering status quickly, keeps running its jobs, and its memory stays bounded.
Every test prints its figures (response times, RSS of the supervisor before, during and after);
run with `-s` to see them.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time

import psutil
import pytest

from conftest import OK_PLUGIN, make_plugin, spec, wait_for
from supervisor.control import CONN_DEADLINE, MAX_CONNS, ControlServer, request as control_request
from supervisor.sync import MAX_BODY, MAX_ENTRIES, MAX_VALUES
from test_confsync import ConfigService, conf, fast_status, http_source, pids, wait_jobs, wait_source

MiB = 1 << 20


def sock_path(svc) -> str:
    return str(svc.root / "run" / "control.sock")


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


class RssSampler:
    """The peak RSS of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except psutil.NoSuchProcess:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed_status(svc) -> float:
    """GET /status on a fresh connection; the seconds it took."""
    t = time.monotonic()
    code, body = control_request(sock_path(svc), "GET", "/status", timeout=10)
    assert code == 200 and json.loads(body)["jobs"]
    return time.monotonic() - t


def timed_cli(svc) -> float:
    t = time.monotonic()
    r = svc.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t


# -- the control socket ------------------------------------------------------------------------

class Attackers:
    """Clients that misbehave, each in its own thread; `closed_after` records when the service
    dropped each holding client (seconds after it connected)."""

    def __init__(self, path: str):
        self.path = path
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.closed_after: dict[str, float] = {}
        self.answers: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        return s

    def spawn(self, name: str, fn) -> None:
        t = threading.Thread(target=self._guard, args=(name, fn), daemon=True)
        t.start()
        self.threads.append(t)

    def _guard(self, name, fn):
        started = time.monotonic()
        try:
            fn(name)
        except OSError:
            pass
        with self.lock:
            self.closed_after.setdefault(name, time.monotonic() - started)

    def _read_answer(self, name: str, s: socket.socket) -> None:
        s.settimeout(30)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
        self.answers[name] = data[:200]

    # the kinds

    def garbage(self, name: str) -> None:
        with self.connect() as s:
            s.sendall(os.urandom(4096) + b"\r\n\r\n")
            self._read_answer(name, s)

    def huge(self, name: str, prefix: bytes) -> None:
        """1 MB of request line or of one header, sent as fast as the service takes it."""
        with self.connect() as s:
            s.settimeout(30)
            try:
                s.sendall(prefix + b"a" * (1 << 20) + b"\r\n\r\n")
            except OSError:
                pass
            self._read_answer(name, s)

    def slowloris(self, name: str) -> None:
        """One header byte a second, never the blank line."""
        with self.connect() as s:
            s.sendall(b"GET /status HTTP/1.1\r\nX-Slow: ")
            while not self.stop.wait(1.0):
                s.sendall(b"a")
            self.closed_after[name] = -1.0  # still open when the test ended

    def silent(self, name: str) -> None:
        """Connects and sends nothing; waits to be dropped."""
        with self.connect() as s:
            s.settimeout(60)
            assert s.recv(1) == b""

    def no_reader(self, name: str) -> None:
        """Asks for /metrics again and again on one connection and never reads (the service
        answers the first, into the socket's buffer, and closes)."""
        with self.connect() as s:
            while not self.stop.wait(0.5):
                s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            self.closed_after[name] = -1.0

    def join(self, timeout: float) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)


@pytest.mark.timeout(120)
def test_control_socket_abuse_does_not_block_status_or_jobs(service_factory):
    svc = service_factory()
    make_plugin(svc.plugins, "ok", OK_PLUGIN)
    job = spec(plugin="ok", interval="1s")
    svc.write_spec("ok.json", job)
    svc.start()
    svc.wait_result(job["uuid"])
    pid = svc.proc.pid
    for _ in range(5):  # warm up: the first answers allocate what later ones reuse
        timed_status(svc)
    rss_before = rss(pid)
    sampler = RssSampler(pid)
    baseline = [timed_status(svc) for _ in range(5)]

    attack = Attackers(sock_path(svc))
    for i in range(10):
        attack.spawn(f"garbage-{i}", attack.garbage)
    attack.spawn("huge-request-line", lambda n: attack.huge(n, b"GET /"))
    attack.spawn("huge-header", lambda n: attack.huge(n, b"GET /status HTTP/1.1\r\nX-Big: "))
    for i in range(20):
        attack.spawn(f"slowloris-{i}", attack.slowloris)
    for i in range(5):
        attack.spawn(f"silent-{i}", attack.silent)
    for i in range(5):
        attack.spawn(f"no-reader-{i}", attack.no_reader)
    results_before = len(svc.results_for(job["uuid"]))

    # while they hold on: status on fresh connections, from here and through the CLI
    during, cli = [], []
    t_end = time.monotonic() + CONN_DEADLINE + 3
    while time.monotonic() < t_end:
        during.append(timed_status(svc))
        cli.append(timed_cli(svc))
        time.sleep(0.2)
    # a flood past the connection cap: the oldest are pushed out, status still answers
    flood = []
    for _ in range(MAX_CONNS * 3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path(svc))
        s.sendall(b"GET /st")
        flood.append(s)
    during_flood = [timed_status(svc) for _ in range(5)]
    open_flood = 0
    for s in flood:
        s.setblocking(False)
        try:
            open_flood += s.recv(1) != b""
        except BlockingIOError:
            open_flood += 1
        except OSError:
            pass
        s.close()
    attack.join(5)
    svc.wait_result(job["uuid"], results_before + 5, timeout=20)  # jobs kept running all along
    rss_peak = sampler.stop()
    rss_after = rss(pid)
    assert svc.proc.poll() is None

    print(f"\ncontrol socket: GET /status before {max(baseline) * 1000:.1f} ms max; "
          f"during the attack {len(during)} requests, max {max(during) * 1000:.1f} ms, "
          f"mean {sum(during) / len(during) * 1000:.1f} ms; CLI status max {max(cli) * 1000:.0f} ms; "
          f"during a flood of {len(flood)} connections max {max(during_flood) * 1000:.1f} ms "
          f"({open_flood} of them still open after)")
    slow = sorted(v for k, v in attack.closed_after.items() if k.startswith(("slowloris", "silent")))
    print(f"holding clients dropped after {min(slow):.1f}-{max(slow):.1f} s; answers: "
          + ", ".join(f"{k}: {v[:12]!r}" for k, v in sorted(attack.answers.items())))
    print(f"supervisor RSS before {rss_before / MiB:.1f} MiB, peak {rss_peak / MiB:.1f} MiB, "
          f"after {rss_after / MiB:.1f} MiB, growth {(rss_after - rss_before) / MiB:+.1f} MiB")

    assert max(during) < 2.0 and max(during_flood) < 2.0
    assert max(cli) < 5.0  # an interpreter start on a shared machine, mostly
    assert open_flood <= MAX_CONNS
    # every holding client was dropped at its deadline, none lasted to the end of the test
    assert len(slow) == 25 and all(CONN_DEADLINE - 1 <= v <= CONN_DEADLINE + 3 for v in slow), slow
    assert all(v.startswith(b"HTTP/1.1 400") for k, v in attack.answers.items() if k.startswith("garbage"))
    for k in ("huge-request-line", "huge-header"):  # 413, or the connection reset before it was read
        assert attack.answers.get(k, b"") in (b"",) or attack.answers[k].startswith(b"HTTP/1.1 413"), attack.answers
    assert rss_after - rss_before < 16 * MiB and rss_peak - rss_before < 32 * MiB


def test_a_client_that_never_reads_a_large_answer_holds_nothing_but_its_own_socket():
    """The write side in isolation: a 16 MiB answer, far beyond a socket buffer, to a client
    that never reads; another client meanwhile gets its answer at once."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="ar-ctl-", dir="/tmp")
    path = os.path.join(folder, "control.sock")
    sel = selectors.DefaultSelector()
    big = b"x" * (16 * MiB)
    server = ControlServer(path, sel, lambda method, target: (200, "text/plain", big if target == "/big" else b"ok\n"))
    server.listen()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            now = time.monotonic()
            for key, _ in sel.select(max(0.0, min(0.1, server.next_timer() - now))):
                key.data()
            server.expire(time.monotonic())

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog.connect(path)
        hog.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        time.sleep(0.3)
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            code, body = control_request(path, "GET", "/small", timeout=5)
            times.append(time.monotonic() - t0)
            assert (code, body) == (200, b"ok\n")
        print(f"\nwhile a 16 MiB answer waits on a reader that never reads: other answers in max "
              f"{max(times) * 1000:.1f} ms")
        assert max(times) < 0.5
        hog.settimeout(CONN_DEADLINE + 5)
        t0 = time.monotonic()
        got = 0
        time.sleep(CONN_DEADLINE)  # the hog wakes up too late: the rest of its answer is gone
        try:
            while chunk := hog.recv(1 << 20):
                got += len(chunk)
        except OSError:
            pass
        assert got < len(big), "the service waited for a reader that never read"
        assert not server.conns
    finally:
        stop.set()
        t.join(2)
        server.close()
        os.rmdir(folder)


# -- the Configuration service -------------------------------------------------------------------

DEEP = 100_000
MILLION = 1_000_000


class HostileService(ConfigService):
    """The test Configuration service with hostile answers on top of its own faults."""

    def _fault(self, h, fault):
        kind = fault[0]
        if kind not in ("deep", "deep_unknown", "utf8", "million_specs", "many_specs", "million_junk", "endless_fast",
                        "endless_slow"):
            return super()._fault(h, fault)
        h.close_connection = True
        head = b'{"revision": "hostile", "complete": true, '
        if kind == "deep":
            return self._send(h, 200, head + b'"upserted": ' + b"[" * DEEP + b"]" * DEEP + b"}")
        if kind == "deep_unknown":
            return self._send(h, 200, head + b'"extra": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}")
        if kind == "utf8":
            return self._send(h, 200, b'{"revision": "bad \xff\xfe\xc3\x28", "complete": true}')
        if kind == "million_specs":
            return self._send(h, 200, head + b'"upserted": [' + b",".join([b"{}"] * MILLION) + b"]}")
        if kind == "many_specs":  # under MAX_VALUES, over MAX_ENTRIES
            return self._send(h, 200, head + b'"upserted": [' + b",".join([b"{}"] * (MAX_ENTRIES * 20)) + b"]}")
        if kind == "million_junk":
            return self._send(h, 200, head + b'"deleted": [' + b",".join([b"0"] * MILLION) + b"]}")
        # a body that never ends: chunked, fast (1 MiB chunks) or slow (a byte every 0.2 s)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.write(b"%x\r\n%s\r\n" % (len(head) + 13, head + b'"upserted": ['))
        piece = b" " * MiB if kind == "endless_fast" else b" "
        frame = b"%x\r\n%s\r\n" % (len(piece), piece)
        while not self.release.is_set():
            h.wfile.write(frame)
            h.wfile.flush()
            if kind == "endless_slow":
                self.release.wait(0.2)


HOSTILE = {  # fault -> what last_error must say
    "deep": "answer is not usable JSON: nested too deep",
    "deep_unknown": "answer is not usable JSON: nested too deep",
    "utf8": "answer is not JSON: Invalid UTF-8",
    "million_specs": f"answer too large: more than {MAX_VALUES} JSON values",
    "million_junk": f"answer too large: more than {MAX_VALUES} JSON values",
    "many_specs": f"answer is not the right shape: $.upserted: Expected `array` of length <= {MAX_ENTRIES}",
    "endless_fast": f"answer too large: more than {MAX_BODY} bytes",
    "endless_slow": "timeout: the answer took longer than 10s",
}


@pytest.mark.timeout(240)
def test_hostile_configuration_answers_fail_visibly_and_change_nothing(service_factory):
    server = HostileService()
    try:
        a = spec(plugin="ok", interval="1s")
        server.publish([a])
        svc = service_factory(conf(server, interval="1s", timeout="1s"), folder=False)
        make_plugin(svc.plugins, "ok", OK_PLUGIN)
        svc.start()
        pid_a = wait_jobs(svc, {a["uuid"]})["jobs"][0]["pid"]
        svc.wait_result(a["uuid"])
        for _ in range(5):
            fast_status(svc)
        pid = svc.proc.pid
        rss_start = rss(pid)
        figures = []
        for fault, error in HOSTILE.items():
            before = http_source(fast_status(svc))
            rss_before = rss(pid)
            sampler = RssSampler(pid)
            results_before = len(svc.results_for(a["uuid"]))
            server.fault = (fault,)
            t0 = time.monotonic()
            times = []

            def failed(s):
                times.append(timed_status(svc))
                return s["consecutive_failures"] >= 1 and s["last_error"] and error in s["last_error"]
            source = wait_source(svc, failed, f"a failed sync for {fault}", timeout=60)
            took = time.monotonic() - t0
            assert source["revision"] == before["revision"], source  # nothing of it was applied
            status = fast_status(svc)
            assert pids(status) == {a["uuid"]: pid_a} and status["rejected"] == []
            svc.wait_result(a["uuid"], results_before + 1, timeout=20)
            # the service answers properly again: the next sync succeeds
            b = spec(plugin="ok", interval="1h")
            server.fault = None
            rev = server.publish([a, b])
            source = wait_source(svc, lambda s: s["revision"] == rev and s["consecutive_failures"] == 0,
                                 f"a good sync after {fault}", timeout=60)
            assert source["last_error"] is None
            wait_jobs(svc, {a["uuid"], b["uuid"]})
            server.publish([a])
            wait_jobs(svc, {a["uuid"]})
            assert pids(fast_status(svc))[a["uuid"]] == pid_a  # the good job was never restarted
            peak = sampler.stop()
            after = rss(pid)
            figures.append((fault, took, max(times), len(times), rss_before, peak, after))
            assert max(times) < 2.0, (fault, times)
        rss_end = rss(pid)
        assert svc.proc.poll() is None
    finally:
        server.close()
    print("\nfault          failed after  status max (n)   RSS before -> peak -> after (MiB)")
    for fault, took, worst, n, before, peak, after in figures:
        print(f"{fault:14} {took:6.1f} s   {worst * 1000:7.1f} ms ({n:3})   "
              f"{before / MiB:6.1f} -> {peak / MiB:6.1f} -> {after / MiB:6.1f}")
    print(f"supervisor RSS at start {rss_start / MiB:.1f} MiB, at the end {rss_end / MiB:.1f} MiB, "
          f"growth {(rss_end - rss_start) / MiB:+.1f} MiB")
    for fault, _, _, _, before, peak, after in figures:
        # a body that never ends is read up to MAX_BODY and then dropped; the rest cost little
        assert peak - before < (MAX_BODY if fault == "endless_fast" else 0) + 32 * MiB, fault
    assert rss_end - rss_start < 48 * MiB
