// Storage pools and volumes. Pools are records served by a backend per type
// (src/storage/backends): a host's own pools at `/storage-pools/<name>` (per host in a cluster),
// shared pools at `/shared/storage-pools/<name>` (the cluster's: storage every host mounts; see
// shared-pools.ts for each host's check that it reaches it). Pool names are unique across both.
// Volumes are records (`/volumes/<pool>/<name>`, or `/shared/volumes/<pool>/<name>` for a shared
// pool) whose attachment lives in the instance's disks (DiskConfig.volume = "pool/name"), so there
// is one truth. An instance created with `storage` keeps its disks in that pool (the extension
// below). Every multi-step change registers undo steps, so a failure leaves no partial file and
// no record. Image transfer (transfer.ts) and instance copies (copies.ts) build on this service.
import { mkdir, rm } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { HfError } from '../../core/errors.js';
import type { ImageRecord } from '../../core/model/image.js';
import { nameSchema, type CreateInstance, type DiskConfig, type Instance } from '../../core/model/instance.js';
import { parseSize } from '../../core/units.js';
import { parseInput } from '../../core/validate.js';
import { Collection } from '../../state/collection.js';
import type { Compare, StateStore, TxnOp } from '../../state/store.js';
import { checkGrow, checkRoom, summarizePool } from '../../storage/accounting.js';
import type { StorageBackend } from '../../storage/backend.js';
import { backendFor } from '../../storage/backends/index.js';
import {
  DEFAULT_POOL,
  attachSchema,
  createPoolSchema,
  createVolumeSchema,
  parseVolumeRef,
  poolRecordSchema,
  volumeRecordSchema,
  type PoolRecord,
  type PoolView,
  type VolumeRecord,
  type VolumeView,
} from '../../storage/model.js';
import { QemuImg, readQcow2Backing } from '../../storage/qemu-img.js';
import { newPoolMarker, samePath } from '../../storage/shared.js';
import type { Logger } from '../../util/log.js';
import { UndoStack } from '../../util/undo.js';
import type { EventBus } from '../events.js';
import type { InstanceExtension } from '../extensions.js';
import type { ImageService } from '../images.js';
import type { InstanceService } from '../instances.js';
import { liveHandle } from '../instances/live-handle.js';
import { exists, extraDisks } from './common.js';
import { SHARED_POOLS_PREFIX, SharedPools, volumesPrefix } from './shared-pools.js';

const LOCAL_POOLS_PREFIX = '/storage-pools/';

/** Where another host of the cluster would keep a pool of its own of some name. */
export interface PoolKeyElsewhere {
  host: string;
  key: string;
}

/** A pool a joining host brings (the cluster checks it against its own). */
export interface JoiningPool {
  name: string;
  shared: boolean;
  id?: string | undefined;
}

export interface StorageServiceDeps {
  store: StateStore;
  /** Where the `default` pool lives (the data directory). */
  defaultPoolPath: string;
  instances: InstanceService;
  images: ImageService;
  events: EventBus;
  log: Logger;
  qemuImg?: QemuImg;
  /**
   * In a cluster: the keys under which each other host would keep a pool of its own named `name`
   * (a shared pool's name must be free on every host). Absent on a single host.
   */
  poolKeysElsewhere?: (name: string) => Promise<PoolKeyElsewhere[]>;
}

export class StorageService {
  private readonly pools: Collection<PoolRecord>;
  private readonly shared: SharedPools;
  readonly qemuImg: QemuImg;

  constructor(private readonly d: StorageServiceDeps) {
    this.pools = new Collection<PoolRecord>(d.store, LOCAL_POOLS_PREFIX, poolRecordSchema);
    this.qemuImg = d.qemuImg ?? new QemuImg();
    this.shared = new SharedPools({ store: d.store, hostName: d.instances.hostName, backend: (p) => this.backend(p), events: d.events, log: d.log });
    d.images.setUsageResolver((rec) => this.imageUsers(rec));
  }

  private get host(): string {
    return this.d.instances.hostName;
  }

