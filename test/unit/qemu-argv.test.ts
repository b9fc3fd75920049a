import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { isHfError } from '../../src/core/errors.js';
import type { DiskConfig, InstanceConfig, NicConfig } from '../../src/core/model/instance.js';
import { buildQemuArgv, diskIds, HOTPLUG_PORTS, type QemuLaunchSpec } from '../../src/drivers/qemu/argv.js';

const UUID = '0b7c8a3e-1f2a-4c3d-9e8f-0123456789ab';

function config(over: Partial<InstanceConfig> = {}): InstanceConfig {
  return {
    vcpus: 1,
    memoryMiB: 256,
    disks: [],
    nics: [],
    boot: { kind: 'kernel', kernel: '/var/lib/hf/vmlinuz', initrd: '/var/lib/hf/initrd.img', cmdline: 'console=ttyS0 root=/dev/vda' },
    accel: 'auto',
    devices: 'virtio',
    restartPolicy: 'never',
    autostart: false,
    ...over,
  };
}

function disk(name: string, over: Partial<DiskConfig> = {}): DiskConfig {
  return { name, path: `/var/lib/hf/disks/${name}.qcow2`, format: 'qcow2', media: 'disk', readonly: false, ...over };
}

function nic(name: string, over: Partial<NicConfig> = {}): NicConfig {
  return { name, network: 'default', mac: '52:54:00:12:34:56', hostIface: `hf-tap-${name}`, ...over };
}

function spec(cfg: InstanceConfig, over: Partial<QemuLaunchSpec> = {}): QemuLaunchSpec {
  return {
    instance: { id: UUID, name: 'web1', config: cfg },
    accel: 'tcg',
    qmpSocket: '/run/hf/web1/qmp.sock',
    consoleSocket: '/run/hf/web1/console.sock',
    consoleLog: '/var/log/hf/web1/console.log',
    pidFile: '/run/hf/web1/qemu.pid',
    ...over,
  };
}

/** Every value that follows `flag` in argv. */
function values(argv: string[], flag: string): string[] {
  const out: string[] = [];
  argv.forEach((a, i) => {
    if (a === flag && i + 1 < argv.length) out.push(argv[i + 1] as string);
  });
  return out;
}

function one(argv: string[], flag: string): string {
  const v = values(argv, flag);
  assert.equal(v.length, 1, `expected exactly one ${flag}, got ${JSON.stringify(v)}`);
  return v[0] as string;
}

function hasPair(argv: string[], flag: string, value: string): boolean {
  return values(argv, flag).includes(value);
}

function devices(argv: string[]): string[] {
  return values(argv, '-device');
}

function device(argv: string[], prefix: string): string {
  const d = devices(argv).filter((x) => x.startsWith(prefix));
  assert.equal(d.length, 1, `expected one -device ${prefix}…, got ${JSON.stringify(d)}`);
  return d[0] as string;
}

function throwsValidation(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(isHfError(e, 'HF_ERR_VALIDATION'), `expected HF_ERR_VALIDATION, got ${String(e)}`);
    assert.match(e.message, pattern);
    return true;
  });
}

