/*
 * ar-exec: the last step between a runner and its plugin.
 *
 * A runner starts this with posix_spawn (vfork-style, no copy of the Python process); it
 * applies the sandbox and execs the plugin. It does exactly what runner/sandbox.py does
 * after fork when this helper is not built:
 *
 *   ar-exec UID GID MEMORY CPU_SECONDS OPEN_FILES PROCESSES PARENT_PID CGROUP CWD -- PATH [ARG...]
 *
 * Numbers are decimal; -1 means "leave unset" (UID/GID -1: keep ours). CGROUP is a list of
 * cgroup folders separated by ':' to join before anything else (so all the plugin starts is
 * counted there), or "-" for none. stdin/stdout/stderr, the session and the signal
 * dispositions are already set up by posix_spawn. On any failure it prints
 * "ar-exec: STEP: ERROR" on stderr and exits 127.
 *
 * Why no libc: it runs once per plugin run, and a libc's start-up (the dynamic loader, or a
 * static glibc's CPU feature probing, many CPUID instructions that trap under virtualisation)
 * cost 0.65-0.8 ms per exec on our benchmark hosts, against 0.05 ms for this. So it talks to
 * the kernel directly: a few raw system calls, for x86_64 and aarch64 (other targets build
 * no helper, and runners fork instead). Only kernel uapi headers are used.
 */
#include <asm/unistd.h>
#include <linux/errno.h>
#include <linux/fcntl.h>
#include <linux/prctl.h>
#include <linux/resource.h>
#include <linux/signal.h>

typedef unsigned long size_t;

#if defined(__x86_64__)
static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
__asm__(".text\n.global _start\n_start:\n xor %rbp,%rbp\n mov %rsp,%rdi\n and $-16,%rsp\n call start_c\n hlt\n");
#elif defined(__aarch64__)
static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    register long x8 __asm__("x8") = n, x0 __asm__("x0") = a, x1 __asm__("x1") = b, x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d, x4 __asm__("x4") = e, x5 __asm__("x5") = f;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5) : "memory");
    return x0;
}
__asm__(".text\n.global _start\n_start:\n mov x0, sp\n bl start_c\n brk #0\n");
#else
#error "ar-exec has raw system calls for x86_64 and aarch64 only; runners fork on other targets"
#endif

#define sys1(n, a) sys6(n, (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define sys5(n, a, b, c, d, e) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* the compiler may emit calls to these for struct copies even when freestanding */
void *memset(void *s, int c, size_t n) {
    unsigned char *p = s;
    while (n--)
        *p++ = (unsigned char)c;
    return s;
}
void *memcpy(void *d, const void *s, size_t n) {
    unsigned char *a = d;
    const unsigned char *b = s;
    while (n--)
        *a++ = *b++;
    return d;
}

