"""The http sink: delivery rate from the outbox to a loopback hub, batched vs one POST per
result, and the publisher's memory with a million results pending.

    python benchmarks/bench_hub.py [--results N] [--pending N] [--window S]

1. batched: N results are written straight into an Outbox (on disk, fsynced), then a real
   publisher process (`python -m supervisor.publisher`, driven over its pipes as the
   supervisor does) delivers them to a hub on 127.0.0.1 with batch_max = 500. The rate is
   results per second between the first request and the last result at the hub; durability
   stays on (the outbox is fsynced, cursors are saved once a second).
2. one POST per result: the same with batch_max = 1, over a fixed window. Target: batching
   at least 20x faster.
3. memory: `--pending` results (1 million) in an outbox, a publisher started on it with its
   hub down (connections refused): its RSS and USS once it has opened the outbox and failed a
   few deliveries, against the same publisher with one result pending.

The hub is cheap on purpose: http.server with HTTP/1.1 keep-alive that reads each body,
counts the results in it and answers 200 with no body.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import msgspec  # noqa: E402
import psutil  # noqa: E402

from runner.framing import Channel  # noqa: E402
from runner.wire import AttestationResult, PluginInfo  # noqa: E402
from supervisor.config import Publisher, Sink  # noqa: E402
from supervisor.publisher.outbox import Outbox  # noqa: E402
from runner.wire import PublisherSettings, PublisherStats, PublisherToSupervisor  # noqa: E402
from supervisor.publisher_link import listen_for_results  # noqa: E402
from runner.units import Duration, Size, enc_hook  # noqa: E402

TARGET_RATE = 20_000
TARGET_SPEEDUP = 20.0
OUTBOX_MAX = 4 << 30  # no drops in reach
MARK = b'"runtime_uuid":'  # once per result in the JSON our sink sends


def make_payloads(count: int) -> list[bytes]:
    """`count` distinct results of a realistic shape (about 450 bytes of msgpack each)."""
    template = AttestationResult(
        uuid="", runtime_uuid=str(uuidlib.uuid4()), job_uuid=str(uuidlib.uuid4()), job_revision="r" * 16,
        plugin=PluginInfo(name="sshd-config", version="1.0.0", sha256="ab" * 32), title="sshd hardening",
        labels={"env": "prod"}, assessment_plan_uuid=None, component_uuid=None, control_id="ac-17",
        start="2026-11-27T12:00:00.123456Z", end="2026-11-27T12:00:00.456789Z", status="satisfied",
        observations=[{"uuid": "o1", "description": "PermitRootLogin is no", "methods": ["TEST"]}])
    encode = msgspec.msgpack.encode
    base = uuidlib.uuid4().hex[:24]
    return [encode(msgspec.structs.replace(template, uuid=f"{base}{i:012x}")) for i in range(count)]


def fill_outbox(folder: str, count: int, chunk: int = 20_000, sink: str = "hub") -> float:
    """Write `count` results into a new outbox, group commits of `chunk`; returns seconds."""
    started = time.monotonic()
    with Outbox(folder, OUTBOX_MAX, sinks=[sink]) as box:
        for start in range(0, count, chunk):
            box.append_many(make_payloads(min(chunk, count - start)))
    return time.monotonic() - started


# -- the hub ----------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # no getfqdn()
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        pass


def serve_posts(on_post, path: str = "/") -> tuple[_Server, str]:
    """A loopback HTTP server that answers every POST with `on_post(body)` (a status, empty
    body), on a thread of its own; the server and its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            status = on_post(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response_only(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{path}"


class CheapHub:
    def __init__(self):
        self.results = 0
        self.requests = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.lock = threading.Lock()
        self.server, self.url = serve_posts(self._take, "/v1/results")

    def _take(self, body: bytes) -> int:
        n = body.count(MARK)
        now = time.monotonic()
        with self.lock:
            self.results += n
            self.requests += 1
            if self.first_at is None:
                self.first_at = now
            self.last_at = now
        return 200

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# -- a publisher process driven like the supervisor drives it ---------------------------------------

class PublisherProc:
    def __init__(self, state_dir: str, url: str, batch_max: int, log_path: str, sink: Sink | None = None):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        os.makedirs(os.path.join(state_dir, "run"), exist_ok=True)
        self.listener = listen_for_results(os.path.join(state_dir, "run"))  # no runner connects: the outbox is filled
        listen_fd = self.listener.fileno()
        with open(log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.publisher", str(to_r), str(from_w), str(os.getpid()), str(listen_fd)],
                pass_fds=(to_r, from_w, listen_fd), stderr=err, cwd=REPO)
        os.close(to_r)
        os.close(from_w)
        self.channel = Channel(from_r, to_w, decode_type=PublisherToSupervisor, enc_hook=enc_hook)
        sink = sink or Sink(name="hub", kind="http", url=url, allow_http=True, timeout=Duration(10),
                            retry_max=Duration(1))
        config = Publisher(outbox_max=Size(OUTBOX_MAX), batch_max=batch_max, flush_interval=Duration(1), sink=[sink])
        self.channel.send(PublisherSettings(
            state_dir=state_dir, log_level="warning",
            publisher=msgspec.Raw(msgspec.msgpack.encode(config, enc_hook=enc_hook))))
        self.channel.flush_blocking(5)
        self.stats: PublisherStats | None = None

    def pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.channel.rfd], [], [], timeout)
        if ready:
            for frame in self.channel.read():
                if isinstance(frame, PublisherStats):
                    self.stats = frame

    def memory(self) -> dict:
        info = psutil.Process(self.proc.pid).memory_full_info()
        return {"rss_mb": round(info.rss / 2**20, 1), "uss_mb": round(info.uss / 2**20, 1)}

    def stop(self) -> None:
        """SIGKILL: what it did not deliver stays in the outbox, and a measurement needs no drain."""
        self.proc.kill()
        self.proc.wait()
        self.channel.close()
        self.listener.close()


