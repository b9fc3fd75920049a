// Instance snapshots. Records live in the state store (`/snapshots/<instance>/<name>`, plus the
// instance's current snapshot in `/snapshot-heads/<instance>`) and form a tree: each snapshot's
// parent is the one its instance descended from when it was taken. The data lives in the disks.
//
// VMs (qcow2 internal snapshots):
//  - stopped: `qemu-img snapshot -c/-a/-d` on every writable disk;
//  - running, disk-only: one QMP transaction of blockdev-snapshot-internal-sync (all disks at
//    one instant, the guest keeps running, crash-consistent);
//  - running, --memory: QEMU's snapshot-save job (RAM + device state into the first disk's
//    image); revert is a snapshot-load job, back to the exact running moment. Reverting a memory
//    snapshot of a stopped VM starts it first, then loads.
//  - reverting a disk-only snapshot of a running VM restarts it: it is stopped (its memory is
//    discarded anyway), its disks reverted, and started again.
//  - raw disks have no internal snapshots: refused with HF_ERR_UNSUPPORTED naming the disk.
// Types whose driver keeps snapshots of its own files (containers: root filesystem + definition,
// `InstanceDriver.createRootfsSnapshot`…) go through DriverSnapshots below; records, tree and
// events are the same for every type, so `snapshot list` shows every snapshot and each one
// emits one event.
import { HfError, isHfError } from '../core/errors.js';
import { nameSchema, type DiskConfig, type Instance, type InstanceType } from '../core/model/instance.js';
import type { Operation } from '../core/model/operation.js';
import { parseInput } from '../core/validate.js';
import type { InstanceDriver, InstanceHandle } from '../drivers/driver.js';
import { Collection } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import {
  createSnapshotSchema,
  snapshotHeadSchema,
  snapshotRecordSchema,
  type CreateSnapshotRequest,
  type SnapshotHead,
  type SnapshotListing,
  type SnapshotRecord,
} from '../storage/model.js';
import { QemuImg } from '../storage/qemu-img.js';
import { buildTree, planDelete, renderTree } from '../storage/snapshot-tree.js';
import type { Logger } from '../util/log.js';
import { UndoStack } from '../util/undo.js';
import type { EventBus } from './events.js';
import type { InstanceExtension } from './extensions.js';
import type { InstanceService } from './instances.js';
import type { OperationContext, OperationManager } from './operations.js';
import { liveHandle } from './instances/live-handle.js';

/**
 * What a type of instance does for snapshots (VMs: qcow2 internal snapshots; DriverSnapshots).
 * The service has asked the lifecycle table first: a provider is called only for what the table
 * allowed, and `live` (the running instance's handle) is given exactly when it allowed it live.
 */
export interface SnapshotProvider {
  /** Validates and returns the record to store (disks covered, vmstate disk…), before anything changes. */
  plan(inst: Instance, req: CreateSnapshotRequest, parent: string | undefined): SnapshotRecord;
  create(inst: Instance, live: InstanceHandle | undefined, rec: SnapshotRecord, ctx: OperationContext, undo: UndoStack): Promise<void>;
  /** Reverts (`live`: the instance runs); returns what it did (for the operation result). */
  revert(inst: Instance, rec: SnapshotRecord, ctx: OperationContext, live: boolean): Promise<Record<string, unknown>>;
  delete(inst: Instance, live: InstanceHandle | undefined, rec: SnapshotRecord): Promise<void>;
}

export interface SnapshotServiceDeps {
  store: StateStore;
  instances: InstanceService;
  operations: OperationManager;
  /** Drivers of other types: those with rootfs snapshots (containers) get DriverSnapshots. */
  drivers?: ReadonlyMap<InstanceType, InstanceDriver>;
  events: EventBus;
  log: Logger;
  qemuImg?: QemuImg;
}

export class SnapshotService {
  private readonly heads: Collection<SnapshotHead>;
  private readonly providers = new Map<string, SnapshotProvider>();
  private readonly qemuImg: QemuImg;

