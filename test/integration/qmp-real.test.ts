// QMP client against a real QEMU (TCG, no guest, started paused with -S).
//   npx tsc -p . ; node --test dist/test/integration/qmp-real.test.js
// Skipped when qemu-system-x86_64 is not installed.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { isHfError, type HfError } from '../../src/core/errors.js';
import { QmpClient, type QmpDisconnectInfo } from '../../src/drivers/qemu/qmp/client.js';
import { Qmp } from '../../src/drivers/qemu/qmp/commands.js';
import { QmpLog } from '../../src/drivers/qemu/qmp/log.js';

const QEMU = 'qemu-system-x86_64';
const haveQemu = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0;
const haveQemuImg = spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status === 0;

const children = new Set<ChildProcess>();
const dirs: string[] = [];
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

interface Vm {
  proc: ChildProcess;
  dir: string;
  socket: string;
  /** performance.now() right before spawn. */
  spawnedAt: number;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
}

function spawnQemu(): Vm {
  const dir = mkdtempSync(join(tmpdir(), 'hf-qmp-real-'));
  dirs.push(dir);
  const socket = join(dir, 'qmp.sock');
  const spawnedAt = performance.now();
  const proc = spawn(
    QEMU,
    ['-accel', 'tcg', '-machine', 'q35', '-nodefaults', '-no-user-config', '-display', 'none', '-m', '64', '-S', '-qmp', `unix:${socket},server=on,wait=off`],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  children.add(proc);
  let err = '';
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.once('exit', (code, signal) => {
      children.delete(proc);
      resolve({ code, signal });
    }),
  );
  return { proc, dir, socket, spawnedAt, exited, stderr: () => err };
}

async function stopVm(vm: Vm, client?: QmpClient): Promise<void> {
  if (client && !client.closed) await new Qmp(client).quit().catch(() => undefined);
  const t = setTimeout(() => vm.proc.kill('SIGKILL'), 3000);
  await vm.exited;
  clearTimeout(t);
}

