// A launch interrupted by a daemon SIGKILL converges to what the user asked for. The daemon kills
// itself at each failpoint of a launch (HYPERFOLD_FAILPOINTS, see src/util/failpoint.ts), for a
// VM and for a container; after the restart the instance runs exactly once (or, killed before its
// record existed, nothing of it is left), it is not reported as a crash, and the launch's
// operation is not left running. A failure after QEMU's spawn (not a kill) leaves no QEMU, no
// socket and no tap.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import { DEFAULT_RUNC_ROOT } from '../../src/drivers/container/driver.js';
import { DEFAULT_RUN_DIR } from '../../src/drivers/qemu/driver.js';
import { INTERRUPTED_START } from '../../src/services/instances/supervisor.js';
import { FAILPOINTS } from '../../src/util/failpoint.js';
import { isProcessAlive } from '../../src/util/proc.js';
import { destroyDataDir, getInstance, makeDataDir, op, startTestDaemon, stopTestDaemon, waitForState, type TestDaemon } from '../helpers/daemon.js';

const KINDS = [
  { short: 'v', body: { image: 'tiny', memory: '128M', accel: 'tcg' } },
  { short: 'c', body: { type: 'container', image: 'busybox', memory: '32M' } },
] as const;

/** Live processes whose command line contains `needle` (QEMU's names its instance id and disk paths). */
function processesWith(needle: string): number[] {
  const out: number[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^[0-9]+$/.test(p)) continue;
    let cmd = '';
    try {
      cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if (cmd.includes(needle) && Number(p) !== process.pid && isProcessAlive(Number(p))) out.push(Number(p));
  }
  return out;
}

/** runc containers whose bundle is `dir`. */
function containersAt(dir: string): Array<{ id: string; status: string }> {
  const r = spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'list', '--format', 'json'], { encoding: 'utf8' });
  const list = (r.stdout.trim() && r.stdout.trim() !== 'null' ? JSON.parse(r.stdout) : []) as Array<{ id: string; bundle: string; status: string }>;
  return list.filter((c) => c.bundle === dir);
}

function removeContainersOf(dataDir: string): void {
  for (const c of containersAt(join(dataDir, 'instances'))) spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', c.id]);
  const r = spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'list', '--format', 'json'], { encoding: 'utf8' });
  const list = (r.stdout.trim() && r.stdout.trim() !== 'null' ? JSON.parse(r.stdout) : []) as Array<{ id: string; bundle: string }>;
  for (const c of list) if (c.bundle.startsWith(dataDir)) spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', c.id]);
}

/** Resolves with the signal that ended the daemon; fails if it is still alive after `timeoutMs`. */
function died(d: TestDaemon, timeoutMs: number): Promise<NodeJS.Signals | null> {
  if (d.proc.exitCode !== null || d.proc.signalCode !== null) return Promise.resolve(d.proc.signalCode);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the daemon did not reach its failpoint within ${timeoutMs} ms:\n${d.output().slice(-2000)}`)), timeoutMs);
    d.proc.once('exit', (_code, signal) => {
      clearTimeout(timer);
      resolve(signal);
    });
  });
}

describe('a launch interrupted by a daemon SIGKILL converges after the restart', () => {
  let dataDir = '';
  let d: TestDaemon | undefined;

  before(async () => {
    dataDir = await makeDataDir();
  });
  after(async () => {
    if (d) await stopTestDaemon(d, 'SIGKILL');
    removeContainersOf(dataDir);
    await destroyDataDir(dataDir);
  });

  let n = 0;
  for (const point of FAILPOINTS) {
    for (const kind of KINDS) {
      it(`${kind.short === 'v' ? 'VM' : 'container'}: daemon killed at ${point}`, async () => {
        const name = `${kind.short}${++n}`;
        const dir = join(dataDir, 'instances', name);
        d = await startTestDaemon(dataDir, { HYPERFOLD_FAILPOINTS: `${point}=kill` });
        // The answer may or may not arrive before the daemon dies: what counts is what happens after.
        const dying = died(d, 120_000);
        await d.api.request('POST', '/api/v1/instances', { name, ...kind.body, start: true }).catch(() => undefined);
        assert.equal(await dying, 'SIGKILL');

        d = await startTestDaemon(dataDir);
        if (point === 'launch.before-record') {
          // Nothing was recorded: nothing of the create may stay (it would block the name).
          await assert.rejects(getInstance(d.api, name), /not found/);
          assert.equal(existsSync(dir), false, 'the instance directory of the unfinished create is removed');
          assert.deepEqual(processesWith(dir + '/'), [], 'no QEMU of it');
          assert.deepEqual(containersAt(dir), [], 'no container of it');
        } else {
          const inst: Instance = await waitForState(d.api, name, 'running', 120_000);
          assert.equal(inst.desired, 'running');
          assert.equal(inst.lastExit?.reason, INTERRUPTED_START, 'an interrupted start, not a crash');
          assert.equal(inst.lastExit?.clean, true);
          assert.equal(inst.restartCount, 0);
          if (kind.short === 'v') {
            assert.deepEqual(processesWith(inst.id), [inst.runtime!.pid], 'exactly one QEMU, the recorded one');
          } else {
            assert.ok(isProcessAlive(inst.runtime!.pid, inst.runtime!.pidStartTime), 'the recorded init runs');
            assert.deepEqual(containersAt(dir).map((c) => `${c.id}:${c.status}`), [`${inst.id}:running`], 'exactly one container');
          }
          const ops = (await d.api.request<{ operations: Operation[] }>('GET', '/api/v1/operations')).operations.filter((o) => o.target.name === name);
          assert.deepEqual(ops.filter((o) => o.status === 'running'), [], 'no operation left running');
          assert.ok(ops.some((o) => o.type === 'instance.start' && o.status === 'failure' && /daemon stopped/.test(o.error?.message ?? '')), 'the interrupted launch failed');
          assert.ok(ops.some((o) => o.type === 'instance.start' && o.status === 'success'), 'the start that converged');
          assert.equal((await op(d.api, 'DELETE', `/api/v1/instances/${name}?force=true`)).status, 'success');
        }
        await stopTestDaemon(d);
        d = undefined;
      });
    }
  }

  it('a VM start failing after the spawn leaves no QEMU, no socket and no tap', async () => {
    d = await startTestDaemon(dataDir, { HYPERFOLD_FAILPOINTS: 'launch.after-spawn=error' });
    const res = await d.api.request<{ instance: Instance; operation: Operation }>('POST', '/api/v1/instances', { name: 'e1', ...KINDS[0].body, nics: [{ network: 'default' }], start: true });
    const done = await d.api.waitOperation(res.operation.id);
    assert.equal(done.status, 'failure');
    assert.match(done.error?.message ?? '', /failpoint launch.after-spawn/);
    const inst = await getInstance(d.api, 'e1');
    assert.equal(inst.state, 'stopped');
    assert.deepEqual(processesWith(inst.id), [], 'QEMU was killed');
    assert.equal(existsSync(join(DEFAULT_RUN_DIR, inst.id)), false, 'its socket directory is gone');
    assert.equal(existsSync(join(dir(dataDir, 'e1'), 'qemu.pid')), false, 'its pid file is gone');
    const tap = inst.config.nics[0]?.hostIface;
    assert.ok(tap, 'the NIC had a tap');
    assert.equal(spawnSync('ip', ['link', 'show', 'dev', tap]).status !== 0, true, `tap ${tap} is removed`);
    await stopTestDaemon(d);
    d = undefined;
  });
});

function dir(dataDir: string, name: string): string {
  return join(dataDir, 'instances', name);
}
