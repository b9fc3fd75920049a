// Builds the built-in `tiny` guest image and boots it under QEMU (TCG) to check what the rest of
// the platform relies on: the ready marker on ttyS0, an interactive shell there, the data disk on
// /mnt, DHCP on eth0, onlining of hot-added CPUs/memory, and a clean ACPI power-off.
//
// The kernel .deb is cached in $HYPERFOLD_TEST_CACHE (default /var/cache/hyperfold-test).

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildTinyImage, readTinyManifest, TINY_DISK_MARKER, TINY_READY_MARKER, type TinyImageManifest } from '../../src/images/tiny/build.js';
import { missingDependency } from '../../src/images/tiny/tools.js';
import { isHfError } from '../../src/core/errors.js';

const CACHE = process.env.HYPERFOLD_TEST_CACHE ?? '/var/cache/hyperfold-test';
const QEMU = 'qemu-system-x86_64';
const haveQemu = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Minimal QMP client: one command at a time, events are skipped. */
class Qmp {
  private buf = '';
  private waiters: ((msg: Record<string, unknown>) => void)[] = [];
  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ('event' in msg) continue;
        this.waiters.shift()?.(msg);
      }
    });
    sock.on('error', () => undefined);
  }

  private next(): Promise<Record<string, unknown>> {
    return new Promise((res) => this.waiters.push(res));
  }

  static async open(path: string): Promise<Qmp> {
    const sock = await connectRetry(path, 10_000);
    const q = new Qmp(sock);
    const greeting = await q.next();
    assert.ok('QMP' in greeting, 'QMP greeting');
    await q.execute('qmp_capabilities');
    return q;
  }

  async execute(cmd: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next();
    this.sock.write(JSON.stringify(args ? { execute: cmd, arguments: args } : { execute: cmd }) + '\n');
    const msg = await reply;
    if ('error' in msg) throw new Error(`QMP ${cmd}: ${JSON.stringify(msg.error)}`);
    return msg.return;
  }

  close(): void {
    this.sock.destroy();
  }
}

async function connectRetry(path: string, timeoutMs: number): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Socket>((res, rej) => {
        const s = connect(path);
        s.once('connect', () => res(s));
        s.once('error', rej);
      });
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await sleep(50);
    }
  }
}

/** A QEMU guest with its serial console on a unix socket (QEMU waits for us before starting). */
class Guest {
  out = '';
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  exited = false;
  readonly startedAt = Date.now();
  private cmdSeq = 0;
  qmp!: Qmp;
  private serial!: Socket;

  private constructor(
    private readonly proc: ChildProcess,
    private readonly dir: string,
  ) {
    let stderr = '';
    proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    this.exit = new Promise((res) =>
      proc.on('exit', (code, signal) => {
        this.exited = true;
        if (stderr.trim()) this.out += `\n[qemu stderr] ${stderr.trim()}\n`;
        res({ code, signal });
      }),
    );
  }

  static async boot(image: string, manifest: TinyImageManifest, devices: string[]): Promise<Guest> {
    const dir = await mkdtemp(join(tmpdir(), 'hf-tiny-'));
    const overlay = join(dir, 'disk.qcow2');
    const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', join(image, manifest.disk), overlay]);
    assert.equal(r.status, 0, `qemu-img create: ${r.stderr}`);
    const args = [
      ...['-accel', 'tcg', '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot'],
      ...['-M', 'pc', '-m', '256M,slots=2,maxmem=1G', '-smp', '1,maxcpus=2'],
      ...['-kernel', join(image, manifest.kernel), '-initrd', join(image, manifest.initrd), '-append', manifest.cmdline],
      ...devices.flatMap((d) => d.replace('@DISK@', overlay).split(' ')),
      ...['-chardev', `socket,id=ser0,path=${join(dir, 'serial.sock')},server=on,wait=on`, '-serial', 'chardev:ser0'],
      ...['-qmp', `unix:${join(dir, 'qmp.sock')},server=on,wait=off`],
    ];
    const proc = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    const g = new Guest(proc, dir);
    g.serial = await connectRetry(join(dir, 'serial.sock'), 10_000);
    g.serial.setEncoding('utf8');
    g.serial.on('data', (d: string) => (g.out += d.replace(/\r/g, '')));
    g.serial.on('error', () => undefined);
    g.qmp = await Qmp.open(join(dir, 'qmp.sock'));
    return g;
  }

  tail(): string {
    return this.out.slice(-2000);
  }

