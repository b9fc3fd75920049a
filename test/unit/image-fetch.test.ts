// Fetching an image from another host, in-process: the real image and instance services over an
// in-memory store, a fake driver, and fake peers that serve a "host h2" from a directory of this
// test (its record, and its files through the real tar stream). Covers the fetch operation and
// the record it registers, one fetch shared by everyone who needs the image, a checksum mismatch
// and a cancel that leave nothing behind, the refusals before any operation, a create that waits
// for the fetch in its own operation, listings with hosts, and the files route closed to anything
// but another host's certificate.
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { isHfError } from '../../src/core/errors.js';
import type { ImageRecord, ImageView } from '../../src/core/model/image.js';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import { imageChecksums } from '../../src/images/digest.js';
import { packImageFiles } from '../../src/images/transfer.js';
import type { ImagePeers, PeerImage } from '../../src/services/images.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { sha256File } from '../../src/util/hash.js';
import { FakeDriver } from '../helpers/fake-driver.js';
import { buildWorld, type TestWorld } from '../helpers/world.js';

/** Host h2 of a pretend cluster: its image records and files, served as the cluster service would. */
class FakePeers implements ImagePeers {
  readonly localHost = 'h1';
  readonly images = new Map<string, { rec: ImageRecord; dir: string }>();
  online = true;
  downloads = 0;
  /** When set, the stream stops after its first chunk until it resolves. */
  hold: Promise<void> | undefined;
  /** Resolves at the first download. */
  started!: Promise<void>;
  private markStarted!: () => void;

  constructor() {
    this.reset();
  }

  reset(): void {
    this.started = new Promise((r) => (this.markStarted = r));
  }

  async records(name?: string): Promise<PeerImage[]> {
    return [...this.images.values()].filter((i) => name === undefined || i.rec.name === name).map((i) => ({ host: 'h2', online: this.online, record: i.rec }));
  }

  async download(host: string, name: string): Promise<{ stream: Readable; bytes?: number }> {
    assert.equal(host, 'h2');
    this.downloads++;
    this.markStarted();
    const img = this.images.get(name)!;
    const packed = await packImageFiles(img.dir, img.rec);
    const hold = this.hold;
    if (!hold) return packed;
    async function* held(): AsyncGenerator<Buffer> {
      let first = true;
      for await (const c of packed.stream) {
        yield c as Buffer;
        if (first) await hold;
        first = false;
      }
    }
    return { stream: Readable.from(held()), bytes: packed.bytes };
  }
}

function codeIs(code: string, re?: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(isHfError(e), String(e));
    assert.equal(e.code, code, e.message);
    if (re) assert.match(e.message, re);
    return true;
  };
}

