// The files that make up the tiny guest's userspace (besides busybox and the kernel modules).
// Everything is a busybox shell script; PID 1 is busybox init driven by /etc/inittab.
//
// Boot sequence:
//   /init            mounts /proc, /sys, devtmpfs on /dev, points stdio at /dev/console and execs
//                    busybox init (PID 1 stays PID 1).
//   /etc/init.d/rcS  (inittab sysinit) loads the modules listed in /etc/hyperfold/modules, starts
//                    the hotplug listener, acpid, mounts the first disk on /mnt, starts udhcpc on
//                    eth0 in the background, then prints the ready marker on the console (ttyS0).
//   inittab respawns a root login shell on ttyS0 (busybox init setsid()s and opens the tty, so it
//   becomes the controlling terminal: job control works).
//   ACPI power button (QEMU `system_powerdown`) -> evdev -> busybox acpid -> /etc/acpi/PWRF/00000080
//   -> `poweroff` -> busybox init runs ::shutdown (rcK: sync, unmount /mnt), kills everything and
//   powers the machine off through ACPI S5, which makes QEMU exit.
//   Hotplug: busybox `uevent` listens on the kernel's uevent netlink socket and runs
//   /sbin/hyperfold-hotplug for each event; it onlines hot-added CPUs (cpuN/online = 1) and memory
//   blocks (memoryN/state = online_movable, falling back to online). A sweep at boot catches
//   anything added before the listener started.

/** Printed on a line of its own on the serial console once the guest is up. */
export const TINY_READY_MARKER = 'HYPERFOLD-GUEST-READY';

/** Line stored in /hyperfold-disk on the image's data disk (mounted on /mnt by the guest). */
export const TINY_DISK_MARKER = 'HYPERFOLD-TINY-DISK-OK';

export const TINY_CMDLINE = 'console=ttyS0 quiet panic=-1';

export interface GuestFile {
  path: string; // relative to the initramfs root
  mode: number;
  content: string;
}

const INIT = `#!/bin/sh
# Hyperfold tiny guest: first process. Mount the API filesystems, then hand PID 1 to busybox init.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
exec </dev/console >/dev/console 2>&1
exec /sbin/init
`;

const INITTAB = `# Hyperfold tiny guest
::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
::restart:/sbin/init
`;

const RCS = `#!/bin/sh
# Hyperfold tiny guest: system start (busybox init sysinit action). Output goes to the console.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
KVER=$(uname -r)
mkdir -p /dev/pts /dev/shm /run /var/log /var/run /tmp /mnt /root
mount -t devpts -o gid=5,mode=620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
[ -f /etc/hostname ] && hostname -F /etc/hostname
ip link set lo up

# Drivers, dependencies first (the list is computed when the image is built).
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$KVER/$m" >>/var/log/modules.log 2>&1 || echo "insmod $m failed" >>/var/log/modules.log
done </etc/hyperfold/modules

# Hot-added CPUs and memory blocks come up offline: online them as they appear, and once now.
setsid uevent /sbin/hyperfold-hotplug </dev/null >/dev/null 2>&1 &
/sbin/hyperfold-hotplug sweep

# ACPI power button (QEMU system_powerdown): acpid runs /etc/acpi/PWRF/00000080 -> poweroff.
acpid -c /etc/acpi -l /var/log/acpid.log

# First disk (virtio-blk, else SCSI/SATA/IDE) with a filesystem -> /mnt.
i=0
while [ ! -b /dev/vda ] && [ ! -b /dev/sda ] && [ $i -lt 10 ]; do usleep 100000; i=$((i + 1)); done
for d in /dev/vda /dev/sda; do
  [ -b "$d" ] || continue
  for p in "$d" "\${d}1"; do
    [ -b "$p" ] && mount "$p" /mnt 2>/dev/null && break
  done
  break
done

# First NIC: DHCP in the background so boot is never blocked on the network.
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  setsid udhcpc -f -i eth0 -t 10 -T 1 -A 3 -x hostname:"$(hostname)" \\
    -s /usr/share/udhcpc/default.script </dev/null >/var/log/udhcpc.log 2>&1 &
fi

echo
echo ${TINY_READY_MARKER}
`;

