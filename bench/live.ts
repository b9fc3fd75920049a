// Live resource benchmarks (issue 6), against a baseline in the same run:
//  1. Time from the API call (PATCH memory / vcpus) until the guest sees the new memory in
//     /proc/meminfo and the new vCPU in /sys/devices/system/cpu/online; the baseline is the same
//     QEMU command line driven by raw QMP (object-add + device_add) with no daemon in between.
//  2. QEMU RSS after the guest touched (then freed) memory, after a balloon inflate (memory
//     lowered) and after the balloon deflate (memory raised back).
// The time to "see" is measured by a watcher loop inside the guest (armed before the call, it
// prints a marker on the serial console as soon as the change is visible, polling every 10 ms).
import { spawn } from 'node:child_process';
import net from 'node:net';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type WebSocket from 'ws';
import type { Instance } from '../src/core/model/instance.js';
import { buildQemuArgv } from '../src/drivers/qemu/argv.js';
import { QmpClient } from '../src/drivers/qemu/qmp/client.js';
import { Qmp } from '../src/drivers/qemu/qmp/commands.js';
import { processRssBytes, waitForProcessExit } from '../src/util/proc.js';
import { destroyDataDir, getInstance, makeDataDir, startTestDaemon, waitForConsole, type TestDaemon } from '../test/helpers/daemon.js';

const ROUNDS = Number(process.env.BENCH_LIVE_ROUNDS ?? 3);
const STEP_MIB = 256;
const MiB = 1024 * 1024;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const ms = (x: number): string => `${x.toFixed(0)} ms`;
const mib = (b: number): string => `${(b / MiB).toFixed(0)} MiB`;

/** A serial console, raw (unix socket) or through the daemon (websocket). */
class GuestConsole {
  private buf = '';
  private constructor(private readonly write: (s: string) => void, private readonly end: () => void) {}

  static fromSocket(path: string): Promise<GuestConsole> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ path });
      s.once('error', reject);
      s.once('connect', () => {
        const c = new GuestConsole((x) => s.write(x), () => s.destroy());
        s.on('data', (b: Buffer) => (c.buf += b.toString()));
        resolve(c);
      });
    });
  }

  static fromWebSocket(ws: WebSocket): Promise<GuestConsole> {
    return new Promise((resolve, reject) => {
      ws.once('error', reject);
      ws.once('open', () => {
        const c = new GuestConsole((x) => ws.send(x), () => ws.close());
        ws.on('message', (b: Buffer) => (c.buf += b.toString()));
        resolve(c);
      });
    });
  }

  /** Runs `cmd` and resolves once `tag` appears (split in the command so its echo does not match). */
  async run(cmd: string, tag: string, timeoutMs = 60_000): Promise<void> {
    const from = this.buf.length;
    this.write(`${cmd}; echo ${tag.slice(0, 2)}''${tag.slice(2)}\n`);
    await this.waitFor(tag, from, timeoutMs);
  }

  /** Starts a guest loop that prints ARMED-tag, then waits for `cond` and prints SEEN-tag. */
  async arm(setup: string, cond: string, tag: string): Promise<() => Promise<number>> {
    const from = this.buf.length;
    this.write(`${setup}; echo AR''MED-${tag}; while ! ${cond}; do usleep 10000; done; echo SE''EN-${tag}\n`);
    await this.waitFor(`ARMED-${tag}`, from, 30_000);
    return async () => {
      await this.waitFor(`SEEN-${tag}`, from, 120_000);
      return performance.now();
    };
  }

  private async waitFor(text: string, from: number, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.buf.slice(from).includes(text)) {
      if (Date.now() > deadline) throw new Error(`console: no "${text}" within ${timeoutMs} ms; tail: ${this.buf.slice(-400)}`);
      await new Promise((r) => setTimeout(r, 2));
    }
  }

  close(): void {
    this.end();
  }
}

const memAtLeast = (kib: number): string => `[ $(awk '/MemTotal/{print $2}' /proc/meminfo) -ge ${kib} ]`;
const memTotalSetup = "o=$(awk '/MemTotal/{print $2}' /proc/meminfo)";
const memGrownCond = (mibMore: number): string => `[ $(awk '/MemTotal/{print $2}' /proc/meminfo) -ge $((o + ${(mibMore - 8) * 1024})) ]`;
const cpuCond = (list: string): string => `[ "$(cat /sys/devices/system/cpu/online)" = "${list}" ]`;

interface Driver {
  growMemory(toMiB: number): Promise<void>;
  setCpus(n: 2): Promise<void>;
}

