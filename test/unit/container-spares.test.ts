// The pure bookkeeping of spare root filesystems: id blocks (lowest free, unique across spares and
// instances), spare directory names, image stamps, and the pool planner (take, refill, waiting
// creates, stale and evicted spares, failures).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ID_LIMIT, SparePlanner, blockOf, imageStamp, lowestFreeBlock, parseSpareName, type SpareSource } from '../../src/drivers/container/spares.js';

const BASE = 1_000_000;
const S = 65_536;
const src = (image: string, stamp = 'v1'): SpareSource => ({ image, stamp, rootfs: `/data/images/${image}/rootfs`, format: 'dir' });

describe('id blocks', () => {
  it('maps an id to the block it lies in', () => {
    assert.equal(blockOf(BASE - 1, BASE), undefined);
    assert.equal(blockOf(0, BASE), undefined);
    assert.equal(blockOf(BASE, BASE), BASE);
    assert.equal(blockOf(BASE + S - 1, BASE), BASE);
    assert.equal(blockOf(BASE + S, BASE), BASE + S);
    // A container's root may chown its / to any id of its own range: still its block.
    assert.equal(blockOf(BASE + 3 * S + 65_534, BASE), BASE + 3 * S);
    assert.equal(blockOf(1.5, BASE), undefined);
  });

  it('picks the lowest free block; ids inside a block mark it used', () => {
    assert.equal(lowestFreeBlock([], BASE), BASE);
    assert.equal(lowestFreeBlock([BASE, BASE + 2 * S], BASE), BASE + S);
    assert.equal(lowestFreeBlock([BASE + 17, BASE + S + 65_535], BASE), BASE + 2 * S);
    assert.equal(lowestFreeBlock([0, 1000, BASE - 1], BASE), BASE, 'ids below the base do not count');
    // The last block must fit under the limit.
    const last = BASE + 2 * S;
    assert.equal(lowestFreeBlock([BASE, BASE + S], BASE, S, last + S - 1), last);
    assert.equal(lowestFreeBlock([BASE, BASE + S], BASE, S, last + S - 2), undefined);
    assert.ok(lowestFreeBlock([], BASE, S, ID_LIMIT)! + S - 1 <= ID_LIMIT);
  });

  it('never hands out a block twice across spares and instances (simulated lifetimes, restarts included)', () => {
    // What is on disk: instance directories and spare directories, each naming one block.
    const instances = new Map<string, number>();
    const spares: number[] = [];
    let seed = 42;
    const rnd = (n: number) => ((seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31) % n);
    const allocate = () => {
      const b = lowestFreeBlock([...instances.values(), ...spares], BASE);
      assert.ok(b !== undefined);
      return b;
    };
    for (let step = 0; step < 2000; step++) {
      const op = rnd(4);
      if (op === 0) spares.push(allocate()); // refill
      else if (op === 1) instances.set(`c${step}`, spares.length ? spares.shift()! : allocate()); // create (take, or copy)
      else if (op === 2 && instances.size) instances.delete([...instances.keys()][rnd(instances.size)]!); // delete
      else if (op === 3 && spares.length) spares.splice(rnd(spares.length), 1); // stale spare dropped
      const all = [...instances.values(), ...spares];
      assert.equal(new Set(all).size, all.length, `a block is used twice at step ${step}`);
      for (const b of all) assert.equal((b - BASE) % S, 0);
    }
  });
});

describe('spare directory names and image stamps', () => {
  it('parses ready and in-progress spare names, nothing else', () => {
    assert.deepEqual(parseSpareName('1065536'), { hostId: 1_065_536, ready: true });
    assert.deepEqual(parseSpareName('1065536.tmp'), { hostId: 1_065_536, ready: false });
    for (const bad of ['', 'busybox', '0', '01', '-5', '1065536.tmp.x', '1065536.old', '99999999999', ' 1065536']) assert.equal(parseSpareName(bad), undefined, bad);
  });

  it('changes when the image is rebuilt or replaced, not with the order of its checksums', () => {
    const img = { name: 'busybox', createdAt: '2026-01-01T00:00:00Z', sha256: { a: '1', b: '2' }, rootfs: { path: '/d/images/busybox/rootfs', format: 'dir' } };
    assert.equal(imageStamp(img), imageStamp({ ...img, sha256: { b: '2', a: '1' } }));
    assert.notEqual(imageStamp(img), imageStamp({ ...img, createdAt: '2026-01-02T00:00:00Z' }));
    assert.notEqual(imageStamp(img), imageStamp({ ...img, sha256: { a: '1', b: '3' } }));
    assert.notEqual(imageStamp(img), imageStamp({ ...img, rootfs: { path: '/d/images/busybox/rootfs.tar', format: 'tar' } }));
    assert.notEqual(imageStamp(img), imageStamp({ ...img, name: 'other' }));
  });
});