const RCK = `#!/bin/sh
# Hyperfold tiny guest: shutdown (busybox init, before processes are killed).
sync
umount /mnt 2>/dev/null || mount -o remount,ro /mnt 2>/dev/null
sync
`;

const HOTPLUG = `#!/bin/sh
# Onlines hot-added CPUs and memory blocks. Run by busybox uevent for every kernel uevent
# (ACTION, DEVPATH, SUBSYSTEM in the environment) and once at boot as "hyperfold-hotplug sweep".
online_cpu() {
  f=$1/online
  [ -w "$f" ] && read -r v <"$f" && [ "$v" = 0 ] && echo 1 >"$f"
}
online_mem() {
  f=$1/state
  # movable keeps the block hot-removable; plain online is the fallback
  [ -w "$f" ] && read -r v <"$f" && [ "$v" = offline ] && { echo online_movable >"$f" 2>/dev/null || echo online >"$f"; }
}
if [ "$1" = sweep ]; then
  for c in /sys/devices/system/cpu/cpu[0-9]*; do online_cpu "$c"; done
  for m in /sys/devices/system/memory/memory[0-9]*; do online_mem "$m"; done
  exit 0
fi
[ "$ACTION" = add ] || exit 0
case "$DEVPATH" in
  /devices/system/cpu/cpu[0-9]*) online_cpu "/sys$DEVPATH" ;;
  /devices/system/memory/memory[0-9]*) online_mem "/sys$DEVPATH" ;;
esac
exit 0
`;

const POWER_BUTTON = `#!/bin/sh
# ACPI power button (busybox acpid, event PWRF/00000080): clean shutdown through busybox init.
exec /sbin/poweroff
`;

const UDHCPC_SCRIPT = `#!/bin/sh
# udhcpc event script: configure $interface from the lease.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    if ! ip -4 addr show dev "$interface" | grep -q "inet $ip/"; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/\${mask:-24}" \${broadcast:+broadcast "$broadcast"} dev "$interface"
    fi
    if [ -n "$router" ]; then
      while ip route del default dev "$interface" 2>/dev/null; do :; done
      for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    fi
    : >/etc/resolv.conf.new
    [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf.new
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf.new; done
    mv /etc/resolv.conf.new /etc/resolv.conf
    ;;
esac
exit 0
`;

const PROFILE = `export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export TERM=\${TERM:-vt102}
export PS1='\\h:\\w\\$ '
cd "$HOME"
`;

export function guestFiles(info: { kernelVersion: string; busyboxVersion: string }): GuestFile[] {
  return [
    { path: 'init', mode: 0o755, content: INIT },
    { path: 'etc/inittab', mode: 0o644, content: INITTAB },
    { path: 'etc/init.d/rcS', mode: 0o755, content: RCS },
    { path: 'etc/init.d/rcK', mode: 0o755, content: RCK },
    { path: 'sbin/hyperfold-hotplug', mode: 0o755, content: HOTPLUG },
    { path: 'etc/acpi/PWRF/00000080', mode: 0o755, content: POWER_BUTTON },
    { path: 'etc/acpi/PWRB/00000080', mode: 0o755, content: POWER_BUTTON },
    { path: 'usr/share/udhcpc/default.script', mode: 0o755, content: UDHCPC_SCRIPT },
    { path: 'etc/profile', mode: 0o644, content: PROFILE },
    { path: 'etc/hostname', mode: 0o644, content: 'tiny\n' },
    { path: 'etc/hosts', mode: 0o644, content: '127.0.0.1 localhost\n127.0.1.1 tiny\n' },
    { path: 'etc/passwd', mode: 0o644, content: 'root::0:0:root:/root:/bin/sh\n' },
    { path: 'etc/group', mode: 0o644, content: 'root:x:0:\ntty:x:5:\n' },
    { path: 'etc/resolv.conf', mode: 0o644, content: '' },
    {
      path: 'etc/os-release',
      mode: 0o644,
      content: `NAME="Hyperfold tiny"\nID=hyperfold-tiny\nPRETTY_NAME="Hyperfold tiny (Linux ${info.kernelVersion}, BusyBox ${info.busyboxVersion})"\n`,
    },
  ];
}