static int same(const char *a, const char *b) {
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static __attribute__((noreturn)) void leave(int code) {
    for (;;)
        sys1(__NR_exit_group, code);
}

/* glibc's wording for the errors these calls can give, so reasons read as they always did */
static const char *describe(long err) {
    switch (err) {
    case EPERM: return "Operation not permitted";
    case ENOENT: return "No such file or directory";
    case ESRCH: return "No such process";
    case EINTR: return "Interrupted system call";
    case EIO: return "Input/output error";
    case E2BIG: return "Argument list too long";
    case ENOEXEC: return "Exec format error";
    case EBADF: return "Bad file descriptor";
    case EAGAIN: return "Resource temporarily unavailable";
    case ENOMEM: return "Cannot allocate memory";
    case EACCES: return "Permission denied";
    case EFAULT: return "Bad address";
    case EBUSY: return "Device or resource busy";
    case EEXIST: return "File exists";
    case ENOTDIR: return "Not a directory";
    case EISDIR: return "Is a directory";
    case EINVAL: return "Invalid argument";
    case ENFILE: return "Too many open files in system";
    case EMFILE: return "Too many open files";
    case ETXTBSY: return "Text file busy";
    case ENOSPC: return "No space left on device";
    case EROFS: return "Read-only file system";
    case ENAMETOOLONG: return "File name too long";
    case ENOSYS: return "Function not implemented";
    case ELOOP: return "Too many levels of symbolic links";
    case EOPNOTSUPP: return "Operation not supported";
    case ELIBBAD: return "Accessing a corrupted shared library";
    default: return "Unknown error";
    }
}

static void put(char *buf, size_t *at, size_t cap, const char *s) {
    while (*s && *at < cap)
        buf[(*at)++] = *s++;
}

static __attribute__((noreturn)) void fail(const char *step, long err) {
    char buf[512];
    size_t at = 0;
    put(buf, &at, sizeof buf - 1, "ar-exec: ");
    put(buf, &at, sizeof buf - 1, step);
    put(buf, &at, sizeof buf - 1, ": ");
    put(buf, &at, sizeof buf - 1, describe(err));
    buf[at++] = '\n';
    sys3(__NR_write, 2, buf, at);
    leave(127);
}

static long long number(const char *s, const char *what) {
    int neg = *s == '-';
    long long v = 0;
    const char *p = s + neg;
    if (!*p)
        fail(what, EINVAL);
    for (; *p; p++) {
        if (*p < '0' || *p > '9' || v > 922337203685477580LL)
            fail(what, EINVAL);
        v = v * 10 + (*p - '0');
    }
    return neg ? -v : v;
}

static void limit(int resource, long long soft, long long hard, const char *what) {
    if (soft < 0)
        return;
    struct rlimit64 rl = {(unsigned long long)soft, (unsigned long long)hard};
    long r = sys4(__NR_prlimit64, 0, resource, &rl, 0);
    if (r < 0)
        fail(what, -r);
}

/* write "0" to DIR/cgroup.procs: this process (and so the plugin) joins that cgroup */
static void join_cgroup(const char *dir, size_t n) {
    static const char tail[] = "/cgroup.procs";
    char path[4096];
    if (n + sizeof tail > sizeof path)
        fail("join cgroup", ENAMETOOLONG);
    memcpy(path, dir, n);
    memcpy(path + n, tail, sizeof tail);
    long fd = sys4(__NR_openat, AT_FDCWD, path, O_WRONLY | O_CLOEXEC, 0);
    if (fd < 0)
        fail("join cgroup", -fd);
    long w = sys3(__NR_write, fd, "0", 1);
    if (w < 0)
        fail("join cgroup", -w);
    sys1(__NR_close, fd);
}

static void check(long r, const char *step) {
    if (r < 0)
        fail(step, -r);
}

__attribute__((used, noreturn)) void start_c(long *sp) {
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1), **envp = argv + argc + 1;
    if (argc < 12 || !same(argv[10], "--"))
        fail("usage: ar-exec UID GID MEMORY CPU OPEN_FILES PROCESSES PARENT_PID CGROUP CWD -- PATH [ARG...]",
             EINVAL);
    long long uid = number(argv[1], "uid"), gid = number(argv[2], "gid");
    long long memory = number(argv[3], "memory"), cpu = number(argv[4], "cpu");
    long long files = number(argv[5], "open_files"), procs = number(argv[6], "processes");
    long long parent = number(argv[7], "parent pid");
    const char *cgroups = argv[8], *cwd = argv[9];

    /* nothing of the runner's leaks into the plugin */
    if (sys3(__NR_close_range, 3U, ~0U, 0U) != 0)
        for (int fd = 3; fd < 65536; fd++)
            sys1(__NR_close, fd);
    if (!same(cgroups, "-")) {
        const char *start = cgroups;
        for (const char *p = cgroups;; p++) {
            if (*p == ':' || *p == 0) {
                if (p > start)
                    join_cgroup(start, (size_t)(p - start));
                if (*p == 0)
                    break;
                start = p + 1;
            }
        }
    }
    sys1(__NR_umask, 077);
    limit(RLIMIT_CORE, 0, 0, "rlimit core");
    limit(RLIMIT_AS, memory, memory, "rlimit memory");
    limit(RLIMIT_CPU, cpu, cpu + 1, "rlimit cpu"); /* SIGXCPU, then SIGKILL a second later */
    limit(RLIMIT_NOFILE, files, files, "rlimit open_files");
    limit(RLIMIT_NPROC, procs, procs, "rlimit processes");
    if (uid >= 0) {
        /* raw calls change this thread's credentials only: we have no other thread */
        check(sys2(__NR_setgroups, 0, 0), "setgroups");
        check(sys1(__NR_setgid, gid), "setgid");
        check(sys1(__NR_setuid, uid), "setuid");
    }
    check(sys5(__NR_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs");
    /* after the uid change, which clears it; then close the race with our parent's death */
    check(sys5(__NR_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig");
    if (sys1(__NR_getppid, 0) != parent)
        leave(127);
    check(sys1(__NR_chdir, cwd), "chdir");
    long r = sys3(__NR_execve, argv[11], &argv[11], envp);
    fail("exec", -r);
}
