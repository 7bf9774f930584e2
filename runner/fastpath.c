/* runner._fastpath: the mechanics of a runner's usual run, in C (issue 9).
 *
 * A runner wakes once a second among hundreds of others, with cold caches; each line of
 * Python it runs then costs far more than it would warm. So the part of a run that is the
 * same every time is done here, with no Python in between:
 *
 *   wait until the run is due (or until the runner's own epoll has something for Python);
 *   check that nothing the plugin trust check and the scratch check depend on has changed
 *   (the same stat fields the Python fast paths compare: a difference hands the run back);
 *   write this run's stdin document and start ar-exec as Sandbox._spawn_helper does;
 *   wait up to `quick` seconds for the plugin, as the Python loop does before it watches the
 *   plugin's pipes; then reap it, kill its process group, read its pipes the same way
 *   Runner.finish_run does, and read the job's cgroup event counters.
 *
 * Python then builds and sends the result (Runner.conclude), as for any run. Whatever is not
 * the usual case is Python's: a check that changed, a spawn that failed ("slow": Python does
 * this run itself), a plugin still running after `quick` or an event for the loop
 * ("inflight": Python takes the run over as if it had started it). The wire, the checks and
 * the result are Python's alone; this file holds no policy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536   /* as runner.main.READ_CHUNK */
#define STDERR_TAIL 4096  /* as runner.main.STDERR_TAIL */
#define MAX_ARGS 1024  /* argv and environment entries, on the stack */

static double clock_now(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static long long ns_of(const struct timespec *ts) {
    return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

/* poll until `until` (monotonic seconds), without the GIL; in slices of at most a minute, so
 * that a far deadline (a job run every 30 days) never overflows poll's int of ms. Interrupted
 * by a signal, Python's handlers run (the runner's only queue it, and its self-pipe, in the
 * epoll we watch, then wakes the next round); one that raises ends the wait: -2, exception set. */
static int wait_for(struct pollfd *fds, int n, double until) {
    for (;;) {
        double left = until - clock_now(CLOCK_MONOTONIC);
        int ms = left <= 0 ? 0 : left >= 60.0 ? 60000 : (int)(left * 1000.0) + 1;
        int r, error;
        Py_BEGIN_ALLOW_THREADS
        r = poll(fds, n, ms);
        error = errno;
        Py_END_ALLOW_THREADS
        if (r < 0 && error == EINTR) {
            if (PyErr_CheckSignals() < 0) return -2;
            continue;
        }
        if (r != 0 || ms < 60000) return r;
    }
}

/* Plugin output is read into static buffers of this module, pages no other process
 * touched (a short output costs a runner one page of its own, once); onto the heap only
 * when it outgrows them. */
typedef struct {
    char *data;
    size_t len, cap;
    int heap;
} buffer;

#define STATIC_SIZE (CHUNK + STDERR_TAIL)
static char stdout_static[STATIC_SIZE], stderr_static[STATIC_SIZE];

/* room for one more chunk; 0 when there is none to be had */
static int reserve(buffer *b) {
    if (b->cap - b->len >= CHUNK) return 1;
    size_t cap = b->cap * 2;
    while (cap - b->len < CHUNK) cap *= 2;
    char *d = b->heap ? realloc(b->data, cap) : malloc(cap);
    if (d == NULL) return 0;
    if (!b->heap) memcpy(d, b->data, b->len);
    b->data = d;
    b->cap = cap;
    b->heap = 1;
    return 1;
}

/* Read a pipe whose writers have all exited: until a read comes back short, or the pipe is
 * not readable at once after a full one (a writer handed to some other process must not
 * block us). stdout keeps its first `keep` + 1 bytes (so that Python sees the limit was
 * passed), stderr its last `keep`. Out of memory, it keeps what it has. */
static void drain(int fd, buffer *b, size_t keep, int tail) {
    for (;;) {
        if (!reserve(b)) return;
        ssize_t n = read(fd, b->data + b->len, CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        b->len += (size_t)n;
        if (tail && b->len > keep) {
            memmove(b->data, b->data + b->len - keep, keep);
            b->len = keep;
        } else if (!tail && b->len > keep + 1) {
            b->len = keep + 1;
        }
        if (n < CHUNK) return;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 0) <= 0) return;
    }
}

/* a cumulative counter from a cgroup events file ("key value" lines), as jobcgroup._event */
static long long event_count(int fd, const char *key) {
    char text[4097];
    if (fd < 0) return 0;
    ssize_t n = pread(fd, text, 4096, 0);
    if (n <= 0) return 0;
    text[n] = 0;
    size_t k = strlen(key);
    for (char *line = text; line != NULL && *line; ) {
        if (strncmp(line, key, k) == 0 && line[k] == ' ') return atoll(line + k + 1);
        line = strchr(line, '\n');
        if (line != NULL) line++;
    }
    return 0;
}

/* One level the trust check looked at: (path, follow, dev, ino, mode, uid, size, mtime_ns,
 * ctime_ns) must still stat the same; (path, -1) must still not exist (an earlier plugin_dir
 * that does not hold the plugin). Returns 1 when it holds, 0 when not, -1 on a bad item. */
static int level_holds(PyObject *item) {
    if (!PyTuple_Check(item) || (PyTuple_GET_SIZE(item) != 2 && PyTuple_GET_SIZE(item) != 9)) return -1;
    const char *path = PyBytes_AsString(PyTuple_GET_ITEM(item, 0));
    long follow = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
    if (path == NULL || PyErr_Occurred()) return -1;
    struct stat st;
    int r = follow > 0 ? stat(path, &st) : lstat(path, &st);
    if (follow < 0) return r < 0 && (errno == ENOENT || errno == ENOTDIR);
    if (r < 0 || PyTuple_GET_SIZE(item) != 9) return 0;
    long long got[7] = {(long long)st.st_dev, (long long)st.st_ino, (long long)st.st_mode, (long long)st.st_uid,
                        (long long)st.st_size, ns_of(&st.st_mtim), ns_of(&st.st_ctim)};
    for (int i = 0; i < 7; i++) {
        long long want = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 2 + i));
        if (PyErr_Occurred()) return -1;
        if (want != got[i]) return 0;
    }
    return 1;
}

