/*
 * ar-exec: the last step between a runner and its plugin.
 *
 * A runner starts this with posix_spawn (vfork-style, no copy of the Python process); it
 * applies the sandbox and execs the plugin. It does exactly what runner/sandbox.py does
 * after fork when this helper is not built:
 *
 *   ar-exec UID GID MEMORY CPU_SECONDS OPEN_FILES PROCESSES PARENT_PID CGROUP CWD CONFINE CAPS
 *           -- PATH [ARG...]
 *
 * Numbers are decimal; -1 means "leave unset" (UID/GID -1: keep ours). CGROUP is a list of
 * cgroup folders separated by ':' to join before anything else (so all the plugin starts is
 * counted there), or "-" for none. CONFINE is "-" (no Landlock) or FLAGS[:WRITE_PATH...]:
 * FLAGS has "l" (confine) and may have "n" (TCP allowed); the plugin may then write only in
 * CWD, /dev/null, /dev/zero, /dev/full and the WRITE_PATHs, with what the kernel's Landlock
 * ABI supports (none at all: it runs unconfined; the supervisor reports the ABI). CAPS is
 * "-" or capability numbers separated by ',' given to the plugin as ambient capabilities
 * on its own uid, with the bounding set cut down to them. stdin/stdout/stderr, the session
 * and the signal dispositions are already set up by posix_spawn. On any failure it prints
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
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif
#include <linux/resource.h>
#include <linux/signal.h>

typedef unsigned long size_t;
typedef unsigned long long u64;

/* Landlock and capability constants are spelled out here: the build host's uapi headers may
 * predate the kernels the helper runs on (the syscall numbers are the same on both arches) */
#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif
#define LANDLOCK_CREATE_RULESET_VERSION 1
#define LANDLOCK_RULE_PATH_BENEATH 1
#define FS_EXECUTE (1ULL << 0)
#define FS_WRITE_FILE (1ULL << 1)
#define FS_READ_FILE (1ULL << 2)
#define FS_READ_DIR (1ULL << 3)
#define FS_ABI1 ((1ULL << 13) - 1) /* EXECUTE .. MAKE_SYM: the 13 rights of ABI 1 */
#define FS_REFER (1ULL << 13)      /* ABI 2 */
#define FS_TRUNCATE (1ULL << 14)   /* ABI 3 */
#define FS_IOCTL_DEV (1ULL << 15)  /* ABI 5 */
#define FS_FILE (FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV)
#define NET_BIND_TCP (1ULL << 0)   /* ABI 4 */
#define NET_CONNECT_TCP (1ULL << 1)
#define SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0) /* ABI 6 */
#define SCOPE_SIGNAL (1ULL << 1)

struct ruleset_attr {
    u64 handled_access_fs, handled_access_net, scoped;
};
struct path_beneath_attr {
    u64 allowed_access;
    int parent_fd;
} __attribute__((packed));

#define CAPABILITY_VERSION_3 0x20080522
struct cap_header {
    unsigned int version;
    int pid;
};
struct cap_data {
    unsigned int effective, permitted, inheritable;
};

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

/* "ar-exec: STEP[ WHAT]: ERROR" */
static __attribute__((noreturn)) void fail2(const char *step, const char *what, long err) {
    char buf[4200];
    size_t at = 0;
    put(buf, &at, sizeof buf - 1, "ar-exec: ");
    put(buf, &at, sizeof buf - 1, step);
    if (what) {
        put(buf, &at, sizeof buf - 1, " ");
        put(buf, &at, sizeof buf - 1, what);
    }
    put(buf, &at, sizeof buf - 1, ": ");
    put(buf, &at, sizeof buf - 1, describe(err));
    buf[at++] = '\n';
    sys3(__NR_write, 2, buf, at);
    leave(127);
}

