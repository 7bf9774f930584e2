/*
 * ar-exec: the last step between a runner and its plugin.
 *
 * A runner starts this with posix_spawn (vfork-style, no copy of the Python process); it
 * applies the sandbox and execs the plugin. It does exactly what runner/sandbox.py does
 * after fork when this helper is not built:
 *
 *   ar-exec UID GID MEMORY CPU_SECONDS OPEN_FILES PROCESSES PARENT_PID CGROUP CWD -- PATH [ARG...]
 *
 * Numbers are decimal; -1 means "leave unset" (UID/GID -1: keep ours). CGROUP is the folder
 * of a cgroup v2 to join before anything else (so all the plugin starts is counted there),
 * or "-" for none. stdin/stdout/stderr,
 * the session and the signal dispositions are already set up by posix_spawn. On any
 * failure it prints "ar-exec: STEP: ERROR" on stderr and exits 127.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

extern char **environ;

static void fail(const char *step) {
    int err = errno;
    fprintf(stderr, "ar-exec: %s: %s\n", step, strerror(err));
    _exit(127);
}

static long long number(const char *s, const char *what) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s) {
        errno = EINVAL;
        fail(what);
    }
    return v;
}

static void limit(int resource, long long soft, long long hard, const char *what) {
    if (soft < 0)
        return;
    struct rlimit rl = {(rlim_t)soft, (rlim_t)hard};
    if (setrlimit(resource, &rl) != 0)
        fail(what);
}

int main(int argc, char **argv) {
    if (argc < 12 || strcmp(argv[10], "--") != 0) {
        errno = EINVAL;
        fail("usage: ar-exec UID GID MEMORY CPU OPEN_FILES PROCESSES PARENT_PID CGROUP CWD -- PATH [ARG...]");
    }
    long long uid = number(argv[1], "uid"), gid = number(argv[2], "gid");
    long long memory = number(argv[3], "memory"), cpu = number(argv[4], "cpu");
    long long files = number(argv[5], "open_files"), procs = number(argv[6], "processes");
    pid_t parent = (pid_t)number(argv[7], "parent pid");
    const char *cgroup = argv[8], *cwd = argv[9];

    /* nothing of the runner's leaks into the plugin */
    if (syscall(SYS_close_range, 3U, ~0U, 0U) != 0)
        for (int fd = 3; fd < 65536; fd++)
            close(fd);
    if (strcmp(cgroup, "-") != 0) {
        char procs[4096];
        if (snprintf(procs, sizeof procs, "%s/cgroup.procs", cgroup) >= (int)sizeof procs) {
            errno = ENAMETOOLONG;
            fail("cgroup");
        }
        FILE *f = fopen(procs, "w");
        if (f == NULL || fputs("0", f) == EOF || fclose(f) != 0)
            fail("join cgroup");
    }
    umask(077);
    limit(RLIMIT_CORE, 0, 0, "rlimit core");
    limit(RLIMIT_AS, memory, memory, "rlimit memory");
    limit(RLIMIT_CPU, cpu, cpu + 1, "rlimit cpu"); /* SIGXCPU, then SIGKILL a second later */
    limit(RLIMIT_NOFILE, files, files, "rlimit open_files");
    limit(RLIMIT_NPROC, procs, procs, "rlimit processes");
    if (uid >= 0) {
        if (setgroups(0, NULL) != 0)
            fail("setgroups");
        if (setgid((gid_t)gid) != 0)
            fail("setgid");
        if (setuid((uid_t)uid) != 0)
            fail("setuid");
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail("no_new_privs");
    /* after the uid change, which clears it; then close the race with our parent's death */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        fail("pdeathsig");
    if (getppid() != parent)
        _exit(127);
    if (chdir(cwd) != 0)
        fail("chdir");
    execve(argv[11], &argv[11], environ);
    fail("exec");
    return 127;
}
