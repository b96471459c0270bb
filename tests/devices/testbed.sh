#!/usr/bin/env bash
# An emulated Raspberry Pi for edgeq: an arm64 Debian bookworm userland run by
# qemu-user through binfmt_misc, with its own sshd in its own network namespace.
#
#   testbed.sh build            build the rootfs once and cache it (a few minutes)
#   testbed.sh start [-i N]     start device N (default 0); builds first if needed
#   testbed.sh stop  [-i N|--all]
#   testbed.sh status [-i N]    exit 0 when up, 3 when down
#   testbed.sh env   [-i N]     shell-sourceable connection facts
#   testbed.sh inventory [-i N ...]   Ansible YAML inventory of the devices
#   testbed.sh known-hosts [-i N ...] known_hosts lines for the devices
#   testbed.sh ssh   [-i N] [CMD...]  log in (or run CMD) on device N
#   testbed.sh deps             install the Debian packages it needs (root)
#   testbed.sh clean            stop everything and delete the cache
#
# Device N is 10.231.N.2 (host side 10.231.N.1), netns edgeq-tbN, hostname
# edgeq-rpiN. Every mount lives in a private mount namespace owned by the
# device's sshd, so when its processes are gone no mount is left on the host.
#
# Environment: EDGEQ_TESTBED_CACHE (default /var/cache/edgeq-testbed),
# EDGEQ_TESTBED_RUN (default $CACHE/run), EDGEQ_TESTBED_NET (default 10.231),
# EDGEQ_TESTBED_PORT (default 22), EDGEQ_TESTBED_CPU (qemu CPU: cortex-a72 = Pi 4,
# the default; cortex-a76 = Pi 5), EDGEQ_TESTBED_MIRROR (default
# http://deb.debian.org/debian), EDGEQ_TESTBED_INDEX (default https://pypi.org/simple).
set -euo pipefail

# Bump when the rootfs recipe changes: a cache with another stamp is rebuilt.
BUILD_ID="edgeq-testbed-bookworm-arm64-v1"

CACHE="${EDGEQ_TESTBED_CACHE:-/var/cache/edgeq-testbed}"
RUNBASE="${EDGEQ_TESTBED_RUN:-$CACHE/run}"
NET="${EDGEQ_TESTBED_NET:-10.231}"
PORT="${EDGEQ_TESTBED_PORT:-22}"
# qemu's default "max" CPU computes wrong int8 results in ai-edge-litert's
# XNNPACK kernels (qemu 7.2); a Cortex-A72 is also what a Raspberry Pi 4 has.
CPU="${EDGEQ_TESTBED_CPU:-cortex-a72}"
MIRROR="${EDGEQ_TESTBED_MIRROR:-http://deb.debian.org/debian}"
INDEX="${EDGEQ_TESTBED_INDEX:-https://pypi.org/simple}"
ROOTFS="$CACHE/rootfs"
KEYS="$CACHE/keys"
STAMP="$ROOTFS/etc/edgeq-testbed"
SSHD_CONFIG=/etc/ssh/sshd_config_edgeq
# Namespace names are machine-wide; this records which test bed (run dir) owns each.
OWNERS=/run/edgeq-testbed
PY_TFLITE=/opt/venv-tflite/bin/python
PY_LITERT=/opt/venv-litert/bin/python
# The device side of the runtimes: tflite-runtime stopped at 2.14 (numpy 1.x);
# ai-edge-litert is its successor. Pinned so device numbers are reproducible.
PIP_TFLITE=("numpy<2" "tflite-runtime==2.14.0")
PIP_LITERT=("numpy>=2,<3" "ai-edge-litert==2.3.0")
DEB_INCLUDE="python3,python3-venv,openssh-server,openssh-sftp-server,ca-certificates,procps"
DEB_HOST_PACKAGES=(debootstrap qemu-user-static binfmt-support iproute2 openssh-client util-linux)

