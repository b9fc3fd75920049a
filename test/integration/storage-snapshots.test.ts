// Snapshots of a real tiny VM under TCG: a marker on the disk survives a disk-only snapshot +
// revert; a marker in guest RAM comes back and a counting process runs on after a --memory
// revert; the tree, deletes, offline snapshots and the refusals (raw disk, unknown snapshot,
// --memory of a stopped VM) on VMs that never start. Each test has its own VMs; two guest boots.
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
  const sh = async (name: string, cmd: string): Promise<string> => (await guestSh(t.d.api, name, cmd)).trim();
  const boots = async (name: string): Promise<number> => ((await t.d.api.request<string>('GET', `/api/v1/instances/${name}/console/log?bytes=1048576`)).match(/^HYPERFOLD-GUEST-READY/gm) ?? []).length;
  /** A VM that is created (its qcow2 root exists) but never started: offline snapshots only. */
  const created = async (name: string): Promise<void> => {
    await t.d.api.request('POST', '/api/v1/instances', { name, image: 'tiny', accel: 'tcg' });
  };
  const snapshot = async (name: string, snap: string, memory = false): Promise<void> => {
    const o = await op(t.d.api, 'POST', `/api/v1/instances/${name}/snapshots`, { name: snap, memory });
    assert.equal(o.status, 'success', JSON.stringify(o.error));
  };

  // One running VM through both kinds of snapshot: the two guest boots are the expensive part.
  it('disk-only snapshot + revert restarts on the old disk; --memory snapshot + revert restores RAM', async () => {
    const r = cli('launch', 'tiny', 'snap1', '--accel', 'tcg', '--memory', '256M');
    assert.equal(r.status, 0, r.stderr);
    await waitForBoot(t.d.api, 'snap1', 1);
    assert.equal(await sh('snap1', 'echo marker-one > /mnt/marker; sync; cat /mnt/marker'), 'marker-one');

    const c = cli('snapshot', 'create', 'snap1', 'before');
    assert.equal(c.status, 0, c.stderr);
    assert.match(c.stdout, /snapshot before of snap1 created/);
    assert.equal(await sh('snap1', 'echo marker-two > /mnt/marker; sync; cat /mnt/marker'), 'marker-two');

    // The snapshot is in the disk image (internal) and in the tree.
    const root = (await getInstance(t.d.api, 'snap1')).config.disks[0]!.path;
    assert.deepEqual((await new QemuImg().snapshotList(root)).map((s) => s.name), ['before']);
    assert.equal((await list('snap1')).current, 'before');

    // Reverting a disk-only snapshot of a running VM restarts it on the reverted disk.
    const rv = cli('snapshot', 'revert', 'snap1', 'before');
    assert.equal(rv.status, 0, rv.stderr);
    assert.equal((await getInstance(t.d.api, 'snap1')).state, 'running');
    await waitForBoot(t.d.api, 'snap1', 2);
    assert.equal(await sh('snap1', 'cat /mnt/marker'), 'marker-one');

    // --memory: guest RAM (the initramfs' /tmp) and its processes come back as they were. A marker
    // file in RAM proves the content; a counting process proves the processes run on afterwards.
    await sh('snap1', "sh -c 'echo $$ > /tmp/counter.pid; i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 1; done' </dev/null >/dev/null 2>&1 &");
    const counter = async (): Promise<number> => Number(await sh('snap1', 'cat /tmp/counter 2>/dev/null || echo 0'));
    await until(async () => (await counter()) >= 1, 30_000, 'the counter starts');
    const pid = await sh('snap1', 'cat /tmp/counter.pid');
    assert.equal(await sh('snap1', 'echo ram-one > /tmp/ram-marker; cat /tmp/ram-marker'), 'ram-one');
    const bootsBefore = await boots('snap1');

    await snapshot('snap1', 'running', true);
    assert.equal(await sh('snap1', 'echo ram-two > /tmp/ram-marker; cat /tmp/ram-marker'), 'ram-two');

    const reverted = await op(t.d.api, 'POST', '/api/v1/instances/snap1/snapshots/running/revert');
    assert.equal(reverted.status, 'success', JSON.stringify(reverted.error));
    assert.deepEqual((reverted.result as { memory: boolean }).memory, true);
    assert.equal(await sh('snap1', 'cat /tmp/ram-marker'), 'ram-one', 'RAM is back at the snapshot');
    // The same process goes on running, and counting, from there; the guest did not reboot.
    assert.equal(await sh('snap1', `kill -0 ${pid} && echo alive`), 'alive');
    const after = await counter();
    await until(async () => (await counter()) > after, 30_000, `the counter keeps running after the revert (was ${after})`);
    assert.equal(await boots('snap1'), bootsBefore, 'no reboot');
    assert.equal((await list('snap1')).current, 'running');
    assert.match(cli('snapshot', 'list', 'snap1').stdout, /└── running \(memory, running.*<- current/);
  });

  it('shows the tree, takes offline snapshots, reverts offline, deletes with re-parenting', async () => {
    await created('tree1');
    await snapshot('tree1', 'a');
    await snapshot('tree1', 'b');
    await snapshot('tree1', 'c');
    const l = await list('tree1');
    assert.deepEqual(l.snapshots.map((s) => [s.name, s.parent ?? null]).sort(), [['a', null], ['b', 'a'], ['c', 'b']]);
    assert.equal(l.current, 'c');
    const text = cli('snapshot', 'list', 'tree1').stdout;
    assert.match(text, /^a \(disk, stopped/m);
    assert.match(text, /└── c \(disk, stopped.*<- current/);

    // Revert offline (qemu-img) to "a", then delete "b": "c" moves up to "a".
    const rv = await op(t.d.api, 'POST', '/api/v1/instances/tree1/snapshots/a/revert');
    assert.equal(rv.status, 'success', JSON.stringify(rv.error));
    assert.equal((await getInstance(t.d.api, 'tree1')).state, 'stopped', 'an offline revert does not start the VM');
    const del = cli('snapshot', 'delete', 'tree1', 'b');
    assert.equal(del.status, 0, del.stderr);
    const l2 = await list('tree1');
    assert.deepEqual(l2.snapshots.map((s) => [s.name, s.parent ?? null]).sort(), [['a', null], ['c', 'a']]);
    assert.equal(l2.current, 'a');
    const root = (await getInstance(t.d.api, 'tree1')).config.disks[0]!.path;
    assert.deepEqual((await new QemuImg().snapshotList(root)).map((s) => s.name).sort(), ['a', 'c']);
  });

  it('refuses: unknown snapshot, duplicate, bad name, --memory of a stopped VM, raw disks', async () => {
    await created('refuse1');
    await snapshot('refuse1', 'before');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/refuse1/snapshots/nope/revert'), (e: ApiError) => e.code === 'HF_ERR_SNAPSHOT_NOT_FOUND' && e.status === 404 && /has no snapshot "nope" \(it has: before\)/.test(e.message));
    const r = cli('snapshot', 'revert', 'refuse1', 'nope');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /HF_ERR_SNAPSHOT_NOT_FOUND/);
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/refuse1/snapshots', { name: 'before' }), (e: ApiError) => e.code === 'HF_ERR_ALREADY_EXISTS');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/refuse1/snapshots', { name: '../x' }), (e: ApiError) => e.code === 'HF_ERR_INVALID_NAME');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/refuse1/snapshots', { name: 'm', memory: true }), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_NOT_RUNNING');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/ghost/snapshots', { name: 'x' }), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_NOT_FOUND');

    // A VM with a raw disk: a clear refusal naming the disk, nothing recorded, nothing written.
    await created('rawvm');
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
    await created('gone1');
    await snapshot('gone1', 's1');
    assert.equal((await list('gone1')).snapshots.length, 1);
    const del = await op(t.d.api, 'DELETE', '/api/v1/instances/gone1');
    assert.equal(del.status, 'success', JSON.stringify(del.error));
    await created('gone1');
    const l = await list('gone1');
    assert.deepEqual(l.snapshots, []);
    assert.equal(l.current, undefined);
  });
});

/** Polls `check` until it holds; fails with `what` once `timeoutMs` passed. */
async function until(check: () => Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 300));
  }
}
