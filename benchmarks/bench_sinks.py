"""The ccf and nats sinks: delivery rate from the outbox, each against a bare loop doing the
same requests in the same run.

    python benchmarks/bench_sinks.py [--ccf N] [--nats N]

1. ccf: N results are written into an Outbox, then a real publisher process (driven over its
   pipes as the supervisor drives it) delivers them as Evidence to a loopback stand-in of the
   CCF API, one POST per result. Baseline: one urllib3 PoolManager POSTing the same number
   of prebuilt Evidence bodies, back to back, to the same stand-in. Target: >= 500 evidence/s.
2. nats: a real nats-server with JetStream (file storage) on a free loopback port and one
   stream. A backlog of N (>= 20,000) results in the outbox is drained into it by a publisher
   (batch_max 500), taken on PubAck. Baseline: a bare socket that publishes the same JSON
   bodies as HPUB frames with Nats-Msg-Id, 500 in flight, and counts the PubAcks, into a
   second stream on the same server. Target: >= 10,000 results/s.
Rates count from the first result at the receiver to the last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import msgspec  # noqa: E402
import urllib3  # noqa: E402

from bench_hub import PublisherProc, _Server, default_folder, fill_outbox, make_payloads  # noqa: E402
from runner.units import Duration  # noqa: E402
from supervisor.config import Sink  # noqa: E402
from supervisor.publisher.ccf import evidence  # noqa: E402
from supervisor.publisher.nats import NatsClient  # noqa: E402

CCF_TARGET = 500
NATS_TARGET = 10_000
BATCH = 500


# -- ccf ------------------------------------------------------------------------------------

class CcfStandIn:
    """POST /api/evidence: Content-Type must be application/json, the body a JSON object;
    201 {"data": {"uuid": ...}}. Keep-alive, TCP_NODELAY (as Go's net/http)."""

    def __init__(self):
        self.count = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Type") != "application/json" or not body.startswith(b"{"):
                    self._answer(415 if self.headers.get("Content-Type") != "application/json" else 400, b"{}")
                    return
                doc = json.loads(body)
                now = time.monotonic()
                with stand_in.lock:
                    stand_in.count += 1
                    stand_in.first_at = stand_in.first_at or now
                    stand_in.last_at = now
                self._answer(201, b'{"data": {"uuid": "%s"}}' % doc["uuid"].encode())

            def _answer(self, status: int, body: bytes):
                self.send_response_only(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def reset(self):
        with self.lock:
            self.count, self.first_at, self.last_at = 0, None, 0.0

    def rate(self) -> tuple[int, float]:
        with self.lock:
            return self.count, max(self.last_at - (self.first_at or self.last_at), 1e-6)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def bench_ccf(base: str, count: int, log) -> dict:
    stand_in = CcfStandIn()
    try:
        # the bare loop: prebuilt bodies, one PoolManager, one POST each
        decode = msgspec.msgpack.decode
        bodies = [msgspec.json.encode(evidence(r, msgspec.json.encode(r), "sshd hardening", "bench"))
                  for r in (decode(p) for p in make_payloads(count))]
        pool = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False)
        url = stand_in.url + "/api/evidence"
        for body in bodies:
            resp = pool.request("POST", url, body=body, headers={"Content-Type": "application/json"})
            assert resp.status == 201, resp.status
        bare_n, bare_s = stand_in.rate()
        stand_in.reset()
        log(f"    bare urllib3 loop: {bare_n:,} POSTs in {bare_s:.2f}s -> {bare_n / bare_s:,.0f}/s")

        state = os.path.join(base, "ccf")
        fill_outbox(os.path.join(state, "outbox"), count, sink="ccf")
        sink = Sink(name="ccf", kind="ccf", url=stand_in.url, allow_http=True, timeout=Duration(10),
                    retry_max=Duration(1))
        pub = PublisherProc(state, "", BATCH, os.path.join(base, "publisher-ccf.log"), sink=sink)
        try:
            _drain(pub, lambda: stand_in.count >= count, 120)
        finally:
            pub.stop()
        ours_n, ours_s = stand_in.rate()
    finally:
        stand_in.close()
    ours, bare = ours_n / ours_s, bare_n / bare_s
    return {"results": ours_n, "per_s": round(ours), "seconds": round(ours_s, 2),
            "bare_per_s": round(bare), "ratio_to_bare": round(ours / bare, 2), "target_per_s": CCF_TARGET,
            "target_ok": ours >= CCF_TARGET}


# -- nats -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, base: str):
        self.port = free_port()
        self.store = os.path.join(base, "jetstream")
        self.proc = subprocess.Popen(["nats-server", "-js", "-sd", self.store, "-a", "127.0.0.1",
                                      "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"nats://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                self.client = NatsClient([self.url], 5)
                self.client.connect()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("nats-server did not start")
                time.sleep(0.1)

    def api(self, subject: str, doc: dict | None = None) -> dict:
        answer = json.loads(self.client.request(subject, json.dumps(doc).encode() if doc else b"").payload)
        if "error" in answer:
            raise RuntimeError(f"{subject}: {answer['error']}")
        return answer

    def stream(self, name: str, subjects: list[str]) -> None:
        self.api(f"$JS.API.STREAM.CREATE.{name}", {"name": name, "subjects": subjects, "storage": "file",
                                                   "duplicate_window": 120_000_000_000})

    def messages(self, name: str) -> int:
        return self.api(f"$JS.API.STREAM.INFO.{name}")["state"]["messages"]

    def close(self):
        self.proc.kill()
        self.proc.wait()


def bare_nats_loop(url: str, bodies: list[tuple[str, bytes]], subject: str) -> float:
    """Publish every (uuid, json) with its Nats-Msg-Id, BATCH in flight, counting PubAcks."""
    host, port = url.removeprefix("nats://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")
    f.readline()  # INFO
    sock.sendall(b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\nSUB _INBOX.bare.> 1\r\n')
    started = time.monotonic()
    for start in range(0, len(bodies), BATCH):
        chunk = bodies[start:start + BATCH]
        frames = bytearray()
        for i, (uuid, body) in enumerate(chunk):
            head = b"NATS/1.0\r\nNats-Msg-Id: " + uuid.encode() + b"\r\n\r\n"
            frames += b"HPUB %s _INBOX.bare.%d %d %d\r\n" % (subject.encode(), i, len(head), len(head) + len(body))
            frames += head + body + b"\r\n"
        sock.sendall(frames)
        acks = 0
        while acks < len(chunk):
            line = f.readline()
            if line.startswith(b"MSG"):
                payload = f.read(int(line.split()[-1]) + 2)
                if b'"seq"' not in payload:
                    raise RuntimeError(f"bare loop: not a PubAck: {payload[:200]!r}")
                acks += 1
            elif line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
    seconds = time.monotonic() - started
    sock.close()
    return seconds


def bench_nats(base: str, count: int, log) -> dict:
    if shutil.which("nats-server") is None:
        raise RuntimeError("no nats-server on PATH (apt-get install nats-server)")
    server = NatsServer(base)
    try:
        server.stream("OURS", ["ours.>"])
        server.stream("BARE", ["bare.>"])
        decode, encode = msgspec.msgpack.decode, msgspec.json.encode
        payloads = make_payloads(count)
        bodies = [(r["uuid"], encode(r)) for r in (decode(p) for p in payloads)]
        bare_s = bare_nats_loop(server.url, bodies, "bare.results")
        bare_n = server.messages("BARE")
        log(f"    bare socket loop: {bare_n:,} messages in {bare_s:.2f}s -> {bare_n / bare_s:,.0f}/s")

        state = os.path.join(base, "nats")
        fill_outbox(os.path.join(state, "outbox"), count, sink="js")
        sink = Sink(name="js", kind="nats", url=server.url, allow_plain=True, subject="ours.{job_uuid}",
                    timeout=Duration(10), retry_max=Duration(1))
        pub = PublisherProc(state, "", BATCH, os.path.join(base, "publisher-nats.log"), sink=sink)
        first = last = None
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pub.pump(0.005)
                n = server.messages("OURS")
                now = time.monotonic()
                if n and first is None:
                    first = (now, n)
                if n >= count:
                    last = now
                    break
                if pub.proc.poll() is not None:
                    raise RuntimeError(f"the publisher exited with {pub.proc.returncode}")
        finally:
            pub.stop()
        ours_n = server.messages("OURS")
    finally:
        server.close()
    if first is None or last is None:
        raise RuntimeError(f"only {ours_n:,} of {count:,} results reached the stream")
    # the first poll that saw messages already saw some of them: count from there
    ours_s = max(last - first[0], 1e-6)
    ours = (ours_n - first[1]) / ours_s
    bare = bare_n / bare_s
    return {"results": ours_n, "per_s": round(ours), "seconds": round(ours_s, 2), "bare_per_s": round(bare),
            "ratio_to_bare": round(ours / bare, 2), "target_per_s": NATS_TARGET, "target_ok": ours >= NATS_TARGET}


def _drain(pub: PublisherProc, done, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not done():
        pub.pump(0.05)
        if pub.proc.poll() is not None:
            raise RuntimeError(f"the publisher exited with {pub.proc.returncode}")
    if not done():
        raise RuntimeError(f"not delivered within {limit:g}s")


def run(ccf: int = 5_000, nats: int = 50_000, log=print) -> dict:
    base = tempfile.mkdtemp(prefix="sinks-bench-", dir=default_folder())
    report: dict = {}
    try:
        log(f"  [ccf] {ccf:,} results, one Evidence POST each, to a loopback stand-in ...")
        try:
            r = report["ccf"] = bench_ccf(base, ccf, log)
            log(f"    ours: {r['per_s']:,} evidence/s -> {r['ratio_to_bare']}x the bare loop; "
                f"{r['per_s'] / CCF_TARGET:.1f}x the target of {CCF_TARGET}/s")
        except Exception as e:  # noqa: BLE001 - the other sink is still measured
            report["ccf"] = {"error": str(e)}
            log(f"    FAILED: {e}")
        log(f"  [nats] a backlog of {nats:,} results drained into a JetStream stream (file storage) ...")
        try:
            r = report["nats"] = bench_nats(base, nats, log)
            log(f"    ours: {r['per_s']:,} results/s -> {r['ratio_to_bare']}x the bare loop; "
                f"{r['per_s'] / NATS_TARGET:.1f}x the target of {NATS_TARGET:,}/s")
        except Exception as e:  # noqa: BLE001
            report["nats"] = {"error": str(e)}
            log(f"    FAILED: {e}")
        return report
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ccf", type=int, default=5_000)
    parser.add_argument("--nats", type=int, default=50_000)
    args = parser.parse_args()
    run(args.ccf, args.nats)


if __name__ == "__main__":
    main()