say() { printf 'testbed: %s\n' "$*" >&2; }
die() { printf 'testbed: error: %s\n' "$*" >&2; exit 1; }

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

# ---------------------------------------------------------------- host checks

need_root() {
    [ "$(id -u)" = 0 ] && return 0
    local miss
    miss=$(missing_packages | xargs)
    if [ -n "$miss" ]; then
        die "needs root (network namespaces, mounts, chroot) and missing Debian packages: $miss; run: sudo apt-get install -y $miss && sudo $0 $*"
    fi
    die "needs root (network namespaces, mounts, chroot); run: sudo $0 $*"
}

missing_packages() {
    local miss=()
    command -v debootstrap >/dev/null 2>&1 || miss+=(debootstrap)
    [ -x /usr/bin/qemu-aarch64-static ] || miss+=(qemu-user-static)
    command -v update-binfmts >/dev/null 2>&1 || miss+=(binfmt-support)
    command -v ip >/dev/null 2>&1 || miss+=(iproute2)
    command -v ssh-keygen >/dev/null 2>&1 || miss+=(openssh-client)
    { command -v unshare && command -v nsenter && command -v setsid; } >/dev/null 2>&1 || miss+=(util-linux)
    printf '%s\n' "${miss[@]}"
}

cmd_deps() {
    local miss
    miss=$(missing_packages | xargs)
    [ -z "$miss" ] && return 0
    if [ "$(id -u)" != 0 ]; then
        die "missing Debian packages: $miss; run: sudo apt-get install -y $miss"
    fi
    say "installing Debian packages: $miss"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $miss; } >/dev/null \
        || die "apt-get install $miss failed; run it by hand to see why"
}

# qemu-user runs the aarch64 binaries only when binfmt_misc knows about them.
ensure_binfmt() {
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
            || die "cannot mount binfmt_misc on /proc/sys/fs/binfmt_misc (is the binfmt_misc kernel module available? try: modprobe binfmt_misc)"
    fi
    if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
        || die "binfmt_misc has no enabled qemu-aarch64 handler; run: update-binfmts --enable qemu-aarch64 (package qemu-user-static)"
    # Without the F flag the interpreter is looked up inside the chroot, where it does not exist.
    grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || die "the qemu-aarch64 binfmt handler lacks the F (fix-binary) flag, so it cannot run inside a chroot; reinstall qemu-user-static"
}

prepare_host() {
    need_root "$@"
    cmd_deps
    ensure_binfmt
}

built() { [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$BUILD_ID" ]; }

# ---------------------------------------------------------------- chroot helper

# A Raspberry Pi 4 as the 64-bit kernel shows it. ai-edge-litert's CPU feature
# detection segfaults under qemu-user when /proc/cpuinfo describes the x86 host.
# The Hardware line says what this really is, so a probe can tell.
write_cpuinfo() {
    local out=$1 i part features model revision
    case $CPU in
        cortex-a72) part=0xd08 revision=3 features="fp asimd evtstrm crc32 cpuid" model="Raspberry Pi 4 Model B Rev 1.4" ;;
        cortex-a76) part=0xd0b revision=1 model="Raspberry Pi 5 Model B Rev 1.0"
            features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        *) die "EDGEQ_TESTBED_CPU must be cortex-a72 (Pi 4) or cortex-a76 (Pi 5), got '$CPU'" ;;
    esac
    : >"$out"
    for i in 0 1 2 3; do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
            "$i" "$features" "$part" "$revision" >>"$out"
    done
    printf 'Hardware\t: BCM2835 (emulated by qemu-user %s, edgeq test bed)\nRevision\t: c03114\nSerial\t\t: 10000000edce0000\nModel\t\t: %s\n' \
        "$CPU" "$model" >>"$out"
}

