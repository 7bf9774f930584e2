"""Start a plugin in its sandbox, and make sure nothing it started outlives its run.

The child side runs between fork and exec, so it only calls os/resource functions and
reports a failure to exec through a close-on-exec pipe, as subprocess does.
"""

from __future__ import annotations

import os
import resource
import signal

from runner import landlock, linux
from runner.landlock import Confine
from runner.wire import RunLimits

PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SpawnError(Exception):
    """The plugin could not be started (exec failed, no such file, permission...)."""


HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ar-exec")
HELPER_FAILURE = b"ar-exec: "  # how the helper's own errors start on stderr (exit code 127)
_PARENT_PID_ARG = 6  # where ar-exec's PARENT_PID is in Sandbox.helper_args
_SPAWN_SIGDEF = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE)


class Sandbox:
    """What every run of one job shares: computed once per runner, not per run.

    With the small C helper `ar-exec` built (`make venv` does it), a plugin is started by
    posix_spawn (vfork-style) of the helper, which applies limits and credentials and execs
    the plugin: no copy of the runner's pages per run. Without it, the same steps run in a
    forked child of the runner.

    `confine`: Landlock for every run (runner/landlock.py), None for none. `capabilities`:
    capability numbers each run gets as ambient capabilities on its own uid, with the
    bounding set cut down to them (SPEC §6 Identity).
    """

    def __init__(self, limits: RunLimits, run_as: tuple[int, int] | None, env_base: dict[str, str],
                 helper: str | None = HELPER, cgroup: str | None = None, cgroup_controllers: tuple[str, ...] = (),
                 *, confine: Confine | None = None, capabilities: tuple[int, ...] = ()):
        self.run_as = run_as
        self.parent = os.getppid()  # the runner's: the zygote (see release)
        self.cgroup = cgroup
        self.confine = confine
        if any(not 0 <= cap < 64 for cap in capabilities):
            raise ValueError(f"capabilities: numbers from 0 to 63 are needed, got {capabilities!r}")
        self.grant = sum(1 << cap for cap in set(capabilities))  # a bit mask
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
        # CONFINE without and with network, and CAPS (runner/ar_exec.c)
        self.confine_args = ("-", "-") if confine is None else (
            landlock.helper_arg(confine.write_paths, False), landlock.helper_arg(confine.write_paths, True))
        self.caps_arg = ",".join(str(cap) for cap in sorted(set(capabilities))) or "-"
        self._made_for: str | None = None  # the cwd _env and _helper_argv were made for
        self._env: dict[str, str] = {}
        self._helper_argv: tuple[list[str], list[str]] = ([], [])
        if self.helper is None and (confine is not None or self.grant):
            landlock.abi()  # ctypes set up once here, not in each forked child
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

    def adopt(self) -> None:
        """In a runner whose zygote built this Sandbox: the pids that are the runner's own."""
        self.parent = os.getppid()
        self.helper_args[_PARENT_PID_ARG] = str(os.getpid())  # whose death kills the plugin
        self._made_for = None  # ar-exec's arguments hold it: made again

    def adopt_argv(self, argv: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """An ar-exec argv made before adopt() (in the zygote, for the fast path), with the
        parent pid that is ours now."""
        own = list(argv)
        own[1 + _PARENT_PID_ARG] = self.helper_args[_PARENT_PID_ARG].encode()
        return tuple(own)

    def spawn(self, argv: list[str], cwd: str, stdin_fd: int, extra_env: dict[str, str],
              network: bool | None = None) -> tuple[int, int, int, int]:
        """Start the plugin. Returns (pid, pidfd, stdout_fd, stderr_fd); the read ends block
        (the runner reads them only when epoll finds them readable). `network`: whether this
        run may use TCP under confinement (its plugin.toml); None: as `confine` says."""
        if network is None:
            network = self.confine is not None and self.confine.network
        env = self.env_for(cwd).copy()
        env.update(extra_env)
        if self.helper is not None:
            return self._spawn_helper(self.helper_argv(cwd, network) + argv, stdin_fd, env)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # child: never returns
            self._exec_child(argv, cwd, env, stdin_fd, out_w, err_w, errpipe_w, network)
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

    def env_for(self, cwd: str) -> dict[str, str]:
        """The plugin's environment, but for its run uuid (do not change it)."""
        self._make_for(cwd)
        return self._env

    def helper_argv(self, cwd: str, network: bool) -> list[str]:
        """ar-exec's own arguments, up to its `--` (a new list)."""
        self._make_for(cwd)
        return list(self._helper_argv[network])

    def _make_for(self, cwd: str) -> None:
        if self._made_for != cwd:  # what does not change from run to run, made once
            self._made_for = cwd
            self._env = dict(self.env_base, HOME=cwd)
            self._helper_argv = tuple([self.helper, *self.helper_args, cwd, confine, self.caps_arg, "--"]
                                      for confine in self.confine_args)

    def release(self, tids: list[int]) -> None:
        """Let these threads of a run use every CPU the zygote may (the runner keeps to one,
        and a run starts there: linux.one_cpu_for); threads started later inherit it.

        Changing the affinity of another uid's threads takes CAP_SYS_NICE, which the unit
        does not give us; the kernel also lets a caller whose effective uid is the target's.
        So we take the run's uid as our effective one for these calls only: our real and
        saved uids stay root, so nothing of that uid can signal or trace us meanwhile. That
        credential change clears our parent-death signal: it is set again."""
        try:
            cpus = os.sched_getaffinity(self.parent)
            if cpus == os.sched_getaffinity(0):
                return  # not placed on one CPU: nothing to let go
        except OSError:
            return
        uid = self.run_as[0] if self.run_as is not None else os.geteuid()
        borrow = uid != os.geteuid()
        if borrow:
            os.seteuid(uid)
        try:
            for tid in tids:
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError:  # gone already
                    pass
        finally:
            if borrow:
                os.seteuid(0)
                linux.die_with_parent(self.parent)

    def _spawn_helper(self, argv: list[str], stdin_fd: int, env: dict[str, str]) -> tuple[int, int, int, int]:
        """`argv`: the helper's, then the plugin's (see ar_exec.c)."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.posix_spawn(
                self.helper, argv, env,
                file_actions=((os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                              (os.POSIX_SPAWN_DUP2, err_w, 2)),
                setsid=True, setsigdef=_SPAWN_SIGDEF, setsigmask=())
        except OSError as e:
            for fd in (out_r, err_r):
                os.close(fd)
            raise SpawnError(f"ar-exec: {e.strerror}") from None
        finally:
            os.close(out_w)
            os.close(err_w)
        return pid, os.pidfd_open(pid), out_r, err_r

    def _exec_child(self, argv, cwd, env, stdin_fd, out_w, err_w, errpipe_w, network) -> None:
        # the same steps in the same order as runner/ar_exec.c
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
                for cgroup in filter(None, self.cgroup.split(":")):  # one per v1 hierarchy
                    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                        f.write("0")
            ruleset = -1
            if self.confine is not None:
                # while root, and before RLIMIT_NOFILE: it opens the paths
                step = "landlock"
                ruleset = landlock.ruleset(cwd, self.confine.write_paths, network)
            step = "umask"
            os.umask(0o077)
            step = "rlimits"
            for which, value in self.rlimits:
                resource.setrlimit(which, value)
            if self.grant:  # only with a grant, as in ar_exec.c (why there)
                step = "drop capabilities"
                landlock.trim_bounding_set(self.grant)
            if self.run_as is not None:
                step = f"switch to uid {self.run_as[0]}"
                if self.grant:
                    landlock.keep_capabilities()
                os.setgroups([])
                os.setgid(self.run_as[1])
                os.setuid(self.run_as[0])
            if self.grant:
                step = "capabilities"
                landlock.grant_capabilities(self.grant)
            step = "no_new_privs"
            linux.set_no_new_privs()
            step = "landlock restrict"
            landlock.restrict_self(ruleset)
            # after every credential change (each clears it)
            step = "pdeathsig"
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            step = "chdir"
            os.chdir(cwd)
            # inherited from the zygote across exec: a plugin's pages are never offered to KSM
            linux.set_memory_merge(False)
            step = "exec"
            os.execve(argv[0], argv, env)
        except BaseException as e:  # noqa: BLE001 - anything here must reach the parent
            try:
                if isinstance(e, landlock.Failure):
                    reason = str(e)  # names its step and path, as ar-exec does
                else:
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
    """Kill and reap everything left behind (we are the child subreaper), once
    linux.has_children says something is. Returns how many."""
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


