// Moving an image between hosts, without the hosts: the pure rules of a record (its checksum
// keys, the directory of its files, the record once moved), the tree digest, and the tar stream
// one host packs and another unpacks and checks — real files in a temporary directory, a tree
// with owners, modes, links and a FIFO, and every way the stream can disagree with the record.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { isHfError } from '../../src/core/errors.js';
import { imageEntries, imageFilesDir, relocateImage, type ImageRecord } from '../../src/core/model/image.js';
import { imageChecksums, treeDigest } from '../../src/images/digest.js';
import { packImageFiles, receiveImageFiles } from '../../src/images/transfer.js';
import { sha256File } from '../../src/util/hash.js';

const HEX = (c: string) => c.repeat(64);

function record(over: Partial<ImageRecord>): ImageRecord {
  return { name: 'img', type: 'vm', description: '', source: 'publish', defaults: {}, sizeBytes: 0, sha256: {}, createdAt: '2026-01-01T00:00:00Z', details: {}, ...over };
}

function rejectsCode(code: string, re?: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(isHfError(e), String(e));
    assert.equal(e.code, code, e.message);
    if (re) assert.match(e.message, re);
    return true;
  };
}

describe('image records between hosts (pure)', () => {
  it('splits checksum keys into files and trees and refuses keys outside the directory', () => {
    assert.deepEqual(imageEntries({ name: 'x', sha256: { 'disk.qcow2': HEX('a'), 'rootfs/': HEX('b'), 'vmlinuz': HEX('c') } }), { files: ['disk.qcow2', 'vmlinuz'], trees: ['rootfs'] });
    for (const bad of ['/etc/passwd', '../x', 'a//b', './a', 'rootfs/x', '']) {
      const sha256 = bad === 'rootfs/x' ? { 'rootfs/': HEX('a'), [bad]: HEX('b') } : { [bad]: HEX('a') };
      assert.throws(() => imageEntries({ name: 'x', sha256 }), rejectsCode('HF_ERR_BAD_IMAGE'), bad);
    }
    assert.throws(() => imageEntries({ name: 'x', sha256: { source: 'not-a-hash' } }), rejectsCode('HF_ERR_BAD_IMAGE', /not a SHA-256/));
  });

  it('finds the directory of an image’s files from its paths, or from details.dir', () => {
    const rec = record({
      boot: { kind: 'kernel', kernel: '/d/h1/images/img/vmlinuz', initrd: '/d/h1/images/img/initrd.img', cmdline: 'x' },
      disk: { path: '/d/h1/images/img/disk.qcow2', format: 'qcow2' },
      sha256: { 'disk.qcow2': HEX('a'), 'vmlinuz': HEX('b'), 'initrd.img': HEX('c') },
    });
    assert.equal(imageFilesDir(rec), '/d/h1/images/img');
    assert.equal(imageFilesDir({ ...rec, details: { dir: '/pool2/images/img' } }), '/pool2/images/img');
    assert.throws(() => imageFilesDir({ ...rec, sha256: {} }), rejectsCode('HF_ERR_BAD_IMAGE', /none of its paths/));
    // The disk says where the image is; a kernel elsewhere does not make it ambiguous (relocateImage refuses it).
    assert.equal(imageFilesDir({ ...rec, disk: { path: '/other/disk.qcow2', format: 'qcow2' } }), '/other');
    const noDisk = { ...rec, disk: undefined, boot: { kind: 'kernel' as const, kernel: '/a/vmlinuz', initrd: '/b/initrd.img', cmdline: '' } };
    assert.throws(() => imageFilesDir(noDisk), rejectsCode('HF_ERR_BAD_IMAGE', /different directories/));
  });

  it('moves every path under the image’s directory and drops the old host’s storage details', () => {
    const rec = record({
      boot: { kind: 'kernel', kernel: '/d/h1/images/img/vmlinuz', cmdline: 'console=ttyS0' },
      disk: { path: '/d/h1/images/img/disk.qcow2', format: 'qcow2' },
      sha256: { 'disk.qcow2': HEX('a'), 'disk1.qcow2': HEX('d'), 'vmlinuz': HEX('b') },
      details: { pool: 'fast', dir: '/d/h1/images/img', extraDisks: [{ name: 'disk1', path: '/d/h1/images/img/disk1.qcow2', format: 'qcow2' }], sourceFile: 'a.ova' },
    });
    const out = relocateImage(rec, '/e/h2/images/img', { host: 'h1', at: '2026-02-02T00:00:00Z' });
    assert.deepEqual(out.boot, { kind: 'kernel', kernel: '/e/h2/images/img/vmlinuz', cmdline: 'console=ttyS0' });
    assert.equal(out.disk?.path, '/e/h2/images/img/disk.qcow2');
    assert.deepEqual(out.details, { extraDisks: [{ name: 'disk1', path: '/e/h2/images/img/disk1.qcow2', format: 'qcow2' }], sourceFile: 'a.ova', fetchedFrom: 'h1', fetchedAt: '2026-02-02T00:00:00Z' });
    assert.deepEqual(out.sha256, rec.sha256);
    // A container's tree.
    const ct = record({ type: 'container', rootfs: { path: '/d/h1/images/bb/rootfs', format: 'dir' }, sha256: { 'rootfs/': HEX('e') } });
    assert.equal(relocateImage(ct, '/e/h2/images/bb', { host: 'h1', at: 'now' }).rootfs?.path, '/e/h2/images/bb/rootfs');
  });

  it('refuses a record whose kernel lies outside its directory (it would not come along)', () => {
    const rec = record({
      boot: { kind: 'kernel', kernel: '/d/h1/images/tiny/vmlinuz', cmdline: '' },
      disk: { path: '/d/h1/images/img/disk.qcow2', format: 'qcow2' },
      sha256: { 'disk.qcow2': HEX('a') },
    });
    assert.throws(() => relocateImage(rec, '/e/h2/images/img', { host: 'h1', at: 'now' }), rejectsCode('HF_ERR_UNSUPPORTED', /kernel \/d\/h1\/images\/tiny\/vmlinuz lies outside/));
  });
});