  /** Waits until `re` matches the serial output after `from`; returns the match index. */
  async waitFor(re: RegExp, timeoutMs: number, from = 0): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = re.exec(this.out.slice(from));
      if (m) return from + m.index + m[0].length;
      if (this.exited) assert.fail(`QEMU exited while waiting for ${re}\n--- serial ---\n${this.tail()}`);
      if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${re}\n--- serial ---\n${this.tail()}`);
      await sleep(50);
    }
  }

  /** Types `cmd` into the serial shell and returns what it printed. */
  async sh(cmd: string, timeoutMs = 15_000): Promise<string> {
    const id = ++this.cmdSeq;
    const from = this.out.length;
    // The quotes keep the echoed command line (which the line editor may wrap) from matching.
    this.serial.write(`echo "@@BEG""${id}@@"; ${cmd}; echo "@@END""${id}@@"\n`);
    const end = await this.waitFor(new RegExp(`^@@END${id}@@$`, 'm'), timeoutMs, from);
    const start = await this.waitFor(new RegExp(`^@@BEG${id}@@\n`, 'm'), 0, from);
    return this.out.slice(start, end - `@@END${id}@@`.length);
  }

  async kill(): Promise<void> {
    this.qmp?.close();
    this.serial?.destroy();
    if (!this.exited) this.proc.kill('SIGKILL');
    await this.exit;
    await rm(this.dir, { recursive: true, force: true });
  }
}

let work: string;
let image: string;
let manifest: TinyImageManifest;
const progress: [number, string][] = [];

before(async () => {
  work = await mkdtemp(join(tmpdir(), 'hf-tiny-image-'));
  image = join(work, 'tiny');
  const t0 = Date.now();
  manifest = await buildTinyImage({ destDir: image, cacheDir: CACHE, onProgress: (p, m) => progress.push([p, m]) });
  const initrd = (await readFile(join(image, manifest.initrd))).length;
  console.log(`# tiny image built in ${Date.now() - t0} ms; initrd ${initrd} bytes, total ${manifest.sizeBytes} bytes`);
});

