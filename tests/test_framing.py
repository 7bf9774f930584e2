"""runner/framing.py: length-prefixed msgpack frames over real pipes (os.pipe), no mocks."""

from __future__ import annotations

import os
import select
import threading
import time
import tracemalloc

import msgspec
import pytest

from runner.framing import MAX_FRAME, Channel, FrameError
from runner.wire import (AttestationResult, Exited, LastResult, PluginInfo, Publish, RunLimits, RunnerConfig,
                         RunnerState, RunNow, Spawned, SupervisorToRunner)

RunnerFrames = RunnerState | Publish  # what runners send: state to the supervisor, results to the publisher


def result_frame(result: msgspec.Raw, duration: float) -> Publish:
    """A runner's result frame around `result`."""
    return Publish(job_uuid="job", last=LastResult("run", "satisfied", None, "2026-11-27T12:00:00.000000Z"),
                   duration=duration, next_run_at=None, result=result)


class Pipes:
    """Makes pipes and closes, at the end, those a test did not close itself (through close(),
    so that an fd number reused in between is never closed by mistake)."""

    def __init__(self):
        self.open: set[int] = set()

    def __call__(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.open |= {r, w}
        return r, w

    def close(self, fd: int) -> None:
        self.open.discard(fd)
        os.close(fd)

    def forget(self, fd: int) -> None:
        self.open.discard(fd)


@pytest.fixture
def pipes():
    made = Pipes()
    yield made
    for fd in made.open:
        os.close(fd)


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def read_until(ch: Channel, count: int, timeout: float = 5.0) -> list:
    """Wait for the read end to be readable and collect `count` frames (or EOF)."""
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < count and not ch.eof:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(out)} of {count} frames"
        select.select([ch.rfd], [], [], left)
        out += ch.read()
    return out


def result(n: int = 0) -> AttestationResult:
    return AttestationResult(
        uuid=f"run-{n}", runtime_uuid="rt", job_uuid="job", job_revision="rev",
        plugin=PluginInfo(name="demo", version="1.0.0", sha256="ab" * 32), title="t", labels={"env": "prod"},
        assessment_plan_uuid=None, component_uuid=None, control_id=None,
        start="2026-11-27T12:00:00.123456Z", end="2026-11-27T12:00:00.456789Z", status="satisfied",
        observations=[{"uuid": "o1", "description": "fine", "props": [{"name": "x", "value": "1"}]}])


def runner_config() -> RunnerConfig:
    return RunnerConfig(
        job_uuid="job", revision="rev", runtime_uuid="rt", job_json=b'{"uuid":"job"}', config_json=b"{}",
        plugin=PluginInfo(name="demo", version="1.0.0"), plugin_url=None, plugin_dirs=["/p"],
        require_sha256=False, title=None, labels={}, assessment_plan_uuid=None, component_uuid=None,
        control_id=None, interval=60.0, timeout=30.0, stop_grace=5.0, run_on_start=True, splay=1.5,
        limits=RunLimits(memory=1 << 20, cpu_time=1.0, open_files=64, processes=8, output=1 << 20),
        scratch_dir="/s", run_as=(65534, 65534))


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_runner_to_supervisor(pipes):
    r, w = pipes()
    sender = Channel(None, w)
    receiver = Channel(r, None, RunnerFrames)
    raw = msgspec.msgpack.encode(result(1))
    messages = [RunnerState(running=False, next_run_at=123.25), RunnerState(running=True, next_run_at=None),
                result_frame(result=msgspec.Raw(raw), duration=0.75)]
    for m in messages:
        sender.send(m)
    assert sender.pending_output == 0
    got = read_until(receiver, 3)
    assert got[:2] == messages[:2]
    assert isinstance(got[2], Publish) and got[2].duration == 0.75
    assert bytes(got[2].result) == raw
    assert msgspec.msgpack.decode(got[2].result, type=AttestationResult) == result(1)
    assert receiver.eof is False and receiver.torn_bytes == 0


def test_round_trip_supervisor_to_runner(pipes):
    r, w = pipes()
    sender = Channel(None, w)
    receiver = Channel(r, None, SupervisorToRunner)
    sender.send(runner_config())
    sender.send(RunNow())
    got = read_until(receiver, 2)
    assert got == [runner_config(), RunNow()]


def test_fds_are_made_non_blocking(pipes):
    r, w = pipes()
    Channel(r, w)
    assert os.get_blocking(r) is False and os.get_blocking(w) is False


def test_read_with_nothing_there_returns_nothing(pipes):
    r, w = pipes()
    ch = Channel(r, None, RunnerFrames)
    assert ch.read() == []
    assert ch.eof is False


