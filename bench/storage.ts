// Storage benchmarks (issue 3), each against a baseline measured in the same run:
//  1. N linked clones of the tiny image launched one after the other: platform time per clone
//     (POST /instances with start=true until the operation reports QMP `running`; guest boot
//     excluded, each clone is stopped right after) versus `qemu-img create -b` + spawning the
//     same QEMU argv + polling QMP until `running`.
//  2. Disk used by the N linked clones versus N full copies (the copy API, flattened).
//  3. Snapshot create + revert with --memory of a booted 256 MiB guest: the API (operations)
//     versus the same QMP jobs (snapshot-save / snapshot-load) issued directly to a raw QEMU
//     running the same argv.
// N defaults to 50 (BENCH_CLONES); the snapshot rounds to 3 (BENCH_SNAPSHOT_RUNS).
import { spawn } from 'node:child_process';
import { mkdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Instance } from '../src/core/model/instance.js';
import { buildQemuArgv, diskIds } from '../src/drivers/qemu/argv.js';
import { QmpClient } from '../src/drivers/qemu/qmp/client.js';
import { Qmp } from '../src/drivers/qemu/qmp/commands.js';
import { QemuImg } from '../src/storage/qemu-img.js';
import { waitForProcessExit } from '../src/util/proc.js';
import { destroyDataDir, getInstance, makeDataDir, op, startTestDaemon, waitForConsole, type TestDaemon } from '../test/helpers/daemon.js';
import { median } from './stats.js';

const N = Number(process.env.BENCH_CLONES ?? 50);
const SNAP_RUNS = Number(process.env.BENCH_SNAPSHOT_RUNS ?? 3);

const ms = (x: number): string => `${x.toFixed(1)} ms`;
const mib = (b: number): string => `${(b / 1048576).toFixed(1)} MiB`;

async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

async function killPid(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone
  }
  await waitForProcessExit(pid, undefined, 5000);
}

async function qmpRunning(qmpSocket: string): Promise<QmpClient> {
  const qmp = await QmpClient.connect(qmpSocket, { retryUntilMs: 15_000 });
  for (;;) {
    const st = await qmp.run<{ running: boolean }>('query-status');
    if (st.running) return qmp;
  }
}

/** The raw path: overlay with qemu-img, spawn QEMU with the platform's argv, poll QMP. */
async function rawClone(template: Instance, tinyDisk: string, dir: string, i: number): Promise<{ ms: number; pid: number; disk: string }> {
  const d = join(dir, `raw${i}`);
  await mkdir(d, { recursive: true });
  const disk = join(d, 'root.qcow2');
  const qmpSocket = join(d, 'qmp.sock');
  const inst = { ...template, name: `raw${i}`, config: { ...template.config, disks: [{ ...template.config.disks[0]!, path: disk }] } };
  const t0 = performance.now();
  await new QemuImg().createOverlay(disk, tinyDisk, 'qcow2');
  const argv = buildQemuArgv({ instance: inst, accel: 'tcg', qmpSocket, consoleSocket: join(d, 'console.sock'), consoleLog: join(d, 'console.log'), pidFile: join(d, 'qemu.pid') });
  const child = spawn('qemu-system-x86_64', argv, { stdio: 'ignore', detached: true });
  const qmp = await qmpRunning(qmpSocket);
  const elapsed = performance.now() - t0;
  await qmp.close();
  return { ms: elapsed, pid: child.pid!, disk };
}

