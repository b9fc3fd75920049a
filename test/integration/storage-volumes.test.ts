// Pools and volumes with a real tiny VM under TCG: the default pool, a new dir pool, volume
// create/list/info; hot-plug of a volume seen by the guest, live resize seen in
// /sys/block/*/size, delete of an attached volume refused, hot-unplug; a pool out of space (a
// tiny tmpfs) refusing an import and a copy with nothing left behind; linked and full copies
// (the linked clone boots and its disk is only the delta), and an image with linked clones
// that cannot be deleted. Two guest boots.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ApiError } from '../../src/cli/client.js';
import type { PoolView, VolumeView } from '../../src/storage/model.js';
import { QemuImg, readQcow2Backing } from '../../src/storage/qemu-img.js';
import { getInstance, op, useTestDaemon, CLI } from '../helpers/daemon.js';
import { guestSh, waitForBoot } from './storage-guest.js';

const MiB = 1024 * 1024;

describe('pools and volumes with real QEMU (TCG)', () => {
  const t = useTestDaemon();
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, ...args], { encoding: 'utf8', timeout: 180_000 });
  let small: string | undefined;
  let scratch: string | undefined;

  after(async () => {
    if (small) {
      spawnSync('umount', ['-l', small]);
      await rm(small, { recursive: true, force: true });
    }
    if (scratch) await rm(scratch, { recursive: true, force: true });
  });

  it('has a default pool in the data directory and creates dir pools', async () => {
    const r = cli('storage', 'list');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^default\\s+dir\\s+${t.dataDir}\\s+\\S+GiB`, 'm'));
    const { pools } = await t.d.api.request<{ pools: PoolView[] }>('GET', '/api/v1/storage/pools');
    const def = pools.find((p) => p.name === 'default')!;
    assert.ok(def.usage.totalBytes > 0 && def.usage.freeBytes > 0 && def.usage.freeBytes <= def.usage.totalBytes);
    assert.equal(def.usage.usedBytes + (def.usage.totalBytes - def.usage.usedBytes), def.usage.totalBytes);

    scratch = await mkdtemp(join(tmpdir(), 'hf-pool-'));
    const c = cli('storage', 'create', 'extra', '--type', 'dir', '--path', join(scratch, 'p'));
    assert.equal(c.status, 0, c.stderr);
    assert.ok((await stat(join(scratch, 'p', 'volumes'))).isDirectory());
    await assert.rejects(t.d.api.request('POST', '/api/v1/storage/pools', { name: 'extra', path: '/tmp/x' }), (e: ApiError) => e.code === 'HF_ERR_ALREADY_EXISTS');
    await assert.rejects(t.d.api.request('POST', '/api/v1/storage/pools', { name: 'rel', path: 'relative/x' }), (e: ApiError) => e.code === 'HF_ERR_VALIDATION');
    await assert.rejects(t.d.api.request('POST', '/api/v1/storage/pools', { name: 'again', path: join(scratch, 'p') }), (e: ApiError) => e.code === 'HF_ERR_CONFLICT');
    await assert.rejects(t.d.api.request('GET', '/api/v1/storage/pools/nope'), (e: ApiError) => e.code === 'HF_ERR_POOL_NOT_FOUND' && e.status === 404);
    const info = cli('storage', 'info', 'extra');
    assert.match(info.stdout, /Type:\s+dir/);
  });

  it('creates, lists and shows volumes; refuses bad ones', async () => {
    let r = cli('volume', 'create', 'extra/data1', '--size', '64M');
    assert.equal(r.status, 0, r.stderr);
    r = cli('volume', 'create', 'default/raw1', '--size', '32M', '--format', 'raw');
    assert.equal(r.status, 0, r.stderr);
    const { volumes } = await t.d.api.request<{ volumes: VolumeView[] }>('GET', '/api/v1/storage/volumes');
    assert.deepEqual(volumes.map((v) => [v.ref, v.format, v.sizeBytes]).sort(), [['default/raw1', 'raw', 32 * MiB], ['extra/data1', 'qcow2', 64 * MiB]]);
    const v = volumes.find((x) => x.ref === 'extra/data1')!;
    assert.equal((await new QemuImg().info(v.path)).virtualSize, 64 * MiB);
    assert.ok(v.allocatedBytes < 2 * MiB, 'thin');
    assert.match(cli('volume', 'list').stdout, /extra\/data1\s+qcow2\s+64MiB/);
    assert.match(cli('volume', 'info', 'extra/data1').stdout, /Attached to: -/);
    await assert.rejects(t.d.api.request('POST', '/api/v1/storage/pools/extra/volumes', { name: 'data1', size: '1G' }), (e: ApiError) => e.code === 'HF_ERR_ALREADY_EXISTS');
    await assert.rejects(t.d.api.request('POST', '/api/v1/storage/pools/extra/volumes', { name: 'x', size: '12Q' }), (e: ApiError) => e.code === 'HF_ERR_INVALID_SIZE');
    await assert.rejects(t.d.api.request('POST', '/api/v1/storage/pools/extra/volumes', { name: '../x', size: '1G' }), (e: ApiError) => e.code === 'HF_ERR_INVALID_NAME');
    assert.notEqual(cli('volume', 'create', 'nopool', '--size', '1M').status, 0);
    const rs = cli('volume', 'resize', 'default/raw1', '16M');
    assert.notEqual(rs.status, 0);
    assert.match(rs.stderr, /shrinking/);
    const del = cli('volume', 'delete', 'default/raw1');
    assert.equal(del.status, 0, del.stderr);
  });

  it('hot-plugs a volume into a running VM, resizes it live, refuses to delete it, hot-unplugs it', async () => {
    const r = cli('launch', 'tiny', 'vol1', '--accel', 'tcg');
    assert.equal(r.status, 0, r.stderr);
    await waitForBoot(t.d.api, 'vol1', 1);
    assert.equal((await guestSh(t.d.api, 'vol1', 'ls /sys/block | grep vd')).trim(), 'vda');

    const a = cli('volume', 'attach', 'vol1', 'extra/data1');
    assert.equal(a.status, 0, a.stderr);
    assert.match(a.stdout, /hot-plugged/);
    let sectors = '';
    for (let i = 0; i < 40 && !sectors; i++) sectors = (await guestSh(t.d.api, 'vol1', 'cat /sys/block/vdb/size 2>/dev/null')).trim();
    assert.equal(Number(sectors), (64 * MiB) / 512, 'the guest sees the 64 MiB disk');
    const inst = await getInstance(t.d.api, 'vol1');
    assert.deepEqual(inst.config.disks.map((d) => [d.name, d.volume ?? null]), [['root', null], ['data1', 'extra/data1']]);
    const live = await t.d.api.request<{ live: Record<string, unknown> }>('GET', '/api/v1/instances/vol1');
    assert.ok(live);

    const rs = cli('volume', 'resize', 'extra/data1', '96M');
    assert.equal(rs.status, 0, rs.stderr);
    let grown = 0;
    for (let i = 0; i < 40 && grown !== (96 * MiB) / 512; i++) grown = Number((await guestSh(t.d.api, 'vol1', 'cat /sys/block/vdb/size')).trim());
    assert.equal(grown, (96 * MiB) / 512, 'the guest sees the new size');
    const v = await t.d.api.request<{ volume: VolumeView }>('GET', '/api/v1/storage/pools/extra/volumes/data1');
    assert.equal(v.volume.sizeBytes, 96 * MiB);
    assert.deepEqual(v.volume.attachedTo, { instance: 'vol1', disk: 'data1' });

    const del = cli('volume', 'delete', 'extra/data1');
    assert.notEqual(del.status, 0);
    assert.match(del.stderr, /attached to vol1.*HF_ERR_CONFLICT/);
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/vol1/volumes', { volume: 'extra/data1', disk: 'again' }), (e: ApiError) => e.code === 'HF_ERR_CONFLICT');

    const d = cli('volume', 'detach', 'vol1', 'extra/data1');
    assert.equal(d.status, 0, d.stderr);
    assert.match(d.stdout, /hot-unplugged/);
    assert.equal((await guestSh(t.d.api, 'vol1', 'ls /sys/block | grep vd')).trim(), 'vda');
    assert.deepEqual((await getInstance(t.d.api, 'vol1')).config.disks.map((x) => x.name), ['root']);
    assert.equal(cli('volume', 'delete', 'extra/data1').status, 0);
    assert.deepEqual(await readdir(join(scratch!, 'p', 'volumes')), []);
  });

  it('makes a linked copy that is only the delta and boots, and a full copy that stands alone', async () => {
    await guestSh(t.d.api, 'vol1', 'dd if=/dev/urandom of=/mnt/blob bs=1M count=4 2>/dev/null; sync; echo copy-marker > /mnt/marker; sync');
    const stop = await op(t.d.api, 'POST', '/api/v1/instances/vol1/stop', { timeout: 60 });
    assert.equal(stop.status, 'success', JSON.stringify(stop.error));
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/vol1/copy', { name: 'vol1' }), (e: ApiError) => e.code === 'HF_ERR_ALREADY_EXISTS');

    const l = cli('copy', 'vol1', 'linked1', '--linked');
    assert.equal(l.status, 0, l.stderr);
    const f = cli('copy', 'vol1', 'full1');
    assert.equal(f.status, 0, f.stderr);

    const tinyDisk = join(t.dataDir, 'images', 'tiny', 'disk.qcow2');
    const linkedDisk = (await getInstance(t.d.api, 'linked1')).config.disks[0]!.path;
    const fullDisk = (await getInstance(t.d.api, 'full1')).config.disks[0]!.path;
    const srcDisk = (await getInstance(t.d.api, 'vol1')).config.disks[0]!.path;
    assert.equal(await readQcow2Backing(linkedDisk), tinyDisk, 'the linked copy is an overlay on the image');
    assert.equal(await readQcow2Backing(fullDisk), undefined, 'the full copy stands alone');
    const [ls, fs, ss, ts] = await Promise.all([linkedDisk, fullDisk, srcDisk, tinyDisk].map((p) => stat(p)));
    // The delta holds the 4 MiB blob; the image's data is not in it.
    assert.ok(ls!.blocks * 512 >= 4 * MiB && ls!.blocks * 512 <= ss!.blocks * 512 + MiB, `linked ${ls!.blocks * 512} vs source ${ss!.blocks * 512}`);
    assert.ok(fs!.blocks * 512 >= ls!.blocks * 512 + ts!.blocks * 512 - 2 * MiB, `full ${fs!.blocks * 512} >= delta + image`);
    assert.equal((await getInstance(t.d.api, 'linked1')).image, 'tiny');

    // The image now has linked clones: delete is refused and names them.
    const del = cli('image', 'delete', 'tiny');
    assert.notEqual(del.status, 0);
    assert.match(del.stderr, /image "tiny" is used by linked1, vol1: delete those first \(HF_ERR_CONFLICT\)/);

    const st = await op(t.d.api, 'POST', '/api/v1/instances/linked1/start', {});
    assert.equal(st.status, 'success', JSON.stringify(st.error));
    await waitForBoot(t.d.api, 'linked1', 1);
    assert.equal((await guestSh(t.d.api, 'linked1', 'cat /mnt/marker; cat /mnt/hyperfold-disk; ls -l /mnt/blob | wc -l')).trim().split('\n').map((x) => x.trim()).join('|'), 'copy-marker|HYPERFOLD-TINY-DISK-OK|1');
  });
  it('refuses an import into a pool and an export onto a file system that are out of space, leaving nothing behind', async () => {
    small = await mkdtemp(join(tmpdir(), 'hf-small-'));
    const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', small], { encoding: 'utf8' });
    assert.equal(m.status, 0, m.stderr);
    assert.equal(cli('storage', 'create', 'small', '--path', small).status, 0);
    const raw = join(scratch!, 'big.raw');
    await writeFile(raw, randomBytes(8 * MiB));

    const imp = cli('image', 'import', raw, '--name', 'big', '--pool', 'small');
    assert.notEqual(imp.status, 0);
    assert.match(imp.stderr, /pool small is out of space: image big needs .*MiB, .* free \(HF_ERR_POOL_FULL\)/);
    await assert.rejects(t.d.api.request('GET', '/api/v1/images/big'), (e: ApiError) => e.code === 'HF_ERR_IMAGE_NOT_FOUND');
    assert.deepEqual(await readdir(join(small, 'images')), []);
    assert.deepEqual(await readdir(join(small, '.staging')), []);

    // Exporting the (stopped) VM's disk, 64 MiB raw, onto the 3 MiB tmpfs.
    const out = join(small, 'vol1.raw');
    const ex = await op(t.d.api, 'POST', '/api/v1/instances/vol1/export', { file: out, format: 'raw' });
    assert.equal(ex.status, 'failure');
    assert.equal(ex.error?.code, 'HF_ERR_POOL_FULL');
    assert.deepEqual((await readdir(small)).sort(), ['.staging', 'images', 'volumes']);
    spawnSync('umount', [small]);
  });
  it('attaches, resizes and detaches on a stopped VM (records and qemu-img), and keeps images in other pools', async () => {
    assert.equal((await getInstance(t.d.api, 'vol1')).state, 'stopped');
    await t.d.api.request('POST', '/api/v1/storage/pools/extra/volumes', { name: 'data2', size: '32M' });
    const a = await t.d.api.request<{ live: boolean; disk: { name: string } }>('POST', '/api/v1/instances/vol1/volumes', { volume: 'extra/data2', disk: 'cold' });
    assert.equal(a.live, false);
    assert.equal(a.disk.name, 'cold');
    const r = await t.d.api.request<{ volume: VolumeView }>('POST', '/api/v1/storage/pools/extra/volumes/data2/resize', { size: '48M' });
    assert.equal((await new QemuImg().info(r.volume.path)).virtualSize, 48 * MiB);
    const d = await t.d.api.request<{ live: boolean }>('DELETE', '/api/v1/instances/vol1/volumes/extra/data2');
    assert.equal(d.live, false);
    await t.d.api.request('DELETE', '/api/v1/storage/pools/extra/volumes/data2');

    // An image imported into another pool lives there, and goes with its record.
    const src = join(scratch!, 'small.qcow2');
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', src, '8M']);
    const imp = await op(t.d.api, 'POST', '/api/v1/images/import', { name: 'inextra', source: src, pool: 'extra' });
    assert.equal(imp.status, 'success', JSON.stringify(imp.error));
    assert.deepEqual(await readdir(join(scratch!, 'p', 'images', 'inextra')), ['disk.qcow2']);
    await assert.rejects(t.d.api.request('DELETE', '/api/v1/storage/pools/extra'), (e: ApiError) => e.code === 'HF_ERR_CONFLICT' && /inextra/.test(e.message));
    await t.d.api.request('DELETE', '/api/v1/images/inextra');
    assert.deepEqual(await readdir(join(scratch!, 'p', 'images')), []);
    await t.d.api.request('DELETE', '/api/v1/storage/pools/extra');
    await assert.rejects(t.d.api.request('DELETE', '/api/v1/storage/pools/default'), (e: ApiError) => e.code === 'HF_ERR_CONFLICT');
  });
});
