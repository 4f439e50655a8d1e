#!/bin/busybox sh
# /init of the kernel VM lane's initramfs (written by tests/e2e/src/vm/prepare.rs).
# The host's root over 9p (read-only) under a tmpfs overlay; the job directory over 9p
# (writable) at its host path; then the job's run.sh in a chroot; its exit code goes to
# <job>/exit_code; power off. Kernel command line: wgmesh.job=<dir> wgmesh.modules=<dir>.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -1; }
JOB=$(arg wgmesh.job)
MODS=$(arg wgmesh.modules)
fail() { echo "wgmesh-vm: $*"; poweroff -f; }
for m in $(cat /mods/order); do insmod /mods/$m.ko || echo "wgmesh-vm: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /mnt || fail "mounting the host root over 9p failed"
# The kernel's modules (from the cached .deb, on the host root) for modprobe and autoload.
mount --bind "/mnt$MODS" /lib/modules || fail "no modules at $MODS"
echo /bin/modprobe > /proc/sys/kernel/modprobe
for m in tun veth wireguard; do modprobe $m || echo "wgmesh-vm: modprobe $m failed"; done
mkdir -p /rw
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
R=/newroot
mount -t overlay -o lowerdir=/mnt,upperdir=/rw/upper,workdir=/rw/work overlay $R || fail "overlay mount failed"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs run $R/run
mkdir -p $R/lib/modules
mount --bind /lib/modules $R/lib/modules
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mkdir -p "$R$JOB"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job "$R$JOB" || fail "mounting the job directory failed"
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
hostname wgmesh-vm
echo "wgmesh-vm: ready after $(cut -d' ' -f1 /proc/uptime) s"
chroot $R /bin/sh "$JOB/run.sh"
rc=$?
echo $rc > "$R$JOB/exit_code"
sync
echo "wgmesh-vm: exit code $rc"
poweroff -f