describe('spare planner', () => {
  it('refills only images in use, up to perImage, and hands out each spare once (lowest first)', () => {
    const p = new SparePlanner({ perImage: 2, maxImages: 4 });
    p.adopt('old', BASE + 5 * S, 'v1', 1);
    assert.equal(p.next(0), undefined, 'adopted spares of an unused image are not refilled');
    p.use(src('busybox'), 10);
    assert.equal(p.take('busybox'), undefined);
    assert.equal(p.next(10)?.image, 'busybox');
    assert.equal(p.next(10)?.image, 'busybox');
    assert.equal(p.next(10), undefined, 'two in flight: full');
    assert.equal(p.preparing('busybox'), 2);
    assert.equal(p.prepared(src('busybox'), BASE + 2 * S), true);
    assert.equal(p.prepared(src('busybox'), BASE + S), true);
    assert.deepEqual(p.ready('busybox'), [BASE + S, BASE + 2 * S]);
    assert.equal(p.take('busybox'), BASE + S);
    assert.equal(p.take('busybox'), BASE + 2 * S);
    assert.equal(p.take('busybox'), undefined);
    assert.equal(p.next(11)?.image, 'busybox', 'taken: refilled');
  });

  it('drops spares made from another build of the image', () => {
    const p = new SparePlanner({ perImage: 2, maxImages: 4 });
    p.adopt('busybox', BASE, 'old-build', 1);
    p.adopt('busybox', BASE + S, 'v2', 1);
    const { stale } = p.use(src('busybox', 'v2'), 10);
    assert.deepEqual(stale, [BASE]);
    assert.equal(p.take('busybox'), BASE + S);
    // A spare finished for a build that was replaced meanwhile is not kept.
    assert.ok(p.next(10));
    p.use(src('busybox', 'v3'), 11);
    assert.equal(p.prepared(src('busybox', 'v2'), BASE + 2 * S), false);
    assert.equal(p.preparing('busybox'), 0);
  });

  it('lets up to perImage creates wait, prepares for them first, and keeps refilling after', () => {
    const p = new SparePlanner({ perImage: 1, maxImages: 4 });
    p.use(src('a'), 1);
    p.use(src('b'), 2);
    assert.equal(p.wait('a', 3), true);
    assert.equal(p.wait('a', 3), false, 'perImage creates wait already');
    assert.equal(p.urgent(), true);
    assert.equal(p.next(3)?.image, 'a', 'the image a create waits for comes first, though b is more recent');
    assert.equal(p.next(3)?.image, 'a', 'one for the waiting create and one for the pool');
    assert.equal(p.next(3)?.image, 'b');
    assert.equal(p.next(3), undefined);
    assert.equal(p.prepared(src('a'), BASE), true);
    assert.equal(p.take('a'), BASE);
    p.unwait('a');
    assert.equal(p.urgent(), false);
    assert.equal(p.prepared(src('a'), BASE + S), true);
    assert.equal(p.prepared(src('b'), BASE + 2 * S), true);
    assert.equal(p.starved(), false);
    assert.equal(p.take('b'), BASE + 2 * S);
    assert.equal(p.starved(), true, 'b has none left');
    assert.equal(p.wait('never-used', 3), false, 'an image never used has no source to prepare from');
  });

  it('after a failure, neither waits nor retries the image for a while', () => {
    const p = new SparePlanner({ perImage: 2, maxImages: 4, retryAfterMs: 1000 });
    p.use(src('a'), 0);
    assert.ok(p.next(0));
    p.failed('a', 100);
    assert.equal(p.preparing('a'), 0);
    assert.equal(p.next(500), undefined);
    assert.equal(p.wait('a', 500), false);
    assert.equal(p.next(1100)?.image, 'a');
  });

  it('evicts the spares of the least recently used images beyond maxImages', () => {
    const p = new SparePlanner({ perImage: 1, maxImages: 2 });
    for (const [i, img] of ['a', 'b'].entries()) {
      p.use(src(img), i + 1);
      p.next(i + 1);
      assert.equal(p.prepared(src(img), BASE + i * S), true);
    }
    const { evicted } = p.use(src('c'), 10);
    assert.deepEqual(evicted, [{ image: 'a', hostIds: [BASE] }]);
    assert.deepEqual(p.ready('a'), []);
    assert.equal(p.wait('a', 10), false, 'an evicted image is not refilled');
    // Using it again brings it back (and evicts the next least recent).
    assert.deepEqual(p.use(src('a'), 11).evicted, [{ image: 'b', hostIds: [BASE + S] }]);
  });

  it('drops an image whose tree is gone; perImage 0 turns the pool off', () => {
    const p = new SparePlanner({ perImage: 2, maxImages: 4 });
    p.adopt('gone', BASE, 'v1', 1);
    p.adopt('gone', BASE + S, 'v1', 1);
    assert.deepEqual(p.drop('gone'), [BASE, BASE + S]);
    assert.deepEqual(p.images(), []);
    const off = new SparePlanner({ perImage: 0, maxImages: 4 });
    off.use(src('a'), 1);
    assert.equal(off.next(1), undefined);
    assert.equal(off.wait('a', 1), false);
    assert.equal(off.starved(), false);
  });
});
