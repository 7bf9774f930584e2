"""The real publisher process: settings and stats over pipes to a stand-in supervisor,
results from stand-in runners over its Unix socket; acks after commit, delivery to a file
sink, SIGKILL and restart, clean stop, bad frames."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import msgspec
import pytest

from runner.framing import Channel
from runner.wire import (Acked, AttestationResult, LastResult, PluginInfo, Publish, PublisherSettings, PublisherStats,
                         PublisherToRunner, PublisherToSupervisor)
from runner.units import Duration, Size, enc_hook
from supervisor.config import Publisher, Sink
from supervisor.publisher.process import EXIT_BAD_FRAME
from supervisor.publisher_link import listen_for_results

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WAIT = 15.0  # generous for a loaded CI host; each wait returns as soon as its condition holds


def make_result(i: int) -> AttestationResult:
    return AttestationResult(
        uuid=str(uuidlib.uuid4()), runtime_uuid="0b6d0000-0000-4000-8000-000000000000",
        job_uuid=f"job-{i % 3}", job_revision="rev1",
        plugin=PluginInfo(name="sshd-config", version="1.0.0", sha256="ab" * 32),
        title=f"check {i}", labels={"env": "test"}, assessment_plan_uuid=None, component_uuid=None,
        control_id=None, start="2026-11-27T12:00:00.123456Z", end="2026-11-27T12:00:00.456789Z",
        status="satisfied", reason=None, observations=[{"description": f"observation {i}"}])


def publish_frame(result: AttestationResult) -> Publish:
    """What a runner sends for one result."""
    return Publish(job_uuid=result.job_uuid, last=LastResult(result.uuid, result.status, result.reason, result.end),
                   duration=0.01, next_run_at=None, result=msgspec.Raw(msgspec.msgpack.encode(result)))


def connect_runner(path: str) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    fd = sock.detach()
    return Channel(fd, fd, decode_type=PublisherToRunner)


class PublisherUnderTest:
    """One publisher process, the supervisor's end of its two pipes, and one runner's
    connection to its results socket (held here, as the supervisor holds it, across restarts)."""

    listeners: dict[Path, socket.socket] = {}

    def __init__(self, tmp_path: Path, flush_interval: float = 0.05, sinks: list[Sink] | None = None,
                 batch_max: int = 50, outbox_max: int = 64 << 20):
        self.tmp_path = tmp_path
        self.batch_max = batch_max
        self.outbox_max = outbox_max
        self.jsonl = tmp_path / "out" / "results.jsonl"
        self.sinks = sinks or [Sink(name="archive", kind="file", path=str(self.jsonl))]
        self.flush_interval = flush_interval
        self.stderr_path = tmp_path / f"publisher-{time.monotonic_ns()}.err"
        if tmp_path not in self.listeners:
            (tmp_path / "run").mkdir(exist_ok=True)
            self.listeners[tmp_path] = listen_for_results(str(tmp_path / "run"))
        listener = self.listeners[tmp_path]
        to_pub_r, to_pub_w = os.pipe()
        from_pub_r, from_pub_w = os.pipe()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.publisher", str(to_pub_r), str(from_pub_w), str(os.getpid()),
                 str(listener.fileno())],
                pass_fds=(to_pub_r, from_pub_w, listener.fileno()), stderr=err, cwd=PROJECT_ROOT)
        os.close(to_pub_r)
        os.close(from_pub_w)
        self.channel = Channel(from_pub_r, to_pub_w, decode_type=PublisherToSupervisor, enc_hook=enc_hook)
        self.runner = connect_runner(listener.getsockname())
        self.acked: list[str] = []
        self.stats: list[PublisherStats] = []

    def start(self) -> "PublisherUnderTest":
        config = Publisher(outbox_max=Size(self.outbox_max), batch_max=self.batch_max,
                           flush_interval=Duration(self.flush_interval), sink=self.sinks)
        self.channel.send(PublisherSettings(state_dir=str(self.tmp_path / "state"),
                                            publisher=msgspec.Raw(msgspec.msgpack.encode(config, enc_hook=enc_hook)),
                                            log_level="debug"))
        return self

    def publish(self, results: list[AttestationResult], runner: Channel | None = None) -> list[str]:
        runner = runner or self.runner
        for result in results:
            runner.send(publish_frame(result))
        assert runner.flush_blocking(WAIT)
        return [r.uuid for r in results]

    def pump(self, timeout: float) -> None:
        """Read what the publisher sent within `timeout` seconds."""
        ready, _, _ = select.select([self.channel.rfd, self.runner.rfd], [], [], timeout)
        if self.runner.rfd in ready:
            for frame in self.runner.read():
                self.acked += frame.uuids
        if self.channel.rfd in ready:
            self.stats += self.channel.read()

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; stderr:\n{self.stderr()}"
            self.pump(0.05)

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"publisher did not exit within {timeout}s; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        self.channel.close()
        self.runner.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def publishers(tmp_path):
    started: list[PublisherUnderTest] = []

    def start(**kwargs) -> PublisherUnderTest:
        pub = PublisherUnderTest(tmp_path, **kwargs).start()
        started.append(pub)
        return pub

    yield start
    for pub in started:
        pub.close()
    PublisherUnderTest.listeners.pop(tmp_path).close()


def delivered_lines(pub: PublisherUnderTest) -> list[dict]:
    """The complete lines of the file sink (a batch may be half written as we look)."""
    if not pub.jsonl.exists():
        return []
    return [json.loads(line) for line in pub.jsonl.read_text().split("\n")[:-1]]


def delivered_uuids(pub: PublisherUnderTest) -> set[str]:
    return {line["uuid"] for line in delivered_lines(pub)}


def test_acks_after_commit_and_file_sink_gets_json_lines(publishers):
    pub = publishers()
    results = [make_result(i) for i in range(120)]
    uuids = pub.publish(results[:70]) + pub.publish(results[70:])
    pub.wait_for(lambda: len(pub.acked) >= len(uuids), "acks")
    assert sorted(pub.acked) == sorted(uuids)
    pub.wait_for(lambda: len(delivered_lines(pub)) >= len(uuids), "delivery to the file sink")
    lines = delivered_lines(pub)
    assert [line["uuid"] for line in lines] == uuids  # in order, each once
    # Every field as the runner encoded it, in the SPEC's order.
    assert lines[5] == json.loads(msgspec.json.encode(results[5]))
    assert list(lines[5]) == list(AttestationResult.__struct_fields__)
    assert oct(pub.jsonl.stat().st_mode & 0o777) == oct(0o640 & ~_umask())
    pub.wait_for(lambda: pub.stats and pub.stats[-1].sinks[0].delivered == len(uuids), "stats")
    sink = pub.stats[-1].sinks[0]
    assert (sink.name, sink.kind, sink.pending, sink.failures, sink.last_error) == ("archive", "file", 0, 0, None)
    assert sink.last_success.endswith("Z") and sink.oldest_pending_age is None
    assert pub.stats[-1].outbox_results == 0 and pub.stats[-1].dropped == 0


def test_sigkill_after_ack_loses_no_acknowledged_result(publishers, tmp_path):
    # The sink's folder is a file, so it cannot deliver: the results are acknowledged but not
    # yet delivered when the publisher is killed.
    (tmp_path / "blocker").write_text("")
    pub = publishers(sinks=[Sink(name="archive", kind="file", path=str(tmp_path / "blocker" / "results.jsonl"))])
    uuids = pub.publish([make_result(i) for i in range(30)])
    pub.wait_for(lambda: len(pub.acked) == len(uuids), "acks")
    pub.wait_for(lambda: pub.stats and pub.stats[-1].outbox_results == 30, "stats showing the backlog")
    assert pub.stats[-1].sinks[0].pending == 30 and pub.stats[-1].sinks[0].oldest_pending_age > 0
    pub.proc.send_signal(signal.SIGKILL)
    assert pub.wait_exit() == -signal.SIGKILL
    assert delivered_uuids(pub) == set()

    again = publishers()
    again.wait_for(lambda: delivered_uuids(again) >= set(uuids), "delivery after the restart")

    # Killed mid-stream, with deliveries under way: every ack still ends up in the file.
    more = []
    for i in range(10):
        more += again.publish([make_result(100 + 10 * i + k) for k in range(10)])
    again.wait_for(lambda: len(again.acked) == len(more), "acks")
    again.proc.send_signal(signal.SIGKILL)
    again.wait_exit()
    third = publishers()
    third.wait_for(lambda: delivered_uuids(third) >= set(uuids + more), "delivery after the second restart")


def test_closing_the_pipe_drains_the_sinks_and_exits_0(publishers):
    pub = publishers(flush_interval=3600)  # no periodic look: delivery follows the commits
    uuids = pub.publish([make_result(i) for i in range(25)])
    pub.wait_for(lambda: len(pub.acked) == len(uuids), "acks")
    os.close(pub.channel.wfd)
    pub.channel.wfd = None
    started = time.monotonic()
    assert pub.wait_exit(10) == 0
    assert time.monotonic() - started < 8  # the drain takes at most 5 s
    assert delivered_uuids(pub) == set(uuids)


def test_sigterm_stops_cleanly(publishers):
    pub = publishers()
    pub.wait_for(lambda: pub.stats, "the first stats")
    pub.proc.send_signal(signal.SIGTERM)
    assert pub.wait_exit(10) == 0
    assert "signal SIGTERM" in pub.stderr()


def test_garbage_from_a_runner_closes_only_its_connection(publishers):
    pub = publishers()
    other = connect_runner(PublisherUnderTest.listeners[pub.tmp_path].getsockname())
    try:
        other.send_payload(b"\xc1 not msgpack")
        assert other.flush_blocking(WAIT)
        deadline = time.monotonic() + WAIT
        while not other.eof:  # the publisher hangs up on that runner ...
            assert time.monotonic() < deadline, pub.stderr()
            select.select([other.rfd], [], [], 0.1)
            other.read()
    finally:
        other.close()
    assert "sent a bad frame" in pub.stderr() and "closing its connection" in pub.stderr()
    uuids = pub.publish([make_result(i) for i in range(5)])  # ... and goes on serving the others
    pub.wait_for(lambda: len(pub.acked) == 5, "acks on the good connection")
    pub.wait_for(lambda: delivered_uuids(pub) == set(uuids), "delivery")
    assert pub.proc.poll() is None


def test_garbage_frame_exits_nonzero_and_committed_results_survive(publishers):
    pub = publishers(flush_interval=3600)
    uuids = pub.publish([make_result(i) for i in range(5)])
    pub.wait_for(lambda: len(pub.acked) == 5, "acks")
    pub.channel.send_payload(b"\xc1 not msgpack")
    assert pub.wait_exit() == EXIT_BAD_FRAME
    assert "bad frame from the supervisor: undecodable frame" in pub.stderr()
    assert delivered_uuids(pub) <= set(uuids)

    again = publishers()
    again.wait_for(lambda: delivered_uuids(again) == set(uuids), "delivery after the restart")


def test_oversize_frame_exits_nonzero(publishers):
    pub = publishers()
    pub.wait_for(lambda: pub.stats, "the first stats")
    os.write(pub.channel.wfd, (1 << 31).to_bytes(4, "big"))
    assert pub.wait_exit() == EXIT_BAD_FRAME
    assert "byte limit" in pub.stderr()


def test_unreachable_hub_keeps_results_pending_and_does_not_hold_back_the_file_sink(publishers, tmp_path):
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        file_sink = Sink(name="archive", kind="file", path=str(tmp_path / "out" / "results.jsonl"))
        hub = Sink(name="hub", kind="http", url=f"http://127.0.0.1:{port}/v1/results", allow_http=True)
        pub = publishers(sinks=[file_sink, hub])
        uuids = pub.publish([make_result(i) for i in range(3)])

        def hub_failed():
            return pub.stats and pub.stats[-1].sinks[1].failures >= 1

        pub.wait_for(hub_failed, "the hub sink to fail")
        pub.wait_for(lambda: delivered_uuids(pub) == set(uuids), "the file sink, not held back by the hub")
        pub.wait_for(lambda: pub.stats[-1].sinks[0].pending == 0, "stats")
        hub_stats = pub.stats[-1].sinks[1]
        assert (hub_stats.kind, hub_stats.pending, hub_stats.delivered) == ("http", 3, 0)
        assert "cannot connect" in hub_stats.last_error and "refused" in hub_stats.last_error
        assert pub.stats[-1].outbox_results == 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_file_sink_appends_lines_and_follows_rotation(tmp_path):
    from supervisor.publisher.sink import FileSink, HttpSink, make_sink

    path = tmp_path / "new" / "folder" / "results.jsonl"
    sink = make_sink(Sink(name="archive", kind="file", path=str(path)), str(tmp_path))
    assert isinstance(sink, FileSink)
    first, second = make_result(1), make_result(2)
    sink.deliver([msgspec.msgpack.encode(first)])
    path.rename(tmp_path / "rotated.jsonl")  # as logrotate does
    sink.deliver([msgspec.msgpack.encode(second), msgspec.msgpack.encode(first)])
    sink.close()
    assert [json.loads(x)["uuid"] for x in (tmp_path / "rotated.jsonl").read_text().splitlines()] == [first.uuid]
    assert [json.loads(x)["uuid"] for x in path.read_text().splitlines()] == [second.uuid, first.uuid]

    hub = make_sink(Sink(name="hub", kind="http", url="https://hub.example.org/v1/results"), str(tmp_path))
    assert isinstance(hub, HttpSink) and hub.kind == "http"


def test_file_sink_failure_raises_oserror(tmp_path):
    from supervisor.publisher.sink import FileSink

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    sink = FileSink(Sink(name="archive", kind="file", path=str(blocker / "results.jsonl")))
    with pytest.raises(OSError):
        sink.deliver([msgspec.msgpack.encode(make_result(1))])


def test_file_sink_cuts_a_torn_last_line_left_by_a_crash(tmp_path):
    from supervisor.publisher.sink import FileSink

    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"uuid": "whole"}\n{"uuid": "to')
    sink = FileSink(Sink(name="archive", kind="file", path=str(path)))
    result = make_result(1)
    sink.deliver([msgspec.msgpack.encode(result)])
    sink.close()
    assert [json.loads(x)["uuid"] for x in path.read_text().splitlines()] == ["whole", result.uuid]
