// Shared storage pools: the marker verdict (pure), and two hosts' storage services on one store,
// each through its own per-host scope as in a cluster (daemon/cluster.ts's LOCAL_PREFIXES): one
// set of pools seen from both, names unique across local and shared pools and every host, each
// host's availability recorded and shown, a volume made on one host and used from the other, an
// instance's disks kept in the pool, attachments judged cluster-wide, a join's pool clashes.
// qemu-img is real (it writes the small qcow2 files); the instances run nowhere.
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HfError } from '../../src/core/errors.js';
import type { ImageRecord } from '../../src/core/model/image.js';
import type { Instance } from '../../src/core/model/instance.js';
import { LOCAL_PREFIXES, localKey } from '../../src/daemon/cluster.js';
import { DataPaths } from '../../src/daemon/config.js';
import type { DiskRequest, InstancePaths } from '../../src/drivers/driver.js';
import { provisionVmDisks } from '../../src/drivers/qemu/provision.js';
import { EventBus } from '../../src/services/events.js';
import { ImageService } from '../../src/services/images.js';
import { InstanceService } from '../../src/services/instances.js';
import { OperationManager } from '../../src/services/operations.js';
import { StorageService } from '../../src/services/storage/index.js';
import { SharedPools } from '../../src/services/storage/shared-pools.js';
import type { StorageBackend } from '../../src/storage/backend.js';
import { ScopedStore } from '../../src/state/scoped-store.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { QemuImg } from '../../src/storage/qemu-img.js';
import { POOL_MARKER_FILE, judgeMarker, samePath, type MarkerRead, type PoolMarker } from '../../src/storage/shared.js';
import { silentLogger } from '../../src/util/log.js';
import { FakeDriver } from '../helpers/fake-driver.js';

const code = (c: string, message?: RegExp) => (e: unknown) => {
  assert.ok(e instanceof HfError, `not an HfError: ${String(e)}`);
  assert.equal(e.code, c, e.message);
  if (message) assert.match(e.message, message);
  return true;
};

