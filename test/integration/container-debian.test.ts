// Slow (runs in CI): the debian-12 image is built with debootstrap from Debian's mirror (cached
// in the shared test cache, so only the first run downloads: about a minute), and a container
// from it boots sysvinit as PID 1 to runlevel 2, then shuts down cleanly on SIGPWR.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Operation } from '../../src/core/model/operation.js';
import { DEFAULT_RUNC_ROOT } from '../../src/drivers/container/driver.js';
import { TEST_CACHE } from '../helpers/image.js';
import { CLI, getInstance, op, operationProgress, startTestDaemon, stopTestDaemon, removeNetworkLeftovers, type TestDaemon } from '../helpers/daemon.js';

describe('debian-12 system container (slow)', { timeout: 8 * 60_000 }, () => {
  let dataDir: string;
  let d: TestDaemon;
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', dataDir, ...args], { encoding: 'utf8', timeout: 60_000 });

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'hf-deb-'));
    d = await startTestDaemon(dataDir, { HYPERFOLD_DEBOOTSTRAP_CACHE: join(TEST_CACHE, 'debootstrap'), HYPERFOLD_STOP_TIMEOUT_MS: '60000' });
  });
  after(async () => {
    if (d) await stopTestDaemon(d, 'SIGKILL');
    const r = spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'list', '--format', 'json'], { encoding: 'utf8' });
    const list = (r.stdout.trim() && r.stdout.trim() !== 'null' ? JSON.parse(r.stdout) : []) as Array<{ id: string; bundle: string }>;
    for (const c of list) if (c.bundle.startsWith(dataDir)) spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', c.id]);
    removeNetworkLeftovers(dataDir);
    await rm(dataDir, { recursive: true, force: true });
  });

  it('builds the image with debootstrap, with progress', async () => {
    const { operation } = await d.api.request<{ operation: Operation }>('POST', '/api/v1/images/debian-12/build', {});
    const done = await d.api.waitOperation(operation.id);
    assert.equal(done.status, 'success', JSON.stringify(done.error));
    const seen = await operationProgress(d, operation.id);
    assert.ok(seen.some((p) => p > 0 && p < 100), `intermediate progress was reported (${seen.join(',')})`);
    const { image } = await d.api.request<{ image: { type: string; rootfs: { path: string }; details: { init: string[] } } }>('GET', '/api/v1/images/debian-12');
    assert.equal(image.type, 'container');
    assert.deepEqual(image.details.init, ['/usr/local/sbin/hyperfold-init']);
  });

  it('boots sysvinit as PID 1 to runlevel 2 and stops cleanly', async () => {
    const l = cli('launch', 'debian-12', 'deb1', '--container', '--cpus', '1', '--memory', '256M');
    assert.equal(l.status, 0, l.stderr);
    assert.equal(cli('exec', 'deb1', '--', 'cat', '/proc/1/comm').stdout.trim(), 'init');
    const deadline = Date.now() + 60_000;
    let runlevel = '';
    while (Date.now() < deadline) {
      runlevel = cli('exec', 'deb1', '--', 'runlevel').stdout.trim();
      if (/\b2$/.test(runlevel)) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    assert.match(runlevel, /\b2$/, 'init reached runlevel 2');
    assert.match(cli('exec', 'deb1', '--', 'cat', '/etc/debian_version').stdout, /^12\./);
    const ps = cli('exec', 'deb1', '--', 'ps', '-e', '-o', 'pid=,comm=').stdout;
    assert.match(ps, /^\s*1 init$/m);
    const pid = (await getInstance(d.api, 'deb1')).runtime!.pid;
    const stopped = await op(d.api, 'POST', '/api/v1/instances/deb1/stop', { timeout: 60 });
    assert.equal(stopped.status, 'success', JSON.stringify(stopped.error));
    assert.doesNotMatch(JSON.stringify(stopped.messages), /forcing/, 'sysvinit shut down on SIGPWR by itself');
    const inst = await getInstance(d.api, 'deb1');
    assert.equal(inst.state, 'stopped');
    assert.equal(inst.lastExit?.clean, true);
    assert.notEqual(inst.runtime?.pid, pid);
  });
});