describe('QMP against real QEMU', { skip: haveQemu ? false : `${QEMU} not installed`, timeout: 60_000 }, () => {
  it('handshake, run state, events, errors, quit', async () => {
    const vm = spawnQemu();
    const log = new QmpLog({ capacity: 100 });
    const client = await QmpClient.connect(vm.socket, { retryUntilMs: 10_000, log });
    const qmp = new Qmp(client);
    try {
      assert.ok(client.greeting.QMP.version.qemu.major >= 7);
      assert.ok(client.greeting.QMP.capabilities.includes('oob'));

      const st = await qmp.queryStatus();
      assert.equal(st.status, 'prelaunch');
      assert.equal(st.running, false);

      const v = await qmp.queryVersion();
      assert.ok(v.qemu.major >= 7, `QEMU ${v.qemu.major}.${v.qemu.minor}`);
      assert.equal(typeof v.package, 'string');

      const kvm = await qmp.queryKvm();
      assert.equal(kvm.enabled, false, 'TCG');
      const cpus = await qmp.queryCpusFast();
      assert.equal(cpus.length, 1);
      assert.ok(cpus[0]!['thread-id'] > 0);
      assert.equal((await qmp.queryMemorySizeSummary())['base-memory'], 64 * 1024 * 1024);

      const resumed = client.waitForEvent('RESUME', 5000);
      await qmp.cont();
      await resumed;
      assert.deepEqual(await qmp.queryStatus().then((s) => [s.status, s.running]), ['running', true]);

      const stopped = client.waitForEvent('STOP', 5000);
      await qmp.stop();
      await stopped;
      assert.deepEqual(await qmp.queryStatus().then((s) => [s.status, s.running]), ['paused', false]);

      let err: HfError | undefined;
      await client.run('no-such-command').catch((e: unknown) => {
        if (isHfError(e)) err = e;
      });
      assert.equal(err?.code, 'HF_ERR_QMP_COMMAND');
      assert.equal(err?.details?.class, 'CommandNotFound');
      const balloon = await qmp.queryBalloon().catch((e: unknown) => e);
      assert.ok(isHfError(balloon, 'HF_ERR_QMP_COMMAND'));
      assert.equal(balloon.details?.class, 'DeviceNotActive');
      assert.equal(await client.isAlive(), true);

      // QEMU serves one QMP client at a time: a second one gets no greeting.
      const second = await QmpClient.connect(vm.socket, { connectTimeoutMs: 300 }).catch((e: unknown) => e);
      assert.ok(isHfError(second, 'HF_ERR_QMP_TIMEOUT'), String(second));

      assert.match(await qmp.humanMonitorCommand('info version'), /^\d+\.\d+/);

      // concurrent commands over the real socket
      const many = await Promise.all([qmp.queryStatus(), qmp.queryVersion(), qmp.queryKvm(), qmp.queryCpusFast(), qmp.queryStatus()]);
      assert.equal(many[0].status, 'paused');
      assert.equal(many[1].qemu.major, v.qemu.major);

      const disconnects: QmpDisconnectInfo[] = [];
      client.on('disconnect', (i) => disconnects.push(i));
      const shutdown = client.waitForEvent('SHUTDOWN', 5000);
      await qmp.quit();
      assert.equal((await shutdown).data.reason, 'host-qmp-quit');
      await client.whenClosed;
      const exit = await vm.exited;
      assert.equal(exit.code, 0, vm.stderr());
      assert.equal(disconnects.length, 1);
      assert.equal(disconnects[0]!.initiatedByClient, false);
      assert.equal(await client.isAlive(), false);

      const kinds = new Set(log.entries().map((e) => e.kind));
      for (const k of ['greeting', 'command', 'reply', 'error', 'event', 'disconnect'] as const) assert.ok(kinds.has(k), `log has ${k}`);
    } finally {
      await client.close();
      await stopVm(vm);
    }
  });

  it('a killed QEMU rejects pending commands with HF_ERR_QMP_DISCONNECTED', async () => {
    const vm = spawnQemu();
    const client = await QmpClient.connect(vm.socket, { retryUntilMs: 10_000 });
    const disconnected = new Promise<QmpDisconnectInfo>((r) => client.once('disconnect', r));
    const waiting = client.waitForEvent('NEVER', 30_000);
    vm.proc.kill('SIGKILL');
    const e = await waiting.catch((err: unknown) => err);
    assert.ok(isHfError(e, 'HF_ERR_QMP_DISCONNECTED'));
    assert.equal((await disconnected).initiatedByClient, false);
    const r = await client.run('query-status').catch((err: unknown) => err);
    assert.ok(isHfError(r, 'HF_ERR_QMP_DISCONNECTED'));
    await stopVm(vm);
  });

  it('blockdev-add, block_resize and an internal snapshot job', { skip: haveQemuImg ? false : 'qemu-img not installed' }, async () => {
    const vm = spawnQemu();
    const img = join(vm.dir, 'disk0.qcow2');
    assert.equal(spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']).status, 0);
    const client = await QmpClient.connect(vm.socket, { retryUntilMs: 10_000 });
    const qmp = new Qmp(client);
    try {
      await qmp.blockdevAdd({ driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
      await qmp.blockResize('disk0', 32 * 1024 * 1024);
      await qmp.snapshotSave({ jobId: 'save1', tag: 'snap1', vmstate: 'disk0', devices: ['disk0'] });
      const job = await qmp.waitForJob('save1', 30_000);
      assert.equal(job.type, 'snapshot-save');
      assert.match(await qmp.humanMonitorCommand('info snapshots'), /snap1/);
      await qmp.snapshotLoad({ jobId: 'load1', tag: 'snap1', vmstate: 'disk0', devices: ['disk0'] });
      await qmp.waitForJob('load1', 30_000);
      await qmp.snapshotDelete({ jobId: 'del1', tag: 'snap1', devices: ['disk0'] });
      await qmp.waitForJob('del1', 30_000);
      assert.doesNotMatch(await qmp.humanMonitorCommand('info snapshots'), /snap1/);
      // a failing job: unknown tag
      await qmp.snapshotLoad({ jobId: 'load2', tag: 'nope', vmstate: 'disk0', devices: ['disk0'] });
      const failed = await qmp.waitForJob('load2', 30_000).catch((e: unknown) => e);
      assert.ok(isHfError(failed, 'HF_ERR_QMP_COMMAND'));
      assert.equal(failed.details?.class, 'JobFailed');
      assert.deepEqual(await qmp.queryJobs(), [], 'jobs dismissed');
      await qmp.blockdevDel('disk0');
    } finally {
      await stopVm(vm, client);
      await client.close();
    }
  });

  it('measures spawn → first successful query-status', async (t) => {
    const runs = 5;
    const times: number[] = [];
    for (let i = 0; i < runs; i++) {
      const vm = spawnQemu();
      const client = await QmpClient.connect(vm.socket, { retryUntilMs: 10_000 });
      const st = await new Qmp(client).queryStatus();
      times.push(performance.now() - vm.spawnedAt);
      assert.equal(st.status, 'prelaunch');
      await stopVm(vm, client);
      await client.close();
    }
    const sorted = times.slice().sort((a, b) => a - b);
    const median = sorted[Math.floor(sorted.length / 2)]!;
    t.diagnostic(`spawn→query-status over ${runs} runs: median ${median.toFixed(1)} ms; all ${sorted.map((x) => x.toFixed(1)).join(', ')} ms`);
    assert.ok(median < 10_000);
  });
});