interface Rounds {
  /** call → the guest sees it */
  memSeen: number[];
  /** call → the call returns */
  memCall: number[];
  cpuSeen: number;
  cpuCall: number;
}

async function rounds(con: GuestConsole, drv: Driver, tag: string): Promise<Rounds> {
  const memSeen: number[] = [];
  const memCall: number[] = [];
  let mem = 256;
  for (let i = 0; i < ROUNDS; i++) {
    mem += STEP_MIB;
    const seen = await con.arm(memTotalSetup, memGrownCond(STEP_MIB), `${tag}m${i}`);
    const t0 = performance.now();
    await drv.growMemory(mem);
    memCall.push(performance.now() - t0);
    memSeen.push((await seen()) - t0);
  }
  // One vCPU hot-plug: under TCG a vCPU cannot be unplugged to measure again (QEMU 7.2 crashes
  // on the next hot-plug after a TCG unplug, see core/live-plan.ts).
  const cpuSeen = await con.arm('true', cpuCond('0-1'), `${tag}c`);
  const t1 = performance.now();
  await drv.setCpus(2);
  const cpuCall = performance.now() - t1;
  return { memSeen, memCall, cpuSeen: (await cpuSeen()) - t1, cpuCall };
}

const CONFIG = (kernel: string, initrd: string): Instance['config'] => ({
  vcpus: 1,
  maxVcpus: 2,
  memoryMiB: 256,
  maxMemoryMiB: 2048,
  disks: [],
  nics: [],
  boot: { kind: 'kernel', kernel, initrd, cmdline: 'console=ttyS0 quiet panic=-1' },
  accel: 'tcg',
  devices: 'virtio',
  restartPolicy: 'never',
  autostart: false,
});

/** The same VM started by hand and driven by raw QMP. */
async function rawBaseline(dataDir: string): Promise<Rounds> {
  const dir = join(dataDir, 'raw-live');
  await mkdir(dir, { recursive: true });
  const img = join(dataDir, 'images', 'tiny');
  const f = { qmp: join(dir, 'qmp.sock'), con: join(dir, 'console.sock'), log: join(dir, 'console.log'), pid: join(dir, 'qemu.pid') };
  const argv = buildQemuArgv({
    instance: { id: 'raw', name: 'raw-live', config: CONFIG(join(img, 'vmlinuz'), join(img, 'initrd.img')) },
    accel: 'tcg',
    qmpSocket: f.qmp,
    consoleSocket: f.con,
    consoleLog: f.log,
    pidFile: f.pid,
  });
  const child = spawn('qemu-system-x86_64', argv, { stdio: 'ignore', detached: true });
  try {
    const client = await QmpClient.connect(f.qmp, { retryUntilMs: 10_000 });
    const qmp = new Qmp(client);
    const con = await GuestConsole.fromSocket(f.con);
    const deadline = Date.now() + 120_000;
    const { readFile } = await import('node:fs/promises');
    while (!(await readFile(f.log, 'utf8').catch(() => '')).includes('HYPERFOLD-GUEST-READY')) {
      if (Date.now() > deadline) throw new Error('raw VM did not boot');
      await new Promise((r) => setTimeout(r, 250));
    }
    let slot = 0;
    const drv: Driver = {
      growMemory: async () => {
        await qmp.objectAdd({ 'qom-type': 'memory-backend-ram', id: `mem-raw${slot}`, size: STEP_MIB * MiB });
        await qmp.deviceAdd({ driver: 'pc-dimm', id: `raw${slot}`, memdev: `mem-raw${slot}`, slot });
        slot++;
      },
      setCpus: async () => {
        await qmp.deviceAdd({ driver: 'max-x86_64-cpu', id: 'rawcpu1', 'socket-id': 1, 'core-id': 0, 'thread-id': 0 });
      },
    };
    const r = await rounds(con, drv, 'raw');
    con.close();
    await client.close();
    return r;
  } finally {
    try {
      process.kill(child.pid!, 'SIGKILL');
    } catch {
      // gone
    }
    await waitForProcessExit(child.pid!, undefined, 5000);
    await rm(dir, { recursive: true, force: true });
  }
}

