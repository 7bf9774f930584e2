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

import _signal
import array
import gc
import os
import select
import signal
import socket
import sys
import time

import msgspec

import runner.main  # noqa: F401 - imported here so every runner shares it
import runner.warmup
from runner import linux
from runner.wire import Exited, Spawn, Spawned

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Spawn).decode
PREPARE_WAIT = 0.2  # for a batch's configs: the supervisor writes each as it asks for the runner


def reap_children(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(_encode(Exited(pid=pid, status=status)))


def spawn_runners(sock: socket.socket, private: list[socket.socket], batch: list[tuple[Spawn, list[int]]]) -> None:
    """Fork one runner per request, back to back, and answer after the last fork.

    What the zygote writes after a fork costs that runner a private copy of the page, unless
    a sibling forked before the write shares it: forking a batch with nothing in between
    but the fork itself lets runners started together share those pages. For the same
    reason each runner of the batch is built here first (runner.main.prepare), all of them
    before the first fork, and the zygote closes its copies of their files only after the
    last one."""
    deadline = time.monotonic() + PREPARE_WAIT
    prepared = [runner.main.prepare(rfd, wfd, max(0.0, deadline - time.monotonic())) for _, (rfd, wfd) in batch]
    table, bounds = _fd_table(batch, prepared)
    cpus = array.array("i", [linux.one_cpu_for(request.job_uuid) for request, _ in batch])
    gc.freeze()  # what the zygote holds now is shared with the child, not touched by its GC
    zygote = os.getpid()
    pids = []
    for i in range(len(batch)):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _close_siblings(table, bounds[i], bounds[i + 1], [sock.fileno(), *(s.fileno() for s in private)])
                _signal.set_wakeup_fd(-1)  # not signal's wrappers: see runner/selfpipe.py
                _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
                sock.close()
                for s in private:
                    s.close()
                linux.die_with_parent(zygote)
                os.setpgid(0, 0)  # the supervisor stops a runner by its process group
                code = runner.main.serve(prepared[i])
            except BaseException:  # noqa: BLE001 - a runner must never fall back into the zygote loop
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        if cpus[i] >= 0:  # before the runner starts anything (it allocates nothing for it)
            _keep_to(pid, cpus[i])
        pids.append(pid)
    # the runners have their own copies now; a Runner's files are closed by their owners (an
    # epoll object closes its fd when freed: closed by number, it would close some later fd)
    for ready in prepared:
        if ready.runner is not None:
            ready.runner.close()
    for _, pipe in batch:
        for fd in pipe:
            os.close(fd)
    for (request, _), pid in zip(batch, pids):
        sock.send(_encode(Spawned(job_uuid=request.job_uuid, pid=pid)))


def _keep_to(pid: int, cpu: int) -> None:
    try:
        os.sched_setaffinity(pid, (cpu,))
    except OSError:  # gone already, or not allowed: it runs on any CPU
        pass


def _close_siblings(table: array.array, own_from: int, own_to: int, also_kept: list[int]) -> None:
    """In a child: close the pipes and files of every other runner of the batch, with one
    close_range per gap between the fds it keeps. Every fd the zygote opened for the batch is
    in the table, so its siblings' all lie between the table's lowest and highest; whatever
    else is in there is the zygote's own (its sockets, kept until closed by name) or leaked
    by a Runner that failed half-built. One close(2) per fd cost 1.9-2.7 ms a runner when
    1,000 started (batches of about 450: 2,200 fds a child); this, 1.45 ms."""
    keep = sorted({*table[own_from:own_to], *also_kept})
    low = min(table)
    for fd in keep:
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, max(table) + 1)


def _fd_table(batch: list[tuple[Spawn, list[int]]], prepared: list) -> tuple[array.array, array.array]:
    """Every fd the zygote holds for the batch, runner by runner (its two pipe ends, then what
    its Runner opened), and where each runner's begin: raw C ints, so that a child closes
    its siblings' without touching a Python object of each (each on a page of its own, which
    the child would copy)."""
    fds, bounds = [], [0]
    for (_, pipe), ready in zip(batch, prepared):
        fds += pipe
        fds += ready.fds
        bounds.append(len(fds))
    return array.array("i", fds), array.array("i", bounds)


def main() -> int:
    args = linux.strip_title_room(sys.argv)
    sock_fd, parent = int(args[1]), int(args[2])
    linux.die_with_parent(parent)
    linux.set_process_name("ar-zygote")
    linux.set_title("assessment-runtime: zygote")
    # CPython 3.11 has no immortal objects: a run in a runner bumps reference counts on about
    # a megabyte of pages it shares with us, and the kernel copies each. Most of those copies
    # are byte-identical in every runner; where the host runs KSM, it merges them back (about
    # 1 MB of 2.1 per active runner). Plugins are taken out again before they start (ar-exec).
    # Only when KSM runs now: the offer costs each plugin start about 20 us (an exec carries it).
    if linux.ksm_running():
        linux.set_memory_merge(True)
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
    try:
        runner.warmup.fill_free_blocks()  # last: what is allocated after it takes free blocks again
    except Exception as e:  # noqa: BLE001 - an optimisation only, as the warm-up
        print(f"zygote: filling free blocks failed (runners start anyway): {e}", file=sys.stderr)
    gc.freeze()
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            try:
                while wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
            reap_children(sock)
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
                spawn_runners(sock, [wake_r, wake_w], batch)


if __name__ == "__main__":
    sys.exit(main())