def test_without_a_decode_type_payloads_are_bytes(pipes):
    r, w = pipes()
    Channel(None, w).send_payload(b"\x93\x01\x02\x03")
    assert read_until(Channel(r, None), 1) == [b"\x93\x01\x02\x03"]


# -- partial and batched reads ----------------------------------------------------------------

def test_frame_written_one_byte_at_a_time(pipes):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    message = result_frame(result=msgspec.Raw(msgspec.msgpack.encode(result(7))), duration=1.5)
    data = frame(msgspec.msgpack.encode(message))
    assert len(data) > 100
    for i, byte in enumerate(data):
        os.write(w, bytes([byte]))
        got = receiver.read()
        if i < len(data) - 1:
            assert got == [], f"decoded early after {i + 1} of {len(data)} bytes"
    assert got[0].duration == 1.5
    assert msgspec.msgpack.decode(got[0].result, type=AttestationResult) == result(7)
    assert receiver.read() == []  # decoded once, not again


def test_many_frames_in_one_write(pipes):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    messages = [RunnerState(running=bool(i % 2), next_run_at=float(i)) for i in range(200)]
    data = b"".join(frame(msgspec.msgpack.encode(m)) for m in messages)
    assert os.write(w, data) == len(data)
    assert receiver.read() == messages


def test_frames_split_across_writes_at_odd_places(pipes):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    messages = [RunnerState(running=True, next_run_at=float(i)) for i in range(20)]
    data = b"".join(frame(msgspec.msgpack.encode(m)) for m in messages)
    got = []
    for start in range(0, len(data), 7):
        os.write(w, data[start:start + 7])
        got += receiver.read()
    assert got == messages


def test_frame_larger_than_the_pipe_buffer(pipes):
    """A frame bigger than the pipe buffer arrives over many reads while a thread writes it."""
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    text = "x" * (3 << 20)
    data = frame(msgspec.msgpack.encode(result_frame(result=msgspec.Raw(msgspec.msgpack.encode(text)), duration=2.0)))
    writer = threading.Thread(target=_write_all, args=(w, data), daemon=True)
    writer.start()
    try:
        got = read_until(receiver, 1, timeout=20)
    finally:
        writer.join(10)
    assert len(got) == 1 and got[0].duration == 2.0
    assert msgspec.msgpack.decode(got[0].result) == text
    assert receiver.read() == []


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- bad input --------------------------------------------------------------------------------

def test_oversize_length_header_raises_at_once_without_allocating(pipes):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    os.write(w, (0xFFFFFFFF).to_bytes(4, "big"))  # claims 4 GiB; no payload follows
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="over"):
            receiver.read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20