async function hyperfold(d: TestDaemon): Promise<{ r: Rounds; rss: string[] }> {
  const name = 'bench-live';
  const img = join(d.dataDir, 'images', 'tiny');
  const c = CONFIG(join(img, 'vmlinuz'), join(img, 'initrd.img'));
  const res = await d.api.request<{ operation: { id: string } }>('POST', '/api/v1/instances', {
    name,
    image: 'tiny',
    boot: c.boot,
    memory: '256M',
    maxMemory: '2G',
    vcpus: 1,
    maxVcpus: 2,
    accel: 'tcg',
    start: true,
  });
  const done = await d.api.waitOperation(res.operation.id);
  if (done.status !== 'success') throw new Error(`launch failed: ${JSON.stringify(done.error)}`);
  await waitForConsole(d.api, name, /HYPERFOLD-GUEST-READY/, 120_000);
  const con = await GuestConsole.fromWebSocket(d.api.websocket(`/api/v1/instances/${name}/console`));
  const patch = async (body: unknown): Promise<void> => {
    const r = await d.api.request<{ applied: string[]; notes: string[] }>('PATCH', `/api/v1/instances/${name}`, body);
    if (r.applied.length === 0) throw new Error(`nothing applied live: ${r.notes.join('; ')}`);
  };
  const r = await rounds(con, { growMemory: (m) => patch({ memory: `${m}M` }), setCpus: (n) => patch({ vcpus: n }) }, 'hf');

  // RSS: the guest touches ~600 MiB (tmpfs), frees it; then the balloon takes memory back.
  const pid = (await getInstance(d.api, name)).runtime!.pid;
  const top = 256 + ROUNDS * STEP_MIB;
  await con.run('mkdir -p /tmp/fill && mount -t tmpfs -o size=700m tmpfs /tmp/fill && dd if=/dev/zero of=/tmp/fill/x bs=1M count=600 2>/dev/null; rm -f /tmp/fill/x; umount /tmp/fill', 'FILLED', 180_000);
  await new Promise((res2) => setTimeout(res2, 1000));
  const rssTouched = processRssBytes(pid) ?? 0;
  const low = 384;
  const tIn = performance.now();
  await patch({ memory: `${low}M` });
  const inflateMs = performance.now() - tIn;
  await new Promise((res2) => setTimeout(res2, 1000));
  const rssInflated = processRssBytes(pid) ?? 0;
  const seenBack = await con.arm('true', memAtLeast((top - 160) * 1024), 'hfdefl');
  const tOut = performance.now();
  await patch({ memory: `${top}M` });
  const deflateMs = performance.now() - tOut;
  await seenBack();
  await new Promise((res2) => setTimeout(res2, 1000));
  const rssDeflated = processRssBytes(pid) ?? 0;
  con.close();
  return {
    r,
    rss: [
      `| QEMU RSS, ${mib(top * MiB)} guest after touching and freeing 600 MiB | ${mib(rssTouched)} | before the balloon |`,
      `| QEMU RSS after balloon inflate to ${low} MiB (API call ${ms(inflateMs)}, returns once QEMU reports the target reached) | ${mib(rssInflated)} | ${mib(rssTouched - rssInflated)} returned to the host |`,
      `| QEMU RSS after balloon deflate back to ${mib(top * MiB)} (API call ${ms(deflateMs)}, returns once QEMU reports the target reached) | ${mib(rssDeflated)} | ${mib(rssDeflated - rssInflated)} more: deflated pages are not touched yet |`,
    ],
  };
}

export async function run(): Promise<string> {
  const dataDir = await makeDataDir();
  let d: TestDaemon | undefined;
  try {
    const raw = await rawBaseline(dataDir);
    d = await startTestDaemon(dataDir);
    const hf = await hyperfold(d);
    const row = (what: string, a: number[], b: number[]): string =>
      `| ${what} (median of ${ROUNDS}) | raw QMP ${ms(median(a))} | Hyperfold API ${ms(median(b))} (${(median(b) / median(a)).toFixed(2)}×) |`;
    return [
      '| measurement | baseline | Hyperfold |',
      '|---|---|---|',
      row(`+${STEP_MIB} MiB (DIMM): call → guest MemTotal shows it`, raw.memSeen, hf.r.memSeen),
      row(`+${STEP_MIB} MiB: call → call returns (QMP object-add + device_add / PATCH)`, raw.memCall, hf.r.memCall),
      `| +1 vCPU: call → guest cpu/online shows it (one run) | raw QMP ${ms(raw.cpuSeen)} | Hyperfold API ${ms(hf.r.cpuSeen)} (${(hf.r.cpuSeen / raw.cpuSeen).toFixed(2)}×) |`,
      `| +1 vCPU: call → call returns (QMP device_add / PATCH, one run) | raw QMP ${ms(raw.cpuCall)} | Hyperfold API ${ms(hf.r.cpuCall)} (${(hf.r.cpuCall / raw.cpuCall).toFixed(2)}×) |`,
      '',
      '| QEMU memory | value | note |',
      '|---|---|---|',
      ...hf.rss,
    ].join('\n');
  } finally {
    await destroyDataDir(dataDir, d);
  }
}