# -- the measurements -------------------------------------------------------------------------------

def bench_rate(base: str, count: int, batch_max: int, window: float | None, log) -> dict:
    """Deliver `count` results (or as many as fit in `window` seconds) from a filled outbox."""
    state = os.path.join(base, f"rate-{batch_max}")
    fill_s = fill_outbox(os.path.join(state, "outbox"), count)
    hub = CheapHub()
    pub = PublisherProc(state, hub.url, batch_max, os.path.join(base, f"publisher-{batch_max}.log"))
    started = time.monotonic()
    try:
        limit = started + (window + 10 if window else 120)
        while time.monotonic() < limit:
            pub.pump(0.05)
            if hub.results >= count:
                break
            if window and hub.first_at and time.monotonic() - hub.first_at >= window:
                break
            if pub.proc.poll() is not None:
                raise RuntimeError(f"the publisher exited with {pub.proc.returncode}")
        with hub.lock:
            results, requests, first, last = hub.results, hub.requests, hub.first_at, hub.last_at
        cpu = psutil.Process(pub.proc.pid).cpu_times()
    finally:
        pub.stop()
        hub.close()
    if not results or first is None:
        raise RuntimeError("no result reached the hub")
    elapsed = max(last - first, 1e-6)
    return {"batch_max": batch_max, "results": results, "requests": requests, "seconds": round(elapsed, 3),
            "per_s": round(results / elapsed), "startup_s": round(first - started, 2),
            "publisher_cpu_s": round(cpu.user + cpu.system, 2), "fill_s": round(fill_s, 2)}


