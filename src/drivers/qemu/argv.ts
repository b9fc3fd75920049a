// The QEMU command line of a virtual machine, built from the instance model. A pure function: it
// reads no files and starts nothing, so every detail of the command line can be unit-tested and
// the same instance always gives the same argv (stable PCI addresses, ids and node-names that the
// hot-plug code can rely on).
//
// Layout:
//  - machine: q35 for the virtio device model or UEFI firmware, pc (i440fx + PIIX IDE) for the
//    emulated model with BIOS.
//  - accelerator: `-accel kvm` / `-accel tcg,thread=multi` (QEMU refuses `-accel` together with
//    `-machine accel=`, and only `-accel` can set the TCG thread mode, so `-accel` it is).
//  - every guest-visible device has a stable id: disk-<disk>, nic-<nic>, scsi0, balloon0, rng0;
//    block nodes are drive-<disk> (file) and fmt-<disk> (format), netdevs net-<nic>.
//  - on q35 every hot-unpluggable PCI device (virtio disk, NIC, SCSI controller) sits on its own
//    pcie-root-port "port-<device id>", and HOTPLUG_PORTS spare ports "hotplug-port-N" are left
//    empty for device_add (PCIe has no hot-plug on the root bus). On pc, pci.0 hot-plugs natively.
import { HfError } from '../../core/errors.js';
import type { DiskBus, DiskConfig, Instance } from '../../core/model/instance.js';

export interface QemuLaunchSpec {
  instance: Pick<Instance, 'id' | 'name' | 'config'>;
  accel: 'kvm' | 'tcg';
  qmpSocket: string;
  consoleSocket: string;
  consoleLog: string;
  pidFile: string;
  /** Firmware files, resolved by the caller when the boot firmware is UEFI (vars: a per-instance copy). */
  uefi?: { codePath: string; varsPath: string } | undefined;
  /** VNC display number (5900 + N) or a unix socket; absent means no display at all. */
  vncDisplay?: number | { unixSocket: string } | undefined;
}

export type MachineType = 'q35' | 'pc';

/** Number of empty pcie-root-ports left for device_add on q35. */
export const HOTPLUG_PORTS = 4;
/** DIMM slots for memory hot-plug when maxMemoryMiB > memoryMiB. */
export const MEMORY_SLOTS = 16;
/** QEMU's limit for a unix socket path (sun_path is 108 bytes with the terminating NUL). */
export const UNIX_PATH_MAX = 107;
/** Most vCPUs QEMU 7.2 accepts per machine type. */
export const MAX_CPUS: Record<MachineType, number> = { q35: 288, pc: 255 };
const PIIX_IDE_SLOTS = 4; // ide.0 and ide.1, master + slave
const AHCI_PORTS = 6;
const QEMU_NODE_NAME_MAX = 31;

export const QEMU_SANDBOX = 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny';

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const IFNAME_RE = /^[A-Za-z0-9_.:-]{1,15}$/;

function invalid(message: string, details?: Record<string, unknown>): HfError {
  return new HfError('HF_ERR_VALIDATION', message, details ? { details } : {});
}

/** Escapes a value for QEMU's key=value option syntax (a comma is written as two). */
export function optValue(v: string): string {
  return v.replaceAll(',', ',,');
}

/** FNV-1a, 32 bits, as 8 hex digits: shortens names deterministically. */
function fnv1a(s: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, '0');
}

/** QEMU block node-names are at most 31 characters: long disk names get a hashed suffix. */
function nodeName(prefix: string, diskName: string): string {
  const full = `${prefix}-${diskName}`;
  if (full.length <= QEMU_NODE_NAME_MAX) return full;
  return `${full.slice(0, QEMU_NODE_NAME_MAX - 9)}-${fnv1a(diskName)}`;
}

/** The ids a disk gets on the command line (the hot-plug code uses the same ones). */
export function diskIds(diskName: string): { device: string; fileNode: string; formatNode: string } {
  return { device: `disk-${diskName}`, fileNode: nodeName('drive', diskName), formatNode: nodeName('fmt', diskName) };
}

/** The ids a NIC gets on the command line. */
export function nicIds(nicName: string): { device: string; netdev: string } {
  return { device: `nic-${nicName}`, netdev: `net-${nicName}` };
}

export function machineTypeFor(config: Pick<Instance['config'], 'devices' | 'boot'>): MachineType {
  const uefi = config.boot.kind !== 'kernel' && config.boot.firmware === 'uefi';
  return config.devices === 'virtio' || uefi ? 'q35' : 'pc';
}