  /** Creates the `default` pool (the data directory) on first start and prepares every pool. */
  async init(): Promise<void> {
    if (!(await this.pools.get(DEFAULT_POOL))) {
      try {
        await this.pools.create(DEFAULT_POOL, { name: DEFAULT_POOL, type: 'dir', path: this.d.defaultPoolPath, shared: false, description: 'the data directory', createdAt: new Date().toISOString() });
      } catch {
        // created concurrently
      }
    }
    for (const { value } of await this.pools.list()) {
      try {
        await this.backend(value).init();
      } catch (e) {
        this.d.log.warn('storage pool unusable', { pool: value.name, error: (e as Error).message });
      }
    }
    // Shared pools: checked now (a host that starts or joins), and whenever one appears.
    await this.shared.start();
  }

  /** Stops following the shared pools (daemon shutdown). */
  async close(): Promise<void> {
    await this.shared.close();
  }

  // ---- pools -----------------------------------------------------------------------------------

  backend(pool: PoolRecord): StorageBackend {
    return backendFor(pool, { qemuImg: this.qemuImg });
  }

  async pool(name: string): Promise<PoolRecord> {
    if (!nameSchema.safeParse(name).success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid pool name`);
    const p = await this.findPool(name);
    if (!p) throw new HfError('HF_ERR_POOL_NOT_FOUND', `storage pool "${name}" not found`);
    return p;
  }

  /** This host's pool or the cluster's shared pool of that name (names are unique across both). */
  private async findPool(name: string): Promise<PoolRecord | undefined> {
    return (await this.pools.get(name))?.value ?? (await this.shared.records.get(name))?.value;
  }

  /** This host's pools and the shared pools, by name. */
  private async allPools(): Promise<PoolRecord[]> {
    const [local, shared] = await Promise.all([this.pools.list(), this.shared.records.list()]);
    return [...local, ...shared].map((p) => p.value).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async listPools(): Promise<PoolView[]> {
    const out: PoolView[] = [];
    for (const p of await this.allPools()) out.push(await this.view(p));
    return out;
  }

  async getPool(name: string): Promise<PoolView> {
    return this.view(await this.pool(name));
  }

  private async view(p: PoolRecord): Promise<PoolView> {
    let access: Pick<PoolView, 'available' | 'reason' | 'hosts'> = { available: true };
    if (p.shared) {
      const hosts = await this.shared.hosts(p);
      const mine = hosts.find((h) => h.host === this.host);
      const reason = mine ? mine.reason : 'not checked on this host yet';
      access = { available: mine?.available ?? false, hosts, ...(reason ? { reason } : {}) };
    }
    const b = this.backend(p);
    const vols = await this.volumesOf(p);
    if (!access.available) return { ...p, ...access, usage: summarizePool({ totalBytes: 0, usedBytes: 0, freeBytes: 0 }, vols.map((v) => ({ allocatedBytes: 0, virtualBytes: v.sizeBytes }))) };
    const usage = await b.usage().catch(() => ({ totalBytes: 0, usedBytes: 0, freeBytes: 0 }));
    const volumes = await Promise.all(vols.map(async (v) => ({ allocatedBytes: await b.allocatedBytes(v.path), virtualBytes: v.sizeBytes })));
    return { ...p, ...access, usage: summarizePool(usage, volumes) };
  }

  /**
   * Creates a pool: this host's own, or (`shared`) one every host of the cluster sees, whose
   * storage this host stamps with the pool's marker. The record goes in with a transaction that
   * also holds the name free everywhere: no local pool, no shared one, and for a shared pool no
   * pool of that name on any other host.
   */
  async createPool(body: unknown): Promise<PoolView> {
    const req = parseInput(createPoolSchema, body);
    const path = resolve(req.path);
    const existing = await this.findPool(req.name);
    if (existing) throw poolExists(existing);
    const all = await this.allPools();
    for (const p of all) if (samePath(p.path, path)) throw new HfError('HF_ERR_CONFLICT', `pool ${p.name} already uses ${path}`);
    const now = new Date().toISOString();
    const marker = req.shared ? newPoolMarker(req.name, this.host) : undefined;
    const rec: PoolRecord = poolRecordSchema.parse({
      name: req.name,
      type: req.type,
      path,
      shared: req.shared,
      ...(marker ? { id: marker.id, createdBy: this.host } : {}),
      description: req.description,
      createdAt: now,
    });
    // Refused before anything is made; the transaction in claim() settles a race.
    const elsewhere = rec.shared ? ((await this.d.poolKeysElsewhere?.(rec.name)) ?? []) : [];
    const taken = await this.nameTakenElsewhere(rec.name, elsewhere);
    if (taken) throw taken;
    const view = await UndoStack.run(async (undo) => {
      const b = this.backend(rec);
      await b.init();
      if (marker) {
        const seen = await b.readMarker();
        if (seen.kind === 'marker') {
          const owner = all.find((p) => p.shared && p.id === seen.marker.id);
          // Another path to the same storage (a second mount, a symlink): one pool per storage.
          if (owner) throw new HfError('HF_ERR_CONFLICT', `${path} is the storage of shared pool ${owner.name} (its marker says so: id ${owner.id})`);
          this.d.log.info('replacing the marker of a deleted pool', { path, old: seen.marker });
        }
        await b.writeMarker(marker);
        undo.add('remove the pool marker', () => b.removeMarker());
      }
      await this.claim(rec, elsewhere);
      return this.view(rec);
    }, this.d.log);
    this.d.events.publish('storage.pool.created', { name: rec.name, shared: rec.shared });
    return view;
  }

  /** Writes a new pool's record if its name is still free everywhere it must be; a shared pool's first answer (this host: available) with it. */
  private async claim(rec: PoolRecord, elsewhere: PoolKeyElsewhere[]): Promise<void> {
    const local = LOCAL_POOLS_PREFIX + rec.name;
    const shared = SHARED_POOLS_PREFIX + rec.name;
    const compares: Compare[] = [local, shared, ...elsewhere.map((e) => e.key)].map((key) => ({ key, modRevision: 0 }));
    const ops: TxnOp[] = [{ type: 'put', key: rec.shared ? shared : local, value: rec }];
    if (rec.shared) {
      const first = this.shared.firstAnswer(rec);
      ops.push({ type: 'put', key: first.key, value: first.value });
    }
    if ((await this.d.store.txn(compares, ops)).succeeded) return;
    // Who holds the name, for the message.
    const taken = await this.findPool(rec.name);
    if (taken) throw poolExists(taken);
    throw (await this.nameTakenElsewhere(rec.name, elsewhere)) ?? new HfError('HF_ERR_CONFLICT', `storage pool "${rec.name}" was created or deleted meanwhile: try again`);
  }

  /** The refusal when another host has a pool of its own of this name. */
  private async nameTakenElsewhere(name: string, elsewhere: PoolKeyElsewhere[]): Promise<HfError | undefined> {
    for (const e of elsewhere) {
      if (await this.d.store.get(e.key)) {
        return new HfError('HF_ERR_ALREADY_EXISTS', `host ${e.host} has a storage pool named "${name}": a shared pool's name must be free on every host`, { details: { host: e.host } });
      }
    }
    return undefined;
  }

  async deletePool(name: string): Promise<void> {
    const p = await this.pool(name);
    if (name === DEFAULT_POOL) throw new HfError('HF_ERR_CONFLICT', 'the default pool cannot be deleted');
    const vols = await this.volumesOf(p);
    if (vols.length) throw new HfError('HF_ERR_CONFLICT', `pool ${name} still holds volumes: ${vols.map((v) => v.name).join(', ')}`, { details: { volumes: vols.map((v) => v.name) } });
    const imgs = (await this.d.images.list()).filter((i) => i.details.pool === name);
    if (imgs.length) throw new HfError('HF_ERR_CONFLICT', `pool ${name} still holds images: ${imgs.map((i) => i.name).join(', ')}`);
    // Instances whose disks live in the pool: on any host for a shared pool, on this one for its own.
    const users = (await this.d.instances.list()).filter((i) => i.storage === name && (p.shared || i.host === this.host));
    if (users.length) {
      throw new HfError('HF_ERR_CONFLICT', `pool ${name} holds the disks of ${users.map((i) => `${i.name} (on ${i.host})`).join(', ')}: delete or move them first`, {
        details: { instances: users.map((i) => ({ name: i.name, host: i.host })) },
      });
    }
    if (!p.shared) await this.pools.delete(p.name);
    else {
      const key = SHARED_POOLS_PREFIX + p.name;
      const cur = await this.d.store.get(key);
      const r = cur && (await this.d.store.txn([{ key, modRevision: cur.modRevision }], [{ type: 'delete', key }, ...(await this.shared.forgetOps(p.name))]));
      if (!r || !r.succeeded) throw new HfError('HF_ERR_CONFLICT', `shared pool ${name} changed meanwhile: try again`);
      // The storage stays (as a directory pool's does), without the marker of a pool that is gone.
      const b = this.backend(p);
      const seen = await b.readMarker().catch(() => undefined);
      if (seen?.kind === 'marker' && seen.marker.id === p.id) await b.removeMarker().catch(() => undefined);
    }
    this.d.events.publish('storage.pool.deleted', { name });
  }

  /** Throws HF_ERR_POOL_UNAVAILABLE when this host cannot use the pool now (a shared pool it does not reach). */
  async usable(pool: PoolRecord): Promise<void> {
    if (pool.shared) await this.shared.require(pool);
  }

  /**
   * The hosts that can use a pool, for placement: a shared pool's hosts that reach it; undefined
   * when that is not known here (this host's own pool, or a name this host has no pool of).
   */
  async poolHosts(name: string): Promise<string[] | undefined> {
    const p = nameSchema.safeParse(name).success ? await this.findPool(name) : undefined;
    if (!p?.shared) return undefined;
    return (await this.shared.hosts(p)).filter((a) => a.available).map((a) => a.host);
  }

  /** Pools of a joining host that cannot come into the cluster as they are (the cluster service lists them as clashes). */
  async joinClashes(pools: JoiningPool[]): Promise<Array<{ name: string; why: string }>> {
    const out: Array<{ name: string; why: string }> = [];
    for (const p of pools) {
      const shared = (await this.shared.records.get(p.name))?.value;
      if (!p.shared) {
        if (shared) out.push({ name: p.name, why: `the cluster has a shared pool ${p.name} (${shared.path}); the host's own pool needs another name` });
        continue;
      }
      if (shared) {
        // The same storage (its marker's id) is the same pool: it merges.
        if (shared.id !== p.id) out.push({ name: p.name, why: `the cluster's shared pool ${p.name} (${shared.path}) is another storage (id ${shared.id}, the host's is ${p.id ?? 'none'})` });
        continue;
      }
      const holders = [...((await this.pools.get(p.name)) ? [this.host] : [])];
      for (const e of (await this.d.poolKeysElsewhere?.(p.name)) ?? []) if (await this.d.store.get(e.key)) holders.push(e.host);
      if (holders.length) out.push({ name: p.name, why: `${holders.length === 1 ? `host ${holders[0]} has a pool` : `hosts ${holders.join(', ')} have pools`} of ${holders.length === 1 ? 'its' : 'their'} own named ${p.name}: a shared pool's name must be free on every host` });
    }
    return out;
  }

  /** Drops what a removed host recorded about the shared pools. */
  async forgetHost(host: string): Promise<void> {
    await this.shared.forgetHost(host);
  }

  // ---- volumes ---------------------------------------------------------------------------------

  volumes(pool: PoolRecord): Collection<VolumeRecord> {
    return new Collection<VolumeRecord>(this.d.store, volumesPrefix(pool), volumeRecordSchema);
  }

  private async volumesOf(pool: PoolRecord): Promise<VolumeRecord[]> {
    return (await this.volumes(pool).list()).map((v) => v.value);
  }

  private ref(ref: string): { pool: string; name: string } {
    try {
      return parseVolumeRef(ref);
    } catch (e) {
      throw new HfError('HF_ERR_INVALID_NAME', (e as Error).message);
    }
  }

  async volume(ref: string): Promise<VolumeRecord> {
    return (await this.volumeIn(ref)).volume;
  }

  /** A volume and its pool. */
  private async volumeIn(ref: string): Promise<{ volume: VolumeRecord; pool: PoolRecord }> {
    const r = this.ref(ref);
    const pool = await this.pool(r.pool);
    const v = await this.volumes(pool).get(r.name);
    if (!v) throw new HfError('HF_ERR_VOLUME_NOT_FOUND', `volume ${r.pool}/${r.name} not found`);
    return { volume: v.value, pool };
  }

  /**
   * Which instance (and disk) has a volume attached: for a shared pool's volume any instance of
   * the cluster; for a host's own pool one of its instances (another host's pool of the same name
   * is another pool).
   */
  private async attachment(ref: string, pool: PoolRecord): Promise<{ instance: Instance; disk: DiskConfig } | undefined> {
    for (const inst of await this.d.instances.list()) {
      if (!pool.shared && inst.host !== this.host) continue;
      const disk = inst.config.disks.find((x) => x.volume === ref);
      if (disk) return { instance: inst, disk };
    }
    return undefined;
  }

  private async volumeView(v: VolumeRecord, pool: PoolRecord, attachments?: Map<string, { instance: string; disk: string }>): Promise<VolumeView> {
    const ref = `${v.pool}/${v.name}`;
    let attachedTo = attachments?.get(ref);
    if (!attachments) {
      const a = await this.attachment(ref, pool);
      if (a) attachedTo = { instance: a.instance.name, disk: a.disk.name };
    }
    const out: VolumeView = { ...v, ref, allocatedBytes: await this.backend(pool).allocatedBytes(v.path) };
    if (attachedTo) out.attachedTo = attachedTo;
    return out;
  }

  async listVolumes(pool?: string): Promise<VolumeView[]> {
    const pools = pool ? [await this.pool(pool)] : await this.allPools();
    const shared = new Set(pools.filter((p) => p.shared).map((p) => p.name));
    const attachments = new Map<string, { instance: string; disk: string }>();
    for (const inst of await this.d.instances.list()) {
      for (const x of inst.config.disks) {
        if (x.volume && (inst.host === this.host || shared.has(x.volume.split('/')[0]!))) attachments.set(x.volume, { instance: inst.name, disk: x.name });
      }
    }
    const out: VolumeView[] = [];
    for (const p of pools) for (const v of await this.volumesOf(p)) out.push(await this.volumeView(v, p, attachments));
    return out;
  }

  async getVolume(ref: string): Promise<VolumeView> {
    const { volume, pool } = await this.volumeIn(ref);
    return this.volumeView(volume, pool);
  }

  async createVolume(poolName: string, body: unknown): Promise<VolumeView> {
    const req = parseInput(createVolumeSchema.extend({ name: nameSchema }), body);
    const pool = await this.pool(poolName);
    await this.usable(pool);
    const b = this.backend(pool);
    if (!b.formats.includes(req.format)) throw new HfError('HF_ERR_UNSUPPORTED', `pool ${pool.name} (${pool.type}) cannot hold ${req.format} volumes`);
    const size = parseSize(req.size, 'size');
    if (size < 1024 * 1024 || size % 512 !== 0) throw new HfError('HF_ERR_INVALID_SIZE', 'a volume is at least 1 MiB and a whole number of 512-byte sectors');
    const col = this.volumes(pool);
    if (await col.get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `volume ${pool.name}/${req.name} already exists`);
    const path = b.volumePath(req.name, req.format);
    if (await exists(path)) throw new HfError('HF_ERR_ALREADY_EXISTS', `${path} already exists on pool ${pool.name} (not a registered volume): remove it or pick another name`);
    // Thin: a new volume takes its metadata only (qcow2: header, refcounts, L1 — under 1 MiB);
    // refuse when even that does not fit.
    const need = req.format === 'qcow2' ? Math.min(size, 1024 * 1024) : 0;
    checkRoom(pool.name, `volume ${req.name}`, need, (await b.usage()).freeBytes);
    return UndoStack.run(async (undo) => {
      const p = await b.createVolume(req.name, req.format, size);
      undo.add('remove volume file', () => b.deleteVolume(p));
      const rec: VolumeRecord = { pool: pool.name, name: req.name, format: req.format, path: p, sizeBytes: size, description: req.description, createdAt: new Date().toISOString() };
      await col.create(rec.name, rec);
      this.d.events.publish('storage.volume.created', { ref: `${pool.name}/${rec.name}` });
      return this.volumeView(rec, pool, new Map());
    }, this.d.log);
  }

  /** Grows a volume; live (block_resize) when its instance runs. */
  async resizeVolume(ref: string, sizeInput: string | number): Promise<VolumeView> {
    const { volume: v, pool } = await this.volumeIn(ref);
    const size = parseSize(sizeInput, 'size');
    checkGrow(`volume ${ref}`, v.sizeBytes, size);
    const apply = async (): Promise<void> => {
      await this.volumes(pool).update(v.name, (r) => ({ ...r, sizeBytes: size }));
    };
    const a = await this.attachment(ref, pool);
    if (a && a.instance.host !== this.host) {
      throw new HfError('HF_ERR_INVALID_STATE', `volume ${ref} is attached to ${a.instance.name} on host ${a.instance.host}: resize it through that host`, { details: { host: a.instance.host } });
    }
    await this.usable(pool);
    if (a) {
      await this.d.instances.withInstance(a.instance.name, 'volume resize', async (inst, handle) => {
        const disk = inst.config.disks.find((x) => x.volume === ref);
        if (!disk) throw new HfError('HF_ERR_CONFLICT', `volume ${ref} was detached meanwhile: try again`);
        if (this.d.instances.allowed(inst, 'resize-disk').live) await liveHandle(inst, handle, 'resizeDisk').resizeDisk(disk.name, size);
        else await this.backend(pool).resizeVolume(v.path, v.format, size);
        await apply();
      });
    } else {
      await this.backend(pool).resizeVolume(v.path, v.format, size);
      await apply();
    }
    this.d.events.publish('storage.volume.resized', { ref, sizeBytes: size });
    return this.getVolume(ref);
  }

  async deleteVolume(ref: string): Promise<void> {
    const { volume: v, pool } = await this.volumeIn(ref);
    const a = await this.attachment(ref, pool);
    if (a) {
      throw new HfError('HF_ERR_CONFLICT', `volume ${ref} is attached to ${a.instance.name} (disk ${a.disk.name}): detach it first`, { details: { instance: a.instance.name, disk: a.disk.name } });
    }
    // Its file goes with its record: only from a host that reaches the storage.
    await this.usable(pool);
    await this.volumes(pool).delete(v.name);
    await this.backend(pool).deleteVolume(v.path);
    this.d.events.publish('storage.volume.deleted', { ref });
  }

  /** Attaches a volume to an instance: hot-plugged when it runs, recorded either way. */
  async attach(instance: string, body: unknown): Promise<{ instance: Instance; disk: DiskConfig; live: boolean }> {
    const req = parseInput(attachSchema, body);
    const { volume: v, pool } = await this.volumeIn(req.volume);
    const ref = `${v.pool}/${v.name}`;
    const diskName = req.disk ?? v.name;
    return this.d.instances.withInstance(instance, 'volume attach', async (inst, handle) => {
      const live = this.d.instances.allowed(inst, 'attach-disk').live ? liveHandle(inst, handle, 'attachDisk') : undefined;
      const other = await this.attachment(ref, pool);
      if (other) throw new HfError('HF_ERR_CONFLICT', `volume ${ref} is already attached to ${other.instance.name}${other.instance.host !== this.host ? ` on host ${other.instance.host}` : ''}`);
      await this.usable(pool);
      if (inst.config.disks.some((x) => x.name === diskName)) {
        throw new HfError('HF_ERR_ALREADY_EXISTS', `instance ${inst.name} already has a disk named "${diskName}": give another name with --as`);
      }
      const disk: DiskConfig = { name: diskName, path: v.path, format: v.format, media: 'disk', bus: 'virtio', readonly: false, volume: ref };
      return UndoStack.run(async (undo) => {
        if (live) {
          await live.attachDisk(disk);
          undo.add('hot-unplug disk', () => live.detachDisk?.(disk.name));
        }
        const updated = await this.d.instances.patch(inst.name, (r) => ({ ...r, config: { ...r.config, disks: [...r.config.disks, disk] } }));
        this.d.events.publish('storage.volume.attached', { ref, instance: inst.name, disk: disk.name, live: live !== undefined });
        return { instance: updated, disk, live: live !== undefined };
      }, this.d.log);
    });
  }

  async detach(instance: string, volumeRef: string): Promise<{ instance: Instance; live: boolean }> {
    const r = this.ref(volumeRef);
    const ref = `${r.pool}/${r.name}`;
    return this.d.instances.withInstance(instance, 'volume detach', async (inst, handle) => {
      const live = this.d.instances.allowed(inst, 'detach-disk').live;
      const disk = inst.config.disks.find((x) => x.volume === ref);
      if (!disk) throw new HfError('HF_ERR_VOLUME_NOT_FOUND', `volume ${ref} is not attached to ${inst.name}`);
      if (live) await liveHandle(inst, handle, 'detachDisk').detachDisk(disk.name);
      const updated = await this.d.instances.patch(inst.name, (x) => ({ ...x, config: { ...x.config, disks: x.config.disks.filter((y) => y.volume !== ref) } }));
      this.d.events.publish('storage.volume.detached', { ref, instance: inst.name, live });
      return { instance: updated, live };
    });
  }

  // ---- instances kept in a pool (`storage`) ----------------------------------------------------------

  /** Where an instance's disks live: its pool's directory for it (`storage`), else its instance directory. */
  async disksDir(inst: Pick<Instance, 'name' | 'storage'>): Promise<string> {
    if (!inst.storage) return this.d.instances.paths(inst.name).dir;
    return this.backend(await this.pool(inst.storage)).instanceDir(inst.name);
  }

  /** The hooks that keep an instance's disks in a pool: made at create, checked at start, removed at delete. */
  extension(): InstanceExtension {
    return {
      name: 'storage',
      disksDir: (req, undo) => this.makeDisksDir(req, undo),
      beforeStart: async (inst) => {
        // A disk on a shared pool this host does not reach: a clear refusal instead of QEMU's.
        for (const name of poolsUsedBy(inst)) {
          const p = await this.findPool(name);
          if (p) await this.usable(p);
        }
        return inst;
      },
      onDelete: async (inst) => {
        if (!inst.storage) return;
        const p = await this.findPool(inst.storage);
        if (!p) return;
        try {
          await this.usable(p);
        } catch (e) {
          // The record goes; the files stay on the storage this host cannot reach now.
          this.d.log.warn('instance deleted without its disks: their pool is unavailable here', { instance: inst.name, pool: p.name, error: (e as Error).message });
          return;
        }
        await rm(this.backend(p).instanceDir(inst.name), { recursive: true, force: true });
      },
    };
  }

  private async makeDisksDir(req: CreateInstance, undo: UndoStack): Promise<string | undefined> {
    if (!req.storage) return undefined;
    if (req.type !== 'vm') throw new HfError('HF_ERR_UNSUPPORTED', `a ${req.type} keeps its root filesystem in its instance directory: storage pools hold VM disks (attach a volume instead)`);
    const pool = await this.pool(req.storage);
    await this.usable(pool);
    const dir = this.backend(pool).instanceDir(req.name);
    // The default pool is the data directory: its instance directories are the instances' own.
    if (samePath(dir, this.d.instances.paths(req.name).dir)) return undefined;
    await mkdir(dirname(dir), { recursive: true, mode: 0o700 });
    try {
      await mkdir(dir, { mode: 0o700 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new HfError('HF_ERR_ALREADY_EXISTS', `pool ${pool.name} already holds disks of an instance named ${req.name} (${dir}): remove them or pick another name`);
      }
      throw new HfError('HF_ERR_POOL_UNAVAILABLE', `pool ${pool.name}: cannot make ${dir}: ${(e as Error).message}`, { cause: e });
    }
    undo.add('remove the instance disks directory', () => rm(dir, { recursive: true, force: true }));
    return dir;
  }

  // ---- images --------------------------------------------------------------------------------------

  /** Instances whose disks use an image (linked clones through a qcow2 backing file, or directly). */
  async imageUsers(rec: ImageRecord): Promise<string[]> {
    const paths = new Set<string>();
    if (rec.disk) paths.add(rec.disk.path);
    for (const x of extraDisks(rec)) paths.add(x.path);
    if (!paths.size) return [];
    const users: string[] = [];
    for (const inst of await this.d.instances.list()) {
      for (const disk of inst.config.disks) {
        if (paths.has(disk.path)) {
          users.push(inst.name);
          break;
        }
        const backing = await readQcow2Backing(disk.path);
        if (backing && paths.has(resolve(dirname(disk.path), backing))) {
          users.push(inst.name);
          break;
        }
      }
    }
    return users;
  }
}

function poolExists(p: PoolRecord): HfError {
  return new HfError('HF_ERR_ALREADY_EXISTS', `${p.shared ? 'shared ' : ''}storage pool "${p.name}" already exists`);
}

/** The pools an instance's disks are in: its `storage` pool and its volumes' pools. */
function poolsUsedBy(inst: Instance): Set<string> {
  const out = new Set<string>();
  if (inst.storage) out.add(inst.storage);
  for (const d of inst.config.disks) if (d.volume) out.add(d.volume.split('/')[0]!);
  return out;
}
