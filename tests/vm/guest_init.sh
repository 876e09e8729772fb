#!/.uballoon/busybox sh
# PID 1 of the throw-away guest that tests/vm/harness.py boots.
#
# The initramfs holds only this script, a static busybox, the kernel modules and a few
# /etc files.  Everything else comes from the host, read-only over 9p, each share under
# a tmpfs overlay at the same path as on the host (so the guest runs the host's Python
# and the installed project, and writes stay in the guest).  What to share, and where
# the command server connects, arrives over fw_cfg in
# /sys/firmware/qemu_fw_cfg/by_name/opt/uballoon-harness/config/raw, one item a line:
#     share TAG PATH      mount the 9p tag TAG at PATH (PATH is the rest of the line)
#     server PYTHON       the interpreter that runs /.uballoon/guest_server.py
#     connect HOST PORT   where the command server connects (the harness listens there)
# Lines on the console that start with "uballoon-" are ours; the harness shows the
# console's tail when the guest does not come up.
#
# Under TCG the command server's first Python start is the slowest step of the boot,
# so it starts as soon as the shares are mounted and waits on a FIFO for the network.

B=/.uballoon/busybox
export PATH=/.uballoon/bin
$B mkdir -p /.uballoon/bin
$B --install -s /.uballoon/bin

uptime() { cut -d' ' -f1 /proc/uptime; }
say() { echo "uballoon-init: $*" >/dev/console; }
die() {
    say "FATAL: $*"
    # -no-reboot turns the reboot into QEMU exiting, which the harness notices at once.
    reboot -f
}
load_modules() {  # $1: the file listing them, dependencies first
    while read -r ko; do
        insmod "/.uballoon/modules/$ko" || say "insmod $ko failed"
    done <"$1"
}

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid devtmpfs /dev || die "devtmpfs"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || say "no cgroup2"
say "up $(uptime)s"
case " $(cat /proc/cmdline) " in
*" uballoon.probe "*)
    # The harness's KVM probe only asks whether a guest gets this far.
    say "probe ok"
    reboot -f
    ;;
esac

load_modules /.uballoon/modules/order1
CFG=/sys/firmware/qemu_fw_cfg/by_name/opt/uballoon-harness/config/raw
[ -r "$CFG" ] || die "no harness config in fw_cfg ($CFG)"
mkdir -p /.uballoon/ro /.uballoon/rw
mount -t tmpfs -o mode=0755 tmpfs /.uballoon/rw

SERVER_PY=
CONNECT=
while read -r kind a rest; do
    case "$kind" in
    share)
        # The 9p mount is read-only; the overlay's upper layer lives on tmpfs.
        mkdir -p "/.uballoon/ro/$a" "/.uballoon/rw/$a/upper" "/.uballoon/rw/$a/work" "$rest"
        mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose "$a" \
            "/.uballoon/ro/$a" || die "9p mount of $a ($rest)"
        mount -t overlay overlay \
            -o "lowerdir=/.uballoon/ro/$a,upperdir=/.uballoon/rw/$a/upper,workdir=/.uballoon/rw/$a/work" \
            "$rest" || die "overlay on $rest"
        ;;
    server) SERVER_PY="$a" ;;
    connect) CONNECT="$a $rest" ;;
    esac
done <"$CFG"
[ -n "$SERVER_PY" ] && [ -n "$CONNECT" ] || die "config lacks server or connect"
say "shares mounted $(uptime)s"

NET_READY=/run/uballoon-net-ready
mkfifo -m 0600 $NET_READY
cd /
# The server runs as a child so that this shell, as PID 1, reaps orphans while it waits.
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 "$SERVER_PY" -I -S -u /.uballoon/guest_server.py $CONNECT $NET_READY \
    </dev/null >/dev/console 2>&1 &
SERVER=$!

load_modules /.uballoon/modules/order2
# QEMU user networking: the host's loopback is the gateway, 10.0.2.2.
ip link set lo up
ip link set eth0 up || die "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "nameserver 10.0.2.3" >/etc/resolv.conf
say "network up $(uptime)s"
echo up >$NET_READY

wait $SERVER
say "command server exited ($?)"
reboot -f