/** The bus a disk ends up on (explicit bus, else what the device model and machine imply). */
export function effectiveDiskBus(disk: Pick<DiskConfig, 'bus' | 'media'>, devices: 'virtio' | 'emulated', machine: MachineType): DiskBus {
  if (disk.bus) return disk.bus;
  // virtio-blk has no removable media: a CD-ROM goes on SATA (q35) or IDE (pc), which every
  // firmware and installer can read without drivers.
  if (devices === 'virtio' && disk.media === 'disk') return 'virtio';
  return machine === 'q35' ? 'ahci' : 'ide';
}

/** Builds the QEMU argv (without the binary) for one VM. Throws HF_ERR_VALIDATION on impossible specs. */
export function buildQemuArgv(spec: QemuLaunchSpec): string[] {
  const { instance, accel } = spec;
  const c = instance.config;
  if (accel !== 'kvm' && accel !== 'tcg') throw invalid(`accelerator must be "kvm" or "tcg" (resolve "auto" first), got "${String(accel)}"`);
  if (!instance.name || /[,=\s]/.test(instance.name)) throw invalid(`instance name "${instance.name}" cannot be used on a QEMU command line`);

  const machine = machineTypeFor(c);
  const firmware = c.boot.kind === 'kernel' ? 'bios' : c.boot.firmware;
  const args: string[] = [];
  const push = (...a: string[]): void => {
    args.push(...a);
  };

  // ---- identity, sandbox, defaults --------------------------------------------------------
  push('-name', `guest=${instance.name},debug-threads=on`);
  if (UUID_RE.test(instance.id)) push('-uuid', instance.id.toLowerCase());
  push('-nodefaults', '-no-user-config');
  push('-sandbox', QEMU_SANDBOX);

  // ---- machine, accelerator, CPU ----------------------------------------------------------
  push('-machine', machine === 'q35' ? 'q35' : 'pc');
  push('-accel', accel === 'kvm' ? 'kvm' : 'tcg,thread=multi');
  push('-cpu', accel === 'kvm' ? 'host' : 'max');

  const maxCpus = c.maxVcpus ?? c.vcpus;
  if (!Number.isInteger(c.vcpus) || c.vcpus < 1) throw invalid(`vcpus must be a positive integer (got ${c.vcpus})`);
  if (!Number.isInteger(maxCpus) || maxCpus < c.vcpus) throw invalid(`maxVcpus (${maxCpus}) must be at least vcpus (${c.vcpus})`);
  if (maxCpus > MAX_CPUS[machine]) throw invalid(`${maxCpus} vCPUs is more than the ${machine} machine supports (${MAX_CPUS[machine]})`);
  // One core per socket, so every vCPU up to maxcpus can be hot-plugged on its own (device_add
  // of a CPU with socket-id=N).
  push('-smp', maxCpus > c.vcpus ? `${c.vcpus},maxcpus=${maxCpus},sockets=${maxCpus},cores=1,threads=1` : String(c.vcpus));

  if (!Number.isInteger(c.memoryMiB) || c.memoryMiB < 16) throw invalid(`memoryMiB must be an integer of at least 16 (got ${c.memoryMiB})`);
  const maxMem = c.maxMemoryMiB ?? c.memoryMiB;
  if (!Number.isInteger(maxMem) || maxMem < c.memoryMiB) throw invalid(`maxMemoryMiB (${maxMem}) must be at least memoryMiB (${c.memoryMiB})`);
  push('-m', maxMem > c.memoryMiB ? `${c.memoryMiB}M,slots=${MEMORY_SLOTS},maxmem=${maxMem}M` : `${c.memoryMiB}M`);

  // ---- firmware and boot ------------------------------------------------------------------
  if (firmware === 'uefi') {
    if (!spec.uefi?.codePath || !spec.uefi.varsPath) throw invalid(`instance ${instance.name} boots with UEFI firmware but no UEFI code/vars files were given`);
    push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${optValue(spec.uefi.codePath)}`);
    push('-drive', `if=pflash,format=raw,unit=1,file=${optValue(spec.uefi.varsPath)}`);
  } else if (spec.uefi) {
    throw invalid(`UEFI firmware files were given but instance ${instance.name} boots with ${c.boot.kind === 'kernel' ? 'a kernel' : 'BIOS'}`);
  }
  if (c.boot.kind === 'kernel') {
    if (!c.boot.kernel) throw invalid(`instance ${instance.name} boots a kernel but no kernel path was given`);
    push('-kernel', c.boot.kernel);
    if (c.boot.initrd) push('-initrd', c.boot.initrd);
    if (c.boot.cmdline) push('-append', c.boot.cmdline);
  }

  // ---- monitor, console, pid file, display ------------------------------------------------
  for (const [what, p] of [['QMP socket', spec.qmpSocket], ['console socket', spec.consoleSocket]] as const) {
    if (!p) throw invalid(`${what} path is empty`);
    if (Buffer.byteLength(p) > UNIX_PATH_MAX) throw invalid(`${what} path is ${Buffer.byteLength(p)} bytes, more than the ${UNIX_PATH_MAX} a unix socket allows: ${p}`);
  }
  if (!spec.consoleLog) throw invalid('console log path is empty');
  if (!spec.pidFile) throw invalid('pid file path is empty');
  push('-chardev', `socket,id=qmp,path=${optValue(spec.qmpSocket)},server=on,wait=off`);
  push('-mon', 'chardev=qmp,mode=control');
  push('-chardev', `socket,id=serial0,path=${optValue(spec.consoleSocket)},server=on,wait=off,logfile=${optValue(spec.consoleLog)},logappend=on`);
  push('-serial', 'chardev:serial0');
  push('-pidfile', spec.pidFile);
  push('-display', 'none');
  if (spec.vncDisplay !== undefined) {
    const v = spec.vncDisplay;
    if (typeof v === 'number') {
      if (!Number.isInteger(v) || v < 0 || v > 65535 - 5900) throw invalid(`VNC display must be an integer from 0 to ${65535 - 5900} (got ${v})`);
      push('-vnc', `:${v}`);
    } else {
      if (!v.unixSocket) throw invalid('VNC unix socket path is empty');
      if (Buffer.byteLength(v.unixSocket) > UNIX_PATH_MAX) throw invalid(`VNC socket path is longer than ${UNIX_PATH_MAX} bytes: ${v.unixSocket}`);
      push('-vnc', `unix:${optValue(v.unixSocket)}`);
    }
    push('-device', 'VGA,id=video0');
  }

  // ---- PCI placement ----------------------------------------------------------------------
  let chassis = 0;
  /** On q35, a pcie-root-port for one device; returns the bus option to put on the device. */
  const portFor = (deviceId: string): string => {
    if (machine !== 'q35') return '';
    chassis++;
    push('-device', `pcie-root-port,id=port-${deviceId},bus=pcie.0,chassis=${chassis}`);
    return `,bus=port-${deviceId}`;
  };

  // ---- disks ------------------------------------------------------------------------------
  const diskNames = new Set<string>();
  for (const d of c.disks) {
    if (diskNames.has(d.name)) throw invalid(`two disks are named "${d.name}"`);
    diskNames.add(d.name);
    if (!d.path) throw invalid(`disk ${d.name} has no path`);
  }
  const bootDisk =
    c.boot.kind === 'disk' ? c.disks.find((d) => d.media === 'disk') : c.boot.kind === 'cdrom' ? c.disks.find((d) => d.media === 'cdrom') : undefined;
  if (c.boot.kind === 'disk' && !bootDisk) throw invalid(`instance ${instance.name} boots from disk but has no disk (only CD-ROMs or nothing)`);
  if (c.boot.kind === 'cdrom' && !bootDisk) throw invalid(`instance ${instance.name} boots from CD-ROM but has no disk with media "cdrom"`);
  // Booting from a CD-ROM: the first hard disk comes next, so an installed system boots once the
  // installer ejects its media.
  const secondBoot = c.boot.kind === 'cdrom' ? c.disks.find((d) => d.media === 'disk') : undefined;

  const buses = c.disks.map((d) => effectiveDiskBus(d, c.devices, machine));
  buses.forEach((bus, i) => {
    const d = c.disks[i] as DiskConfig;
    if (bus === 'virtio' && d.media === 'cdrom') throw invalid(`disk ${d.name}: a CD-ROM cannot be on the virtio bus (use ahci, ide or scsi)`);
    if (bus === 'ide' && machine === 'q35') throw invalid(`disk ${d.name}: the q35 machine (virtio devices or UEFI) has no IDE controller: use bus "ahci"`);
  });
  const ideCount = buses.filter((b) => b === 'ide').length;
  if (ideCount > PIIX_IDE_SLOTS) throw invalid(`${ideCount} disks on IDE: the pc machine has ${PIIX_IDE_SLOTS} IDE slots`);
  const ahciCount = buses.filter((b) => b === 'ahci').length;
  if (ahciCount > AHCI_PORTS) throw invalid(`${ahciCount} disks on AHCI: at most ${AHCI_PORTS} are supported`);

  // Controllers. q35 has its ICH9 AHCI built in (buses ide.0 .. ide.5); pc gets one when asked.
  let ahciBus = (port: number): string => `ide.${port}`;
  if (ahciCount > 0 && machine === 'pc') {
    push('-device', 'ich9-ahci,id=ahci0');
    ahciBus = (port) => `ahci0.${port}`;
  }
  if (buses.includes('scsi')) {
    const bus = portFor('scsi0');
    push('-device', `virtio-scsi-pci,id=scsi0${bus}`);
  }

  let idePos = 0;
  let ahciPos = 0;
  let scsiId = 0;
  c.disks.forEach((d, i) => {
    const bus = buses[i] as DiskBus;
    const ids = diskIds(d.name);
    const cdrom = d.media === 'cdrom';
    const readOnly = cdrom || d.readonly;
    const fileNode: Record<string, unknown> = { driver: 'file', filename: d.path, 'node-name': ids.fileNode, 'read-only': readOnly };
    const fmtNode: Record<string, unknown> = { driver: d.format, file: ids.fileNode, 'node-name': ids.formatNode, 'read-only': readOnly };
    if (!readOnly) {
      fileNode.discard = 'unmap';
      fmtNode.discard = 'unmap';
    }
    push('-blockdev', JSON.stringify(fileNode));
    push('-blockdev', JSON.stringify(fmtNode));

    let dev: string;
    switch (bus) {
      case 'virtio':
        dev = `virtio-blk-pci,id=${ids.device},drive=${ids.formatNode}${portFor(ids.device)}`;
        break;
      case 'scsi':
        dev = `${cdrom ? 'scsi-cd' : 'scsi-hd'},id=${ids.device},drive=${ids.formatNode},bus=scsi0.0,channel=0,scsi-id=${scsiId++},lun=0`;
        break;
      case 'ide': {
        const n = idePos++;
        dev = `${cdrom ? 'ide-cd' : 'ide-hd'},id=${ids.device},drive=${ids.formatNode},bus=ide.${n >> 1},unit=${n & 1}`;
        break;
      }
      case 'ahci':
        dev = `${cdrom ? 'ide-cd' : 'ide-hd'},id=${ids.device},drive=${ids.formatNode},bus=${ahciBus(ahciPos++)}`;
        break;
    }
    if (d === bootDisk) dev += ',bootindex=1';
    else if (d === secondBoot) dev += ',bootindex=2';
    push('-device', dev);
  });

  // ---- NICs -------------------------------------------------------------------------------
  const nicNames = new Set<string>();
  for (const n of c.nics) {
    if (nicNames.has(n.name)) throw invalid(`two NICs are named "${n.name}"`);
    nicNames.add(n.name);
    if (!n.hostIface) throw invalid(`NIC ${n.name} of ${instance.name} has no host interface (the network layer must create its tap first)`, { nic: n.name });
    if (!IFNAME_RE.test(n.hostIface)) throw invalid(`NIC ${n.name}: "${n.hostIface}" is not a valid host interface name (1-15 of letters, digits, _ . : -)`);
    if (!/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/.test(n.mac)) throw invalid(`NIC ${n.name}: MAC "${n.mac}" must look like 52:54:00:12:34:56 (lower case)`);
    if ((parseInt(n.mac.slice(0, 2), 16) & 1) === 1) throw invalid(`NIC ${n.name}: MAC ${n.mac} is a multicast address`);
    const ids = nicIds(n.name);
    push('-netdev', `tap,id=${ids.netdev},ifname=${n.hostIface},script=no,downscript=no`);
    const model = c.devices === 'virtio' ? 'virtio-net-pci' : 'e1000';
    push('-device', `${model},id=${ids.device},netdev=${ids.netdev},mac=${n.mac}${portFor(ids.device)}`);
  }

  // ---- virtio extras ----------------------------------------------------------------------
  if (c.devices === 'virtio') {
    push('-device', 'virtio-balloon-pci,id=balloon0');
    push('-object', 'rng-random,id=rng0,filename=/dev/urandom');
    push('-device', 'virtio-rng-pci,id=rng0-dev,rng=rng0');
  }

  // ---- spare hot-plug ports -----------------------------------------------------------------
  if (machine === 'q35') {
    for (let i = 0; i < HOTPLUG_PORTS; i++) {
      chassis++;
      push('-device', `pcie-root-port,id=hotplug-port-${i},bus=pcie.0,chassis=${chassis}`);
    }
  }

  return args;
}
