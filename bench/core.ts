// Platform-core benchmarks (issue 2), each measured against a baseline in the same run:
//  1. API start of an existing VM definition until QMP reports `running`, versus spawning the
//     same QEMU argv directly and polling QMP until `running` (median of N).
//  2. 20 tiny VMs launched at once: total time until all run, daemon RSS.
//  3. 1,000 stopped VMs defined: daemon RSS and p50/p99 latency of GET /api/v1/instances.
import { spawn } from 'node:child_process';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { buildQemuArgv } from '../src/drivers/qemu/argv.js';
import { QmpClient } from '../src/drivers/qemu/qmp/client.js';
import type { Instance } from '../src/core/model/instance.js';
import { processRssBytes, waitForProcessExit } from '../src/util/proc.js';
import { destroyDataDir, getInstance, makeDataDir, op, startTestDaemon, type TestDaemon } from '../test/helpers/daemon.js';
import { median, pct } from './stats.js';

const N_START = Number(process.env.BENCH_START_RUNS ?? 10);
const N_PARALLEL = Number(process.env.BENCH_PARALLEL_VMS ?? 20);
const N_DEFINED = Number(process.env.BENCH_DEFINED_VMS ?? 1000);

const ms = (x: number) => `${x.toFixed(1)} ms`;
const mib = (b: number) => `${(b / 1048576).toFixed(1)} MiB`;

/** Spawns QEMU with `argv` and resolves once QMP says running; returns the elapsed time. */
async function rawStart(argv: string[], qmpSocket: string): Promise<{ ms: number; pid: number }> {
  await rm(qmpSocket, { force: true });
  const t0 = performance.now();
  const child = spawn('qemu-system-x86_64', argv, { stdio: 'ignore', detached: true });
  const qmp = await QmpClient.connect(qmpSocket, { retryUntilMs: 10_000 });
  for (;;) {
    const st = await qmp.run<{ running: boolean }>('query-status');
    if (st.running) break;
  }
  const elapsed = performance.now() - t0;
  await qmp.close();
  return { ms: elapsed, pid: child.pid! };
}

async function killPid(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone
  }
  await waitForProcessExit(pid, undefined, 5000);
}

async function startVsRaw(d: TestDaemon): Promise<string[]> {
  const created = await d.api.request<{ instance: Instance }>('POST', '/api/v1/instances', { name: 'bench-start', image: 'tiny', memory: '128M', accel: 'tcg' });
  const inst = created.instance;
  // The same argv the driver builds, with the baseline's own sockets.
  const dir = join(d.dataDir, 'raw');
  await mkdir(dir, { recursive: true });
  const qmpSocket = join(dir, 'qmp.sock');
  const argv = buildQemuArgv({
    instance: inst,
    accel: 'tcg',
    qmpSocket,
    consoleSocket: join(dir, 'console.sock'),
    consoleLog: join(dir, 'console.log'),
    pidFile: join(dir, 'qemu.pid'),
  });
  const api: number[] = [];
  const raw: number[] = [];
  // warm-up (page cache, accelerator verdict)
  await op(d.api, 'POST', '/api/v1/instances/bench-start/start', {});
  await op(d.api, 'POST', '/api/v1/instances/bench-start/stop', { force: true });
  const r0 = await rawStart(argv, qmpSocket);
  await killPid(r0.pid);
  for (let i = 0; i < N_START; i++) {
    // alternate to spread machine noise evenly over both
    const r = await rawStart(argv, qmpSocket);
    raw.push(r.ms);
    await killPid(r.pid);
    const t0 = performance.now();
    // One round trip: the answer comes once the operation finished (what `hyperfold start` does).
    const done = await d.api.request<{ operation: { status: string } }>('POST', '/api/v1/instances/bench-start/start?wait=30', {});
    api.push(performance.now() - t0);
    if (done.operation.status !== 'success') throw new Error(`start failed: ${JSON.stringify(done)}`);
    await op(d.api, 'POST', '/api/v1/instances/bench-start/stop', { force: true });
  }
  await op(d.api, 'DELETE', '/api/v1/instances/bench-start');
  const ratio = median(api) / median(raw);
  return [
    `| start → QMP running, raw QEMU (median of ${N_START}) | ${ms(median(raw))} | baseline |`,
    `| start → QMP running, Hyperfold API (median of ${N_START}) | ${ms(median(api))} | ${ratio.toFixed(2)}× (target ≤ 1.10×) |`,
  ];
}

