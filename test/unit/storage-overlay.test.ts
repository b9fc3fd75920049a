// The in-process qcow2 overlay writer (linked clones without a qemu-img spawn): qemu-img must
// find it clean, read the backing data through it, and accept writes into it.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLinkedClone, qcow2OverlayBytes } from '../../src/storage/overlay.js';
import { QemuImg, readQcow2Backing } from '../../src/storage/qemu-img.js';

describe('qcow2 overlay writer', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-overlay-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  const qi = new QemuImg();

  it('writes an overlay of a qcow2 that qemu-img checks clean and reads as the backing data', async () => {
    const base = join(dir, 'base.qcow2');
    assert.equal(spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '96M']).status, 0);
    assert.equal(spawnSync('qemu-io', ['-c', 'write -P 0x5a 1M 2M', base]).status, 0);
    const ov = join(dir, 'clone.qcow2');
    await createLinkedClone(ov, base, 'qcow2', qi);
    const info = await qi.info(ov);
    assert.equal(info.format, 'qcow2');
    assert.equal(info.virtualSize, 96 * 1024 * 1024);
    assert.equal(info.backingFile, base);
    assert.equal(await readQcow2Backing(ov), base);
    assert.deepEqual(await qi.check(ov, 'qcow2'), { supported: true, ok: true, message: '', leaks: 0 });
    assert.equal(spawnSync('qemu-img', ['compare', ov, base]).status, 0, 'reads fall through to the backing file');
    // Writes land in the overlay only.
    assert.equal(spawnSync('qemu-io', ['-c', 'write -P 0x77 0 64k', ov]).status, 0);
    assert.equal((await qi.check(ov, 'qcow2')).ok, true);
    assert.notEqual(spawnSync('qemu-img', ['compare', ov, base]).status, 0);
    const read = spawnSync('qemu-io', ['-c', 'read -P 0x5a 1M 2M', '-c', 'read -P 0x77 0 64k', ov], { encoding: 'utf8' });
    assert.doesNotMatch(read.stdout + read.stderr, /Pattern verification failed/);
    // Internal snapshots work on it (the snapshot code relies on it).
    await qi.snapshotCreate(ov, 's1');
    assert.deepEqual((await qi.snapshotList(ov)).map((s) => s.name), ['s1']);
  });

  it('handles raw backing files and sizes needing several L2 tables, and never overwrites', async () => {
    const raw = join(dir, 'base.raw');
    await writeFile(raw, Buffer.alloc(0));
    spawnSync('truncate', ['-s', '1536M', raw]);
    const ov = join(dir, 'raw-clone.qcow2');
    await createLinkedClone(ov, raw, 'raw', qi);
    const info = await qi.info(ov);
    assert.equal(info.virtualSize, 1536 * 1024 * 1024);
    assert.equal((await qi.check(ov, 'qcow2')).ok, true);
    // 1.5 GiB with 64 KiB clusters: 3 L1 entries.
    assert.equal(qcow2OverlayBytes(raw, 'raw', 1536 * 1024 * 1024).readUInt32BE(36), 3);
    await assert.rejects(createLinkedClone(ov, raw, 'raw', qi), /EEXIST/);
  });

  it('falls back to qemu-img for a backing file it cannot size, and refuses nonsense', async () => {
    const bogus = join(dir, 'bogus.qcow2');
    await writeFile(bogus, 'not a qcow2 at all');
    await assert.rejects(createLinkedClone(join(dir, 'x.qcow2'), bogus, 'qcow2', qi), (e: Error) => /qemu-img/.test(e.message));
    assert.throws(() => qcow2OverlayBytes('/b', 'qcow2', 0), RangeError);
    assert.throws(() => qcow2OverlayBytes('', 'qcow2', 1024), RangeError);
  });
});
