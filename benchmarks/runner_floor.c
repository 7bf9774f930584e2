/* runner_floor.c: a C stand-in for our runners, for `make bench` (bench_floor.py).
 *
 *   runner-floor JOBS HELPER PLUGIN SINK_SOCKET CGROUP_PREFIXES UID_BASE SCRATCH_BASE
 *
 * Forks JOBS processes; each runs PLUGIN through HELPER (our ar-exec, with the full sandbox
 * arguments: its own uid, limits, its own cgroups, Landlock) once a second on its own grid, and
 * makes the same system calls per run as runner/main.py does for a quick plugin: the plugin
 * path's trust-check stats, the scratch folder's stat, the stdin memfd rewritten, two pipes,
 * posix_spawn, a pidfd waited for with epoll, wait4, the group killed, our children listed,
 * both pipes read, the cgroup counters read, a result frame of our size written to the
 * publisher's socket, acks read without blocking. What it leaves out is everything Python does
 * around those calls, which is the point: its CPU per run is the floor under a runner's.
 * CGROUP_PREFIXES: folders separated by ':' (each job joins PREFIX/jN), or "-" for none.
 * A failed run is reported on stderr as "job N: ...". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FRAME_BYTES 700 /* about what a runner sends for one result of the trivial plugin */

static double monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int open_counter(const char *prefixes, int job, const char *controller, const char *file) {
    const char *p = strstr(prefixes, controller);
    if (strcmp(prefixes, "-") == 0 || p == NULL)
        return -1;
    const char *start = p, *end = strchr(p, ':');
    while (start > prefixes && start[-1] != ':')
        start--;
    char path[512];
    snprintf(path, sizeof path, "%.*s/j%d/%s", (int)((end ? end : p + strlen(p)) - start), start, job, file);
    return open(path, O_RDONLY | O_CLOEXEC);
}

static void job(int i, int jobs, char *helper, char *plugin, const char *sink, const char *prefixes, int uid_base,
                const char *scratch_base, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set); /* as the zygote places our runners */
    char scratch[256], cgroups[1024] = "-", uid[16], parent[16];
    snprintf(scratch, sizeof scratch, "%s/%d", scratch_base, i);
    mkdir(scratch, 0700);
    if (chown(scratch, uid_base + i, uid_base + i) != 0)
        perror("chown scratch");
    if (strcmp(prefixes, "-") != 0) { /* PREFIX/jN for each prefix */
        size_t n = 0;
        const char *p = prefixes;
        while (*p && n < sizeof cgroups - 64) {
            const char *end = strchr(p, ':');
            size_t len = end ? (size_t)(end - p) : strlen(p);
            n += snprintf(cgroups + n, sizeof cgroups - n, "%s%.*s/j%d", n ? ":" : "", (int)len, p, i);
            p += len + (end != NULL);
        }
    }
    snprintf(uid, sizeof uid, "%d", uid_base + i);
    snprintf(parent, sizeof parent, "%d", (int)getpid());
    char *argv[] = {helper, uid, uid, "268435456", "30", "128", "64", parent, cgroups, scratch, "l", "-", "--",
                    plugin, NULL};
    char *envp[] = {"PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8",
                    "ASSESSMENT_JOB_UUID=00000000-0000-4000-8000-000000000000",
                    "ASSESSMENT_RUNTIME_UUID=00000000-0000-4000-8000-000000000001",
                    "ASSESSMENT_RUN_UUID=00000000-0000-4000-8000-000000000002", NULL};
    int stdin_fd = memfd_create("stdin", MFD_CLOEXEC);
    char doc[400];
    memset(doc, ' ', sizeof doc);
    doc[0] = '{';
    doc[sizeof doc - 1] = '}';
    int oom = open_counter(prefixes, i, "memory", "memory.failcnt");
    int pids = open_counter(prefixes, i, "pids", "pids.events");
    int children = open("/proc/thread-self/children", O_RDONLY | O_CLOEXEC);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, sink, sizeof addr.sun_path - 1);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        perror("connect");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    const char *levels[] = {"/", plugin, plugin, plugin, plugin}; /* five stats, as for a plugin 4 levels down */
    char frame[FRAME_BYTES], buf[65536];
    memset(frame, 'r', sizeof frame);
    double next = (double)i / jobs;
    next += (long)(monotonic() - next) + 1;
    for (;;) {
        double wait = next - monotonic();
        if (wait > 0) {
            struct epoll_event ev;
            epoll_wait(ep, &ev, 1, (int)(wait * 1000) + 1);
            if (monotonic() < next)
                continue;
        }
        next += 1.0;
        struct stat st;
        for (int k = 0; k < 5; k++)
            lstat(levels[k], &st);
        lstat(scratch, &st);
        pwrite(stdin_fd, doc, sizeof doc, 0);
        lseek(stdin_fd, 0, SEEK_SET);
        int out[2], err[2];
        if (pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
            perror("pipe2");
            exit(1);
        }
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, stdin_fd, 0);
        posix_spawn_file_actions_adddup2(&fa, out[1], 1);
        posix_spawn_file_actions_adddup2(&fa, err[1], 2);
        posix_spawnattr_t at;
        posix_spawnattr_init(&at);
        sigset_t all;
        sigfillset(&all);
        posix_spawnattr_setsigdefault(&at, &all);
        posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF);
        pid_t pid;
        int failed = posix_spawn(&pid, helper, &fa, &at, argv, envp);
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&at);
        close(out[1]);
        close(err[1]);
        if (failed) {
            fprintf(stderr, "job %d: posix_spawn: %s\n", i, strerror(failed));
            exit(1);
        }
        int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = pidfd};
        epoll_ctl(ep, EPOLL_CTL_ADD, pidfd, &ev);
        epoll_wait(ep, &ev, 1, 10000);
        int status = 0;
        struct rusage usage;
        wait4(pid, &status, 0, &usage);
        kill(-pid, SIGKILL);
        pread(children, buf, sizeof buf, 0);
        ssize_t got = read(out[0], buf, sizeof buf);
        ssize_t got_err = read(err[0], buf, sizeof buf);
        close(out[0]);
        close(err[0]);
        close(pidfd);
        if (oom >= 0)
            pread(oom, buf, 64, 0);
        if (pids >= 0)
            pread(pids, buf, 64, 0);
        if (got <= 0 || status != 0)
            fprintf(stderr, "job %d: exit status %d, %zd bytes out, %zd err: %.*s\n", i, status, got, got_err,
                    got_err > 0 ? (int)got_err : 0, buf);
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        snprintf(frame + 4, 32, "%lld.%09ld", (long long)now.tv_sec, now.tv_nsec);
        write(sock, frame, sizeof frame);
        recv(sock, buf, sizeof buf, MSG_DONTWAIT);
    }
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: runner-floor JOBS HELPER PLUGIN SINK_SOCKET CGROUP_PREFIXES UID_BASE SCRATCH_BASE\n");
        return 2;
    }
    int jobs = atoi(argv[1]), uid_base = atoi(argv[6]);
    cpu_set_t mine;
    sched_getaffinity(0, sizeof mine, &mine);
    int cpus[CPU_SETSIZE], ncpu = 0;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &mine))
            cpus[ncpu++] = c;
    for (int i = 0; i < jobs; i++)
        if (fork() == 0) {
            job(i, jobs, argv[2], argv[3], argv[4], argv[5], uid_base, argv[7], cpus[i % ncpu]);
            _exit(0);
        }
    for (;;)
        pause();
}