describe('fetching images from another host of the cluster', () => {
  let dir: string;
  let w: TestWorld;
  let peers: FakePeers;
  let h2: string;

  /** An image on h2: a disk and a kernel in h2's image directory, with its record. */
  async function onH2(name: string, opts: { diskBytes?: number; kernelOutside?: boolean } = {}): Promise<ImageRecord> {
    const d = join(h2, 'images', name);
    await mkdir(d, { recursive: true });
    await writeFile(join(d, 'disk.qcow2'), randomBytes(opts.diskBytes ?? 300_000));
    await writeFile(join(d, 'vmlinuz'), randomBytes(2000));
    const rec: ImageRecord = {
      name,
      type: 'vm',
      description: `${name} of h2`,
      source: 'publish',
      boot: { kind: 'kernel', kernel: opts.kernelOutside ? '/somewhere/else/vmlinuz' : join(d, 'vmlinuz'), cmdline: 'console=ttyS0' },
      disk: { path: join(d, 'disk.qcow2'), format: 'qcow2' },
      defaults: { vcpus: 1, memoryMiB: 96 },
      sizeBytes: (opts.diskBytes ?? 300_000) + 2000,
      sha256: await imageChecksums(d, { files: ['disk.qcow2', 'vmlinuz'] }),
      createdAt: '2026-01-01T00:00:00.000Z',
      details: { pool: 'default' },
    };
    peers.images.set(name, { rec, dir: d });
    return rec;
  }

  /** Nothing of `name` on this host: no directory, no leftover of a fetch, no record. */
  async function nothingOf(name: string): Promise<void> {
    assert.ok(!existsSync(join(w.dir, 'images', name)), 'no image directory');
    const left = (await readdir(join(w.dir, 'images')).catch(() => [] as string[])).filter((f) => f.startsWith('.fetch-'));
    assert.deepEqual(left, [], 'no partial download');
    assert.equal(await w.images.find(name), undefined, 'no record');
  }

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-fetch-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    const sub = await mkdtemp(join(dir, 'w-'));
    h2 = join(sub, 'h2');
    w = await buildWorld(join(sub, 'h1'), { store: SqliteStateStore.open(':memory:'), drivers: [['vm', new FakeDriver()]] });
    peers = new FakePeers();
    w.images.setPeers(peers);
  });

  it('fetches as an operation: checked files in this host’s image directory, the record moved there', async () => {
    const theirs = await onH2('golden');
    const op = await w.images.fetch('golden');
    assert.equal(op.type, 'image.fetch');
    assert.equal(op.cancellable, true);
    const done = await w.ops.wait(op.id, 10_000);
    assert.equal(done.status, 'success', JSON.stringify(done.error));
    assert.deepEqual(done.result, { image: 'golden', from: 'h2', sizeBytes: theirs.sizeBytes });
    const mine = (await w.images.find('golden'))!;
    const d = join(w.dir, 'images', 'golden');
    assert.equal(mine.disk?.path, join(d, 'disk.qcow2'));
    assert.deepEqual(mine.boot, { kind: 'kernel', kernel: join(d, 'vmlinuz'), cmdline: 'console=ttyS0' });
    assert.deepEqual(mine.sha256, theirs.sha256);
    assert.equal(mine.details.fetchedFrom, 'h2');
    assert.equal(mine.details.pool, undefined);
    for (const f of ['disk.qcow2', 'vmlinuz']) assert.equal(await sha256File(join(d, f)), theirs.sha256[f]);
    assert.deepEqual((await readdir(join(w.dir, 'images'))).sort(), ['golden']);
  });

  it('one fetch for everyone who needs the image meanwhile', async () => {
    await onH2('shared');
    let release!: () => void;
    peers.hold = new Promise((r) => (release = r));
    const op = await w.images.fetch('shared');
    await peers.started;
    const [a, b] = [w.images.ensure('shared'), w.images.ensure('shared')];
    const again = await w.images.fetch('shared');
    assert.equal(again.id, op.id, 'a second fetch is the first one');
    release();
    const [ra, rb] = await Promise.all([a, b]);
    assert.equal(ra.name, 'shared');
    assert.deepEqual(ra, rb);
    assert.equal(peers.downloads, 1);
    assert.equal((await w.ops.wait(op.id, 10_000)).status, 'success');
  });

  it('a file that does not match its checksum fails the fetch with HF_ERR_CHECKSUM_MISMATCH and leaves nothing', async () => {
    await onH2('corrupt');
    // h2's copy went bad after its record was written.
    await writeFile(join(h2, 'images', 'corrupt', 'disk.qcow2'), randomBytes(300_000));
    await assert.rejects(w.images.ensure('corrupt'), codeIs('HF_ERR_CHECKSUM_MISMATCH', /disk\.qcow2 from host h2 does not match/));
    const op = (await w.ops.list()).find((o) => o.type === 'image.fetch' && o.target.name === 'corrupt')!;
    const done = await w.ops.wait(op.id, 10_000);
    assert.equal(done.status, 'failure');
    assert.equal(done.error?.code, 'HF_ERR_CHECKSUM_MISMATCH');
    await nothingOf('corrupt');
  });

  it('a cancelled fetch ends cancelled and leaves nothing', async () => {
    await onH2('big', { diskBytes: 2_000_000 });
    let release!: () => void;
    peers.hold = new Promise((r) => (release = r));
    const op = await w.images.fetch('big');
    await peers.started;
    await w.ops.cancel(op.id);
    const done = await w.ops.wait(op.id, 10_000);
    release();
    assert.equal(done.status, 'cancelled');
    assert.equal(done.error?.code, 'HF_ERR_CANCELLED');
    await nothingOf('big');
  });

  it('refuses what cannot be fetched before it starts anything', async () => {
    await onH2('remote');
    await assert.rejects(w.images.fetch('nothere'), codeIs('HF_ERR_IMAGE_NOT_FOUND'));
    await assert.rejects(w.images.get('remote'), codeIs('HF_ERR_IMAGE_NOT_FOUND', /not on this host \(h2 holds it\): `hyperfold image fetch remote`/));
    await assert.rejects(w.images.fetch('remote', { from: 'h3' }), codeIs('HF_ERR_IMAGE_NOT_FOUND', /host h3 holds no image "remote" \(h2 do/));
    await assert.rejects(w.images.fetch('remote', { from: 'h1' }), codeIs('HF_ERR_VALIDATION'));
    await assert.rejects(w.images.fetch('Bad Name'), codeIs('HF_ERR_INVALID_NAME'));
    await onH2('outside', { kernelOutside: true });
    await assert.rejects(w.images.fetch('outside'), codeIs('HF_ERR_UNSUPPORTED', /kernel \/somewhere\/else\/vmlinuz lies outside/));
    const old = await onH2('old');
    peers.images.set('old', { ...peers.images.get('old')!, rec: { ...old, sha256: {} } });
    await assert.rejects(w.images.fetch('old'), codeIs('HF_ERR_BAD_IMAGE', /no checksums/));
    await mkdir(join(w.dir, 'images', 'remote'), { recursive: true });
    await assert.rejects(w.images.fetch('remote'), codeIs('HF_ERR_ALREADY_EXISTS', /no image record names it/));
    peers.online = false;
    await assert.rejects(w.images.fetch('remote', { from: 'h2' }), codeIs('HF_ERR_HOST_OFFLINE'));
    await assert.rejects(w.images.fetch('outside'), codeIs('HF_ERR_HOST_OFFLINE', /only on offline host\(s\) h2/));
    assert.equal(peers.downloads, 0);
    assert.deepEqual(await w.ops.list(), [], 'no operation');
  });

  it('refuses a fetch of an image this host has, and any fetch on a single host', async () => {
    await onH2('twice');
    assert.equal((await w.ops.wait((await w.images.fetch('twice')).id, 10_000)).status, 'success');
    await assert.rejects(w.images.fetch('twice'), codeIs('HF_ERR_ALREADY_EXISTS', /already on this host/));
    const alone = await buildWorld(join(dir, `alone-${Date.now()}`), { store: SqliteStateStore.open(':memory:'), drivers: [['vm', new FakeDriver()]] });
    await assert.rejects(alone.images.fetch('twice'), codeIs('HF_ERR_NOT_CLUSTERED'));
  });

  it('a create from an image only h2 holds is one operation that fetches, creates and starts', async () => {
    await onH2('tmpl');
    const res = await w.call('POST', '/api/v1/instances', { name: 'vm1', image: 'tmpl', start: true });
    assert.equal(res.status, 202, JSON.stringify(res.json));
    assert.equal(res.json.instance, undefined, 'no instance yet: it comes after the image');
    const op = res.json.operation as Operation;
    assert.equal(op.type, 'instance.create');
    const done = await w.finish(res);
    assert.equal(done.status, 'success', JSON.stringify(done.error));
    assert.ok(done.messages.some((m) => /image tmpl is not on this host: fetching it from h2/.test(m.text)), JSON.stringify(done.messages));
    const inst = (await w.call('GET', '/api/v1/instances/vm1')).json.instance as Instance;
    assert.equal(inst.state, 'running');
    assert.equal(inst.config.memoryMiB, 96, 'the image’s defaults, read from h2’s record for placement');
    assert.equal(inst.config.boot.kind === 'kernel' && inst.config.boot.kernel, join(w.dir, 'images', 'tmpl', 'vmlinuz'));
    // Once here, the next create is the ordinary one.
    const next = await w.call('POST', '/api/v1/instances', { name: 'vm2', image: 'tmpl' });
    assert.equal(next.status, 201);
  });

  it('a create that waits for a fetch that fails fails with its code, and creates nothing', async () => {
    await onH2('badtmpl');
    await writeFile(join(h2, 'images', 'badtmpl', 'vmlinuz'), 'changed');
    const res = await w.call('POST', '/api/v1/instances', { name: 'vm3', image: 'badtmpl', start: true });
    assert.equal(res.status, 202);
    const done = await w.finish(res);
    assert.equal(done.status, 'failure');
    assert.equal(done.error?.code, 'HF_ERR_CHECKSUM_MISMATCH');
    assert.equal((await w.call('GET', '/api/v1/instances/vm3')).status, 404);
    await nothingOf('badtmpl');
  });

  it('lists every host’s images with the hosts that hold them, and shows one only h2 has', async () => {
    await onH2('a-img');
    await onH2('b-img');
    assert.equal((await w.ops.wait((await w.images.fetch('b-img')).id, 10_000)).status, 'success');
    const list = (await w.call('GET', '/api/v1/images')).json.images as ImageView[];
    assert.deepEqual(list.map((i) => [i.name, i.hosts]), [['a-img', ['h2']], ['b-img', ['h1', 'h2']]]);
    const shown = (await w.call('GET', '/api/v1/images/a-img')).json.image as ImageView;
    assert.deepEqual(shown.hosts, ['h2']);
    assert.equal(shown.disk?.path, join(h2, 'images', 'a-img', 'disk.qcow2'), 'h2’s record as h2 keeps it');
    assert.equal(peers.downloads, 1, 'showing fetches nothing');
    await assert.rejects(w.images.checkNewName('a-img'), codeIs('HF_ERR_ALREADY_EXISTS', /exists on host h2/));
  });

  it('the files route answers only another host’s certificate: with the admin token it is HF_ERR_FORBIDDEN', async () => {
    await onH2('x-img');
    assert.equal((await w.ops.wait((await w.images.fetch('x-img')).id, 10_000)).status, 'success');
    const res = await w.call('GET', '/api/v1/images/x-img/files');
    assert.equal(res.status, 403);
    assert.equal((res.json.error as { code: string }).code, 'HF_ERR_FORBIDDEN');
  });

  it('removes what a fetch cut short by a dying daemon left', async () => {
    await mkdir(join(w.dir, 'images', '.fetch-gone-abc', 'x'), { recursive: true });
    await writeFile(join(w.dir, 'images', '.fetch-gone-abc.trees.tar'), 'x');
    await w.images.init();
    assert.deepEqual(await readdir(join(w.dir, 'images')), []);
  });
});
