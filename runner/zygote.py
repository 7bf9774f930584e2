"""The zygote: a small, warm, single-threaded process that forks runners.

The supervisor runs threads (the folder watcher, HTTP sync), and forking a threaded process
is unsafe; so it starts this process once, which imports everything a runner needs, freezes
its heap for the garbage collector (so children share those pages instead of copying them),
and forks a runner on each request. It reaps its children and reports their exits.

Protocol: datagrams on a SOCK_SEQPACKET socket. Spawn carries the runner's two pipe ends as
SCM_RIGHTS; the answer is Spawned(pid). Exited(pid, status) is sent as children are reaped.
EOF on the socket means the supervisor is gone: the zygote exits and its runners follow
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys

import msgspec

import runner.main  # noqa: F401 - imported here so every runner shares it
import runner.warmup
from runner import linux
from runner.framing import MAX_FRAME, Channel
from runner.wire import Exited, Spawn, Spawned, SupervisorToRunner

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Spawn).decode


def reap_children(sock: socket.socket, kept: dict) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        kept.pop(pid, None)  # its Runner, built here: free it now that nobody shares its pages
        sock.send(_encode(Exited(pid=pid, status=status)))


# The supervisor writes the RunnerConfig into the pipe before it asks for the fork: one that
# fits in the pipe (64 KiB) is all there; a bigger one is read by the runner itself, so the
# zygote never waits for anyone.
CONFIG_WAIT = 0.0


class Prepared:
    """One runner about to be forked: its pipes, and the Runner built here from its config."""

    def __init__(self, request: Spawn, rfd: int, wfd: int):
        self.request = request
        self.channel = Channel(rfd, wfd, SupervisorToRunner, max_frame=MAX_FRAME)
        self.runner: runner.main.Runner | None = None
        cfg, frames = runner.main.read_config(self.channel, CONFIG_WAIT)
        if cfg is not None:
            try:
                self.runner = runner.main.build_runner(self.channel, cfg, frames)
            except Exception as e:  # noqa: BLE001 - the child tries again, and reports it
                print(f"zygote: cannot prepare the runner of job {request.job_uuid}: {e}", file=sys.stderr)
        # the fds this runner owns (its Poller makes its epoll fd only in the child), as
        # plain ints: after its fork we close ours without touching the objects it shares with us
        self.fds = [rfd, wfd]


def spawn_runners(sock: socket.socket, private: list[socket.socket], batch: list[tuple[Spawn, list[int]]],
                  kept: dict[int, Prepared]) -> None:
    """Build each runner here, then fork them back to back and answer after the last fork.

    A Runner built before the fork sits in pages the child shares with us; built in the
    child, its setup costs each runner about 0.5 MB of private pages. For the same reason we
    must not write to a runner's objects after its fork, not even a reference count: `kept`
    holds them, untouched, until that runner exits. Forking a batch with nothing in between
    but the fork itself also lets runners started together share the pages we write then."""
    prepared = [Prepared(request, *fds) for request, fds in batch]
    gc.freeze()  # what the zygote holds now is shared with the child, not touched by its GC
    zygote = os.getpid()
    pids = []
    for i, this in enumerate(prepared):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for later in prepared[i + 1:]:  # what the runners forked after this one own
                    for fd in later.fds:
                        os.close(fd)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                sock.close()
                for s in private:
                    s.close()
                linux.die_with_parent(zygote)
                os.setpgid(0, 0)  # the supervisor stops a runner by its process group
                code = runner.main.serve(this.channel, this.runner)
            except BaseException:  # noqa: BLE001 - a runner must never fall back into the zygote loop
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        for fd in this.fds:
            os.close(fd)
        pids.append(pid)
    for this, pid in zip(prepared, pids):
        kept[pid] = this
    for this, pid in zip(prepared, pids):
        sock.send(_encode(Spawned(job_uuid=this.request.job_uuid, pid=pid)))


def main() -> int:
    sock_fd, parent = int(sys.argv[1]), int(sys.argv[2])
    linux.die_with_parent(parent)
    linux.set_process_name("ar-zygote")
    try:
        runner.warmup.warm_up()  # before the freeze below, so that every runner shares what it leaves
    except Exception as e:  # noqa: BLE001 - an optimisation only: never a reason not to start
        print(f"zygote: warm-up failed (runners start anyway): {e}", file=sys.stderr)
    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    gc.collect()
    gc.freeze()
    kept: dict[int, Prepared] = {}  # runner pid -> what was built for it here, until it exits
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            try:
                while wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
            reap_children(sock, kept)
        if sock in readable:
            batch: list[tuple[Spawn, list[int]]] = []
            more = True
            while more:  # every request queued now: one batch of forks
                try:
                    data, fds, _, _ = socket.recv_fds(sock, 65536, 2)  # (3.11 ignores its flags argument)
                except ConnectionResetError:
                    data, fds = b"", []
                if not data:
                    return 0
                more = bool(select.select([sock], [], [], 0)[0])
                try:
                    request = _decode(data)
                    if len(fds) != 2:
                        raise ValueError(f"expected 2 fds, got {len(fds)}")
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                    print(f"zygote: bad request from the supervisor: {e}", file=sys.stderr)
                    for fd in fds:
                        os.close(fd)
                    continue
                batch.append((request, fds))
            if batch:
                spawn_runners(sock, [wake_r, wake_w], batch, kept)


if __name__ == "__main__":
    sys.exit(main())
