// Real QEMU (TCG) accepts the argv buildQemuArgv makes: each VM is started with -S (CPUs stopped,
// so no guest code and no kernel is needed), must stay up for a second and answer QMP, and then is
// killed. NICs are left out: they need a tap device made by the network layer.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { DiskConfig, InstanceConfig } from '../../src/core/model/instance.js';
import { buildQemuArgv, type QemuLaunchSpec } from '../../src/drivers/qemu/argv.js';

const QEMU = process.env.HF_QEMU_BINARY ?? 'qemu-system-x86_64';
const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';
const haveQemu = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0 && spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status === 0;

type QmpReply = { return?: unknown; error?: { class: string; desc: string } };

/** Just enough QMP for a test: one command at a time, events skipped. */
class TinyQmp {
  private buf = '';
  private waiters: Array<(line: string) => void> = [];
  private lines: string[] = [];
  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 1);
        const w = this.waiters.shift();
        if (w) w(line);
        else this.lines.push(line);
      }
    });
  }
  static async connect(file: string): Promise<TinyQmp> {
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(file, () => resolve(s));
      s.once('error', reject);
    });
    const q = new TinyQmp(sock);
    await q.line(); // greeting
    const r = await q.run('qmp_capabilities');
    assert.deepEqual(r.return, {});
    return q;
  }
  private line(): Promise<string> {
    const l = this.lines.shift();
    if (l !== undefined) return Promise.resolve(l);
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  async run(execute: string, args?: Record<string, unknown>): Promise<QmpReply> {
    this.sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    for (;;) {
      const msg = JSON.parse(await this.line()) as QmpReply & { event?: string };
      if (msg.event === undefined) return msg;
    }
  }
  close(): void {
    this.sock.destroy();
  }
}

interface Running {
  child: ChildProcess;
  exited: Promise<number | null>;
  stderr: () => string;
}

