// Images across a real two-host cluster (scripts/cluster-sandbox.sh: a network namespace, a
// daemon and an etcd member per host, TLS between them). An image only h1 holds (published there
// from a stopped VM) is launched on h2: h2's create fetches it from h1's cluster listener in its
// operation, checks every file against h1's record in etcd, and the VM boots from it. A copy that
// went bad on h1 fails the fetch with HF_ERR_CHECKSUM_MISMATCH and leaves nothing on h2.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { open, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ApiError } from '../../src/cli/client.js';
import type { ImageView } from '../../src/core/model/image.js';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import { sha256File } from '../../src/util/hash.js';
import { waitForConsole } from '../helpers/daemon.js';
import { Sandbox } from '../helpers/sandbox.js';

describe('images across a two-host cluster', () => {
  let sb: Sandbox;
  const api = (h: string) => sb.host(h).api;
  const image = async (h: string, name: string) => (await api(h).request<{ image: ImageView }>('GET', `/api/v1/images/${name}`)).image;
  const finished = async (h: string, id: string) => (await api(h).request<{ operation: Operation }>('GET', `/api/v1/operations/${id}?wait=300`)).operation;
  const operations = async (h: string) => (await api(h).request<{ operations: Operation[] }>('GET', '/api/v1/operations')).operations;

  /** Publishes h1's stopped VM src1 as `as` (an image only h1 holds). */
  async function publishOnH1(as: string): Promise<void> {
    const res = await api('h1').request<{ operation: Operation }>('POST', '/api/v1/instances/src1/publish', { as });
    const done = await finished('h1', res.operation.id);
    assert.equal(done.status, 'success', JSON.stringify(done.error));
  }

  /** Nothing of `name` on h2: no directory, no leftover of a fetch, and no record (etcd names only h1 as a holder). */
  async function nothingOnH2(name: string): Promise<void> {
    const images = join(sb.host('h2').dataDir, 'images');
    assert.ok(!existsSync(join(images, name)), `no ${name} directory on h2`);
    assert.deepEqual((await readdir(images)).filter((f) => f.startsWith('.fetch-')), [], 'no partial download on h2');
    assert.deepEqual((await image('h2', name)).hosts, ['h1'], 'no record of it on h2');
  }

  before(async () => {
    sb = await Sandbox.up(2, { prefix: 'hfim', net: '10.213.43', ttl: 3 });
    const src = await api('h1').request<{ instance: Instance }>('POST', '/api/v1/instances', { name: 'src1', image: 'tiny', vcpus: 1, memory: '128M', target: 'h1' });
    assert.equal(src.instance.host, 'h1');
  });
  after(async () => {
    await sb?.down();
  });

  it('h2 launches from an image only h1 holds: its create fetches it, checked, and the VM boots', async () => {
    await publishOnH1('golden');
    assert.deepEqual((await image('h2', 'golden')).hosts, ['h1'], 'h2 sees h1’s image before it has it');
    assert.ok(!existsSync(join(sb.host('h2').dataDir, 'images', 'golden')));

    // Through h1's CLI, as a user would: the create goes to h2, which fetches the image first.
    const launch = await sb.cli('h1', 'launch', 'golden', 'gold-h2', '--target', 'h2', '--memory', '128M');
    assert.equal(launch.code, 0, launch.stderr);
    const inst = (await api('h1').request<{ instance: Instance }>('GET', '/api/v1/instances/gold-h2')).instance;
    assert.equal(inst.host, 'h2');
    assert.equal(inst.state, 'running');
    await waitForConsole(api('h2'), 'gold-h2', /HYPERFOLD-GUEST-READY/);

    // The create was one operation on h2 that waited for the fetch, itself an operation of its own.
    const ops = await operations('h2');
    const create = ops.find((o) => o.type === 'instance.create' && o.target.name === 'gold-h2');
    assert.ok(create, JSON.stringify(ops.map((o) => [o.type, o.target.name])));
    assert.equal(create.status, 'success', JSON.stringify(create.error));
    assert.ok(create.messages.some((m) => /image golden is not on this host: fetching it from h1/.test(m.text)), JSON.stringify(create.messages));
    const fetch = ops.find((o) => o.type === 'image.fetch' && o.target.name === 'golden');
    assert.equal(fetch?.status, 'success');
    assert.equal((fetch.result as { from: string }).from, 'h1');

    // h2's copy: every file the record names, with the SHA-256 h1's record carries, under h2's directory.
    const theirs = await image('h1', 'golden');
    const mine = await image('h2', 'golden');
    assert.deepEqual(mine.hosts, ['h1', 'h2']);
    assert.deepEqual(Object.keys(theirs.sha256).sort(), ['disk.qcow2', 'initrd.img', 'vmlinuz']);
    assert.deepEqual(mine.sha256, theirs.sha256);
    const dir = join(sb.host('h2').dataDir, 'images', 'golden');
    for (const [f, sum] of Object.entries(theirs.sha256)) assert.equal(await sha256File(join(dir, f)), sum, `h2's ${f}`);
    assert.equal(mine.disk?.path, join(dir, 'disk.qcow2'));
    assert.ok(mine.boot?.kind === 'kernel' && mine.boot.kernel === join(dir, 'vmlinuz'), JSON.stringify(mine.boot));
    assert.equal(mine.details.fetchedFrom, 'h1');
    const list = await sb.cli('h2', 'image', 'list');
    assert.match(list.stdout, /golden\s+vm\s+publish\s+\S+\s+h1,h2\s/);
  });

  it('a copy that went bad on h1 fails the fetch with HF_ERR_CHECKSUM_MISMATCH and leaves nothing on h2', async () => {
    await publishOnH1('golden2');
    // One byte in the middle of h1's disk changes after its record was written (bit rot, a bad copy).
    const disk = join(sb.host('h1').dataDir, 'images', 'golden2', 'disk.qcow2');
    const fh = await open(disk, 'r+');
    try {
      const at = Math.floor((await stat(disk)).size / 2);
      const b = Buffer.alloc(1);
      await fh.read(b, 0, 1, at);
      b[0] = b[0]! ^ 0xff;
      await fh.write(b, 0, 1, at);
    } finally {
      await fh.close();
    }

    const cli = await sb.cli('h2', 'image', 'fetch', 'golden2', '--from', 'h1');
    assert.notEqual(cli.code, 0);
    assert.match(cli.stderr, /disk\.qcow2 from host h1 does not match the checksum its record carries.*\(HF_ERR_CHECKSUM_MISMATCH\)/);
    const failed = (await operations('h2')).find((o) => o.type === 'image.fetch' && o.target.name === 'golden2');
    assert.equal(failed?.status, 'failure');
    assert.equal(failed.error?.code, 'HF_ERR_CHECKSUM_MISMATCH');
    await nothingOnH2('golden2');

    // A launch on h2 from it fails the same way, in its create's operation, and makes no instance.
    const res = await api('h2').request<{ operation: Operation }>('POST', '/api/v1/instances', { name: 'gold2-h2', image: 'golden2', memory: '128M', start: true, target: 'h2' });
    const done = await finished('h2', res.operation.id);
    assert.equal(done.status, 'failure');
    assert.equal(done.error?.code, 'HF_ERR_CHECKSUM_MISMATCH');
    await assert.rejects(api('h2').request('GET', '/api/v1/instances/gold2-h2'), (e: unknown) => e instanceof ApiError && e.code === 'HF_ERR_INSTANCE_NOT_FOUND');
    await nothingOnH2('golden2');
  });

  it('the files route answers only the cluster’s certificates, and fetches name what is wrong', async () => {
    await assert.rejects(api('h2').request('GET', '/api/v1/images/golden/files'), (e: unknown) => e instanceof ApiError && e.code === 'HF_ERR_FORBIDDEN');
    await assert.rejects(api('h2').request('POST', '/api/v1/images/nosuch/fetch', {}), (e: unknown) => e instanceof ApiError && e.code === 'HF_ERR_IMAGE_NOT_FOUND');
    await assert.rejects(api('h2').request('POST', '/api/v1/images/golden/fetch', {}), (e: unknown) => e instanceof ApiError && e.code === 'HF_ERR_ALREADY_EXISTS');
  });
});
