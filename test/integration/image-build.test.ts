// `hyperfold image build tiny` through the daemon: an operation with progress, then a usable image.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { link, mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Operation } from '../../src/core/model/operation.js';
import type { ImageRecord } from '../../src/core/model/image.js';
import { CLI, operationProgress, useTestDaemon } from '../helpers/daemon.js';
import { TEST_CACHE } from '../helpers/image.js';

describe('image build', () => {
  const t = useTestDaemon();

  it('rebuilds the tiny image as an operation with progress, visible in operation list', async () => {
    // Reuse the kernel package already downloaded for the test suite (no second download).
    await mkdir(join(t.dataDir, 'cache'), { recursive: true });
    for (const f of await readdir(TEST_CACHE)) {
      if (f.endsWith('.deb')) await link(join(TEST_CACHE, f), join(t.dataDir, 'cache', f)).catch(() => undefined);
    }
    const before = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/tiny')).image;
    const { operation } = await t.d.api.request<{ operation: Operation }>('POST', '/api/v1/images/tiny/build', {});
    assert.equal(operation.type, 'image.build');
    const done = await t.d.api.waitOperation(operation.id);
    assert.equal(done.status, 'success', JSON.stringify(done.error));
    const seen = await operationProgress(t.d, operation.id);
    assert.ok(seen.some((p) => p > 0 && p < 100), `intermediate progress was reported (${[...seen].join(',')})`);
    const after = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/tiny')).image;
    assert.notEqual(after.createdAt, before.createdAt, 'a new build');
    assert.equal(after.source, 'builtin');
    // A second build while one runs is refused with a clear error.
    const again = await t.d.api.request<{ operation: Operation }>('POST', '/api/v1/images/tiny/build', {});
    await assert.rejects(t.d.api.request('POST', '/api/v1/images/tiny/build', {}), (e: Error & { code?: string }) => e.code === 'HF_ERR_BUSY');
    await t.d.api.waitOperation(again.operation.id);

    const list = spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, 'operation', 'list'], { encoding: 'utf8' });
    assert.equal(list.status, 0, list.stderr);
    assert.match(list.stdout, new RegExp(`${operation.id}\\s+image.build\\s+tiny\\s+success\\s+100%`));
    const show = spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, 'operation', 'wait', operation.id], { encoding: 'utf8' });
    assert.match(show.stdout, /Status:\s+success/);
    const images = spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, 'image', 'list'], { encoding: 'utf8' });
    assert.match(images.stdout, /tiny\s+vm\s+builtin/);
    const host = spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, 'host', 'info'], { encoding: 'utf8' });
    assert.match(host.stdout, /KVM:\s+(usable|NOT usable): \S/);
    assert.match(host.stdout, /Default:\s+(kvm|tcg)/);
  });

  it('while a missing image is being built, a create says so (HF_ERR_IMAGE_BUILDING) and `launch` waits for the build', async () => {
    await t.d.api.request('DELETE', '/api/v1/images/tiny');
    const { operation } = await t.d.api.request<{ operation: Operation }>('POST', '/api/v1/images/tiny/build', {});
    await assert.rejects(
      t.d.api.request('POST', '/api/v1/instances', { name: 'early', image: 'tiny', memory: '64M' }),
      (e: Error & { code?: string; details?: { operation?: string } }) => e.code === 'HF_ERR_IMAGE_BUILDING' && e.details?.operation === operation.id,
    );
    const launch = spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, 'launch', 'tiny', 'early', '--memory', '64M', '--accel', 'tcg'], { encoding: 'utf8', timeout: 300_000 });
    assert.equal(launch.status, 0, launch.stderr);
    assert.match(launch.stderr, new RegExp(`image tiny is being built \\(operation ${operation.id}\\): waiting`));
    assert.equal((await t.d.api.waitOperation(operation.id)).status, 'success');
    assert.equal((await t.d.api.request<{ instance: { state: string } }>('GET', '/api/v1/instances/early')).instance.state, 'running');
  });
});