# SetEnv reaches every session: qemu-user reads QEMU_CPU from the guest environment at each exec.
write_sshd_config() {
    cat >"$1" <<EOF
# edgeq test bed: key-only root login on the device's own address.
Port $PORT
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PidFile /run/sshd.pid
SetEnv QEMU_CPU=$CPU
# Fleet tests open several sessions at once; qemu makes each handshake slow.
MaxStartups 40:30:100
MaxSessions 20
LoginGraceTime 120
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
}

# Mounts a device's pseudo file systems under $1 (inside the caller's private
# mount namespace). $2: the cpuinfo file to show as /proc/cpuinfo.
# shellcheck disable=SC2016
MOUNT_PSEUDO='
mount_pseudo() {
r=$1; cpuinfo=$2
mount -t proc proc "$r/proc"
mount --bind "$cpuinfo" "$r/proc/cpuinfo"
# So the device can see that qemu runs it (edgeq probe reports it).
mount -t binfmt_misc -o ro binfmt_misc "$r/proc/sys/fs/binfmt_misc" 2>/dev/null || true
mount -t sysfs -o ro sysfs "$r/sys"
mount -t tmpfs -o mode=755,size=64k tmpfs "$r/dev"
for n in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
    set -- $n; mknod -m 666 "$r/dev/$1" c "$2" "$3"
done
mkdir -p "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
ln -s /proc/self/fd "$r/dev/fd"
mount -t tmpfs -o mode=1777 tmpfs "$r/dev/shm"
mount -t tmpfs -o mode=755 tmpfs "$r/run"
mkdir -p "$r/run/sshd"; chmod 755 "$r/run/sshd"
mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
}
'

# in_chroot ROOT CPUINFO CMD...: run CMD in ROOT with proc/dev/sys, in a private
# mount namespace (so nothing stays mounted when it returns).
in_chroot() {
    local root=$1 cpuinfo=$2; shift 2
    QEMU_CPU=$CPU unshare --mount --propagation private -- /bin/sh -ec "$MOUNT_PSEUDO"'
mount_pseudo "$1" "$2"; shift 2; exec chroot "$r" "$@"' sh "$root" "$cpuinfo" "$@"
}

# ---------------------------------------------------------------- build