async function clones(d: TestDaemon, rows: string[]): Promise<void> {
  const tiny = join(d.dataDir, 'images', 'tiny', 'disk.qcow2');
  const rawDir = join(d.dataDir, 'raw');
  await mkdir(rawDir, { recursive: true });
  // Warm-up: page cache, accelerator verdict; its record is the argv template of the baseline.
  await op(d.api, 'POST', '/api/v1/instances', { name: 'warm', image: 'tiny', memory: '128M', accel: 'tcg', start: true });
  await op(d.api, 'POST', '/api/v1/instances/warm/stop', { force: true });
  const template = await getInstance(d.api, 'warm');
  const w = await rawClone(template, tiny, rawDir, 999);
  await killPid(w.pid);

  const api: number[] = [];
  const raw: number[] = [];
  const rawDisks: string[] = [];
  for (let i = 0; i < N; i++) {
    // alternate, so machine noise spreads evenly over both
    const r = await rawClone(template, tiny, rawDir, i);
    raw.push(r.ms);
    rawDisks.push(r.disk);
    await killPid(r.pid);
    const t0 = performance.now();
    const res = await d.api.request<{ operation: { id: string } }>('POST', '/api/v1/instances', { name: `clone${i}`, image: 'tiny', memory: '128M', accel: 'tcg', start: true });
    const done = await d.api.waitOperation(res.operation.id);
    api.push(performance.now() - t0);
    if (done.status !== 'success') throw new Error(`launch clone${i} failed: ${JSON.stringify(done.error)}`);
    await op(d.api, 'POST', `/api/v1/instances/clone${i}/stop`, { force: true });
  }
  const ratio = median(api) / median(raw);
  rows.push(`| linked clone launched → QMP running, raw \`qemu-img create -b\` + QEMU (median of ${N}) | ${ms(median(raw))} | baseline |`);
  rows.push(`| linked clone launched → QMP running, Hyperfold API (median of ${N}) | ${ms(median(api))} | ${ratio.toFixed(2)}× (target ≤ 1.20×) |`);

  // Disk used: the N linked clones (each booted briefly, so each holds a small delta) versus N
  // full copies made with the copy API from the first clone.
  let linkedBytes = 0;
  for (let i = 0; i < N; i++) linkedBytes += await allocated((await getInstance(d.api, `clone${i}`)).config.disks[0]!.path);
  const t0 = performance.now();
  let fullBytes = 0;
  for (let i = 0; i < N; i++) {
    const done = await op(d.api, 'POST', '/api/v1/instances/clone0/copy', { name: `full${i}` });
    if (done.status !== 'success') throw new Error(`copy failed: ${JSON.stringify(done.error)}`);
    fullBytes += await allocated((await getInstance(d.api, `full${i}`)).config.disks[0]!.path);
  }
  const copyMs = (performance.now() - t0) / N;
  let rawLinked = 0;
  for (const p of rawDisks) rawLinked += await allocated(p);
  rows.push(`| disk used by ${N} linked clones (stopped right after QMP running; the image's ${mib(await allocated(tiny))} shared) | ${mib(linkedBytes)} | raw \`qemu-img create -b\` overlays: ${mib(rawLinked)} |`);
  rows.push(`| disk used by ${N} full copies (copy API, flattened: image data + delta; ${ms(copyMs)} each) | ${mib(fullBytes)} | ${(fullBytes / Math.max(1, linkedBytes)).toFixed(1)}× the linked clones |`);
  for (let i = 0; i < N; i++) {
    await op(d.api, 'DELETE', `/api/v1/instances/clone${i}`);
    await op(d.api, 'DELETE', `/api/v1/instances/full${i}`);
  }
  await rm(rawDir, { recursive: true, force: true });
}

async function waitFile(path: string, re: RegExp, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const text = await readFile(path, 'utf8').catch(() => '');
    if (re.test(text)) return;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`${path} did not show ${re}`);
}

