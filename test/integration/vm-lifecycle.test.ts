// A real tiny VM under TCG through the real daemon: launch, console, pause/resume, graceful
// stop, state across a daemon restart, and the state errors a user can hit on the way.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readProcStat } from '../../src/util/proc.js';
import { ApiError } from '../../src/cli/client.js';
import type { Instance } from '../../src/core/model/instance.js';
import {
  CLI,
  consoleRun,
  getInstance,
  op,
  startTestDaemon,
  stopTestDaemon,
  waitForConsole,
  useTestDaemon,
} from '../helpers/daemon.js';

describe('VM lifecycle with real QEMU (TCG)', () => {
  const t = useTestDaemon();

  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, ...args], { encoding: 'utf8', timeout: 120_000 });

  it('launches from the tiny image with the CLI and the guest reaches its ready marker', async () => {
    const r = cli('launch', 'tiny', 'web1', '--cpus', '1', '--memory', '256M', '--accel', 'tcg');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /launched vm web1 \(running\)/);
    const inst = await getInstance(t.d.api, 'web1');
    assert.equal(inst.state, 'running');
    assert.equal(inst.runtime?.accel, 'tcg');
    assert.equal(inst.config.memoryMiB, 256);
    assert.ok(inst.runtime && readProcStat(inst.runtime.pid), 'the QEMU process exists');
    const log = await waitForConsole(t.d.api, 'web1', /HYPERFOLD-GUEST-READY/);
    assert.match(log, /HYPERFOLD-GUEST-READY/);
    // The list shows it, as a table and as JSON.
    const list = cli('list');
    assert.match(list.stdout, /web1\s+vm\s+running\s+1\s+256MiB\s+tiny/);
    const json = JSON.parse(cli('list', '--format', 'json').stdout) as Instance[];
    assert.deepEqual(json.map((i) => i.name), ['web1']);
    // The log is readable with the CLI too.
    assert.match(cli('console', 'web1', '--log').stdout, /HYPERFOLD-GUEST-READY/);
  });

  it('refuses to start a running VM and to delete it without --force', async () => {
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/web1/start', {}), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_RUNNING' && e.status === 409);
    await assert.rejects(t.d.api.request('DELETE', '/api/v1/instances/web1'), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_RUNNING');
    const r = cli('delete', 'web1');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /HF_ERR_INSTANCE_RUNNING/);
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'running');
  });

  it('answers on the interactive console (websocket)', async () => {
    const got = await consoleRun(t.d.api, 'web1', 'echo hf-$((6*7))-ok', 30_000);
    assert.match(got, /hf-42-ok/);
  });

  it('pauses and resumes', async () => {
    const paused = await op(t.d.api, 'POST', '/api/v1/instances/web1/pause', {});
    assert.equal(paused.status, 'success', JSON.stringify(paused.error));
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'paused');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/web1/pause', {}), (e: ApiError) => e.code === 'HF_ERR_INVALID_STATE' || e.code === 'HF_ERR_INSTANCE_NOT_RUNNING');
    const resumed = await op(t.d.api, 'POST', '/api/v1/instances/web1/resume', {});
    assert.equal(resumed.status, 'success');
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'running');
  });

  it('answers an action finished in one round trip with ?wait, and refuses a bad ?wait before acting', async () => {
    const bad = await t.d.api.raw('POST', '/api/v1/instances/web1/pause?wait=soon', {});
    assert.equal(bad.status, 400, bad.text);
    assert.equal((JSON.parse(bad.text) as { error: { code: string } }).error.code, 'HF_ERR_VALIDATION');
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'running', 'nothing was done');
    const paused = await t.d.api.raw('POST', '/api/v1/instances/web1/pause?wait=30', {});
    assert.equal(paused.status, 200, paused.text);
    assert.equal((JSON.parse(paused.text) as { operation: { status: string; type: string } }).operation.status, 'success');
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'paused');
    const resumed = await t.d.api.raw('POST', '/api/v1/instances/web1/resume', {});
    assert.equal(resumed.status, 202, 'without ?wait the answer comes at once');
    const id = (JSON.parse(resumed.text) as { operation: { id: string } }).operation.id;
    assert.equal((await t.d.api.waitOperation(id)).status, 'success');
    const cli1 = cli('pause', 'web1');
    assert.equal(cli1.status, 0, cli1.stderr);
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'paused');
    assert.equal(cli('resume', 'web1').status, 0);
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'running');
  });

  it('stops gracefully (ACPI power-down) and records a clean exit', async () => {
    const pid = (await getInstance(t.d.api, 'web1')).runtime!.pid;
    const stopped = await op(t.d.api, 'POST', '/api/v1/instances/web1/stop', { timeout: 60 });
    assert.equal(stopped.status, 'success', JSON.stringify(stopped.error));
    const inst = await getInstance(t.d.api, 'web1');
    assert.equal(inst.state, 'stopped');
    assert.equal(inst.runtime, undefined);
    assert.equal(inst.lastExit?.clean, true);
    // The guest powered off by itself: no forced stop was needed.
    assert.doesNotMatch(JSON.stringify(stopped.messages), /forcing/);
    const st = readProcStat(pid);
    assert.ok(!st || st.state === 'Z', 'QEMU is gone');
  });

  it('keeps the state across a daemon restart', async () => {
    const before = await getInstance(t.d.api, 'web1');
    await stopTestDaemon(t.d);
    t.d = await startTestDaemon(t.dataDir);
    const afterRestart = await getInstance(t.d.api, 'web1');
    assert.equal(afterRestart.state, 'stopped');
    assert.equal(afterRestart.id, before.id);
    assert.deepEqual(afterRestart.config, before.config);
  });

  it('starts again, is stopped by force, and is deleted with nothing left', async () => {
    const started = await op(t.d.api, 'POST', '/api/v1/instances/web1/start', {});
    assert.equal(started.status, 'success', JSON.stringify(started.error));
    const pid = (await getInstance(t.d.api, 'web1')).runtime!.pid;
    const killed = await op(t.d.api, 'POST', '/api/v1/instances/web1/stop', { force: true });
    assert.equal(killed.status, 'success');
    assert.equal((await getInstance(t.d.api, 'web1')).state, 'stopped');
    const st = readProcStat(pid);
    assert.ok(!st || st.state === 'Z');
    const del = await op(t.d.api, 'DELETE', '/api/v1/instances/web1');
    assert.equal(del.status, 'success');
    await assert.rejects(getInstance(t.d.api, 'web1'), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_NOT_FOUND' && e.status === 404);
    const { existsSync } = await import('node:fs');
    assert.equal(existsSync(`${t.dataDir}/instances/web1`), false, 'instance directory removed');
  });
});
