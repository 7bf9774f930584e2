"""The runner's result link over a real Unix socket: kept until acked, acks read lazily,
a large result's ack read at once, everything resent after a reconnect."""

from __future__ import annotations

import socket
import time

import msgspec
import pytest

from runner.framing import Channel
from runner.poller import Poller
from runner.results import LARGE, ResultLink
from runner.wire import Acked, LastResult, Publish, RunnerToPublisher


def message(uuid: str, size: int = 10) -> Publish:
    return Publish(job_uuid="job", last=LastResult(uuid, "satisfied", None, "2026-12-01T00:00:00.000000Z"),
                   duration=0.01, next_run_at=None, result=msgspec.Raw(msgspec.msgpack.encode("x" * size)))


@pytest.fixture
def publisher(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "results.sock"))
    listener.listen(4)
    listener.settimeout(5)
    yield listener
    listener.close()


def accept(listener) -> Channel:
    conn, _ = listener.accept()
    fd = conn.detach()
    return Channel(fd, fd, RunnerToPublisher)


def frames(channel: Channel, n: int) -> list[Publish]:
    got: list[Publish] = []
    deadline = time.monotonic() + 5
    while len(got) < n:
        assert time.monotonic() < deadline, got
        got += channel.read()
        time.sleep(0.01)
    return got


@pytest.mark.timeout(30)
def test_small_results_wait_for_the_next_one_and_large_ones_are_acked_at_once(publisher):
    poller = Poller()
    link = ResultLink(publisher.getsockname(), 64 << 20, poller)
    assert link.connect(time.monotonic())
    pub = accept(publisher)
    link.publish("a", message("a"))
    assert [f.last.uuid for f in frames(pub, 1)] == ["a"]
    pub.send(Acked(["a"]))
    assert link.channel.rfd not in poller.handlers  # no wake-up for a small result's ack ...
    poller.poll(0.2)
    assert list(link.unacked) == ["a"]
    link.publish("b", message("b"))  # ... it is read before the next result goes out
    assert list(link.unacked) == ["b"]
    big = message("c", LARGE + 1)
    link.publish("c", big)
    assert [f.last.uuid for f in frames(pub, 2)] == ["b", "c"]
    pub.send(Acked(["b", "c"]))
    deadline = time.monotonic() + 5
    while link.unacked:  # a large result: its ack wakes the loop
        assert time.monotonic() < deadline
        poller.poll(0.5)
    assert link.channel.rfd not in poller.handlers  # and it stops listening once it holds none
    link.close()
    pub.close()


@pytest.mark.timeout(30)
def test_everything_unacked_is_sent_again_after_a_reconnect(publisher):
    poller = Poller()
    link = ResultLink(publisher.getsockname(), 64 << 20, poller)
    link.connect(time.monotonic())
    first = accept(publisher)
    link.publish("a", message("a"))
    link.publish("b", message("b"))
    frames(first, 2)
    first.send(Acked(["a"]))
    first.close()  # the publisher dies with "b" unacknowledged
    link.publish("c", message("c"))  # notices: reads the ack for "a", then EOF
    assert link.channel is None and list(link.unacked) == ["b", "c"]
    while link.channel is None:
        link.connect(time.monotonic())
        time.sleep(0.01)
    second = accept(publisher)
    assert [f.last.uuid for f in frames(second, 2)] == ["b", "c"]
    link.close()
    second.close()