describe('buildQemuArgv: minimal virtio kernel-boot VM under TCG', () => {
  const argv = buildQemuArgv(spec(config({ disks: [disk('root')] })));

  it('has no binary and is made of strings only', () => {
    assert.ok(argv[0]?.startsWith('-'));
    assert.ok(argv.every((a) => typeof a === 'string'));
  });
  it('names the guest and sets the uuid', () => {
    assert.equal(one(argv, '-name'), 'guest=web1,debug-threads=on');
    assert.equal(one(argv, '-uuid'), UUID);
  });
  it('starts from nothing and shows nothing', () => {
    assert.ok(argv.includes('-nodefaults'));
    assert.ok(argv.includes('-no-user-config'));
    assert.equal(one(argv, '-display'), 'none');
    assert.deepEqual(values(argv, '-vnc'), []);
    assert.ok(!argv.includes('-no-reboot'), 'a guest reboot must reset the VM, not end QEMU');
    assert.ok(!argv.includes('-daemonize'));
  });
  it('uses q35 with multi-threaded TCG and -cpu max', () => {
    assert.equal(one(argv, '-machine'), 'q35');
    assert.equal(one(argv, '-accel'), 'tcg,thread=multi');
    assert.equal(one(argv, '-cpu'), 'max');
  });
  it('sizes the VM', () => {
    assert.equal(one(argv, '-smp'), '1');
    assert.equal(one(argv, '-m'), '256M');
  });
  it('boots the kernel', () => {
    assert.equal(one(argv, '-kernel'), '/var/lib/hf/vmlinuz');
    assert.equal(one(argv, '-initrd'), '/var/lib/hf/initrd.img');
    assert.equal(one(argv, '-append'), 'console=ttyS0 root=/dev/vda');
    assert.ok(!devices(argv).some((d) => d.includes('bootindex')), 'no bootindex for a kernel boot');
    assert.ok(!argv.some((a) => a.includes('pflash')));
  });
  it('puts QMP, the serial console and the pid file where asked', () => {
    assert.ok(hasPair(argv, '-chardev', 'socket,id=qmp,path=/run/hf/web1/qmp.sock,server=on,wait=off'));
    assert.equal(one(argv, '-mon'), 'chardev=qmp,mode=control');
    assert.ok(hasPair(argv, '-chardev', 'socket,id=serial0,path=/run/hf/web1/console.sock,server=on,wait=off,logfile=/var/log/hf/web1/console.log,logappend=on'));
    assert.equal(one(argv, '-serial'), 'chardev:serial0');
    assert.equal(one(argv, '-pidfile'), '/run/hf/web1/qemu.pid');
  });
  it('attaches the disk as blockdev file + format nodes and a virtio-blk on its own root port', () => {
    const bd = values(argv, '-blockdev').map((j) => JSON.parse(j) as Record<string, unknown>);
    assert.deepEqual(bd, [
      { driver: 'file', filename: '/var/lib/hf/disks/root.qcow2', 'node-name': 'drive-root', 'read-only': false, discard: 'unmap' },
      { driver: 'qcow2', file: 'drive-root', 'node-name': 'fmt-root', 'read-only': false, discard: 'unmap' },
    ]);
    assert.ok(hasPair(argv, '-device', 'pcie-root-port,id=port-disk-root,bus=pcie.0,chassis=1'));
    assert.equal(device(argv, 'virtio-blk-pci'), 'virtio-blk-pci,id=disk-root,drive=fmt-root,bus=port-disk-root');
    // the root port comes before the device that plugs into it
    assert.ok(argv.indexOf('pcie-root-port,id=port-disk-root,bus=pcie.0,chassis=1') < argv.indexOf('virtio-blk-pci,id=disk-root,drive=fmt-root,bus=port-disk-root'));
  });
  it('adds balloon, rng and spare hot-plug ports', () => {
    assert.equal(device(argv, 'virtio-balloon-pci'), 'virtio-balloon-pci,id=balloon0');
    assert.ok(hasPair(argv, '-object', 'rng-random,id=rng0,filename=/dev/urandom'));
    assert.equal(device(argv, 'virtio-rng-pci'), 'virtio-rng-pci,id=rng0-dev,rng=rng0');
    const spare = devices(argv).filter((d) => d.startsWith('pcie-root-port,id=hotplug-port-'));
    assert.equal(spare.length, HOTPLUG_PORTS);
    assert.equal(spare[0], 'pcie-root-port,id=hotplug-port-0,bus=pcie.0,chassis=2');
    const chassis = devices(argv).filter((d) => d.startsWith('pcie-root-port')).map((d) => /chassis=(\d+)/.exec(d)?.[1]);
    assert.equal(new Set(chassis).size, chassis.length, 'chassis numbers are unique');
  });
  it('runs sandboxed', () => {
    assert.equal(one(argv, '-sandbox'), 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny');
  });
  it('is deterministic', () => {
    assert.deepEqual(buildQemuArgv(spec(config({ disks: [disk('root')] }))), argv);
  });
  it('omits -initrd and -append when not given, and -uuid for a non-uuid id', () => {
    const a = buildQemuArgv({ ...spec(config({ boot: { kind: 'kernel', kernel: '/k', cmdline: '' } })), instance: { id: 'inst-7', name: 'web1', config: config({ boot: { kind: 'kernel', kernel: '/k', cmdline: '' } }) } });
    assert.equal(one(a, '-kernel'), '/k');
    assert.deepEqual(values(a, '-initrd'), []);
    assert.deepEqual(values(a, '-append'), []);
    assert.deepEqual(values(a, '-uuid'), []);
  });
});

describe('buildQemuArgv: KVM', () => {
  const argv = buildQemuArgv(spec(config({ disks: [disk('root')] }), { accel: 'kvm' }));
  it('uses -accel kvm and -cpu host', () => {
    assert.equal(one(argv, '-accel'), 'kvm');
    assert.equal(one(argv, '-cpu'), 'host');
    assert.equal(one(argv, '-machine'), 'q35');
    assert.ok(!argv.some((a) => a.includes('tcg')));
  });
  it('rejects an unresolved accelerator', () => {
    throwsValidation(() => buildQemuArgv(spec(config(), { accel: 'auto' as unknown as 'kvm' })), /resolve "auto" first/);
  });
});

describe('buildQemuArgv: emulated devices', () => {
  const cfg = config({ devices: 'emulated', boot: { kind: 'disk', firmware: 'bios' }, disks: [disk('root'), disk('data', { format: 'raw' })], nics: [nic('eth0')] });
  const argv = buildQemuArgv(spec(cfg));
  it('uses the pc machine (i440fx) and no PCIe ports', () => {
    assert.equal(one(argv, '-machine'), 'pc');
    assert.ok(!devices(argv).some((d) => d.startsWith('pcie-root-port')));
  });
  it('puts disks on the PIIX IDE, the first one bootable', () => {
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-root,drive=fmt-root,bus=ide.0,unit=0,bootindex=1'));
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-data,drive=fmt-data,bus=ide.0,unit=1'));
    assert.ok(values(argv, '-blockdev').some((j) => (JSON.parse(j) as Record<string, unknown>).driver === 'raw'));
  });
  it('uses an e1000 NIC on a tap', () => {
    assert.ok(hasPair(argv, '-netdev', 'tap,id=net-eth0,ifname=hf-tap-eth0,script=no,downscript=no'));
    assert.equal(device(argv, 'e1000'), 'e1000,id=nic-eth0,netdev=net-eth0,mac=52:54:00:12:34:56');
  });
  it('has no virtio devices', () => {
    assert.ok(!argv.some((a) => a.includes('virtio')));
    assert.deepEqual(values(argv, '-object'), []);
  });
  it('fills both IDE buses and refuses a fifth IDE disk', () => {
    const four = buildQemuArgv(spec({ ...cfg, nics: [], disks: ['a', 'b', 'c', 'd'].map((n) => disk(n)) }));
    assert.ok(hasPair(four, '-device', 'ide-hd,id=disk-d,drive=fmt-d,bus=ide.1,unit=1'));
    throwsValidation(() => buildQemuArgv(spec({ ...cfg, nics: [], disks: ['a', 'b', 'c', 'd', 'e'].map((n) => disk(n)) })), /5 disks on IDE/);
  });
});

describe('buildQemuArgv: AHCI', () => {
  it('bus "ahci" on pc adds an ich9-ahci controller', () => {
    const argv = buildQemuArgv(spec(config({ devices: 'emulated', boot: { kind: 'disk', firmware: 'bios' }, disks: [disk('root', { bus: 'ahci' }), disk('old')] })));
    assert.equal(one(argv, '-machine'), 'pc');
    assert.equal(device(argv, 'ich9-ahci'), 'ich9-ahci,id=ahci0');
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-root,drive=fmt-root,bus=ahci0.0,bootindex=1'));
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-old,drive=fmt-old,bus=ide.0,unit=0'));
  });
  it('emulated devices on q35 (UEFI) use the built-in ICH9 AHCI', () => {
    const argv = buildQemuArgv(
      spec(config({ devices: 'emulated', boot: { kind: 'disk', firmware: 'uefi' }, disks: [disk('root'), disk('two')] }), {
        uefi: { codePath: '/usr/share/OVMF/OVMF_CODE_4M.fd', varsPath: '/var/lib/hf/web1/vars.fd' },
      }),
    );
    assert.equal(one(argv, '-machine'), 'q35');
    assert.ok(!devices(argv).some((d) => d.startsWith('ich9-ahci')));
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-root,drive=fmt-root,bus=ide.0,bootindex=1'));
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-two,drive=fmt-two,bus=ide.1'));
  });
  it('virtio model + bus ahci puts that disk on SATA', () => {
    const argv = buildQemuArgv(spec(config({ disks: [disk('root'), disk('sata', { bus: 'ahci' })] })));
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-sata,drive=fmt-sata,bus=ide.0'));
  });
  it('refuses IDE on q35 and more than 6 AHCI disks', () => {
    throwsValidation(() => buildQemuArgv(spec(config({ disks: [disk('root', { bus: 'ide' })] }))), /no IDE controller/);
    throwsValidation(() => buildQemuArgv(spec(config({ disks: ['a', 'b', 'c', 'd', 'e', 'f', 'g'].map((n) => disk(n, { bus: 'ahci' })) }))), /7 disks on AHCI/);
  });
});

describe('buildQemuArgv: SCSI', () => {
  it('adds one virtio-scsi controller and scsi-hd / scsi-cd devices', () => {
    const argv = buildQemuArgv(spec(config({ disks: [disk('a', { bus: 'scsi' }), disk('b', { bus: 'scsi', readonly: true }), disk('iso', { bus: 'scsi', media: 'cdrom', format: 'raw', path: '/isos/x.iso' })] })));
    assert.equal(device(argv, 'virtio-scsi-pci'), 'virtio-scsi-pci,id=scsi0,bus=port-scsi0');
    assert.ok(hasPair(argv, '-device', 'scsi-hd,id=disk-a,drive=fmt-a,bus=scsi0.0,channel=0,scsi-id=0,lun=0'));
    assert.ok(hasPair(argv, '-device', 'scsi-hd,id=disk-b,drive=fmt-b,bus=scsi0.0,channel=0,scsi-id=1,lun=0'));
    assert.ok(hasPair(argv, '-device', 'scsi-cd,id=disk-iso,drive=fmt-iso,bus=scsi0.0,channel=0,scsi-id=2,lun=0'));
    const ro = values(argv, '-blockdev').map((j) => JSON.parse(j) as Record<string, unknown>).filter((n) => n['read-only'] === true);
    assert.deepEqual(ro.map((n) => n['node-name']), ['drive-b', 'fmt-b', 'drive-iso', 'fmt-iso']);
    assert.ok(ro.every((n) => n.discard === undefined));
  });
});

describe('buildQemuArgv: UEFI', () => {
  const uefi = { codePath: '/usr/share/OVMF/OVMF_CODE_4M.fd', varsPath: '/var/lib/hf/web,1/vars.fd' };
  const argv = buildQemuArgv(spec(config({ boot: { kind: 'disk', firmware: 'uefi' }, disks: [disk('root')] }), { uefi }));
  it('maps code read-only and vars read-write as pflash (commas in paths doubled)', () => {
    assert.deepEqual(values(argv, '-drive'), [
      'if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd',
      'if=pflash,format=raw,unit=1,file=/var/lib/hf/web,,1/vars.fd',
    ]);
    assert.equal(one(argv, '-machine'), 'q35');
    assert.deepEqual(values(argv, '-kernel'), []);
    assert.equal(device(argv, 'virtio-blk-pci'), 'virtio-blk-pci,id=disk-root,drive=fmt-root,bus=port-disk-root,bootindex=1');
  });
  it('needs the firmware paths', () => {
    throwsValidation(() => buildQemuArgv(spec(config({ boot: { kind: 'disk', firmware: 'uefi' }, disks: [disk('root')] }))), /UEFI firmware but no UEFI code\/vars/);
  });
  it('refuses firmware paths for a BIOS or kernel boot', () => {
    throwsValidation(() => buildQemuArgv(spec(config({ boot: { kind: 'disk', firmware: 'bios' }, disks: [disk('root')] }), { uefi })), /boots with BIOS/);
    throwsValidation(() => buildQemuArgv(spec(config(), { uefi })), /boots with a kernel/);
  });
});

describe('buildQemuArgv: CD-ROM boot', () => {
  const iso = disk('install', { media: 'cdrom', format: 'raw', path: '/isos/debian.iso' });
  it('virtio model: CD-ROM on SATA with bootindex=1, the first hard disk next', () => {
    const argv = buildQemuArgv(spec(config({ boot: { kind: 'cdrom', firmware: 'bios' }, disks: [disk('root'), iso] })));
    assert.ok(hasPair(argv, '-device', 'ide-cd,id=disk-install,drive=fmt-install,bus=ide.0,bootindex=1'));
    assert.equal(device(argv, 'virtio-blk-pci'), 'virtio-blk-pci,id=disk-root,drive=fmt-root,bus=port-disk-root,bootindex=2');
    const nodes = values(argv, '-blockdev').map((j) => JSON.parse(j) as Record<string, unknown>).filter((n) => String(n['node-name']).endsWith('install'));
    assert.deepEqual(nodes, [
      { driver: 'file', filename: '/isos/debian.iso', 'node-name': 'drive-install', 'read-only': true },
      { driver: 'raw', file: 'drive-install', 'node-name': 'fmt-install', 'read-only': true },
    ]);
  });
  it('emulated model: ide-cd on PIIX IDE', () => {
    const argv = buildQemuArgv(spec(config({ devices: 'emulated', boot: { kind: 'cdrom', firmware: 'bios' }, disks: [iso, disk('root')] })));
    assert.ok(hasPair(argv, '-device', 'ide-cd,id=disk-install,drive=fmt-install,bus=ide.0,unit=0,bootindex=1'));
    assert.ok(hasPair(argv, '-device', 'ide-hd,id=disk-root,drive=fmt-root,bus=ide.0,unit=1,bootindex=2'));
  });
  it('disk boot ignores CD-ROMs when picking the boot disk', () => {
    const argv = buildQemuArgv(spec(config({ boot: { kind: 'disk', firmware: 'bios' }, disks: [iso, disk('root')] })));
    assert.ok(hasPair(argv, '-device', 'ide-cd,id=disk-install,drive=fmt-install,bus=ide.0'));
    assert.equal(device(argv, 'virtio-blk-pci'), 'virtio-blk-pci,id=disk-root,drive=fmt-root,bus=port-disk-root,bootindex=1');
  });
  it('errors: no cdrom to boot, no disk to boot, cdrom on virtio', () => {
    throwsValidation(() => buildQemuArgv(spec(config({ boot: { kind: 'cdrom', firmware: 'bios' }, disks: [disk('root')] }))), /no disk with media "cdrom"/);
    throwsValidation(() => buildQemuArgv(spec(config({ boot: { kind: 'disk', firmware: 'bios' }, disks: [iso] }))), /boots from disk but has no disk/);
    throwsValidation(() => buildQemuArgv(spec(config({ disks: [{ ...iso, bus: 'virtio' }] }))), /CD-ROM cannot be on the virtio bus/);
  });
});

describe('buildQemuArgv: hot-plug sizing', () => {
  it('maxcpus with one core per socket', () => {
    const argv = buildQemuArgv(spec(config({ vcpus: 2, maxVcpus: 8 })));
    assert.equal(one(argv, '-smp'), '2,maxcpus=8,sockets=8,cores=1,threads=1');
  });
  it('maxVcpus equal to vcpus is plain -smp', () => {
    assert.equal(one(buildQemuArgv(spec(config({ vcpus: 4, maxVcpus: 4 }))), '-smp'), '4');
  });
  it('maxmem and DIMM slots', () => {
    const argv = buildQemuArgv(spec(config({ memoryMiB: 512, maxMemoryMiB: 4096 })));
    assert.equal(one(argv, '-m'), '512M,slots=16,maxmem=4096M');
    assert.equal(one(buildQemuArgv(spec(config({ memoryMiB: 512, maxMemoryMiB: 512 }))), '-m'), '512M');
  });
  it('errors on shrinking maxima and machine limits', () => {
    throwsValidation(() => buildQemuArgv(spec(config({ vcpus: 4, maxVcpus: 2 }))), /maxVcpus \(2\) must be at least vcpus \(4\)/);
    throwsValidation(() => buildQemuArgv(spec(config({ memoryMiB: 1024, maxMemoryMiB: 512 }))), /maxMemoryMiB \(512\) must be at least memoryMiB \(1024\)/);
    throwsValidation(() => buildQemuArgv(spec(config({ vcpus: 1, maxVcpus: 300 }))), /more than the q35 machine supports \(288\)/);
  });
});

describe('buildQemuArgv: NICs', () => {
  it('virtio-net on a tap with its MAC, on its own root port', () => {
    const argv = buildQemuArgv(spec(config({ nics: [nic('eth0'), nic('eth1', { mac: '52:54:00:ab:cd:ef', hostIface: 'tap1' })] })));
    assert.deepEqual(values(argv, '-netdev'), ['tap,id=net-eth0,ifname=hf-tap-eth0,script=no,downscript=no', 'tap,id=net-eth1,ifname=tap1,script=no,downscript=no']);
    assert.ok(hasPair(argv, '-device', 'virtio-net-pci,id=nic-eth0,netdev=net-eth0,mac=52:54:00:12:34:56,bus=port-nic-eth0'));
    assert.ok(hasPair(argv, '-device', 'virtio-net-pci,id=nic-eth1,netdev=net-eth1,mac=52:54:00:ab:cd:ef,bus=port-nic-eth1'));
    assert.ok(hasPair(argv, '-device', 'pcie-root-port,id=port-nic-eth1,bus=pcie.0,chassis=2'));
  });
  it('a NIC without a host interface is a validation error', () => {
    const { hostIface: _unused, ...bare } = nic('eth0');
    throwsValidation(() => buildQemuArgv(spec(config({ nics: [bare] }))), /NIC eth0 of web1 has no host interface/);
  });
  it('rejects bad interface names, multicast MACs and duplicate names', () => {
    throwsValidation(() => buildQemuArgv(spec(config({ nics: [nic('eth0', { hostIface: 'tap,script=/x' })] }))), /not a valid host interface name/);
    throwsValidation(() => buildQemuArgv(spec(config({ nics: [nic('eth0', { hostIface: 'averyveryverylongtap' })] }))), /not a valid host interface name/);
    throwsValidation(() => buildQemuArgv(spec(config({ nics: [nic('eth0', { mac: '01:00:5e:00:00:01' })] }))), /multicast/);
    throwsValidation(() => buildQemuArgv(spec(config({ nics: [nic('eth0'), nic('eth0')] }))), /two NICs are named "eth0"/);
  });
});

describe('buildQemuArgv: display, paths, names', () => {
  it('VNC on a display number or a unix socket, with a VGA', () => {
    const a = buildQemuArgv(spec(config(), { vncDisplay: 3 }));
    assert.equal(one(a, '-vnc'), ':3');
    assert.equal(device(a, 'VGA'), 'VGA,id=video0');
    const b = buildQemuArgv(spec(config(), { vncDisplay: { unixSocket: '/run/hf/web1/vnc.sock' } }));
    assert.equal(one(b, '-vnc'), 'unix:/run/hf/web1/vnc.sock');
    throwsValidation(() => buildQemuArgv(spec(config(), { vncDisplay: -1 })), /VNC display/);
  });
  it('doubles commas in socket and log paths', () => {
    const a = buildQemuArgv(spec(config(), { qmpSocket: '/run/a,b/qmp.sock', consoleLog: '/log/a,b.log' }));
    assert.ok(hasPair(a, '-chardev', 'socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off'));
    assert.ok(values(a, '-chardev').some((c) => c.endsWith('logfile=/log/a,,b.log,logappend=on')));
  });
  it('refuses socket paths longer than a unix socket allows', () => {
    throwsValidation(() => buildQemuArgv(spec(config(), { qmpSocket: `/${'x'.repeat(120)}/qmp.sock` })), /QMP socket path is \d+ bytes/);
  });
  it('shortens block node-names over 31 characters, deterministically and uniquely', () => {
    const long1 = 'a'.repeat(40);
    const long2 = `${'a'.repeat(39)}b`;
    const i1 = diskIds(long1);
    const i2 = diskIds(long2);
    assert.ok(i1.fileNode.length <= 31 && i1.formatNode.length <= 31);
    assert.notEqual(i1.fileNode, i2.fileNode);
    assert.equal(i1.device, `disk-${long1}`);
    assert.deepEqual(diskIds('root'), { device: 'disk-root', fileNode: 'drive-root', formatNode: 'fmt-root' });
    const argv = buildQemuArgv(spec(config({ disks: [disk(long1)] })));
    assert.ok(devices(argv).includes(`virtio-blk-pci,id=disk-${long1},drive=${i1.formatNode},bus=port-disk-${long1}`));
  });
  it('refuses duplicate disk names and an empty kernel path', () => {
    throwsValidation(() => buildQemuArgv(spec(config({ disks: [disk('a'), disk('a')] }))), /two disks are named "a"/);
    throwsValidation(() => buildQemuArgv(spec(config({ boot: { kind: 'kernel', kernel: '', cmdline: '' } }))), /boots a kernel but no kernel path/);
  });
  it('validation errors carry status 400', () => {
    try {
      buildQemuArgv(spec(config({ vcpus: 0 })));
      assert.fail('should throw');
    } catch (e) {
      assert.ok(isHfError(e, 'HF_ERR_VALIDATION'));
      assert.equal(e.status, 400);
    }
  });
});
