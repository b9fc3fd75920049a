// The storage services over fake drivers: a step that fails half-way leaves nothing behind
// (publish, volume attach, container copy), and container snapshots go through the shared
// SnapshotService — listed with the others, one event each, a running container frozen meanwhile.
// qemu-img is real (it writes the small qcow2 disks); the instances run nowhere.
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HfError } from '../../src/core/errors.js';
import type { ImageRecord } from '../../src/core/model/image.js';
import type { DiskConfig, Instance, InstanceConfig } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import type { DiskRequest, InstanceDriver, InstanceHandle, InstancePaths, StartContext } from '../../src/drivers/driver.js';
import type { HfEvent } from '../../src/services/events.js';
import type { ImageService } from '../../src/services/images.js';
import type { InstanceService } from '../../src/services/instances.js';
import { SnapshotService } from '../../src/services/snapshots.js';
import { CopyService, ImageTransferService, StorageService } from '../../src/services/storage/index.js';
import { silentLogger } from '../../src/util/log.js';
import { CONTAINER_CAPABILITIES } from '../../src/drivers/container/capabilities.js';
import { provisionVmDisks } from '../../src/drivers/qemu/provision.js';
import { QemuImg } from '../../src/storage/qemu-img.js';
import { FakeDriver, FakeHandle } from '../helpers/fake-driver.js';
import { buildWorld, type TestWorld } from '../helpers/world.js';

/** Containers without runc: the root filesystem is one file, snapshots and copies are copies of it. */
class FakeContainerDriver implements InstanceDriver {
  readonly type = 'container' as const;
  readonly capabilities = CONTAINER_CAPABILITIES;
  readonly runner = new FakeDriver();
  readonly copies = new Map<string, string>();
  released: string[] = [];
  /** What the handle's state was while each snapshot was taken. */
  snapshotStates: string[] = [];

  async provision(instance: Instance, _image: ImageRecord | undefined, paths: InstancePaths): Promise<Instance> {
    const from = this.copies.get(instance.name);
    await writeFile(join(paths.dir, 'rootfs'), from ? `copy of ${from}` : 'fresh');
    return instance;
  }
  async check(): Promise<void> {}
  start(instance: Instance, ctx: StartContext): Promise<InstanceHandle> {
    return this.runner.start(instance, ctx);
  }
  attach(instance: Instance): Promise<InstanceHandle | null> {
    return this.runner.attach(instance);
  }
  async cleanup(): Promise<void> {}
  async createRootfsSnapshot(instance: Instance, paths: InstancePaths, tag: string): Promise<void> {
    this.snapshotStates.push(this.runner.handles.get(instance.name)?.state ?? 'stopped');
    await mkdir(join(paths.dir, 'snapshots'), { recursive: true });
    await writeFile(join(paths.dir, 'snapshots', tag), JSON.stringify(instance.config));
  }
  async revertRootfsSnapshot(instance: Instance): Promise<InstanceConfig> {
    return instance.config;
  }
  async deleteRootfsSnapshot(_instance: Instance, paths: InstancePaths, tag: string): Promise<void> {
    await rm(join(paths.dir, 'snapshots', tag), { force: true });
  }
  async prepareCopy(src: Instance, _srcPaths: InstancePaths, dstName: string): Promise<() => void> {
    this.copies.set(dstName, src.name);
    return () => {
      this.copies.delete(dstName);
      this.released.push(dstName);
    };
  }
}

/** A handle that records disk hot-plugs. */
class DiskHandle extends FakeHandle {
  readonly plugged = new Set<string>();
  async attachDisk(disk: DiskConfig): Promise<void> {
    this.plugged.add(disk.name);
  }
  async detachDisk(name: string): Promise<void> {
    this.plugged.delete(name);
  }
}

