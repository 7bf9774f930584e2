"""Start a plugin in its sandbox, and make sure nothing it started outlives its run.

The child side runs between fork and exec, so it only calls os/resource functions and
reports a failure to exec through a close-on-exec pipe, as subprocess does.
"""

from __future__ import annotations

import os
import resource
import signal

from runner import linux
from runner.wire import RunLimits

PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SpawnError(Exception):
    """The plugin could not be started (exec failed, no such file, permission...)."""


HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ar-exec")
HELPER_FAILURE = b"ar-exec: "  # how the helper's own errors start on stderr (exit code 127)
_SPAWN_SIGDEF = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE)


class Sandbox:
    """What every run of one job shares: computed once per runner, not per run.

    With the small C helper `ar-exec` built (`make venv` does it), a plugin is started by
    posix_spawn (vfork-style) of the helper, which applies limits and credentials and execs
    the plugin: no copy of the runner's pages per run. Without it, the same steps run in a
    forked child of the runner.
    """

    def __init__(self, limits: RunLimits, run_as: tuple[int, int] | None, env_base: dict[str, str],
                 helper: str | None = HELPER, cgroup: str | None = None, cgroup_controllers: tuple[str, ...] = ()):
        self.run_as = run_as
        self.cgroup = cgroup
        # a cgroup's memory.max and pids.max replace RLIMIT_AS (virtual memory, too strict for
        # some runtimes) and RLIMIT_NPROC (counted per user, not per run)
        if "memory" in cgroup_controllers:
            limits = RunLimits(None, limits.cpu_time, limits.open_files, limits.processes, limits.output)
        if "pids" in cgroup_controllers:
            limits = RunLimits(limits.memory, limits.cpu_time, limits.open_files, None, limits.output)
        self.env_base = env_base
        self.helper = helper if helper and os.access(helper, os.X_OK) else None
        cpu = max(1, int(limits.cpu_time + 0.999)) if limits.cpu_time else -1
        self.helper_args = [str(v) for v in (
            run_as[0] if run_as else -1, run_as[1] if run_as else -1, limits.memory or -1, cpu,
            limits.open_files or -1, limits.processes or -1, os.getpid(), cgroup or "-")]
        self.rlimits: list[tuple[int, tuple[int, int]]] = [(resource.RLIMIT_CORE, (0, 0))]
        if limits.memory:
            self.rlimits.append((resource.RLIMIT_AS, (limits.memory, limits.memory)))
        if limits.cpu_time:
            # SIGXCPU at the soft limit, SIGKILL one second later if it is caught
            soft = max(1, int(limits.cpu_time + 0.999))
            self.rlimits.append((resource.RLIMIT_CPU, (soft, soft + 1)))
        if limits.open_files:
            self.rlimits.append((resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files)))
        if limits.processes:
            self.rlimits.append((resource.RLIMIT_NPROC, (limits.processes, limits.processes)))

    def spawn(self, argv: list[str], cwd: str, stdin_fd: int, extra_env: dict[str, str]) -> tuple[int, int, int, int]:
        """Start the plugin. Returns (pid, pidfd, stdout_fd, stderr_fd); the read ends block
        (the runner reads them only when epoll finds them readable)."""
        env = dict(self.env_base)
        env.update(extra_env)
        env["HOME"] = cwd
        if self.helper is not None:
            return self._spawn_helper(argv, cwd, stdin_fd, env)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # child: never returns
            self._exec_child(argv, cwd, env, stdin_fd, out_w, err_w, errpipe_w)
        os.close(out_w)
        os.close(err_w)
        os.close(errpipe_w)
        failure = os.read(errpipe_r, 4096)
        os.close(errpipe_r)
        if failure:
            os.waitpid(pid, 0)
            os.close(out_r)
            os.close(err_r)
            raise SpawnError(failure.decode(errors="replace"))
        return pid, os.pidfd_open(pid), out_r, err_r

    def _spawn_helper(self, argv: list[str], cwd: str, stdin_fd: int, env: dict[str, str]) -> tuple[int, int, int, int]:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.posix_spawn(
                self.helper, [self.helper, *self.helper_args, cwd, "--", *argv], env,
                file_actions=[(os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                              (os.POSIX_SPAWN_DUP2, err_w, 2)],
                setsid=True, setsigdef=_SPAWN_SIGDEF, setsigmask=())
        except OSError as e:
            for fd in (out_r, err_r):
                os.close(fd)
            raise SpawnError(f"ar-exec: {e.strerror}") from None
        finally:
            os.close(out_w)
            os.close(err_w)
        return pid, os.pidfd_open(pid), out_r, err_r

    def _exec_child(self, argv, cwd, env, stdin_fd, out_w, err_w, errpipe_w) -> None:
        step = "setsid"
        try:
            os.setsid()  # a new session: the plugin and its group can be killed as one
            step = "redirect"
            os.dup2(stdin_fd, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, errpipe_w)
            os.closerange(errpipe_w + 1, 65536)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if self.cgroup is not None:
                step = "join cgroup"
                with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
                    f.write("0")
            step = "umask"
            os.umask(0o077)
            step = "rlimits"
            for which, value in self.rlimits:
                resource.setrlimit(which, value)
            if self.run_as is not None:
                step = f"switch to uid {self.run_as[0]}"
                os.setgroups([])
                os.setgid(self.run_as[1])
                os.setuid(self.run_as[0])
            step = "no_new_privs"
            linux.set_no_new_privs()
            # after any uid change (a change of credentials clears it)
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            step = "chdir"
            os.chdir(cwd)
            step = "exec"
            os.execve(argv[0], argv, env)
        except BaseException as e:  # noqa: BLE001 - anything here must reach the parent
            try:
                reason = f"{step}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
                os.write(errpipe_w, reason.encode()[:4000])
            finally:
                os._exit(127)


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def sweep_orphans() -> int:
    """Kill and reap everything left behind (we are the child subreaper). Returns how many."""
    if not linux.has_children():  # the usual case: one read of /proc, nothing to do
        return 0
    me = os.getpid()
    killed = 0
    for _ in range(50):  # killing one may re-parent its own children to us; go round again
        children = linux.children_of(me)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        reaped = reap_all()
        if not children and not reaped:
            break
        if children and not reaped:
            try:
                os.waitpid(-1, 0)  # they were SIGKILLed: this is short
            except ChildProcessError:
                break
    return killed


def reap_all() -> int:
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


def cgroup_counters(cgroup: str | None) -> tuple[int, int]:
    """(oom kills, fork refusals) so far in a job's cgroup: compared before and after a run."""
    if cgroup is None:
        return 0, 0
    return _event(cgroup, "memory.events", b"oom_kill"), _event(cgroup, "pids.events", b"max")


def _event(cgroup: str, name: str, key: bytes) -> int:
    try:
        with open(os.path.join(cgroup, name), "rb") as f:
            for line in f:
                k, _, v = line.partition(b" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def kill_cgroup(cgroup: str | None) -> None:
    """SIGKILL everything in the job's cgroup (cgroup.kill, or one by one on older kernels)."""
    if cgroup is None:
        return
    try:
        with open(os.path.join(cgroup, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "rb") as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