/* a version 4 uuid, as runner.protocol.new_uuid */
static int new_uuid(char out[37]) {
    unsigned char b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) return -1;
    b[6] = (b[6] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    static const char hex[] = "0123456789abcdef";
    int j = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) out[j++] = '-';
        out[j++] = hex[b[i] >> 4];
        out[j++] = hex[b[i] & 15];
    }
    out[j] = 0;
    return 0;
}

/* a tuple of bytes into `out` (room for its size + 1) as a NULL-terminated array pointing
 * into the bytes objects; -1 (with an exception set) when it is not one */
static int strings(PyObject *tuple, char **out) {
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyBytes_AsString(PyTuple_GET_ITEM(tuple, i));
        if (out[i] == NULL) return -1;
    }
    out[n] = NULL;
    return 0;
}

static PyObject *SLOW, *WAKE;

/* ar-exec, as Sandbox._spawn_helper starts it: stdin, stdout and stderr in place, a new
 * session, the default action for the signals the runner handles, no signal blocked */
static pid_t spawn(const char *helper, char **argv, char **envp, int stdin_fd, int out, int err) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    sigset_t defaults, mask;
    pid_t pid = -1;
    sigemptyset(&defaults);
    int handled[] = {SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGPIPE};  /* sandbox._SPAWN_SIGDEF */
    for (size_t i = 0; i < sizeof handled / sizeof handled[0]; i++) sigaddset(&defaults, handled[i]);
    sigemptyset(&mask);
    if (posix_spawn_file_actions_init(&actions)) return -1;
    if (posix_spawnattr_init(&attr)) {
        posix_spawn_file_actions_destroy(&actions);
        return -1;
    }
    if (!posix_spawn_file_actions_adddup2(&actions, stdin_fd, 0) && !posix_spawn_file_actions_adddup2(&actions, out, 1) &&
        !posix_spawn_file_actions_adddup2(&actions, err, 2) && !posix_spawnattr_setsigdefault(&attr, &defaults) &&
        !posix_spawnattr_setsigmask(&attr, &mask) &&
        !posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK) &&
        posix_spawn(&pid, helper, &actions, &attr, argv, envp) != 0)
        pid = -1;
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    return pid;
}