  constructor(private readonly d: SnapshotServiceDeps) {
    this.heads = new Collection<SnapshotHead>(d.store, '/snapshot-heads/', snapshotHeadSchema);
    this.qemuImg = d.qemuImg ?? new QemuImg();
    this.providers.set('vm', new VmSnapshots(this.qemuImg, d));
    for (const [type, driver] of d.drivers ?? []) if (type !== 'vm' && driver.createRootfsSnapshot) this.providers.set(type, new DriverSnapshots(driver, d));
  }

  registerProvider(type: string, p: SnapshotProvider): void {
    this.providers.set(type, p);
  }

  /** Snapshot records go with their instance. */
  extension(): InstanceExtension {
    return {
      name: 'snapshots',
      onDelete: async (inst) => {
        for (const { value } of await this.records(inst.name).list()) await this.records(inst.name).delete(value.name);
        await this.heads.delete(inst.name).catch(() => undefined);
      },
    };
  }

  private records(instance: string): Collection<SnapshotRecord> {
    return new Collection<SnapshotRecord>(this.d.store, `/snapshots/${instance}/`, snapshotRecordSchema);
  }

  private provider(inst: Instance): SnapshotProvider {
    const p = this.providers.get(inst.type);
    if (!p) throw new HfError('HF_ERR_UNSUPPORTED', `snapshots of ${inst.type} instances are not supported on this host yet`);
    return p;
  }

  async current(instance: string): Promise<string | undefined> {
    return (await this.heads.get(instance))?.value.current;
  }

  private async setCurrent(instance: string, current: string | undefined): Promise<void> {
    const value: SnapshotHead = current === undefined ? { instance } : { instance, current };
    if (await this.heads.get(instance)) await this.heads.update(instance, () => value);
    else await this.heads.create(instance, value);
  }

  async list(instance: string): Promise<SnapshotListing> {
    await this.d.instances.get(instance);
    const snapshots = (await this.records(instance).list()).map((v) => v.value);
    const current = await this.current(instance);
    const tree = buildTree(snapshots);
    const out: SnapshotListing = { instance, snapshots, tree, text: renderTree(tree, current) };
    if (current !== undefined) out.current = current;
    return out;
  }