static __attribute__((noreturn)) void fail(const char *step, long err) {
    fail2(step, 0, err);
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

/* "-" or "2,13": a mask of capability numbers */
static u64 capabilities(const char *s) {
    u64 mask = 0;
    if (same(s, "-"))
        return 0;
    for (const char *p = s;;) {
        unsigned v = 0;
        const char *digits = p;
        for (; *p >= '0' && *p <= '9' && v < 64; p++)
            v = v * 10 + (unsigned)(*p - '0');
        if (p == digits || v > 63 || (*p && *p != ','))
            fail("capabilities", EINVAL);
        mask |= 1ULL << v;
        if (!*p++)
            return mask;
    }
}

/* Allow `access` beneath `path` (all of it, or the file rights when it is not a folder).
 * The path is opened here, while we are still root: a write path need not be reachable by
 * the plugin's uid. A missing default device is skipped; anything else missing is an error. */
static void allow(long ruleset, const char *path, u64 access, int optional, const char *step) {
    long fd = -ENOTDIR;
    if (access & ~FS_FILE)
        fd = sys4(__NR_openat, AT_FDCWD, path, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
    if (fd == -ENOTDIR) {
        access &= FS_FILE; /* the kernel refuses folder rights on anything else */
        fd = sys4(__NR_openat, AT_FDCWD, path, O_PATH | O_CLOEXEC, 0);
    }
    if (fd == -ENOENT && optional)
        return;
    if (fd < 0)
        fail2(step, path, -fd);
    struct path_beneath_attr rule = {access, (int)fd};
    long r = sys4(__NR_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0);
    if (r < 0)
        fail2(step, path, -r);
    sys1(__NR_close, fd);
}

/* The Landlock ruleset for CONFINE (see the top), or -1 to run unconfined: "-", or a kernel
 * without Landlock. Built while root; enforced by restrict_self just before exec. */
static long landlock_ruleset(char *confine, const char *cwd) {
    if (same(confine, "-"))
        return -1;
    int confined = 0, network = 0;
    char *p = confine;
    for (; *p && *p != ':'; p++) {
        if (*p == 'l')
            confined = 1;
        else if (*p == 'n')
            network = 1;
        else
            fail("confine", EINVAL);
    }
    if (!confined)
        fail("confine", EINVAL);
    long abi = sys3(__NR_landlock_create_ruleset, 0, 0, LANDLOCK_CREATE_RULESET_VERSION);
    if (abi == -ENOSYS || abi == -EOPNOTSUPP) /* not built in, or not enabled at boot */
        return -1;
    check(abi, "landlock abi");
    /* handle every right the kernel knows, so that whatever is not granted is denied */
    struct ruleset_attr attr = {FS_ABI1, 0, 0};
    size_t size = 8;
    if (abi >= 2)
        attr.handled_access_fs |= FS_REFER;
    if (abi >= 3)
        attr.handled_access_fs |= FS_TRUNCATE;
    if (abi >= 5)
        attr.handled_access_fs |= FS_IOCTL_DEV;
    if (abi >= 4) {
        size = 16;
        if (!network)
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP; /* and no rule allows any */
    }
    if (abi >= 6) {
        size = 24;
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL;
    }
    u64 all = attr.handled_access_fs;
    long ruleset = sys3(__NR_landlock_create_ruleset, &attr, size, 0);
    check(ruleset, "landlock ruleset");
    allow(ruleset, "/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR, 0, "landlock read");
    allow(ruleset, cwd, all, 0, "landlock scratch");
    allow(ruleset, "/dev/null", all & FS_FILE, 1, "landlock write path");
    allow(ruleset, "/dev/zero", all & FS_FILE, 1, "landlock write path");
    allow(ruleset, "/dev/full", all & FS_FILE, 1, "landlock write path");
    /* configured write paths never hold ':' (the config refuses them) */
    while (*p == ':') {
        char *path = ++p;
        while (*p && *p != ':')
            p++;
        char sep = *p;
        *p = 0;
        if (*path)
            allow(ruleset, path, all, 0, "landlock write path");
        *p = sep;
    }
    return ruleset;
}

/* Keep only `grant` in the bounding set (nothing an exec could ever gain beyond it) */
static void trim_bounding_set(u64 grant) {
    for (int cap = 0; cap < 64; cap++) {
        if (grant & (1ULL << cap))
            continue;
        long r = sys5(__NR_prctl, PR_CAPBSET_DROP, cap, 0, 0, 0);
        if (r == -EINVAL) /* past the kernel's last capability */
            break;
        check(r, "drop capabilities");
    }
}

/* After the uid change (which clears the ambient set): `grant` becomes the permitted,
 * effective and inheritable sets, and ambient, so that it survives the exec of a plain file */
static void grant_capabilities(u64 grant) {
    struct cap_header head = {CAPABILITY_VERSION_3, 0};
    struct cap_data data[2];
    for (int i = 0; i < 2; i++) {
        unsigned int word = (unsigned int)(grant >> (32 * i));
        data[i].effective = data[i].permitted = data[i].inheritable = word;
    }
    check(sys2(__NR_capset, &head, data), "capset");
    for (int cap = 0; cap < 64; cap++)
        if (grant & (1ULL << cap))
            check(sys5(__NR_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "ambient capability");
}

__attribute__((used, noreturn)) void start_c(long *sp) {
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1), **envp = argv + argc + 1;
    if (argc < 14 || !same(argv[12], "--"))
        fail("usage: ar-exec UID GID MEMORY CPU OPEN_FILES PROCESSES PARENT_PID CGROUP CWD CONFINE CAPS "
             "-- PATH [ARG...]", EINVAL);
    long long uid = number(argv[1], "uid"), gid = number(argv[2], "gid");
    long long memory = number(argv[3], "memory"), cpu = number(argv[4], "cpu");
    long long files = number(argv[5], "open_files"), procs = number(argv[6], "processes");
    long long parent = number(argv[7], "parent pid");
    const char *cgroups = argv[8], *cwd = argv[9];
    int grants = !same(argv[11], "-");
    u64 grant = capabilities(argv[11]);

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
    /* before RLIMIT_NOFILE (it opens a few paths) and while root (see allow) */
    long ruleset = landlock_ruleset(argv[10], cwd);
    sys1(__NR_umask, 077);
    limit(RLIMIT_CORE, 0, 0, "rlimit core");
    limit(RLIMIT_AS, memory, memory, "rlimit memory");
    limit(RLIMIT_CPU, cpu, cpu + 1, "rlimit cpu"); /* SIGXCPU, then SIGKILL a second later */
    limit(RLIMIT_NOFILE, files, files, "rlimit open_files");
    limit(RLIMIT_NPROC, procs, procs, "rlimit processes");
    /* needs CAP_SETPCAP, so before the uid change. Only with a grant: each drop is a
     * credential change (27 us for all of them on our test VM, twice what Landlock costs),
     * and without a grant a run as another user has nothing the bounding set could still
     * limit, since no_new_privs stops setuid files and file capabilities. */
    if (grants)
        trim_bounding_set(grant);
    if (uid >= 0) {
        /* keep the permitted set across setuid, to hand the grant on below */
        if (grants)
            check(sys5(__NR_prctl, PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps");
        /* raw calls change this thread's credentials only: we have no other thread */
        check(sys2(__NR_setgroups, 0, 0), "setgroups");
        check(sys1(__NR_setgid, gid), "setgid");
        check(sys1(__NR_setuid, uid), "setuid");
    }
    if (grants)
        grant_capabilities(grant);
    /* landlock_restrict_self needs it without CAP_SYS_ADMIN */
    check(sys5(__NR_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs");
    if (ruleset >= 0)
        check(sys2(__NR_landlock_restrict_self, ruleset, 0), "landlock restrict");
    /* after every credential change, which clears it; then close the race with our parent's death */
    check(sys5(__NR_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig");
    if (sys1(__NR_getppid, 0) != parent)
        leave(127);
    check(sys1(__NR_chdir, cwd), "chdir");
    /* the zygote offers runner pages to KSM, and that is inherited across exec: take the
     * plugin's back, so that no plugin's memory is merged with ours (a deduplication timing
     * side channel) or scanned. EINVAL before Linux 6.4: nothing to take back. */
    sys5(__NR_prctl, PR_SET_MEMORY_MERGE, 0, 0, 0, 0);
    long r = sys3(__NR_execve, argv[13], &argv[13], envp);
    fail("exec", -r);
}