static void close_all(const int *fds, int n) {
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0) close(fds[i]);
}

PyDoc_STRVAR(run_doc,
"run(epoll_fd, due, levels, scratch, scratch_key, scratch_age, run_uuid, stdin_rw, stdin_ro, head, tail,\n"
"    helper, argv, env, quick, output_limit, children_fd, oom_fd, pids_fd)\n\n"
"One usual run (see the file's comment). `due` 0: start now; `levels` (): checked already;\n"
"`scratch_key`: (inode, ctime ns) of the scratch folder as it was left empty, trusted only\n"
"while that ctime is at least `scratch_age` ns old; `run_uuid` b'': make one. Returns one of:\n"
"  ('wake',)  the epoll had something before the run was due: nothing was done;\n"
"  ('slow',)  a check changed or the plugin could not be started: nothing was started;\n"
"  ('inflight', uuid, start_wall, start_mono, pid, pidfd, stdout_fd, stderr_fd);\n"
"  ('done', uuid, start_wall, start_mono, pid, status, utime, stime, stdout, stderr,\n"
"   has_children, oom_kills, pids_max_events, end_wall).");

static PyObject *run(PyObject *Py_UNUSED(module), PyObject *args) {
    int epoll_fd, stdin_rw, stdin_ro, children_fd, oom_fd, pids_fd;
    double due, quick;
    PyObject *levels, *argv_tuple, *env_tuple;
    const char *scratch, *head, *tail, *helper, *given_uuid;
    Py_ssize_t head_len, tail_len, limit, given_uuid_len;
    long long scratch_ino, scratch_ctime, scratch_age;
    if (!PyArg_ParseTuple(args, "idO!y(LL)Ly#iiy#y#yO!O!dniii:run", &epoll_fd, &due, &PyTuple_Type, &levels, &scratch,
                          &scratch_ino, &scratch_ctime, &scratch_age, &given_uuid, &given_uuid_len, &stdin_rw, &stdin_ro, &head, &head_len, &tail, &tail_len,
                          &helper, &PyTuple_Type, &argv_tuple, &PyTuple_Type, &env_tuple, &quick, &limit, &children_fd, &oom_fd, &pids_fd))
        return NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "output_limit must not be negative");
        return NULL;
    }
    struct pollfd fds[2] = {{.fd = -1, .events = POLLIN}, {.fd = epoll_fd, .events = POLLIN}};

    if (given_uuid_len != 0 && given_uuid_len != 36) {
        PyErr_SetString(PyExc_ValueError, "a run uuid has 36 characters");
        return NULL;
    }
    int r;

    /* 1. until the run is due, unless the loop has something to do first (due 0: now) */
    if (due > 0 && (r = wait_for(fds + 1, 1, due)) != 0) return r == -2 ? NULL : Py_NewRef(WAKE);

    /* 2. the checks' fast paths */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(levels); i++) {
        int holds = level_holds(PyTuple_GET_ITEM(levels, i));
        if (holds < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "bad level");
            return NULL;
        }
        if (!holds) return Py_NewRef(SLOW);
    }
    struct stat st;
    if (lstat(scratch, &st) < 0 || (long long)st.st_ino != scratch_ino || ns_of(&st.st_ctim) != scratch_ctime)
        return Py_NewRef(SLOW);
    /* timestamps are coarse: what a plugin changed within the clock tick its folder was left
     * empty in would not show in the ctime (runner.main.SCRATCH_TICK_NS) */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (ns_of(&now) - scratch_ctime < scratch_age) return Py_NewRef(SLOW);

    /* 3. this run's uuid, stdin document and environment */
    char uuid[37];
    if (given_uuid_len) {
        memcpy(uuid, given_uuid, 36);
        uuid[36] = 0;
    } else if (new_uuid(uuid)) {
        return Py_NewRef(SLOW);
    }
    /* the whole document each run (see runner.protocol.StdinFile); its size is sealed */
    struct iovec doc[3] = {{(void *)head, (size_t)head_len}, {uuid, 36}, {(void *)tail, (size_t)tail_len}};
    ssize_t written = pwritev(stdin_rw, doc, 3, 0);
    if (written != head_len + 36 + tail_len || lseek(stdin_ro, 0, SEEK_SET) != 0) return Py_NewRef(SLOW);
    if (PyTuple_GET_SIZE(argv_tuple) > MAX_ARGS || PyTuple_GET_SIZE(env_tuple) > MAX_ARGS) {
        PyErr_SetString(PyExc_ValueError, "too many arguments or environment variables");
        return NULL;
    }
    char *argv[PyTuple_GET_SIZE(argv_tuple) + 1], *envp[PyTuple_GET_SIZE(env_tuple) + 2];
    if (strings(argv_tuple, argv) || strings(env_tuple, envp)) return NULL;
    char run_env[64];
    snprintf(run_env, sizeof run_env, "ASSESSMENT_RUN_UUID=%s", uuid);
    envp[PyTuple_GET_SIZE(env_tuple)] = run_env;
    envp[PyTuple_GET_SIZE(env_tuple) + 1] = NULL;

    /* 4. start it */
    double start_wall = clock_now(CLOCK_REALTIME), start_mono = clock_now(CLOCK_MONOTONIC);
    int out[2] = {-1, -1}, err[2] = {-1, -1};
    pid_t pid = -1;
    if (pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0)
        pid = spawn(helper, argv, envp, stdin_ro, out[1], err[1]);
    close_all((int[]){out[1], err[1]}, 2);
    int pidfd = pid > 0 ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;
    if (pid > 0 && pidfd < 0) {  /* out of fds, say: end it unseen, and let Python try and say why */
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
        pid = -1;
    }
    if (pid <= 0) {
        close_all((int[]){out[0], err[0]}, 2);
        return Py_NewRef(SLOW);
    }

    /* 5. a quick plugin is waited for here; one still running, or an event, is Python's */
    fds[0].fd = pidfd;
    r = wait_for(fds, 2, start_mono + quick);
    if (r == -2) PyErr_Clear();  /* the run has started and must be handed over: a raising handler (the runner has none) loses its exception */
    if (r <= 0 || !(fds[0].revents & POLLIN))
        return Py_BuildValue("(ss#ddiiii)", "inflight", uuid, (Py_ssize_t)36, start_wall, start_mono, (int)pid,
                             pidfd, out[0], err[0]);

    /* 6. collect what it left */
    int status = 0;
    struct rusage usage;
    memset(&usage, 0, sizeof usage);
    while (wait4(pid, &status, 0, &usage) < 0 && errno == EINTR) {}
    kill(-pid, SIGKILL);  /* whatever of its group is left: nothing a run starts outlives it */
    char c;
    int children = children_fd < 0 || pread(children_fd, &c, 1, 0) != 0;  /* linux.has_children */
    buffer stdout_buf = {stdout_static, 0, STATIC_SIZE, 0}, stderr_buf = {stderr_static, 0, STATIC_SIZE, 0};
    /* (out of memory, a drain keeps what it had: the run still gets its one result) */
    drain(out[0], &stdout_buf, (size_t)limit, 0);
    drain(err[0], &stderr_buf, STDERR_TAIL, 1);
    close_all((int[]){out[0], err[0], pidfd}, 3);
    long long oom = event_count(oom_fd, "oom_kill"), pids = event_count(pids_fd, "max");
    double end = clock_now(CLOCK_REALTIME);
    PyObject *result = Py_BuildValue(
        "(ss#ddiiddy#y#iLLd)", "done", uuid, (Py_ssize_t)36, start_wall, start_mono, (int)pid, status,
        usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6, usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6,
        stdout_buf.data, (Py_ssize_t)stdout_buf.len, stderr_buf.data, (Py_ssize_t)stderr_buf.len, children, oom,
        pids, end);
    if (stdout_buf.heap) free(stdout_buf.data);
    if (stderr_buf.heap) free(stderr_buf.data);
    return result;
}

static PyMethodDef methods[] = {{"run", run, METH_VARARGS, run_doc}, {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "runner._fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void) {
    SLOW = Py_BuildValue("(s)", "slow");
    WAKE = Py_BuildValue("(s)", "wake");
    if (SLOW == NULL || WAKE == NULL) return NULL;
    return PyModule_Create(&module);
}
