#!/bin/bash
# A Debian bookworm root with a real systemd as PID 1, for tests/test_systemd.py (and by hand).
#
#   systemd_container.sh rootfs CACHE ROOT   # ROOT: a fresh copy of the cached pristine root
#   systemd_container.sh boot ROOT NAME      # prints the container's PID 1 (as seen here)
#   systemd_container.sh stop ROOT NAME      # poweroff, then removes the cgroups boot made
#   systemd_container.sh mirror              # the Debian mirror apt is configured with
#
# rootfs: CACHE/pristine is made once with debootstrap (minbase + systemd, dbus) from the mirror
# of this host's /etc/apt/sources.list*, with that apt config, `apt-get update` done and the
# package's dependencies (python3.11, procps) downloaded into apt's cache, so a later
# `apt-get install ./x.deb` resolves them as on any host without fetching them again.
#
# boot: systemd runs in new pid, mount, uts, ipc and cgroup namespaces (no network namespace:
# it shares the host's), with /proc, a read-only /sys and the cgroup v1 controllers of this
# host mounted writable inside, so that Delegate=yes, the per-job v1 memory/pids cgroups and
# the service's own cleanup work as on a host. Before unshare this shell moves itself into a
# child cgroup NAME of its own in every hierarchy (the container's cgroup namespace root);
# after boot the unshare helper is moved back out, else `systemctl status` cannot list the
# unit's processes. `nsenter -t PID1 -a CMD` runs CMD inside but in the host's cgroup: use
# `systemd-run --wait -P -q CMD` for anything that must run in a cgroup of the container.
# console-getty is masked: /dev/console is /dev/null here.
set -euo pipefail

mirror() {  # the first Debian mirror serving bookworm in /etc/apt/sources.list*
    local m
    m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
        /^URIs:/ {uri=$2} /^Suites:/ {for (i=2;i<=NF;i++) if ($i=="bookworm") print uri}' | head -1)
    if [ -z "$m" ]; then
        m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1=="deb" && $3=="bookworm" {print $2; exit}' | sed 's/\[[^]]*\]//')
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