class DiskVmDriver extends FakeDriver {
  /** Real qcow2 files, as the QEMU driver makes them: publish and attach read them. */
  async provision(instance: Instance, image: ImageRecord | undefined, paths: InstancePaths, _progress?: unknown, disks: DiskRequest[] = []): Promise<Instance> {
    return provisionVmDisks(instance, image, paths, disks, new QemuImg());
  }
  override async start(instance: Instance): Promise<InstanceHandle> {
    const h = new DiskHandle({ pid: 4242, pidStartTime: 1, accel: 'tcg', startedAt: new Date().toISOString(), details: {} }, true);
    this.handles.set(instance.name, h);
    return h;
  }
}

/** `target` with one method replaced: the fake step that fails. */
function failing<T extends object, K extends keyof T>(target: T, method: K, replacement: T[K]): T {
  return Object.create(target, { [method]: { value: replacement } }) as T;
}

interface World extends TestWorld {
  vm: DiskVmDriver;
  ct: FakeContainerDriver;
  storage: StorageService;
  snapshots: SnapshotService;
  seen: HfEvent[];
}

async function world(dir: string): Promise<World> {
  const vm = new DiskVmDriver();
  const ct = new FakeContainerDriver();
  const w = await buildWorld(dir, { drivers: [['vm', vm], ['container', ct]] });
  const drivers = new Map<Instance['type'], InstanceDriver>([['vm', vm], ['container', ct]]);
  const storage = new StorageService({ store: w.store, defaultPoolPath: dir, instances: w.svc, images: w.images, events: w.events, log: silentLogger });
  await storage.init();
  const snapshots = new SnapshotService({ store: w.store, instances: w.svc, operations: w.ops, drivers, events: w.events, log: silentLogger });
  const seen: HfEvent[] = [];
  w.events.subscribe((e) => void seen.push(e));
  return { ...w, vm, ct, storage, snapshots, seen };
}

async function done(w: World, started: Promise<Operation>): Promise<Operation> {
  return w.ops.wait((await started).id, 30_000);
}