async function memorySnapshots(d: TestDaemon, rows: string[]): Promise<void> {
  await op(d.api, 'POST', '/api/v1/instances', { name: 'snapvm', image: 'tiny', memory: '256M', accel: 'tcg', start: true });
  await waitForConsole(d.api, 'snapvm', /HYPERFOLD-GUEST-READY/, 120_000);
  const inst = await getInstance(d.api, 'snapvm');

  // The baseline: the same argv on a copy-free overlay of its own, driven over QMP directly.
  const dir = join(d.dataDir, 'rawsnap');
  await mkdir(dir, { recursive: true });
  const disk = join(dir, 'root.qcow2');
  await new QemuImg().createOverlay(disk, join(d.dataDir, 'images', 'tiny', 'disk.qcow2'), 'qcow2');
  const qmpSocket = join(dir, 'qmp.sock');
  const consoleLog = join(dir, 'console.log');
  const argv = buildQemuArgv({
    instance: { ...inst, name: 'rawsnap', config: { ...inst.config, disks: [{ ...inst.config.disks[0]!, path: disk }] } },
    accel: 'tcg',
    qmpSocket,
    consoleSocket: join(dir, 'console.sock'),
    consoleLog,
    pidFile: join(dir, 'qemu.pid'),
  });
  const child = spawn('qemu-system-x86_64', argv, { stdio: 'ignore', detached: true });
  const client = await qmpRunning(qmpSocket);
  const qmp = new Qmp(client);
  await waitFile(consoleLog, /HYPERFOLD-GUEST-READY/, 120_000);
  const node = diskIds('root').formatNode;

  const apiSave: number[] = [];
  const apiLoad: number[] = [];
  const rawSave: number[] = [];
  const rawLoad: number[] = [];
  try {
    for (let i = 0; i < SNAP_RUNS; i++) {
      let t = performance.now();
      await qmp.snapshotSave({ jobId: `save${i}`, tag: `s${i}`, vmstate: node, devices: [node] });
      await qmp.waitForJob(`save${i}`, 300_000);
      rawSave.push(performance.now() - t);
      t = performance.now();
      await qmp.snapshotLoad({ jobId: `load${i}`, tag: `s${i}`, vmstate: node, devices: [node] });
      await qmp.waitForJob(`load${i}`, 300_000);
      rawLoad.push(performance.now() - t);

      t = performance.now();
      const c = await op(d.api, 'POST', '/api/v1/instances/snapvm/snapshots', { name: `s${i}`, memory: true });
      apiSave.push(performance.now() - t);
      if (c.status !== 'success') throw new Error(`snapshot failed: ${JSON.stringify(c.error)}`);
      t = performance.now();
      const r = await op(d.api, 'POST', `/api/v1/instances/snapvm/snapshots/s${i}/revert`);
      apiLoad.push(performance.now() - t);
      if (r.status !== 'success') throw new Error(`revert failed: ${JSON.stringify(r.error)}`);
    }
  } finally {
    await client.close();
    await killPid(child.pid!);
    await op(d.api, 'DELETE', '/api/v1/instances/snapvm?force=true');
    await rm(dir, { recursive: true, force: true });
  }
  const vmstate = 'booted 256 MiB guest';
  rows.push(`| snapshot --memory create, QMP snapshot-save job directly (${vmstate}, median of ${SNAP_RUNS}) | ${ms(median(rawSave))} | baseline |`);
  rows.push(`| snapshot --memory create, Hyperfold API | ${ms(median(apiSave))} | ${(median(apiSave) / median(rawSave)).toFixed(2)}× |`);
  rows.push(`| snapshot revert (memory), QMP snapshot-load job directly | ${ms(median(rawLoad))} | baseline |`);
  rows.push(`| snapshot revert (memory), Hyperfold API | ${ms(median(apiLoad))} | ${(median(apiLoad) / median(rawLoad)).toFixed(2)}× |`);
}

export async function run(): Promise<string> {
  const dataDir = await makeDataDir();
  const d = await startTestDaemon(dataDir);
  const rows: string[] = [];
  try {
    await clones(d, rows);
    await memorySnapshots(d, rows);
  } finally {
    await destroyDataDir(dataDir, d);
  }
  return ['| measurement | result | vs baseline |', '|---|---|---|', ...rows].join('\n');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(await run());
}