after(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

describe('tiny image build', () => {
  it('writes the image files and a manifest readTinyManifest returns', async () => {
    assert.equal(manifest.name, 'tiny');
    assert.match(manifest.kernelVersion, /^\d+\.\d+\.\d+-\d+-amd64$/);
    assert.match(manifest.busyboxVersion, /^\d+\.\d+/);
    assert.match(manifest.cmdline, /console=ttyS0/);
    assert.match(manifest.cmdline, /panic=-1/);
    const files = (await readdir(image)).sort();
    assert.deepEqual(files, [manifest.disk, 'image.json', manifest.initrd, manifest.kernel].sort());
    const { createHash } = await import('node:crypto');
    for (const f of [manifest.kernel, manifest.initrd, manifest.disk]) {
      const sum = createHash('sha256').update(await readFile(join(image, f))).digest('hex');
      assert.equal(manifest.sha256[f], sum, `sha256 of ${f}`);
    }
    assert.deepEqual(await readTinyManifest(image), manifest);
    assert.equal(await readTinyManifest(join(work, 'nope')), undefined);
    // progress is monotonic and ends at 100 'done'
    assert.deepEqual(progress.at(-1), [100, 'done']);
    for (let i = 1; i < progress.length; i++) assert.ok(progress[i]![0] >= progress[i - 1]![0], JSON.stringify(progress));
    // no temp dirs left beside the image
    assert.deepEqual(await readdir(work), ['tiny']);
  });

  it('readTinyManifest rejects a broken manifest', async () => {
    const dir = join(work, 'broken');
    await rm(dir, { recursive: true, force: true });
    await (await import('node:fs/promises')).mkdir(dir);
    await writeFile(join(dir, 'image.json'), '{"name":"tiny"');
    assert.equal(await readTinyManifest(dir), undefined);
    await writeFile(join(dir, 'image.json'), JSON.stringify(manifest)); // files missing
    assert.equal(await readTinyManifest(dir), undefined);
    await rm(dir, { recursive: true });
  });

  it('an aborted build leaves nothing behind', async () => {
    const ac = new AbortController();
    const dest = join(work, 'aborted');
    // Aborted at a known step, once the kernel package is extracted into the work directory
    // (so there is something to clean up), and certainly before the build could finish.
    let abortedAt: string | undefined;
    const p = buildTinyImage({
      destDir: dest,
      cacheDir: CACHE,
      signal: ac.signal,
      onProgress: (_p, m) => {
        if (m.startsWith('building initramfs') && !abortedAt) {
          abortedAt = m;
          ac.abort();
        }
      },
    });
    await assert.rejects(p, (e: Error) => e.name === 'AbortError');
    assert.equal(abortedAt, 'building initramfs', 'the abort came in the middle of the build');
    assert.equal(existsSync(dest), false);
    assert.deepEqual((await readdir(work)).filter((f) => f !== 'tiny'), []);
  });

  it('missing tools are reported with the apt-get command to run', () => {
    const e = missingDependency(['cpio', 'qemu-img'], ['cpio', 'qemu-utils']);
    assert.ok(isHfError(e, 'HF_ERR_MISSING_DEPENDENCY'));
    assert.match(e.message, /apt-get install -y cpio qemu-utils/);
  });
});

describe('tiny image boots (virtio, TCG)', { skip: !haveQemu && `${QEMU} not installed` }, () => {
  let g: Guest;
  after(async () => g?.kill());

  it(`prints ${TINY_READY_MARKER} on ttyS0 within 60 s`, async () => {
    g = await Guest.boot(image, manifest, [
      '-drive file=@DISK@,if=virtio',
      '-netdev user,id=n0',
      '-device virtio-net-pci,netdev=n0',
      '-device virtio-balloon-pci',
    ]);
    await g.waitFor(new RegExp(`^${TINY_READY_MARKER}$`, 'm'), 60_000);
    console.log(`# virtio boot to marker: ${Date.now() - g.startedAt} ms`);
  });

  it('mounts the data disk on /mnt', async () => {
    assert.match(await g.sh('cat /mnt/hyperfold-disk'), new RegExp(`^${TINY_DISK_MARKER}$`, 'm'));
  });

  it('gets 10.0.2.15 on eth0 from slirp DHCP', async () => {
    const deadline = Date.now() + 20_000;
    let out = '';
    while (Date.now() < deadline) {
      out = await g.sh('ip addr show eth0');
      if (out.includes('inet 10.0.2.15/')) return;
      await sleep(500);
    }
    assert.fail(`no DHCP address on eth0:\n${out}`);
  });

  it('has job control on the serial shell', async () => {
    const out = await g.sh('sleep 30 & jobs; kill %1');
    assert.match(out, /\[1\]\+?\s+Running\s+sleep 30/);
  });

  it('onlines a hot-added CPU and memory block', async () => {
    const memOnline = async () => Number((await g.sh('cat /sys/devices/system/memory/memory*/state | grep -c online')).trim());
    const before = await memOnline();
    const slots = (await g.qmp.execute('query-hotpluggable-cpus')) as { type: string; props: Record<string, number>; 'qom-path'?: string }[];
    const free = slots.find((s) => !s['qom-path']);
    assert.ok(free, 'a free CPU slot');
    await g.qmp.execute('device_add', { driver: free.type, id: 'cpu1', ...free.props });
    await g.qmp.execute('object-add', { 'qom-type': 'memory-backend-ram', id: 'mem1', size: 128 * 1024 * 1024 });
    await g.qmp.execute('device_add', { driver: 'pc-dimm', id: 'dimm1', memdev: 'mem1' });
    const deadline = Date.now() + 20_000;
    let cpus = '';
    let mem = before;
    while (Date.now() < deadline) {
      cpus = (await g.sh('cat /sys/devices/system/cpu/online')).trim();
      mem = await memOnline();
      if (cpus === '0-1' && mem > before) return;
      await sleep(500);
    }
    assert.fail(`hotplug not onlined: cpus online=${cpus}, memory blocks online ${before} -> ${mem}`);
  });

  it('powers off cleanly on QMP system_powerdown within 30 s', async () => {
    const t0 = Date.now();
    await g.qmp.execute('system_powerdown');
    const res = await Promise.race([g.exit, sleep(30_000).then(() => undefined)]);
    assert.ok(res, `QEMU still running 30 s after system_powerdown\n--- serial ---\n${g.tail()}`);
    assert.equal(res.code, 0);
    console.log(`# system_powerdown to QEMU exit: ${Date.now() - t0} ms`);
  });
});

describe('tiny image boots (e1000 + IDE, TCG)', { skip: !haveQemu && `${QEMU} not installed` }, () => {
  let g: Guest;
  after(async () => g?.kill());

  it('reaches the ready marker and mounts the IDE disk', async () => {
    g = await Guest.boot(image, manifest, ['-drive file=@DISK@,if=ide', '-netdev user,id=n0', '-device e1000,netdev=n0']);
    await g.waitFor(new RegExp(`^${TINY_READY_MARKER}$`, 'm'), 60_000);
    console.log(`# e1000+IDE boot to marker: ${Date.now() - g.startedAt} ms`);
    assert.match(await g.sh('cat /mnt/hyperfold-disk; ls /sys/class/net'), new RegExp(`^${TINY_DISK_MARKER}$`, 'm'));
    assert.match(await g.sh('ls /sys/class/net'), /eth0/);
  });
});