async function parallelLaunch(d: TestDaemon): Promise<string[]> {
  const names = Array.from({ length: N_PARALLEL }, (_, i) => `par${i}`);
  const t0 = performance.now();
  const ops = await Promise.all(
    names.map((name) => d.api.request<{ operation: { id: string } }>('POST', '/api/v1/instances', { name, image: 'tiny', memory: '64M', accel: 'tcg', start: true })),
  );
  const results = await Promise.all(ops.map((o) => d.api.waitOperation(o.operation.id)));
  const total = performance.now() - t0;
  const failed = results.filter((r) => r.status !== 'success');
  const rss = processRssBytes(d.proc.pid!) ?? 0;
  let qemuRss = 0;
  for (const n of names) {
    const i = await getInstance(d.api, n);
    if (i.runtime) qemuRss += processRssBytes(i.runtime.pid) ?? 0;
  }
  for (const n of names) await op(d.api, 'DELETE', `/api/v1/instances/${n}?force=true`);
  return [
    `| ${N_PARALLEL} tiny VMs launched at once, until all QMP-running | ${ms(total)} (${ms(total / N_PARALLEL)} per VM) | ${failed.length} failed |`,
    `| daemon RSS with ${N_PARALLEL} VMs running | ${mib(rss)} | QEMU processes: ${mib(qemuRss)} in all |`,
  ];
}

async function manyDefined(d: TestDaemon): Promise<string[]> {
  const kernel = (await getTinyKernel(d)).kernel;
  const t0 = performance.now();
  const batch = 25;
  for (let i = 0; i < N_DEFINED; i += batch) {
    await Promise.all(
      Array.from({ length: Math.min(batch, N_DEFINED - i) }, (_, j) =>
        d.api.request('POST', '/api/v1/instances', { name: `def${i + j}`, boot: { kind: 'kernel', kernel }, memory: '64M', description: 'x'.repeat(200) }),
      ),
    );
  }
  const createMs = performance.now() - t0;
  // let the heap settle, then measure
  await new Promise((r) => setTimeout(r, 1000));
  const rss = processRssBytes(d.proc.pid!) ?? 0;
  const lat: number[] = [];
  let bytes = 0;
  for (let i = 0; i < 5; i++) await d.http.raw('GET', '/api/v1/instances');
  for (let i = 0; i < 100; i++) {
    const t = performance.now();
    const r = await d.http.raw('GET', '/api/v1/instances');
    lat.push(performance.now() - t);
    bytes = r.text.length;
  }
  return [
    `| define ${N_DEFINED} stopped VMs through the API | ${ms(createMs)} (${ms(createMs / N_DEFINED)} each) | |`,
    `| daemon RSS with ${N_DEFINED} stopped VMs | ${mib(rss)} | |`,
    `| GET /api/v1/instances with ${N_DEFINED} VMs (${(bytes / 1024).toFixed(0)} KiB), p50 / p99 over 100 | ${ms(pct(lat, 50))} / ${ms(pct(lat, 99))} | target p99 < 50 ms |`,
  ];
}

async function getTinyKernel(d: TestDaemon): Promise<{ kernel: string }> {
  const { image } = await d.api.request<{ image: { boot: { kernel: string } } }>('GET', '/api/v1/images/tiny');
  return { kernel: image.boot.kernel };
}

export async function run(): Promise<string> {
  const dataDir = await makeDataDir();
  // 20 one-vCPU guests on a 2-core host need a CPU overcommit above the default 8.
  const d = await startTestDaemon(dataDir, { HYPERFOLD_CPU_OVERCOMMIT: '16' });
  try {
    const rows = [
      '| measurement | result | against the baseline |',
      '|---|---|---|',
      ...(await startVsRaw(d)),
      ...(await parallelLaunch(d)),
      ...(await manyDefined(d)),
    ];
    return rows.join('\n');
  } finally {
    await destroyDataDir(dataDir, d);
  }
}
