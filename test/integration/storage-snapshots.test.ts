// Snapshots of a real tiny VM under TCG: a marker on the disk survives a disk-only snapshot +
// revert; a counter running in guest RAM resumes from its snapshot value after a --memory
// revert; the tree, deletes, offline snapshots and the refusals (raw disk, unknown snapshot,
// --memory of a stopped VM). Two guest boots.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { ApiError } from '../../src/cli/client.js';
import type { SnapshotListing } from '../../src/storage/model.js';
import { QemuImg } from '../../src/storage/qemu-img.js';
import { getInstance, op, useTestDaemon, CLI } from '../helpers/daemon.js';
import { guestSh, waitForBoot } from './storage-guest.js';

describe('snapshots with real QEMU (TCG)', () => {
  const t = useTestDaemon();
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, ...args], { encoding: 'utf8', timeout: 180_000 });
  const list = (name: string) => t.d.api.request<SnapshotListing>('GET', `/api/v1/instances/${name}/snapshots`);
  const counter = async (): Promise<number> => Number((await guestSh(t.d.api, 'snap1', 'cat /tmp/counter')).trim());

  it('disk-only: marker written, snapshot, marker changed, revert, original marker back', async () => {
    const r = cli('launch', 'tiny', 'snap1', '--accel', 'tcg', '--memory', '256M');
    assert.equal(r.status, 0, r.stderr);
    await waitForBoot(t.d.api, 'snap1', 1);
    assert.equal((await guestSh(t.d.api, 'snap1', 'echo marker-one > /mnt/marker; sync; cat /mnt/marker')).trim(), 'marker-one');

    const c = cli('snapshot', 'create', 'snap1', 'before');
    assert.equal(c.status, 0, c.stderr);
    assert.match(c.stdout, /snapshot before of snap1 created/);
    assert.equal((await guestSh(t.d.api, 'snap1', 'echo marker-two > /mnt/marker; sync; cat /mnt/marker')).trim(), 'marker-two');

    // The snapshot is in the disk image (internal) and in the tree.
    const root = (await getInstance(t.d.api, 'snap1')).config.disks[0]!.path;
    assert.deepEqual((await new QemuImg().snapshotList(root)).map((s) => s.name), ['before']);
    assert.equal((await list('snap1')).current, 'before');

    // Reverting a disk-only snapshot of a running VM restarts it on the reverted disk.
    const rv = cli('snapshot', 'revert', 'snap1', 'before');
    assert.equal(rv.status, 0, rv.stderr);
    assert.equal((await getInstance(t.d.api, 'snap1')).state, 'running');
    await waitForBoot(t.d.api, 'snap1', 2);
    assert.equal((await guestSh(t.d.api, 'snap1', 'cat /mnt/marker')).trim(), 'marker-one');
  });

  it('--memory: a counter in guest RAM resumes from the snapshot value after revert', async () => {
    await guestSh(t.d.api, 'snap1', '(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 1; done) </dev/null >/dev/null 2>&1 &');
    let before = 0;
    for (let i = 0; i < 40 && before < 3; i++) {
      await new Promise((r) => setTimeout(r, 500));
      before = await counter().catch(() => 0);
    }
    assert.ok(before >= 3, `the counter runs (${before})`);
    const created = await op(t.d.api, 'POST', '/api/v1/instances/snap1/snapshots', { name: 'running', memory: true });
    assert.equal(created.status, 'success', JSON.stringify(created.error));
    const atSnapshot = await counter();
    assert.ok(atSnapshot >= before);

    // Let it run on well past the snapshot value.
    let later = atSnapshot;
    for (let i = 0; i < 60 && later < atSnapshot + 6; i++) {
      await new Promise((r) => setTimeout(r, 500));
      later = await counter();
    }
    assert.ok(later >= atSnapshot + 6, `the counter went on (${atSnapshot} -> ${later})`);

    const reverted = await op(t.d.api, 'POST', '/api/v1/instances/snap1/snapshots/running/revert');
    assert.equal(reverted.status, 'success', JSON.stringify(reverted.error));
    assert.deepEqual((reverted.result as { memory: boolean }).memory, true);
    const after = await counter();
    // Back to the saved moment (plus the seconds the revert and this read took), not where it was.
    assert.ok(after >= before && after < later, `counter after revert ${after}: snapshot ${atSnapshot}, before revert ${later}`);
    assert.ok(after <= atSnapshot + 4, `counter resumed from the snapshot value (${after} vs ${atSnapshot})`);
    // The same processes go on running: it keeps counting from there.
    await new Promise((r) => setTimeout(r, 3000));
    assert.ok((await counter()) > after, 'the counter keeps running after the revert');
    // No restart happened: still the second boot.
    const log = await t.d.api.request<string>('GET', '/api/v1/instances/snap1/console/log?bytes=1048576');
    assert.equal((log.match(/^HYPERFOLD-GUEST-READY/gm) ?? []).length, 2);
  });

  it('shows the tree, takes offline snapshots, deletes with re-parenting', async () => {
    const stopped = await op(t.d.api, 'POST', '/api/v1/instances/snap1/stop', { force: true });
    assert.equal(stopped.status, 'success');
    const off = await op(t.d.api, 'POST', '/api/v1/instances/snap1/snapshots', { name: 'offline' });
    assert.equal(off.status, 'success', JSON.stringify(off.error));
    const l = await list('snap1');
    assert.deepEqual(l.snapshots.map((s) => [s.name, s.parent ?? null]).sort(), [['before', null], ['offline', 'running'], ['running', 'before']].sort());
    assert.equal(l.current, 'offline');
    const text = cli('snapshot', 'list', 'snap1').stdout;
    assert.match(text, /^before \(disk, running/m);
    assert.match(text, /└── running \(memory, running/);
    assert.match(text, /offline \(disk, stopped.*<- current/);

    // Revert offline (qemu-img) to "before", then delete "running": "offline" moves up to "before".
    const rv = await op(t.d.api, 'POST', '/api/v1/instances/snap1/snapshots/before/revert');
    assert.equal(rv.status, 'success', JSON.stringify(rv.error));
    assert.equal((await getInstance(t.d.api, 'snap1')).state, 'stopped', 'an offline revert does not start the VM');
    const del = cli('snapshot', 'delete', 'snap1', 'running');
    assert.equal(del.status, 0, del.stderr);
    const l2 = await list('snap1');
    assert.deepEqual(l2.snapshots.map((s) => [s.name, s.parent ?? null]).sort(), [['before', null], ['offline', 'before']]);
    assert.equal(l2.current, 'before');
    const root = (await getInstance(t.d.api, 'snap1')).config.disks[0]!.path;
    assert.deepEqual((await new QemuImg().snapshotList(root)).map((s) => s.name).sort(), ['before', 'offline']);
  });

  it('refuses: unknown snapshot, duplicate, bad name, --memory of a stopped VM, raw disks', async () => {
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/snap1/snapshots/nope/revert'), (e: ApiError) => e.code === 'HF_ERR_SNAPSHOT_NOT_FOUND' && e.status === 404 && /has no snapshot "nope" \(it has: before, offline\)/.test(e.message));
    const r = cli('snapshot', 'revert', 'snap1', 'nope');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /HF_ERR_SNAPSHOT_NOT_FOUND/);
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/snap1/snapshots', { name: 'before' }), (e: ApiError) => e.code === 'HF_ERR_ALREADY_EXISTS');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/snap1/snapshots', { name: '../x' }), (e: ApiError) => e.code === 'HF_ERR_INVALID_NAME');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/snap1/snapshots', { name: 'm', memory: true }), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_NOT_RUNNING');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/ghost/snapshots', { name: 'x' }), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_NOT_FOUND');

    // A VM with a raw disk: a clear refusal naming the disk, nothing recorded, nothing written.
    await t.d.api.request('POST', '/api/v1/instances', { name: 'rawvm', image: 'tiny', accel: 'tcg' });
    await t.d.api.request('POST', '/api/v1/storage/pools/default/volumes', { name: 'rawdata', size: '16M', format: 'raw' });
    await t.d.api.request('POST', '/api/v1/instances/rawvm/volumes', { volume: 'default/rawdata', disk: 'data' });
    await assert.rejects(
      t.d.api.request('POST', '/api/v1/instances/rawvm/snapshots', { name: 's' }),
      (e: ApiError) => e.code === 'HF_ERR_UNSUPPORTED' && /disk data .* is raw, and only qcow2 disks hold internal snapshots/.test(e.message),
    );
    assert.deepEqual((await list('rawvm')).snapshots, []);
    const rawRoot = (await getInstance(t.d.api, 'rawvm')).config.disks[0]!.path;
    assert.deepEqual(await new QemuImg().snapshotList(rawRoot), [], 'the qcow2 root got no half snapshot');
  });

  it('drops snapshot records with their instance', async () => {
    const del = await op(t.d.api, 'DELETE', '/api/v1/instances/snap1');
    assert.equal(del.status, 'success', JSON.stringify(del.error));
    await t.d.api.request('POST', '/api/v1/instances', { name: 'snap1', image: 'tiny', accel: 'tcg' });
    const l = await list('snap1');
    assert.deepEqual(l.snapshots, []);
    assert.equal(l.current, undefined);
  });
});