rootfs() {
    local cache=$1 root=$2 m
    mkdir -p "$cache"
    if [ ! -f "$cache/pristine/.complete" ]; then
        m=$(mirror)
        rm -rf "$cache/pristine.tmp" "$cache/pristine"
        debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$cache/pristine.tmp" "$m" \
            > "$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log" >&2; return 1; }
        local p=$cache/pristine.tmp
        # the host's apt sources (same mirror, same snapshot), and its resolver for apt
        rm -f "$p/etc/apt/sources.list"
        cp /etc/apt/sources.list.d/*.sources "$p/etc/apt/sources.list.d/" 2>/dev/null || true
        [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$p/etc/apt/sources.list"
        cp -L /etc/resolv.conf "$p/etc/resolv.conf"
        mount -t proc proc "$p/proc"
        local rc=0
        { chroot "$p" apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive chroot "$p" apt-get install -y -qq --download-only python3.11 python3 procps ; } \
            > "$cache/apt.log" 2>&1 || rc=$?
        umount "$p/proc"
        [ "$rc" -eq 0 ] || { tail -20 "$cache/apt.log" >&2; return 1; }
        ln -sf /dev/null "$p/etc/systemd/system/console-getty.service"
        touch "$p/.complete"
        mv "$p" "$cache/pristine"
    fi
    rm -rf "$root"
    cp -a "$cache/pristine" "$root"
    chmod 0755 "$root"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
}

cg_dirs() {  # the folder NAME is/would be in each hierarchy of this shell's cgroup
    local name=$1 id ctl path m
    while IFS=: read -r id ctl path; do
        case "$ctl" in
            "") m=/sys/fs/cgroup/unified; [ -d "$m" ] || m=/sys/fs/cgroup ;;
            name=systemd) m=/sys/fs/cgroup/systemd ;;
            *) m=/sys/fs/cgroup/$ctl ;;
        esac
        path=${path%/}
        path=${path%/"$name"}   # already moved in (a second call from the same shell)
        [ -d "$m$path" ] && echo "$m$path"
    done < /proc/self/cgroup
}

boot() {
    local root=$1 name=$2 parents=() p
    mapfile -t parents < <(cg_dirs "$name")
    for p in "${parents[@]}"; do
        mkdir -p "$p/$name"
        if [ -f "$p/cpuset.cpus" ]; then
            cat "$p/cpuset.cpus" > "$p/$name/cpuset.cpus"
            cat "$p/cpuset.mems" > "$p/$name/cpuset.mems"
        fi
        echo $$ > "$p/$name/cgroup.procs"
    done
    printf '%s\n' "${parents[@]}" > "$root.cgroups"
    # shellcheck disable=SC2016
    setsid unshare --pid --fork --mount --uts --ipc --cgroup --propagation private -- /bin/bash -c '
set -e
R=$1
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs -o ro sysfs "$R/sys"
mount -t tmpfs -o mode=755 tmpfs "$R/sys/fs/cgroup"
for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
    [ -d /sys/fs/cgroup/$c ] || continue
    mkdir "$R/sys/fs/cgroup/$c"; mount -t cgroup -o $c cgroup "$R/sys/fs/cgroup/$c"
done
mkdir "$R/sys/fs/cgroup/systemd"; mount -t cgroup -o none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
mkdir "$R/sys/fs/cgroup/unified"; mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified"
mount -o remount,ro,bind "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do touch "$R/dev/$n"; mount --bind /dev/$n "$R/dev/$n"; done
touch "$R/dev/console"; mount --bind /dev/null "$R/dev/console"
mkdir "$R/dev/shm" "$R/dev/pts"; mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
# a devpts of its own and /dev/ptmx: without them PrivateDevices=yes fails (226/NAMESPACE)
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"; ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"; ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
hostname ctr
cd "$R"; mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot 2>/dev/null || true
exec /usr/bin/env -i container=other TERM=dumb /lib/systemd/systemd --log-target=journal
' boot "$root" </dev/null > "$root.console" 2>&1 &
    local us=$! leader="" i
    echo "$us" > "$root.unshare"
    for i in $(seq 100); do
        leader=$(ps -o pid= --ppid "$us" | tr -d ' ' || true)
        [ -n "$leader" ] && [ "$(cat "/proc/$leader/comm" 2>/dev/null)" = systemd ] && break
        leader=""; sleep 0.1
    done
    # this shell and the unshare helper back out of the container's cgroup root
    for p in "${parents[@]}"; do echo "$us" > "$p/cgroup.procs"; echo $$ > "$p/cgroup.procs"; done
    [ -n "$leader" ] || { echo "boot failed:" >&2; cat "$root.console" >&2; return 1; }
    echo "$leader" > "$root.leader"
    for i in $(seq 300); do [ -S "/proc/$leader/root/run/systemd/private" ] && break; sleep 0.1; done
    timeout 60 nsenter -t "$leader" -a systemctl is-system-running --wait >/dev/null 2>&1 || true
    echo "$leader"
}

stop() {
    local root=$1 name=$2 us leader i
    us=$(cat "$root.unshare" 2>/dev/null || true)
    leader=$(cat "$root.leader" 2>/dev/null || true)
    if [ -n "$leader" ]; then
        kill -RTMIN+4 "$leader" 2>/dev/null || true   # SIGRTMIN+4: systemd's poweroff
        for i in $(seq 150); do kill -0 "$us" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$us" 2>/dev/null; then kill -KILL "$leader" 2>/dev/null || true; sleep 0.5; fi
    elif [ -n "$us" ]; then
        kill -KILL "$us" 2>/dev/null || true
    fi
    # the cgroups boot made, deepest first (the container's own are inside them)
    if [ -f "$root.cgroups" ]; then
        local p
        while read -r p; do
            [ -d "$p/$name" ] || continue
            find "$p/$name" -depth -type d | while read -r d; do
                rmdir "$d" 2>/dev/null || echo "busy: $d" >&2
            done
        done < "$root.cgroups"
    fi
    rm -f "$root.unshare" "$root.leader" "$root.cgroups"
}

cmd=${1:-}; shift || true
case "$cmd" in
    rootfs) rootfs "$@" ;;
    boot) boot "$@" ;;
    stop) stop "$@" ;;
    mirror) mirror ;;
    *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