cmd_build() {
    prepare_host build
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    if built; then
        say "rootfs cached: $ROOTFS ($(du -sh "$ROOTFS" 2>/dev/null | cut -f1))"
        return 0
    fi
    if any_running; then
        die "cannot rebuild while devices run; run: $0 stop --all"
    fi
    local t0 tmp log
    t0=$(date +%s)
    tmp="$CACHE/rootfs.build"
    log="$CACHE/build.log"
    rm -rf "$tmp" "$ROOTFS"
    : >"$log"
    say "building arm64 Debian bookworm rootfs in $tmp (log: $log); takes a few minutes"
    debootstrap --arch=arm64 --variant=minbase --include="$DEB_INCLUDE" bookworm "$tmp" "$MIRROR" >>"$log" 2>&1 \
        || { tail -n 20 "$log" >&2; die "debootstrap failed (full log: $log)"; }

    say "configuring sshd, keys and users"
    mkdir -p "$KEYS"
    chmod 700 "$KEYS"
    [ -f "$KEYS/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C edgeq-testbed -f "$KEYS/id_ed25519"
    rm -f "$tmp"/etc/ssh/ssh_host_*
    ssh-keygen -q -t ed25519 -N '' -C edgeq-testbed-device -f "$tmp/etc/ssh/ssh_host_ed25519_key"
    write_sshd_config "$tmp$SSHD_CONFIG"
    echo edgeq-rpi >"$tmp/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tedgeq-rpi\n' >"$tmp/etc/hosts"
    install -d -m 700 "$tmp/root/.ssh"
    install -m 600 "$KEYS/id_ed25519.pub" "$tmp/root/.ssh/authorized_keys"
    mkdir -p "$tmp/run/sshd"
    # pip inside the rootfs talks to PyPI with the host's resolver and CA bundle.
    cp -L /etc/resolv.conf "$tmp/etc/resolv.conf"
    install -d "$tmp/etc/edgeq-testbed-ca"
    cp -L /etc/ssl/certs/ca-certificates.crt "$tmp/etc/edgeq-testbed-ca/ca-certificates.crt"
    write_cpuinfo "$CACHE/cpuinfo"

    say "adding user pi and the two device venvs (pip under qemu: a few minutes)"
    in_chroot "$tmp" "$CACHE/cpuinfo" /bin/sh -ec '
        useradd -m -s /bin/bash pi
        install -d -m 700 -o pi -g pi /home/pi/.ssh
        install -m 600 -o pi -g pi /root/.ssh/authorized_keys /home/pi/.ssh/authorized_keys
    ' >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "creating user pi failed (log: $log)"; }
    local pipenv=(env -i QEMU_CPU="$CPU" PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
        PIP_CONFIG_FILE=/dev/null PIP_CERT=/etc/edgeq-testbed-ca/ca-certificates.crt
        PIP_INDEX_URL="$INDEX" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
        PIP_DEFAULT_TIMEOUT=120 PIP_ONLY_BINARY=:all:)
    for spec in "tflite|${PIP_TFLITE[*]}" "litert|${PIP_LITERT[*]}"; do
        local name=${spec%%|*} reqs=${spec#*|}
        say "  /opt/venv-$name: $reqs"
        # shellcheck disable=SC2086
        in_chroot "$tmp" "$CACHE/cpuinfo" "${pipenv[@]}" /bin/sh -ec '
            v=$1; shift
            python3 -m venv "$v"
            "$v/bin/pip" install -q "$@"
        ' sh "/opt/venv-$name" $reqs >>"$log" 2>&1 \
            || { tail -n 20 "$log" >&2; die "pip install into /opt/venv-$name failed (log: $log)"; }
    done
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/* "$tmp"/root/.cache
    {
        echo "$BUILD_ID"
        echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $MIRROR"
        echo "tflite: ${PIP_TFLITE[*]}"
        echo "litert: ${PIP_LITERT[*]}"
    } >"$tmp/etc/edgeq-testbed"
    mv "$tmp" "$ROOTFS"
    say "built in $(( $(date +%s) - t0 )) s: $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
}

# ---------------------------------------------------------------- devices

set_instance() {
    local n=$1
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -le 250 ] || die "device index must be 0..250, got '$n'"
    N=$n
    NS="edgeq-tb$N"
    VETH_HOST="eqtb${N}h"
    VETH_DEV="eqtb${N}d"
    HOST_ADDR="$NET.$N.1"
    DEV_ADDR="$NET.$N.2"
    RUN="$RUNBASE/$N"
    DEV_NAME="edgeq-rpi$N"
    OWNER_FILE="$OWNERS/$NS"
}

# Succeeds when device N is free or ours; prints the other owner otherwise.
owned_elsewhere() {
    local owner
    [ -f "$OWNER_FILE" ] || return 1
    owner=$(cat "$OWNER_FILE")
    [ "$owner" = "$RUN" ] && return 1
    # The owner's devices are gone if its namespace is.
    ip netns list 2>/dev/null | grep -qw "^$NS" || return 1
    echo "$owner"
}

pids_in_ns() { ip netns pids "$NS" 2>/dev/null || true; }

sshd_pid() {
    local pid
    [ -f "$RUN/sshd.pid" ] || return 1
    pid=$(cat "$RUN/sshd.pid")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    # The PID must still be ours: a process inside our namespace.
    pids_in_ns | grep -qx "$pid" || return 1
    echo "$pid"
}

port_open() {
    timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" && head -c 4 <&3' "$DEV_ADDR" "$PORT" 2>/dev/null | grep -q '^SSH-'
}

is_up() { sshd_pid >/dev/null && port_open; }

any_running() {
    local d
    for d in "$RUNBASE"/*/; do
        [ -d "$d" ] || continue
        set_instance "$(basename "$d")"
        sshd_pid >/dev/null && return 0
    done
    return 1
}

cmd_start() {
    prepare_host start
    built || cmd_build
    exec 9>"$CACHE/.lock.$N"
    flock 9
    if is_up; then
        say "$DEV_NAME already up at $DEV_ADDR:$PORT"
        return 0
    fi
    local other
    if other=$(owned_elsewhere); then
        die "device $N ($NS) belongs to another test bed (run dir $other); stop it there or use another index (-i)"
    fi
    stop_instance quiet
    if ip -4 route get "$DEV_ADDR" 2>/dev/null | grep -q ' via '; then
        : # routed via the default gateway: no local network claims it
    elif ip -4 route show | grep -q "^$NET\.$N\."; then
        die "$DEV_ADDR is already on a local route ($(ip -4 route show | grep "^$NET\.$N\." | head -n1)); choose another network with EDGEQ_TESTBED_NET"
    fi

    mkdir -p "$RUN/upper/etc/ssh" "$RUN/work" "$RUN/root"
    write_cpuinfo "$RUN/cpuinfo"
    write_sshd_config "$RUN/upper$SSHD_CONFIG"
    printf '%s %s\n' "$DEV_ADDR" "$(cut -d' ' -f1,2 "$ROOTFS/etc/ssh/ssh_host_ed25519_key.pub")" >"$RUN/known_hosts"
    if [ "$PORT" != 22 ]; then
        printf '[%s]:%s %s\n' "$DEV_ADDR" "$PORT" "$(cut -d' ' -f1,2 "$ROOTFS/etc/ssh/ssh_host_ed25519_key.pub")" >"$RUN/known_hosts"
    fi

    mkdir -p "$OWNERS"
    echo "$RUN" >"$OWNER_FILE"
    if ! { ip netns add "$NS" &&
        ip link add "$VETH_HOST" type veth peer name "$VETH_DEV" &&
        ip link set "$VETH_DEV" netns "$NS" &&
        ip addr add "$HOST_ADDR/30" dev "$VETH_HOST" &&
        ip link set "$VETH_HOST" up &&
        ip -n "$NS" link set lo up &&
        ip -n "$NS" addr add "$DEV_ADDR/30" dev "$VETH_DEV" &&
        ip -n "$NS" link set "$VETH_DEV" up; }; then
        stop_instance quiet
        die "could not set up network namespace $NS with $VETH_HOST/$VETH_DEV (ip's error above)"
    fi

    # setsid/nsenter/unshare/sh/chroot all exec in place, so $! is sshd itself.
    # shellcheck disable=SC2016
    setsid nsenter --net="/run/netns/$NS" unshare --mount --uts --propagation private -- /bin/sh -ec '
        lower=$1 run=$2 name=$3 port=$4 conf=$5 cpu=$6
        mount -t overlay overlay -o "lowerdir=$lower,upperdir=$run/upper,workdir=$run/work" "$run/root"
        '"$MOUNT_PSEUDO"'
        mount_pseudo "$run/root" "$run/cpuinfo"
        hostname "$name"
        echo "$name" >"$run/root/etc/hostname"
        exec env QEMU_CPU="$cpu" chroot "$r" /usr/sbin/sshd -D -e -f "$conf" -p "$port"
    ' sh "$ROOTFS" "$RUN" "$DEV_NAME" "$PORT" "$SSHD_CONFIG" "$CPU" </dev/null >"$RUN/sshd.log" 2>&1 &
    echo $! >"$RUN/sshd.pid"

    local i
    for i in $(seq 1 120); do
        if port_open; then
            say "$DEV_NAME up at $DEV_ADDR:$PORT (pid $(cat "$RUN/sshd.pid"))"
            return 0
        fi
        if ! kill -0 "$(cat "$RUN/sshd.pid")" 2>/dev/null; then
            tail -n 20 "$RUN/sshd.log" >&2
            stop_instance quiet
            die "sshd of $DEV_NAME exited during start-up (log above)"
        fi
        sleep 0.5
    done
    tail -n 20 "$RUN/sshd.log" >&2
    stop_instance quiet
    die "sshd of $DEV_NAME did not answer on $DEV_ADDR:$PORT within 60 s"
}

stop_instance() {
    local quiet=${1:-} pids i other
    if other=$(owned_elsewhere); then
        say "$DEV_NAME belongs to another test bed (run dir $other); left alone"
        return 0
    fi
    if [ -z "$quiet" ] && [ ! -d "$RUN" ] && ! ip netns list 2>/dev/null | grep -qw "^$NS"; then
        say "$DEV_NAME is not running"
        return 0
    fi
    pids=$(pids_in_ns | xargs)
    if [ -f "$RUN/sshd.pid" ]; then
        local p
        p=$(cat "$RUN/sshd.pid")
        # Only a PID that is still inside our namespace is ours to kill.
        if [ -n "$p" ] && pids_in_ns | grep -qx "$p"; then pids="$p $pids"; fi
    fi
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        for i in $(seq 1 50); do
            [ -z "$(pids_in_ns)" ] && break
            sleep 0.1
        done
        pids=$(pids_in_ns | xargs)
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        for i in $(seq 1 50); do
            [ -z "$(pids_in_ns)" ] && break
            sleep 0.1
        done
    fi
    if ip netns list 2>/dev/null | grep -qw "^$NS"; then
        ip netns del "$NS"
    fi
    # Deleting the namespace deletes the device end; the host end goes with it.
    if ip link show "$VETH_HOST" >/dev/null 2>&1; then ip link del "$VETH_HOST"; fi
    if [ -d "$RUN" ]; then
        if grep -q " $RUN/root " /proc/self/mounts; then umount -R "$RUN/root" 2>/dev/null || true; fi
        rm -rf "$RUN"
    fi
    rm -f "$OWNER_FILE"
    [ -n "$quiet" ] || say "$DEV_NAME stopped"
}

cmd_stop() {
    need_root stop
    if [ -n "${ALL:-}" ]; then
        local d found=
        for d in "$RUNBASE"/*/; do
            [ -d "$d" ] || continue
            found=1
            set_instance "$(basename "$d")"
            stop_instance
        done
        for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^edgeq-tb[0-9]*$' || true); do
            set_instance "${ns#edgeq-tb}"
            found=1
            stop_instance
        done
        [ -n "$found" ] || say "no device running"
        return 0
    fi
    stop_instance
}

cmd_status() {
    if [ "$(id -u)" != 0 ]; then die "status needs root (to look into network namespaces)"; fi
    local built_msg="not built"
    built && built_msg="built ($(sed -n 2p "$STAMP"))"
    if is_up; then
        echo "$DEV_NAME: up at $DEV_ADDR:$PORT, sshd pid $(sshd_pid), rootfs $built_msg"
        return 0
    fi
    if ip netns list 2>/dev/null | grep -qw "^$NS" || [ -d "$RUN" ]; then
        echo "$DEV_NAME: down (leftovers present; '$0 stop -i $N' removes them), rootfs $built_msg"
    else
        echo "$DEV_NAME: down, rootfs $built_msg"
    fi
    return 3
}

cmd_env() {
    local kh="$RUN/known_hosts"
    printf 'EDGEQ_TESTBED_NAME=%q\n' "$DEV_NAME"
    printf 'EDGEQ_TESTBED_ADDR=%q\n' "$DEV_ADDR"
    printf 'EDGEQ_TESTBED_PORT=%q\n' "$PORT"
    printf 'EDGEQ_TESTBED_USER=%q\n' root
    printf 'EDGEQ_TESTBED_HOST=%q\n' "root@$DEV_ADDR:$PORT"
    printf 'EDGEQ_TESTBED_KEY=%q\n' "$KEYS/id_ed25519"
    printf 'EDGEQ_TESTBED_KNOWN_HOSTS=%q\n' "$kh"
    printf 'EDGEQ_TESTBED_PYTHON_TFLITE=%q\n' "$PY_TFLITE"
    printf 'EDGEQ_TESTBED_PYTHON_LITERT=%q\n' "$PY_LITERT"
    printf 'EDGEQ_TESTBED_CPU=%q\n' "$CPU"
    printf 'EDGEQ_TESTBED_ROOTFS=%q\n' "$ROOTFS"
}

cmd_inventory() {
    # One host per requested device: even ones use the litert venv, odd ones tflite-runtime.
    echo "# edgeq test bed: emulated Raspberry Pi devices (qemu-user, arm64 Debian bookworm)"
    echo "all:"
    echo "  children:"
    echo "    emulated:"
    echo "      hosts:"
    local n py
    for n in "${INSTANCES[@]}"; do
        set_instance "$n"
        echo "        $DEV_NAME:"
        echo "          ansible_host: $DEV_ADDR"
        echo "          ansible_port: $PORT"
        echo "          ansible_user: root"
        echo "          ansible_ssh_private_key_file: $KEYS/id_ed25519"
        if [ $((N % 2)) = 0 ]; then py=$PY_LITERT; else py=$PY_TFLITE; fi
        echo "          ansible_python_interpreter: $py"
    done
}

cmd_known_hosts() {
    local n key
    key=$(cut -d' ' -f1,2 "$ROOTFS/etc/ssh/ssh_host_ed25519_key.pub" 2>/dev/null) \
        || die "the rootfs is not built yet; run: $0 build"
    for n in "${INSTANCES[@]}"; do
        set_instance "$n"
        if [ "$PORT" = 22 ]; then echo "$DEV_ADDR $key"; else echo "[$DEV_ADDR]:$PORT $key"; fi
    done
}

cmd_ssh() {
    is_up || die "$DEV_NAME is not running; run: $0 start -i $N"
    exec ssh -q -i "$KEYS/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
        -o UserKnownHostsFile="$RUN/known_hosts" -o StrictHostKeyChecking=yes \
        -p "$PORT" "root@$DEV_ADDR" "$@"
}

cmd_clean() {
    need_root clean
    ALL=1 cmd_stop
    if [ -d "$CACHE" ]; then
        rm -rf "$CACHE"
        say "removed $CACHE"
    fi
}

# ---------------------------------------------------------------- main

[ $# -ge 1 ] || { usage; exit 2; }
cmd=$1; shift
INSTANCES=()
ALL=
while [ $# -gt 0 ]; do
    case $1 in
        -i|--instance) [ $# -ge 2 ] || die "$1 needs a device index"; INSTANCES+=("$2"); shift 2 ;;
        --all) ALL=1; shift ;;
        --) shift; break ;;
        -h|--help) usage; exit 0 ;;
        *) [ "$cmd" = ssh ] && break; die "unknown argument '$1' (see: $0 --help)" ;;
    esac
done
[ ${#INSTANCES[@]} -gt 0 ] || INSTANCES=("${EDGEQ_TESTBED_INSTANCE:-0}")
set_instance "${INSTANCES[0]}"

case $cmd in
    build) cmd_build ;;
    start) for n in "${INSTANCES[@]}"; do set_instance "$n"; cmd_start; done ;;
    stop) if [ -n "$ALL" ]; then cmd_stop; else for n in "${INSTANCES[@]}"; do set_instance "$n"; cmd_stop; done; fi ;;
    status) rc=0; for n in "${INSTANCES[@]}"; do set_instance "$n"; cmd_status || rc=$?; done; exit $rc ;;
    env) cmd_env ;;
    inventory) cmd_inventory ;;
    known-hosts) cmd_known_hosts ;;
    ssh) cmd_ssh "$@" ;;
    deps) cmd_deps ;;
    clean) cmd_clean ;;
    -h|--help|help) usage ;;
    *) die "unknown command '$cmd' (see: $0 --help)" ;;
esac