function launch(argv: string[]): Running {
  const child = spawn(QEMU, ['-S', ...argv], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => (err += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, exited, stderr: () => err };
}

async function stop(r: Running): Promise<void> {
  if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGKILL');
  await r.exited;
}

describe('buildQemuArgv under real QEMU (TCG, -S)', { skip: haveQemu ? false : 'qemu-system-x86_64 / qemu-img not installed' }, () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'hf-argv-'));
    for (const [name, size] of [['root.qcow2', '64M'], ['data.qcow2', '16M']] as const) {
      const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, name), size]);
      assert.equal(r.status, 0, String(r.stderr));
    }
    await writeFile(path.join(dir, 'blank.iso'), Buffer.alloc(2048 * 16));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  function disk(name: string, over: Partial<DiskConfig> = {}): DiskConfig {
    return { name, path: path.join(dir, `${name}.qcow2`), format: 'qcow2', media: 'disk', readonly: false, ...over };
  }

  function spec(name: string, cfg: Partial<InstanceConfig>, over: Partial<QemuLaunchSpec> = {}): QemuLaunchSpec {
    const config: InstanceConfig = {
      vcpus: 1,
      memoryMiB: 128,
      disks: [disk('root')],
      nics: [],
      boot: { kind: 'disk', firmware: 'bios' },
      accel: 'tcg',
      devices: 'virtio',
      restartPolicy: 'never',
      autostart: false,
      ...cfg,
    };
    return {
      instance: { id: '6f1c2a9e-0d4b-4e8a-9c1f-2b3a4c5d6e7f', name, config },
      accel: 'tcg',
      qmpSocket: path.join(dir, `${name}.qmp`),
      consoleSocket: path.join(dir, `${name}.con`),
      consoleLog: path.join(dir, `${name}.log`),
      pidFile: path.join(dir, `${name}.pid`),
      ...over,
    };
  }

  async function accepts(s: QemuLaunchSpec, extra?: (qmp: TinyQmp) => Promise<void>): Promise<void> {
    const r = launch(buildQemuArgv(s));
    try {
      const early = await Promise.race([r.exited.then((code) => ({ code })), new Promise<null>((res) => setTimeout(() => res(null), 1000))]);
      assert.equal(early, null, `QEMU exited early (${JSON.stringify(early)}): ${r.stderr()}`);
      const qmp = await TinyQmp.connect(s.qmpSocket);
      try {
        const st = await qmp.run('query-status');
        assert.deepEqual(st.return, { status: 'prelaunch', singlestep: false, running: false });
        if (extra) await extra(qmp);
      } finally {
        qmp.close();
      }
      const pid = Number((await readFile(s.pidFile, 'utf8')).trim());
      assert.equal(pid, r.child.pid, 'the pid file names the QEMU process');
    } finally {
      await stop(r);
    }
    assert.ok(!/warning|error/i.test(r.stderr()), `QEMU complained: ${r.stderr()}`);
  }

  it('virtio: q35, virtio-blk + virtio-scsi, balloon, rng, sandbox; CPU, memory and PCIe hot-plug work', async () => {
    const s = spec('vio', {
      vcpus: 1,
      maxVcpus: 2,
      memoryMiB: 128,
      maxMemoryMiB: 384,
      disks: [disk('root'), disk('data', { bus: 'scsi', readonly: true })],
    });
    await accepts(s, async (qmp) => {
      const blk = await qmp.run('blockdev-add', { driver: 'null-co', 'node-name': 'hp0' });
      assert.equal(blk.error, undefined, JSON.stringify(blk));
      const dev = await qmp.run('device_add', { driver: 'virtio-blk-pci', id: 'hp-disk', drive: 'hp0', bus: 'hotplug-port-0' });
      assert.equal(dev.error, undefined, JSON.stringify(dev));
      const cpus = (await qmp.run('query-hotpluggable-cpus')).return as Array<{ type: string; props: Record<string, number>; 'qom-path'?: string }>;
      const free = cpus.filter((c) => c['qom-path'] === undefined);
      assert.equal(cpus.length, 2);
      assert.equal(free.length, 1);
      const cpu = await qmp.run('device_add', { driver: free[0]!.type, id: 'cpu-1', ...free[0]!.props });
      assert.equal(cpu.error, undefined, JSON.stringify(cpu));
      const mem = await qmp.run('object-add', { 'qom-type': 'memory-backend-ram', id: 'mem1', size: 128 * 1024 * 1024 });
      assert.equal(mem.error, undefined, JSON.stringify(mem));
      const dimm = await qmp.run('device_add', { driver: 'pc-dimm', id: 'dimm1', memdev: 'mem1' });
      assert.equal(dimm.error, undefined, JSON.stringify(dimm));
    });
  });

  it('emulated: pc, IDE disks + IDE CD-ROM, an AHCI disk', async () => {
    await accepts(
      spec('emu', {
        devices: 'emulated',
        boot: { kind: 'cdrom', firmware: 'bios' },
        disks: [disk('root'), { name: 'iso', path: path.join(dir, 'blank.iso'), format: 'raw', media: 'cdrom', readonly: true }, disk('data', { bus: 'ahci' })],
      }),
    );
  });

  it('UEFI: q35 with OVMF pflash, SATA CD-ROM, VNC on a unix socket', { skip: existsSync(OVMF_CODE) ? false : 'ovmf not installed' }, async () => {
    const vars = path.join(dir, 'vars.fd');
    await copyFile(OVMF_VARS, vars);
    await accepts(
      spec(
        'efi',
        {
          boot: { kind: 'disk', firmware: 'uefi' },
          disks: [disk('root'), { name: 'iso', path: path.join(dir, 'blank.iso'), format: 'raw', media: 'cdrom', readonly: true }],
        },
        { uefi: { codePath: OVMF_CODE, varsPath: vars }, vncDisplay: { unixSocket: path.join(dir, 'efi.vnc') } },
      ),
    );
  });

  it('UEFI with the emulated device model (q35 + AHCI)', { skip: existsSync(OVMF_CODE) ? false : 'ovmf not installed' }, async () => {
    const vars = path.join(dir, 'vars2.fd');
    await copyFile(OVMF_VARS, vars);
    await accepts(spec('efiemu', { devices: 'emulated', boot: { kind: 'disk', firmware: 'uefi' }, disks: [disk('root'), disk('data')] }, { uefi: { codePath: OVMF_CODE, varsPath: vars } }));
  });
});