describe('image files over a tar stream', () => {
  let dir: string;
  let src: string;
  let sums: Record<string, string>;
  const files = ['disk.qcow2', 'vmlinuz', 'sub/initrd.img'];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-imgx-'));
    src = join(dir, 'src');
    await mkdir(join(src, 'sub'), { recursive: true });
    await writeFile(join(src, 'disk.qcow2'), randomBytes(700_000));
    await writeFile(join(src, 'vmlinuz'), randomBytes(1000));
    await writeFile(join(src, 'sub/initrd.img'), '');
    await chmod(join(src, 'disk.qcow2'), 0o444);
    const root = join(src, 'rootfs');
    await mkdir(join(root, 'bin'), { recursive: true });
    await mkdir(join(root, 'home/user'), { recursive: true });
    await mkdir(join(root, 'tmp'), { recursive: true });
    await chmod(join(root, 'tmp'), 0o1777);
    await writeFile(join(root, 'bin/busybox'), randomBytes(50_000));
    await chmod(join(root, 'bin/busybox'), 0o4755);
    await symlink('/bin/busybox', join(root, 'bin/sh'));
    await writeFile(join(root, 'home/user/.profile'), 'export A=1\n');
    await chown(join(root, 'home/user'), 1000, 1000);
    await chown(join(root, 'home/user/.profile'), 1000, 1000);
    assert.equal(spawnSync('mkfifo', [join(root, 'tmp/fifo')]).status, 0);
    sums = await imageChecksums(src, { files, trees: ['rootfs'] });
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const fresh = async (name: string) => {
    const d = join(dir, name);
    await mkdir(d);
    return d;
  };

  it('carries files and a tree (owners, modes, links, a FIFO) that check out on the other side', async () => {
    const rec = { name: 'img', sha256: sums };
    const packed = await packImageFiles(src, rec);
    assert.equal(packed.bytes, 700_000 + 1000 + 0 + 50_000 + 'export A=1\n'.length);
    const dest = await fresh('ok');
    let bytes = 0;
    await receiveImageFiles(packed.stream, dest, rec, { from: 'h1', onBytes: (n) => (bytes += n) });
    assert.equal(bytes, packed.bytes);
    for (const f of files) assert.equal(await sha256File(join(dest, f)), sums[f], f);
    assert.equal(await treeDigest(join(dest, 'rootfs')), sums['rootfs/']);
    assert.deepEqual((await readdir(dest)).sort(), ['disk.qcow2', 'rootfs', 'sub', 'vmlinuz']);
    assert.ok(!existsSync(`${dest}.trees.tar`), 'the staging archive is gone');
  });

  it('the tree digest changes with a mode, an owner or a byte, and not with times', async () => {
    const copy = join(dir, 'copy');
    assert.equal(spawnSync('cp', ['-a', join(src, 'rootfs'), copy]).status, 0);
    const base = await treeDigest(copy);
    assert.equal(base, sums['rootfs/']);
    spawnSync('touch', ['-d', '2001-01-01', join(copy, 'bin/busybox')]);
    assert.equal(await treeDigest(copy), base);
    await chmod(join(copy, 'bin/busybox'), 0o755);
    const noSuid = await treeDigest(copy);
    assert.notEqual(noSuid, base);
    await chown(join(copy, 'home/user/.profile'), 0, 0);
    assert.notEqual(await treeDigest(copy), noSuid);
  });

  it('refuses a file whose content differs from the record: HF_ERR_CHECKSUM_MISMATCH naming it', async () => {
    const packed = await packImageFiles(src, { name: 'img', sha256: sums });
    const dest = await fresh('bad-file');
    await assert.rejects(receiveImageFiles(packed.stream, dest, { name: 'img', sha256: { ...sums, 'disk.qcow2': HEX('0') } }, { from: 'h1' }), rejectsCode('HF_ERR_CHECKSUM_MISMATCH', /disk\.qcow2 from host h1 does not match/));
    assert.ok(!existsSync(`${dest}.trees.tar`));
  });

  it('refuses a tree whose digest differs', async () => {
    const packed = await packImageFiles(src, { name: 'img', sha256: sums });
    const dest = await fresh('bad-tree');
    await assert.rejects(receiveImageFiles(packed.stream, dest, { name: 'img', sha256: { ...sums, 'rootfs/': HEX('1') } }, { from: 'h1' }), rejectsCode('HF_ERR_CHECKSUM_MISMATCH', /rootfs\/ from host h1/));
    assert.ok(!existsSync(`${dest}.trees.tar`));
  });

  it('refuses a member the record does not name, and a file that never arrives', async () => {
    const all = { name: 'img', sha256: sums };
    const fewer = { name: 'img', sha256: { 'disk.qcow2': sums['disk.qcow2']! } };
    await assert.rejects(receiveImageFiles((await packImageFiles(src, all)).stream, await fresh('extra'), fewer, { from: 'h1' }), rejectsCode('HF_ERR_BAD_IMAGE', /sent (vmlinuz|rootfs|sub)/));
    await assert.rejects(receiveImageFiles((await packImageFiles(src, fewer)).stream, await fresh('missing'), all, { from: 'h1' }), rejectsCode('HF_ERR_CHECKSUM_MISMATCH', /did not arrive/));
  });

  it('a sender refuses an image whose files are not all there, before it sends anything', async () => {
    await assert.rejects(packImageFiles(src, { name: 'img', sha256: { 'nope.qcow2': HEX('a') } }), rejectsCode('HF_ERR_BAD_IMAGE', /nope\.qcow2/));
    await assert.rejects(packImageFiles(src, { name: 'img', sha256: {} }), rejectsCode('HF_ERR_BAD_IMAGE', /no checksums/));
  });

  it('stops when aborted, rejecting with the abort reason', async () => {
    const packed = await packImageFiles(src, { name: 'img', sha256: sums });
    const ac = new AbortController();
    const reason = new Error('cancelled by the test');
    let seen = 0;
    const p = receiveImageFiles(packed.stream, await fresh('abort'), { name: 'img', sha256: sums }, {
      from: 'h1',
      signal: ac.signal,
      onBytes: (n) => {
        seen += n;
        if (seen > 100_000) ac.abort(reason);
      },
    });
    await assert.rejects(p, (e) => e === reason);
  });

  it('a stream that breaks off is an error, not a short image', async () => {
    const packed = await packImageFiles(src, { name: 'img', sha256: sums });
    const chunks: Buffer[] = [];
    for await (const c of packed.stream) chunks.push(c as Buffer);
    const all = Buffer.concat(chunks);
    const cut = Readable.from([all.subarray(0, 300_000)]);
    await assert.rejects(receiveImageFiles(cut, await fresh('cut'), { name: 'img', sha256: sums }, { from: 'h1' }), (e: unknown) => isHfError(e) && /broke off|did not arrive|does not match/.test(e.message));
  });
});