describe('shared pools: the marker verdict', () => {
  const pool = { name: 'nfs1', path: '/mnt/nfs1', id: 'id-1' };
  const marker = (id: string): PoolMarker => ({ pool: 'nfs1', id, createdBy: 'h1', createdAt: 'x' });

  it('is available only where the marker carries the pool id', () => {
    assert.deepEqual(judgeMarker(pool, { kind: 'marker', marker: marker('id-1') }), { available: true });
    const other = judgeMarker(pool, { kind: 'marker', marker: { ...marker('id-2'), pool: 'old' } });
    assert.equal(other.available, false);
    assert.match(other.reason ?? '', /marker of another storage \(pool old, id id-2, made by h1\).*another storage is mounted there/);
  });

  it('names a missing path, a missing marker and an unreadable one', () => {
    assert.match(judgeMarker(pool, { kind: 'missing' }).reason ?? '', /\/mnt\/nfs1 does not exist on this host/);
    assert.match(judgeMarker(pool, { kind: 'none' }).reason ?? '', /holds no pool marker: it is not pool nfs1's storage here/);
    assert.match(judgeMarker(pool, { kind: 'error', message: 'permission denied' }).reason ?? '', /\/mnt\/nfs1: permission denied/);
    for (const k of ['missing', 'none'] as const) assert.equal(judgeMarker(pool, { kind: k }).available, false);
  });

  it('compares paths without their trailing slashes', () => {
    assert.ok(samePath('/srv/a/', '/srv/a'));
    assert.ok(samePath('/', '/'));
    assert.ok(!samePath('/srv/a', '/srv/ab'));
  });
});

describe('shared pools: a storage that does not answer', () => {
  it('is unavailable after the deadline, and a read still under way is not started again', async () => {
    const store = SqliteStateStore.open(':memory:');
    const pool = { name: 'nfs9', type: 'dir' as const, path: '/mnt/hung', shared: true, id: 'id-9', description: '', createdAt: 'x' };
    await store.put('/shared/storage-pools/nfs9', pool);
    const ours: MarkerRead = { kind: 'marker', marker: { pool: 'nfs9', id: 'id-9', createdBy: 'h1', createdAt: 'x' } };
    let reads = 0;
    let answer: (r: MarkerRead) => void = () => undefined;
    let mounted = false;
    const hung = {
      readMarker: () => {
        reads++;
        return mounted ? Promise.resolve(ours) : new Promise<MarkerRead>((r) => (answer = r));
      },
      init: async () => undefined,
    } as unknown as StorageBackend;
    const shared = new SharedPools({ store, hostName: 'h1', backend: () => hung, events: new EventBus('h1'), log: silentLogger, answerMs: 50 });
    const first = await shared.check(pool);
    assert.deepEqual(first, { available: false, reason: '/mnt/hung: the storage did not answer within 0.05 s (a hung mount?)' });
    assert.equal((await shared.check(pool)).available, false);
    assert.equal(reads, 1, 'one read waited for, not two started');
    assert.equal((await shared.hosts(pool))[0]?.available, false, 'the answer is recorded');
    // The hung read ends at last; the next look is a new one, and the storage answers now.
    mounted = true;
    answer(ours);
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(await shared.check(pool), { available: true });
    assert.equal(reads, 2);
    await shared.close();
  });
});

/** A VM driver whose disks are real (small) qcow2 files, as the QEMU driver makes them. */
class DiskDriver extends FakeDriver {
  async provision(instance: Instance, image: ImageRecord | undefined, paths: InstancePaths, _progress?: unknown, disks: DiskRequest[] = []): Promise<Instance> {
    return provisionVmDisks(instance, image, paths, disks, new QemuImg());
  }
}

interface Host {
  name: string;
  dir: string;
  events: EventBus;
  ops: OperationManager;
  instances: InstanceService;
  storage: StorageService;
}

/** One host of a two-host "cluster" on one store: its own data directory and per-host scope. */
async function makeHost(name: string, inner: SqliteStateStore, root: string, all: string[]): Promise<Host> {
  const dir = await mkdtemp(join(root, `${name}-`));
  const store = new ScopedStore(inner, { scope: localKey(name, ''), prefixes: LOCAL_PREFIXES });
  const events = new EventBus(name);
  const ops = new OperationManager(store, events, name, silentLogger);
  const paths = new DataPaths(dir);
  const images = new ImageService(store, paths, ops);
  const extensions: NonNullable<ConstructorParameters<typeof InstanceService>[0]['extensions']> = [];
  const instances = new InstanceService({
    store,
    drivers: new Map([
      ['vm', new DiskDriver()],
      ['container', new FakeDriver()],
    ]),
    images,
    operations: ops,
    events,
    log: silentLogger,
    hostName: name,
    instancesDir: paths.instancesDir,
    capacity: () => ({ cpus: 4, memoryMiB: 4096 }),
    overcommit: { cpu: 1, memory: 1 },
    stopTimeoutMs: 200,
    consoleLogMaxBytes: 1024,
    extensions,
  });
  const storage = new StorageService({
    store,
    defaultPoolPath: dir,
    instances,
    images,
    events,
    log: silentLogger,
    poolKeysElsewhere: async (pool) => all.filter((h) => h !== name).map((h) => ({ host: h, key: localKey(h, `/storage-pools/${pool}`) })),
  });
  await storage.init();
  extensions.push(storage.extension());
  return { name, dir, events, ops, instances, storage };
}

describe('shared pools: two hosts on one store', () => {
  let root: string;
  let inner: SqliteStateStore;
  let h1: Host;
  let h2: Host;
  let shared: string;
  let kernel: string;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'hf-unit-shared-'));
    kernel = join(root, 'vmlinuz');
    await writeFile(kernel, 'not a kernel');
  });
  after(async () => {
    await rm(root, { recursive: true, force: true });
  });
  beforeEach(async () => {
    await h1?.storage.close();
    await h2?.storage.close();
    inner = SqliteStateStore.open(':memory:');
    h1 = await makeHost('h1', inner, root, ['h1', 'h2']);
    h2 = await makeHost('h2', inner, root, ['h1', 'h2']);
    shared = await mkdtemp(join(root, 'share-'));
  });

  /** Creates the pool on h1 and waits for h2's own check of it (its watch). */
  const createShared = async (name = 'nfs1', path = shared) => {
    const checked = h2.events.waitFor((e) => e.type === 'storage.pool.access' && e.data.pool === name, 5_000);
    const view = await h1.storage.createPool({ name, path, shared: true });
    await checked;
    return view;
  };

  it('makes one pool that both hosts list, each host checking it and recording the answer', async () => {
    const view = await createShared();
    assert.equal(view.shared, true);
    assert.equal(view.createdBy, 'h1');
    assert.ok(view.id);
    const marker = JSON.parse(await readFile(join(shared, POOL_MARKER_FILE), 'utf8')) as PoolMarker;
    assert.equal(marker.id, view.id, 'the storage carries the pool id');
    const seen = await h2.storage.getPool('nfs1');
    assert.equal(seen.available, true);
    assert.deepEqual(seen.hosts?.map((h) => `${h.host}:${h.available}`).sort(), ['h1:true', 'h2:true']);
    assert.deepEqual((await h2.storage.listPools()).map((p) => `${p.name}:${p.shared}`), ['default:false', 'nfs1:true']);
    // Each host's own pools stay its own: h1's default is not h2's.
    assert.notEqual((await h1.storage.getPool('default')).path, (await h2.storage.getPool('default')).path);
    assert.deepEqual((await h1.storage.poolHosts('nfs1'))?.sort(), ['h1', 'h2']);
    assert.equal(await h1.storage.poolHosts('default'), undefined, 'a host pool gives placement no host list');
  });

  it('keeps pool names unique across host pools, shared pools and every host', async () => {
    await h2.storage.createPool({ name: 'fast', path: join(root, 'h2-fast') });
    await assert.rejects(h1.storage.createPool({ name: 'fast', path: join(root, 'other'), shared: true }), code('HF_ERR_ALREADY_EXISTS', /host h2 has a storage pool named "fast"/));
    assert.equal(existsSync(join(root, 'other')), false, 'the refused create made nothing');
    await h1.storage.createPool({ name: 'fast', path: join(root, 'h1-fast') }); // host pools may share a name
    await assert.rejects(h1.storage.createPool({ name: 'default', path: join(root, 'd'), shared: true }), code('HF_ERR_ALREADY_EXISTS'));
    await createShared();
    await assert.rejects(h2.storage.createPool({ name: 'nfs1', path: join(root, 'x') }), code('HF_ERR_ALREADY_EXISTS', /shared storage pool "nfs1" already exists/));
    await assert.rejects(h2.storage.createPool({ name: 'nfs2', path: shared, shared: true }), code('HF_ERR_CONFLICT', /pool nfs1 already uses/));
    await assert.rejects(h2.storage.createPool({ name: 'nfs2', path: `${shared}/.`, shared: true }), code('HF_ERR_CONFLICT'));
  });

  it('creates a volume from h2 that h1 lists and attaches nowhere else once attached', async () => {
    await createShared();
    const v = await h2.storage.createVolume('nfs1', { name: 'data1', size: '4M' });
    assert.ok(v.path.startsWith(shared), v.path);
    assert.ok(existsSync(v.path));
    assert.deepEqual((await h1.storage.listVolumes('nfs1')).map((x) => x.ref), ['nfs1/data1']);
    await h2.instances.create({ name: 'vm2', boot: { kind: 'kernel', kernel } });
    await h1.instances.create({ name: 'vm1', boot: { kind: 'kernel', kernel } });
    await h2.storage.attach('vm2', { volume: 'nfs1/data1' });
    assert.deepEqual((await h1.storage.getVolume('nfs1/data1')).attachedTo, { instance: 'vm2', disk: 'data1' });
    await assert.rejects(h1.storage.attach('vm1', { volume: 'nfs1/data1' }), code('HF_ERR_CONFLICT', /already attached to vm2 on host h2/));
    await assert.rejects(h1.storage.deleteVolume('nfs1/data1'), code('HF_ERR_CONFLICT', /attached to vm2/));
    // Host pools of one name are two pools: h1's default/x is not h2's.
    await h1.storage.createVolume('default', { name: 'x', size: '2M' });
    await h2.storage.createVolume('default', { name: 'x', size: '2M' });
    await h2.storage.attach('vm2', { volume: 'default/x' });
    assert.equal((await h1.storage.getVolume('default/x')).attachedTo, undefined);
    await h1.storage.attach('vm1', { volume: 'default/x' });
  });

  it('keeps a VM’s disks in the pool and refuses to delete the pool while it does', async () => {
    await createShared();
    const inst = await h2.instances.create({ name: 'vm2', boot: { kind: 'kernel', kernel }, storage: 'nfs1', disks: [{ name: 'data', size: '4M' }] });
    assert.equal(inst.storage, 'nfs1');
    assert.equal(inst.config.disks[0]?.path, join(shared, 'instances', 'vm2', 'data.qcow2'));
    assert.ok(existsSync(inst.config.disks[0]!.path));
    assert.equal(await h1.storage.disksDir(inst), join(shared, 'instances', 'vm2'));
    await assert.rejects(h1.storage.deletePool('nfs1'), code('HF_ERR_CONFLICT', /holds the disks of vm2 \(on h2\)/));
    await assert.rejects(h1.instances.create({ name: 'c1', type: 'container', storage: 'nfs1' }), code('HF_ERR_UNSUPPORTED', /root filesystem in its instance directory/));
    await assert.rejects(h1.instances.create({ name: 'vm2x', boot: { kind: 'kernel', kernel }, storage: 'nope' }), code('HF_ERR_POOL_NOT_FOUND'));
    assert.equal(existsSync(h1.instances.paths('vm2x').dir), false, 'the refused create left no directory');
    // A create that fails after its disks directory was made in the pool takes it back.
    await assert.rejects(h1.instances.create({ name: 'vm3', boot: { kind: 'kernel', kernel }, storage: 'nfs1', disks: [{ name: 'a', size: '2M' }, { name: 'b', path: join(root, 'absent.qcow2') }] }), code('HF_ERR_VALIDATION', /absent\.qcow2 does not exist/));
    assert.equal(existsSync(join(shared, 'instances', 'vm3')), false, 'no disks directory left in the pool');
    assert.equal(existsSync(h1.instances.paths('vm3').dir), false);
    // `storage: default` is the instance directory itself.
    const local = await h1.instances.create({ name: 'vm1', boot: { kind: 'kernel', kernel }, storage: 'default', disks: [{ name: 'd', size: '2M' }] });
    assert.equal(local.config.disks[0]?.path, join(h1.instances.paths('vm1').dir, 'd.qcow2'));
    const op = await h2.instances.delete('vm2');
    assert.equal((await h2.ops.wait(op.id, 10_000)).status, 'success');
    assert.equal(existsSync(join(shared, 'instances', 'vm2')), false, 'its disks went with it');
    await h1.storage.deletePool('nfs1');
    assert.equal(existsSync(join(shared, POOL_MARKER_FILE)), false, 'the marker of a deleted pool is gone');
    assert.deepEqual((await h2.storage.listPools()).map((p) => p.name), ['default']);
    assert.deepEqual((await inner.list('/shared/')).entries.map((e) => e.key), [], 'no record of it is left');
  });

  it('shows a pool unavailable where the storage is not the pool’s, and refuses disks there', async () => {
    await createShared();
    // The storage seen at the path changes (another share mounted): its marker is another pool's.
    const real = await readFile(join(shared, POOL_MARKER_FILE), 'utf8');
    await writeFile(join(shared, POOL_MARKER_FILE), JSON.stringify({ pool: 'elsewhere', id: 'other-id', createdBy: 'h9', createdAt: 'x' }));
    await assert.rejects(h2.storage.createVolume('nfs1', { name: 'v', size: '2M' }), code('HF_ERR_POOL_UNAVAILABLE', /not available on host h2: .*marker of another storage \(pool elsewhere/));
    const seen = await h1.storage.getPool('nfs1');
    assert.deepEqual(seen.hosts?.map((h) => `${h.host}:${h.available}`).sort(), ['h1:true', 'h2:false'], 'h2 recorded its answer for every host to read');
    assert.match(seen.hosts?.find((h) => h.host === 'h2')?.reason ?? '', /another storage is mounted there/);
    assert.deepEqual(await h1.storage.poolHosts('nfs1'), ['h1']);
    await assert.rejects(h2.instances.create({ name: 'vm2', boot: { kind: 'kernel', kernel }, storage: 'nfs1' }), code('HF_ERR_POOL_UNAVAILABLE'));
    assert.equal(existsSync(h2.instances.paths('vm2').dir), false);
    // The marker gone (an empty mount point): still unavailable; the real storage back: usable again.
    await rm(join(shared, POOL_MARKER_FILE));
    await assert.rejects(h2.storage.createVolume('nfs1', { name: 'v', size: '2M' }), code('HF_ERR_POOL_UNAVAILABLE', /holds no pool marker/));
    await writeFile(join(shared, POOL_MARKER_FILE), real);
    await h2.storage.createVolume('nfs1', { name: 'v', size: '2M' });
    assert.equal((await h2.storage.getPool('nfs1')).available, true);
  });

  it('lists a joining host’s pools that clash: a host pool named as a shared one, another storage, a host pool’s name', async () => {
    const view = await createShared();
    await h2.storage.createPool({ name: 'fast', path: join(root, 'h2-fast') });
    const clashes = await h1.storage.joinClashes([
      { name: 'nfs1', shared: false },
      { name: 'nfs1', shared: true, id: 'another' },
      { name: 'fast', shared: true, id: 'x' },
      { name: 'default', shared: true, id: 'y' },
      { name: 'nfs1', shared: true, id: view.id },
      { name: 'new1', shared: true, id: 'z' },
      { name: 'default', shared: false },
    ]);
    assert.deepEqual(
      clashes.map((c) => `${c.name}: ${c.why.split(':')[0]}`),
      [
        'nfs1: the cluster has a shared pool nfs1 (' + shared + '); the host\'s own pool needs another name',
        'nfs1: the cluster\'s shared pool nfs1 (' + shared + ') is another storage (id ' + view.id + ', the host\'s is another)',
        'fast: host h2 has a pool of its own named fast',
        'default: hosts h1, h2 have pools of their own named default',
      ],
    );
  });
});