def bench_memory(base: str, pending: int, log) -> dict:
    with socket.socket() as closed:  # bound, not listening: the hub is down
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1/results"
        out = {}
        # The baseline has one result pending: the same code runs (failed deliveries), only the backlog differs.
        for name, count in (("baseline", 1), ("pending", pending)):
            state = os.path.join(base, f"memory-{name}")
            os.makedirs(state)
            fill_s = fill_outbox(os.path.join(state, "outbox"), count)
            if count > 1:
                log(f"    wrote {count:,} results into an outbox in {fill_s:.1f}s "
                    f"({du(os.path.join(state, 'outbox')) / 2**20:,.0f} MiB)")
            pub = PublisherProc(state, url, 500, os.path.join(base, f"publisher-memory-{name}.log"))
            try:
                started = time.monotonic()
                # Wait until it has opened the outbox and failed a few deliveries (each reads a batch).
                while time.monotonic() - started < 30:
                    pub.pump(0.1)
                    if pub.stats and pub.stats.sinks[0].failures >= 3:
                        break
                time.sleep(0.5)
                pub.pump(0)
                mem = pub.memory()
                stats = pub.stats
            finally:
                pub.stop()
            out[name] = {"pending": stats.sinks[0].pending if stats else None,
                         "failures": stats.sinks[0].failures if stats else None, **mem}
            shutil.rmtree(state, ignore_errors=True)
    out["uss_growth_mb"] = round(out["pending"]["uss_mb"] - out["baseline"]["uss_mb"], 1)
    return out


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def default_folder() -> str:
    """The temp folder unless it is tmpfs (then fsync is free and the numbers flatter us)."""
    temp = tempfile.gettempdir()
    try:
        import outbox_bench
        if outbox_bench.filesystem_of(temp) == "tmpfs":
            return os.path.dirname(os.path.abspath(__file__))
    except ImportError:
        pass
    return temp


def run(results: int = 200_000, single_window: float = 5.0, pending: int = 1_000_000, log=print) -> dict:
    base = tempfile.mkdtemp(prefix="hub-bench-", dir=default_folder())
    report: dict = {"folder_filesystem": None}
    try:
        try:
            import outbox_bench
            report["folder_filesystem"] = outbox_bench.filesystem_of(base)
        except ImportError:
            pass
        log(f"  [batched] {results:,} results, batch_max 500 ...")
        batched = bench_rate(base, results, 500, None, log)
        report["batched"] = batched
        log(f"    {batched['per_s']:,} results/s ({batched['requests']:,} requests in {batched['seconds']}s; "
            f"publisher CPU {batched['publisher_cpu_s']}s) -> {batched['per_s'] / TARGET_RATE:.2f}x the "
            f"target of {TARGET_RATE:,}/s")
        log(f"  [single] one POST per result for {single_window:g}s ...")
        single = bench_rate(base, 50_000, 1, single_window, log)
        report["single"] = single
        report["speedup"] = round(batched["per_s"] / single["per_s"], 1)
        log(f"    {single['per_s']:,} results/s -> batching is {report['speedup']}x faster "
            f"(target >= {TARGET_SPEEDUP:g}x)")
        log(f"  [memory] publisher with {pending:,} results pending and its hub down ...")
        report["memory"] = bench_memory(base, pending, log)
        m = report["memory"]
        log(f"    1 pending: RSS {m['baseline']['rss_mb']} MB, USS {m['baseline']['uss_mb']} MB; "
            f"{m['pending']['pending']:,} pending: RSS {m['pending']['rss_mb']} MB, USS {m['pending']['uss_mb']} MB "
            f"(+{m['uss_growth_mb']} MB)")
        report["targets"] = {"rate_ok": batched["per_s"] >= TARGET_RATE, "speedup_ok": report["speedup"] >= TARGET_SPEEDUP}
        return report
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=200_000, help="results for the batched case")
    parser.add_argument("--window", type=float, default=5.0, help="seconds of one POST per result")
    parser.add_argument("--pending", type=int, default=1_000_000, help="results pending for the memory case")
    args = parser.parse_args()
    started = time.monotonic()
    run(args.results, args.window, args.pending)
    print(f"  took {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