def test_length_just_over_a_small_limit_is_refused_and_at_the_limit_accepted(pipes):
    r, w = pipes()
    receiver = Channel(r, None, max_frame=16)
    os.write(w, frame(b"\x00" * 16))
    assert receiver.read() == [b"\x00" * 16]
    os.write(w, (17).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        receiver.read()


def test_default_limit_is_64_mib(pipes):
    r, w = pipes()
    receiver = Channel(r, None)
    os.write(w, (MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        receiver.read()
    assert MAX_FRAME == 64 << 20


def test_sending_an_oversize_frame_is_refused_before_writing(pipes):
    r, w = pipes()
    sender = Channel(r, w, max_frame=8)
    with pytest.raises(FrameError):
        sender.send_payload(b"123456789")
    assert sender.pending_output == 0
    assert select.select([r], [], [], 0)[0] == []  # nothing reached the pipe


@pytest.mark.parametrize("payload", [
    b"\xc1",  # a byte msgpack never uses
    b"\x92\x01",  # an array of 2 with 1 item
    b"",  # an empty frame
    b"\xa3ab",  # a str of 3 with 2 bytes
])
def test_garbage_payload_raises(pipes, payload):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    os.write(w, frame(payload))
    with pytest.raises(FrameError):
        receiver.read()


@pytest.mark.parametrize("message", [
    RunNow(),  # supervisor -> runner, not runner -> supervisor
    Spawned(job_uuid="j", pid=1),
    Exited(pid=1, status=0),
    {"type": "RunnerState"},  # the right tag, the fields missing
    {"running": True, "next_run_at": None},  # the right fields, no tag
    {"type": "Bogus", "running": True},
    [1, 2, 3],
])
def test_frame_of_a_type_not_in_the_union_raises(pipes, message):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    os.write(w, frame(msgspec.msgpack.encode(message)))
    with pytest.raises(FrameError):
        receiver.read()


def test_eof_in_the_middle_of_a_frame(pipes):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    first = RunnerState(running=True, next_run_at=1.0)
    second = RunnerState(running=False, next_run_at=None)
    torn = frame(msgspec.msgpack.encode(RunnerState(running=True, next_run_at=2.0)))[:-3]
    os.write(w, frame(msgspec.msgpack.encode(first)) + frame(msgspec.msgpack.encode(second)) + torn)
    pipes.close(w)
    got = []
    for _ in range(10):  # EOF may show on the read after the data
        got += receiver.read()
        if receiver.eof:
            break
    assert got == [first, second]
    assert receiver.eof is True
    assert receiver.torn_bytes == len(torn)
    assert receiver.read() == []


def test_eof_in_the_middle_of_a_header(pipes):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    first = RunnerState(running=True, next_run_at=1.0)
    os.write(w, frame(msgspec.msgpack.encode(first)) + b"\x00\x00")
    pipes.close(w)
    got = read_until(receiver, 2)
    assert got == [first]
    assert receiver.eof is True and receiver.torn_bytes == 2


def test_clean_eof_after_whole_frames(pipes):
    r, w = pipes()
    receiver = Channel(r, None, RunnerFrames)
    msg = RunnerState(running=True, next_run_at=1.0)
    os.write(w, frame(msgspec.msgpack.encode(msg)))
    pipes.close(w)
    got = read_until(receiver, 2)
    assert got == [msg]
    assert receiver.eof is True and receiver.torn_bytes == 0


# -- writing ----------------------------------------------------------------------------------

def pipe_size(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ


def test_send_larger_than_the_pipe_does_not_block_and_flushes_once_drained(pipes):
    r, w = pipes()
    sender = Channel(None, w)
    raw = os.urandom(1 << 20)
    message = result_frame(result=msgspec.Raw(msgspec.msgpack.encode(raw)), duration=3.0)
    assert pipe_size(w) < 1 << 20

    started = time.monotonic()
    sender.send(message)  # would hang here if the write end were blocking
    assert time.monotonic() - started < 2
    assert sender.pending_output > 0
    assert sender.flush() is False
    assert sender.flush_blocking(0.05) is False  # nobody reads: gives up after its timeout

    receiver = Channel(r, None, RunnerFrames)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(read_until(receiver, 2, timeout=20)), daemon=True)
    reader.start()
    try:
        assert sender.flush_blocking(20) is True
        assert sender.pending_output == 0
        sender.send(RunnerState(running=False, next_run_at=None))
        assert sender.flush_blocking(5) is True
    finally:
        reader.join(20)
    assert not reader.is_alive()
    assert len(got) == 2
    assert msgspec.msgpack.decode(got[0].result) == raw
    assert got[1] == RunnerState(running=False, next_run_at=None)


def test_many_sends_queue_in_order_while_the_peer_is_slow(pipes):
    r, w = pipes()
    sender = Channel(None, w)
    receiver = Channel(r, None, RunnerFrames)
    messages = [result_frame(result=msgspec.Raw(msgspec.msgpack.encode("y" * 10000)), duration=float(i))
                for i in range(50)]  # ~500 KB: more than the pipe holds
    for m in messages:
        sender.send(m)
    assert sender.pending_output > 0
    got = []
    deadline = time.monotonic() + 20
    while len(got) < len(messages):
        assert time.monotonic() < deadline
        got += receiver.read()
        sender.flush()
    assert [m.duration for m in got] == [float(i) for i in range(50)]
    assert sender.pending_output == 0


def test_write_to_a_pipe_whose_reader_is_closed_raises_broken_pipe(pipes):
    r, w = pipes()
    sender = Channel(None, w)
    pipes.close(r)
    with pytest.raises(BrokenPipeError):
        sender.send(RunnerState(running=True, next_run_at=None))


def test_flush_of_queued_output_after_the_reader_closes_raises_broken_pipe(pipes):
    r, w = pipes()
    sender = Channel(None, w)
    sender.send_payload(b"z" * (1 << 20))
    assert sender.pending_output > 0
    pipes.close(r)
    with pytest.raises(BrokenPipeError):
        sender.flush()
    with pytest.raises(BrokenPipeError):
        sender.flush_blocking(1)


def test_close_closes_both_fds(pipes):
    r, w = pipes()
    ch = Channel(r, w)
    ch.close()
    pipes.forget(r)
    pipes.forget(w)
    assert ch.rfd is None and ch.wfd is None
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)
    ch.close()  # twice is fine