  async get(instance: string, name: string): Promise<SnapshotRecord> {
    await this.d.instances.get(instance);
    if (!nameSchema.safeParse(name).success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid snapshot name`);
    const v = await this.records(instance).get(name);
    if (!v) {
      const known = (await this.records(instance).list()).map((x) => x.value.name);
      throw new HfError('HF_ERR_SNAPSHOT_NOT_FOUND', `instance ${instance} has no snapshot "${name}"${known.length ? ` (it has: ${known.join(', ')})` : ' (it has none)'}`);
    }
    return v.value;
  }

  async create(instance: string, body: unknown): Promise<Operation> {
    const req = parseInput(createSnapshotSchema, body);
    const inst = await this.d.instances.get(instance);
    const action = req.memory ? 'snapshot-memory' : 'snapshot';
    // Fail fast, before an operation exists; checked again under the lock.
    this.d.instances.precheck(inst, action);
    const provider = this.provider(inst);
    if (await this.records(instance).get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance ${instance} already has a snapshot "${req.name}"`);
    provider.plan(inst, req, await this.current(instance));
    return this.d.operations.start('snapshot.create', { kind: 'instance', name: instance }, (ctx) =>
      this.d.instances.withInstance(
        instance,
        'snapshot',
        async (cur, handle) =>
          UndoStack.run(async (undo) => {
            const live = this.d.instances.allowed(cur, action).live ? liveHandle(cur, handle) : undefined;
            if (await this.records(instance).get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance ${instance} already has a snapshot "${req.name}"`);
            const rec = provider.plan(cur, req, await this.current(instance));
            await provider.create(cur, live, rec, ctx, undo);
            await this.records(instance).create(rec.name, rec);
            undo.add('remove snapshot record', () => this.records(instance).delete(rec.name).then(() => undefined));
            await this.setCurrent(instance, rec.name);
            this.d.events.publish('snapshot.created', { instance, name: rec.name, memory: rec.memory });
            return { snapshot: rec.name, parent: rec.parent ?? null, memory: rec.memory, disks: rec.disks };
          }, this.d.log),
        ctx,
      ),
    );
  }

  async revert(instance: string, name: string): Promise<Operation> {
    const rec = await this.get(instance, name);
    const inst = await this.d.instances.get(instance);
    this.d.instances.precheck(inst, 'revert');
    const provider = this.provider(inst);
    return this.d.operations.start('snapshot.revert', { kind: 'instance', name: instance }, async (ctx) => {
      const cur = await this.d.instances.get(instance);
      const result = await provider.revert(cur, rec, ctx, this.d.instances.allowed(cur, 'revert').live);
      await this.setCurrent(instance, rec.name);
      this.d.events.publish('snapshot.reverted', { instance, name });
      return { snapshot: name, ...result };
    });
  }

  async delete(instance: string, name: string): Promise<Operation> {
    await this.get(instance, name);
    const inst = await this.d.instances.get(instance);
    this.d.instances.precheck(inst, 'delete-snapshot');
    const provider = this.provider(inst);
    return this.d.operations.start('snapshot.delete', { kind: 'instance', name: instance }, (ctx) =>
      this.d.instances.withInstance(instance, 'snapshot delete', async (cur, handle) => {
        const live = this.d.instances.allowed(cur, 'delete-snapshot').live ? liveHandle(cur, handle) : undefined;
        const rec = await this.get(instance, name);
        ctx.progress(10, `deleting snapshot ${name}`);
        await provider.delete(cur, live, rec);
        const all = (await this.records(instance).list()).map((v) => v.value);
        const plan = planDelete(all, name, await this.current(instance));
        for (const r of plan.reparent) await this.records(instance).update(r.name, () => r);
        await this.records(instance).delete(name);
        await this.setCurrent(instance, plan.current);
        this.d.events.publish('snapshot.deleted', { instance, name });
        return { deleted: name, reparented: plan.reparent.map((r) => r.name), current: plan.current ?? null };
      }, ctx),
    );
  }
}

/** The disks a VM snapshot covers: writable hard disks, all of them qcow2. */
export function snapshotDisks(inst: Instance): DiskConfig[] {
  const disks = inst.config.disks.filter((d) => d.media === 'disk' && !d.readonly);
  if (!disks.length) throw new HfError('HF_ERR_UNSUPPORTED', `instance ${inst.name} has no writable disk to snapshot`);
  const raw = disks.filter((d) => d.format !== 'qcow2');
  if (raw.length) {
    throw new HfError(
      'HF_ERR_UNSUPPORTED',
      `cannot snapshot ${inst.name}: disk ${raw.map((d) => `${d.name} (${d.path})`).join(', ')} is ${raw[0]!.format}, and only qcow2 disks hold internal snapshots; ` +
        'convert it (stop the VM, `qemu-img convert -O qcow2`) or detach it first',
      { details: { disks: raw.map((d) => d.name) } },
    );
  }
  return disks;
}

class VmSnapshots implements SnapshotProvider {
  constructor(private readonly qemuImg: QemuImg, private readonly d: SnapshotServiceDeps) {}

  plan(inst: Instance, req: CreateSnapshotRequest, parent: string | undefined): SnapshotRecord {
    const disks = snapshotDisks(inst);
    const running = inst.state === 'running' || inst.state === 'paused';
    const rec: SnapshotRecord = {
      instance: inst.name,
      name: req.name,
      memory: req.memory,
      takenWhile: running ? (inst.state as 'running' | 'paused') : 'stopped',
      disks: disks.map((d) => d.name),
      description: req.description,
      createdAt: new Date().toISOString(),
    };
    if (parent !== undefined) rec.parent = parent;
    if (req.memory) rec.vmstateDisk = disks[0]!.name;
    return rec;
  }

  async create(inst: Instance, live: InstanceHandle | undefined, rec: SnapshotRecord, ctx: OperationContext, undo: UndoStack): Promise<void> {
    const disks = inst.config.disks.filter((d) => rec.disks.includes(d.name));
    if (live) {
      if (rec.memory) {
        const handle = liveHandle(inst, live, 'saveSnapshot');
        ctx.progress(5, 'saving RAM and device state');
        await handle.saveSnapshot(rec.name, rec.vmstateDisk!, rec.disks, (p) => ctx.progress(5 + p * 0.9, `saving state: ${Math.floor(p)}%`));
      } else {
        const handle = liveHandle(inst, live, 'snapshotDisks');
        ctx.progress(20, `snapshotting ${rec.disks.join(', ')} (live)`);
        await handle.snapshotDisks(rec.name, rec.disks);
      }
      undo.add('delete internal snapshot (live)', () => live.deleteSnapshot?.(rec.name, rec.disks));
      return;
    }
    for (const [i, disk] of disks.entries()) {
      ctx.progress(10 + (i / disks.length) * 80, `snapshotting ${disk.name}`);
      // A stale internal snapshot of the same name (from a crash before the record was written) goes first.
      if ((await this.qemuImg.snapshotList(disk.path)).some((s) => s.name === rec.name)) await this.qemuImg.snapshotDelete(disk.path, rec.name);
      await this.qemuImg.snapshotCreate(disk.path, rec.name);
      undo.add(`delete internal snapshot of ${disk.name}`, () => this.qemuImg.snapshotDelete(disk.path, rec.name));
    }
  }

  async revert(inst0: Instance, rec: SnapshotRecord, ctx: OperationContext, live: boolean): Promise<Record<string, unknown>> {
    const name = inst0.name;
    const missing = rec.disks.filter((n) => !inst0.config.disks.some((d) => d.name === n));
    if (missing.length) throw new HfError('HF_ERR_CONFLICT', `snapshot ${rec.name} covers disk(s) ${missing.join(', ')} that ${name} no longer has: re-attach them to revert`);

    if (rec.memory) {
      let started = false;
      if (!live) {
        ctx.progress(5, `starting ${name} to load its saved state`);
        await this.d.operations.succeeded(this.d.instances.action(name, 'start'));
        started = true;
      }
      await this.d.instances.withInstance(
        name,
        'snapshot revert',
        async (inst, h) => {
          if (!this.d.instances.allowed(inst, 'revert').live) throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', `instance ${name} stopped during the revert`);
          const handle = liveHandle(inst, h, 'loadSnapshot');
          ctx.progress(20, 'loading RAM, device state and disks');
          await handle.loadSnapshot(rec.name, rec.vmstateDisk ?? rec.disks[0]!, rec.disks, (p) => ctx.progress(20 + p * 0.75, `loading state: ${Math.floor(p)}%`));
        },
        ctx,
      );
      return { memory: true, started };
    }

    // Disk-only: the disks are reverted offline; a running VM is restarted around it.
    let restarted = false;
    if (live) {
      ctx.progress(5, `stopping ${name} (a disk-only revert discards its memory)`);
      await this.d.operations.succeeded(this.d.instances.action(name, 'stop', { force: true }));
      restarted = true;
    }
    try {
      await this.revertDisksOffline(name, rec, ctx);
    } catch (e) {
      // The guest was stopped for nothing: bring it back as it was before failing.
      if (restarted) await this.d.operations.succeeded(this.d.instances.action(name, 'start')).catch(() => undefined);
      throw e;
    }
    if (restarted) {
      ctx.progress(80, `starting ${name} again`);
      await this.d.operations.succeeded(this.d.instances.action(name, 'start'));
    }
    return { memory: false, restarted };
  }

  private async revertDisksOffline(name: string, rec: SnapshotRecord, ctx: OperationContext): Promise<void> {
    await this.d.instances.withInstance(name, 'snapshot revert', async (inst) => {
      if (this.d.instances.allowed(inst, 'revert').live) throw new HfError('HF_ERR_BUSY', `instance ${name} was started during the revert: try again`);
      const disks = inst.config.disks.filter((d) => rec.disks.includes(d.name));
      for (const [i, disk] of disks.entries()) {
        ctx.progress(20 + (i / disks.length) * 50, `reverting ${disk.name}`);
        try {
          await this.qemuImg.snapshotApply(disk.path, rec.name);
        } catch (e) {
          if (isHfError(e) && /not found|Could not find/i.test(e.message)) {
            throw new HfError('HF_ERR_SNAPSHOT_NOT_FOUND', `disk ${disk.name} of ${name} has no internal snapshot "${rec.name}" (was the disk replaced?)`, { cause: e });
          }
          throw e;
        }
      }
    }, ctx);
  }

  async delete(inst: Instance, live: InstanceHandle | undefined, rec: SnapshotRecord): Promise<void> {
    const disks = inst.config.disks.filter((d) => rec.disks.includes(d.name));
    if (live) {
      await liveHandle(inst, live, 'deleteSnapshot').deleteSnapshot(rec.name, disks.map((d) => d.name));
      return;
    }
    for (const disk of disks) {
      try {
        await this.qemuImg.snapshotDelete(disk.path, rec.name);
      } catch (e) {
        // Already gone from that disk: the record goes anyway.
        if (!(isHfError(e) && /not found|Could not find|No such file/i.test(e.message))) throw e;
        this.d.log.warn('internal snapshot missing on delete', { instance: inst.name, disk: disk.name, snapshot: rec.name });
      }
    }
  }
}

/**
 * Snapshots a driver keeps of its own files (containers: root filesystem + definition). A running
 * instance is frozen while its snapshot is made; revert needs it stopped and brings the
 * definition back (its NICs and disks stay as they are now).
 */
class DriverSnapshots implements SnapshotProvider {
  constructor(private readonly driver: InstanceDriver, private readonly d: SnapshotServiceDeps) {}

  plan(inst: Instance, req: CreateSnapshotRequest, parent: string | undefined): SnapshotRecord {
    const running = inst.state === 'running' || inst.state === 'paused';
    const rec: SnapshotRecord = {
      instance: inst.name,
      name: req.name,
      memory: false,
      takenWhile: running ? (inst.state as 'running' | 'paused') : 'stopped',
      disks: [],
      description: req.description,
      createdAt: new Date().toISOString(),
    };
    if (parent !== undefined) rec.parent = parent;
    return rec;
  }

  async create(inst: Instance, live: InstanceHandle | undefined, rec: SnapshotRecord, ctx: OperationContext, undo: UndoStack): Promise<void> {
    const paths = this.d.instances.paths(inst.name);
    // A paused instance is frozen already.
    const freeze = live !== undefined && inst.state === 'running';
    if (freeze) {
      ctx.progress(5, `freezing ${inst.name}`);
      await live.pause();
    }
    try {
      ctx.progress(10, 'copying the root filesystem');
      await this.driver.createRootfsSnapshot!(inst, paths, rec.name, { stateful: live !== undefined });
      undo.add('delete the snapshot files', () => this.driver.deleteRootfsSnapshot?.(inst, paths, rec.name));
    } finally {
      if (freeze) await live.resume();
    }
  }

  /** The table refuses a revert of a running instance whose driver has no "revert-live" (containers). */
  async revert(inst0: Instance, rec: SnapshotRecord, ctx: OperationContext): Promise<Record<string, unknown>> {
    const name = inst0.name;
    const revertFiles = this.driver.revertRootfsSnapshot;
    if (!revertFiles) throw new HfError('HF_ERR_UNSUPPORTED', `${inst0.type}s cannot revert snapshots on this host`);
    return this.d.instances.withInstance(
      name,
      'snapshot revert',
      async (cur) => {
        this.d.instances.allowed(cur, 'revert');
        ctx.progress(10, 'copying the snapshot back');
        const config = await revertFiles.call(this.driver, cur, this.d.instances.paths(name), rec.name);
        await this.d.instances.patch(name, (r) => ({ ...r, config: { ...config, nics: r.config.nics, disks: r.config.disks }, pending: {} }));
        return { restarted: false };
      },
      ctx,
    );
  }

  async delete(inst: Instance, _handle: InstanceHandle | undefined, rec: SnapshotRecord): Promise<void> {
    await this.driver.deleteRootfsSnapshot?.(inst, this.d.instances.paths(inst.name), rec.name);
  }
}