describe('storage services: rollback and container snapshots (fake drivers)', () => {
  let root: string;
  let w: World;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'hf-unit-storage-'));
  });
  after(async () => {
    await rm(root, { recursive: true, force: true });
  });
  beforeEach(async () => {
    w = await world(await mkdtemp(join(root, 'w-')));
  });

  const kernelVm = async (name: string) => {
    const kernel = join(w.dir, 'vmlinuz');
    await writeFile(kernel, 'not a kernel');
    return w.svc.create({ name, boot: { kind: 'kernel', kernel }, disks: [{ name: 'root', size: '4M' }] });
  };

  it('a publish that fails at registering its image leaves no image row, directory or staging file', async () => {
    await kernelVm('pub1');
    const images = failing<ImageService, 'register'>(w.images, 'register', async (rec: ImageRecord) => {
      await w.images.register(rec); // the row is written, then the step fails
      throw new HfError('HF_ERR_INTERNAL', 'injected: register failed after writing');
    });
    const transfers = new ImageTransferService({ storage: w.storage, instances: w.svc, images, operations: w.ops, events: w.events, log: silentLogger });
    const op = await done(w, transfers.publish('pub1', { as: 'tmpl' }));
    assert.equal(op.status, 'failure');
    assert.match(op.error?.message ?? '', /injected/);
    assert.equal(await w.images.find('tmpl'), undefined, 'no image row');
    assert.equal(existsSync(w.images.dir('tmpl')), false, 'no image directory');
    const staging = w.storage.backend(await w.storage.pool('default')).stagingDir();
    assert.deepEqual(existsSync(staging) ? await readdir(staging) : [], [], 'no staging leftovers');
    assert.equal(w.seen.filter((e) => e.type === 'image.published').length, 0);
  });

  it('an attach that fails at recording the disk unplugs it from the running VM and records nothing', async () => {
    await kernelVm('att1');
    await w.storage.createVolume('default', { name: 'data1', size: '2M' });
    assert.equal((await done(w, w.svc.action('att1', 'start'))).status, 'success');
    const instances = failing<InstanceService, 'patch'>(w.svc, 'patch', async () => {
      throw new HfError('HF_ERR_CONFLICT', 'injected: the record changed meanwhile');
    });
    const storage = new StorageService({ store: w.store, defaultPoolPath: w.dir, instances, images: w.images, events: w.events, log: silentLogger });
    await assert.rejects(storage.attach('att1', { volume: 'default/data1' }), /injected/);
    const handle = w.vm.handles.get('att1') as DiskHandle;
    assert.deepEqual([...handle.plugged], [], 'the hot-plugged disk was unplugged');
    assert.equal((await w.svc.get('att1')).config.disks.some((d) => d.volume === 'default/data1'), false);
    assert.equal((await w.storage.getVolume('default/data1')).attachedTo, undefined);
  });

  it('a container copy that fails after its create leaves no instance, directory or announced source', async () => {
    await w.svc.create({ name: 'c1', type: 'container' });
    const instances = failing<InstanceService, 'patch'>(w.svc, 'patch', async () => {
      throw new HfError('HF_ERR_CONFLICT', 'injected: patch failed');
    });
    const copies = new CopyService({ storage: w.storage, instances, operations: w.ops, drivers: new Map<Instance['type'], InstanceDriver>([['vm', w.vm], ['container', w.ct]]), events: w.events, log: silentLogger });
    const op = await done(w, copies.copy('c1', { name: 'c2' }));
    assert.equal(op.status, 'failure');
    assert.match(op.error?.message ?? '', /injected/);
    assert.deepEqual((await w.svc.list()).map((i) => i.name), ['c1']);
    assert.equal(existsSync(w.svc.paths('c2').dir), false, 'no instance directory');
    assert.deepEqual(w.ct.released, ['c2'], 'the copy source was released');
    assert.equal(w.ct.copies.size, 0);
    assert.equal(w.seen.filter((e) => e.type === 'instance.copied').length, 0);

    // and the same copy without the failure works, through the same path
    const ok = new CopyService({ storage: w.storage, instances: w.svc, operations: w.ops, drivers: new Map<Instance['type'], InstanceDriver>([['container', w.ct]]), events: w.events, log: silentLogger });
    assert.equal((await done(w, ok.copy('c1', { name: 'c3' }))).status, 'success');
    assert.equal((await w.svc.get('c3')).type, 'container');
    await assert.rejects(ok.copy('c1', { name: 'c4', linked: true }), (e: HfError) => e.code === 'HF_ERR_UNSUPPORTED');
  });

  it('a container snapshot is a shared snapshot record: listed, one event, frozen while taken', async () => {
    await w.svc.create({ name: 'c1', type: 'container' });
    assert.equal((await done(w, w.svc.action('c1', 'start'))).status, 'success');
    const before = w.seen.length;
    const op = await done(w, w.snapshots.create('c1', { name: 's1' }));
    assert.equal(op.status, 'success', op.error?.message);
    const snapshotEvents = w.seen.slice(before).filter((e) => e.type.includes('snapshot'));
    assert.deepEqual(snapshotEvents.map((e) => e.type), ['snapshot.created'], 'exactly one event');
    assert.deepEqual(w.ct.snapshotStates, ['paused'], 'frozen while its files were copied');
    assert.equal(w.ct.runner.handles.get('c1')?.state, 'running', 'thawed afterwards');
    const listing = await w.snapshots.list('c1');
    assert.deepEqual(listing.snapshots.map((s) => [s.name, s.takenWhile]), [['s1', 'running']]);
    assert.equal(listing.current, 's1');
    await assert.rejects(w.snapshots.create('c1', { name: 'm', memory: true }), (e: HfError) => e.code === 'HF_ERR_UNSUPPORTED');
    await assert.rejects(done(w, w.snapshots.revert('c1', 's1')).then((o) => {
      if (o.status === 'failure') throw new HfError('HF_ERR_INSTANCE_RUNNING', o.error?.message ?? '');
    }), /stop it before reverting/);
    assert.equal((await done(w, w.snapshots.delete('c1', 's1'))).status, 'success');
    assert.equal(existsSync(join(w.svc.paths('c1').dir, 'snapshots', 's1')), false);
    assert.deepEqual((await w.snapshots.list('c1')).snapshots, []);
  });
});
