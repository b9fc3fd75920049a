// Storage pools and volumes. Pools are records (`/storage-pools/<name>`) served by a backend per
// type (src/storage/backends); volumes are records (`/volumes/<pool>/<name>`) whose attachment
// lives in the instance's disks (DiskConfig.volume = "pool/name"), so there is one truth. Every
// multi-step change registers undo steps, so a failure leaves no partial file and no record.
// Image transfer (transfer.ts) and instance copies (copies.ts) build on this service.
import { dirname, resolve } from 'node:path';
import { HfError } from '../../core/errors.js';
import type { ImageRecord } from '../../core/model/image.js';
import { nameSchema, type DiskConfig, type Instance } from '../../core/model/instance.js';
import { parseSize } from '../../core/units.js';
import { parseInput } from '../../core/validate.js';
import { Collection } from '../../state/collection.js';
import type { StateStore } from '../../state/store.js';
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
import type { Logger } from '../../util/log.js';
import { UndoStack } from '../../util/undo.js';
import type { EventBus } from '../events.js';
import type { ImageService } from '../images.js';
import type { InstanceService } from '../instances.js';
import { liveHandle } from '../instances/live-handle.js';
import { exists, extraDisks } from './common.js';

export interface StorageServiceDeps {
  store: StateStore;
  /** Where the `default` pool lives (the data directory). */
  defaultPoolPath: string;
  instances: InstanceService;
  images: ImageService;
  events: EventBus;
  log: Logger;
  qemuImg?: QemuImg;
}

export class StorageService {
  private readonly pools: Collection<PoolRecord>;
  readonly qemuImg: QemuImg;

  constructor(private readonly d: StorageServiceDeps) {
    this.pools = new Collection<PoolRecord>(d.store, '/storage-pools/', poolRecordSchema);
    this.qemuImg = d.qemuImg ?? new QemuImg();
    d.images.setUsageResolver((rec) => this.imageUsers(rec));
  }

  /** Creates the `default` pool (the data directory) on first start and prepares every pool. */
  async init(): Promise<void> {
    if (!(await this.pools.get(DEFAULT_POOL))) {
      try {
        await this.pools.create(DEFAULT_POOL, { name: DEFAULT_POOL, type: 'dir', path: this.d.defaultPoolPath, description: 'the data directory', createdAt: new Date().toISOString() });
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
  }

  // ---- pools -----------------------------------------------------------------------------------

  backend(pool: PoolRecord): StorageBackend {
    return backendFor(pool, { qemuImg: this.qemuImg });
  }

  async pool(name: string): Promise<PoolRecord> {
    if (!nameSchema.safeParse(name).success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid pool name`);
    const p = await this.pools.get(name);
    if (!p) throw new HfError('HF_ERR_POOL_NOT_FOUND', `storage pool "${name}" not found`);
    return p.value;
  }

  async listPools(): Promise<PoolView[]> {
    const out: PoolView[] = [];
    for (const { value } of await this.pools.list()) out.push(await this.view(value));
    return out;
  }

  async getPool(name: string): Promise<PoolView> {
    return this.view(await this.pool(name));
  }

  private async view(p: PoolRecord): Promise<PoolView> {
    const b = this.backend(p);
    const vols = await this.volumesOf(p.name);
    const usage = await b.usage().catch(() => ({ totalBytes: 0, usedBytes: 0, freeBytes: 0 }));
    const volumes = await Promise.all(vols.map(async (v) => ({ allocatedBytes: await b.allocatedBytes(v.path), virtualBytes: v.sizeBytes })));
    return { ...p, usage: summarizePool(usage, volumes) };
  }

  async createPool(body: unknown): Promise<PoolView> {
    const req = parseInput(createPoolSchema, body);
    if (await this.pools.get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `storage pool "${req.name}" already exists`);
    const path = resolve(req.path);
    for (const { value } of await this.pools.list()) {
      const a = value.path.endsWith('/') ? value.path : `${value.path}/`;
      const b = path.endsWith('/') ? path : `${path}/`;
      if (a === b) throw new HfError('HF_ERR_CONFLICT', `pool ${value.name} already uses ${path}`);
    }
    const rec: PoolRecord = { name: req.name, type: req.type, path, description: req.description, createdAt: new Date().toISOString() };
    await this.backend(rec).init();
    await this.pools.create(rec.name, rec);
    this.d.events.publish('storage.pool.created', { name: rec.name });
    return this.view(rec);
  }

  async deletePool(name: string): Promise<void> {
    const p = await this.pool(name);
    if (name === DEFAULT_POOL) throw new HfError('HF_ERR_CONFLICT', 'the default pool cannot be deleted');
    const vols = await this.volumesOf(name);
    if (vols.length) throw new HfError('HF_ERR_CONFLICT', `pool ${name} still holds volumes: ${vols.map((v) => v.name).join(', ')}`, { details: { volumes: vols.map((v) => v.name) } });
    const imgs = (await this.d.images.list()).filter((i) => i.details.pool === name);
    if (imgs.length) throw new HfError('HF_ERR_CONFLICT', `pool ${name} still holds images: ${imgs.map((i) => i.name).join(', ')}`);
    await this.pools.delete(p.name);
    this.d.events.publish('storage.pool.deleted', { name });
  }

  // ---- volumes ---------------------------------------------------------------------------------

  volumes(pool: string): Collection<VolumeRecord> {
    return new Collection<VolumeRecord>(this.d.store, `/volumes/${pool}/`, volumeRecordSchema);
  }

  private async volumesOf(pool: string): Promise<VolumeRecord[]> {
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
    const r = this.ref(ref);
    await this.pool(r.pool);
    const v = await this.volumes(r.pool).get(r.name);
    if (!v) throw new HfError('HF_ERR_VOLUME_NOT_FOUND', `volume ${r.pool}/${r.name} not found`);
    return v.value;
  }

  /** Which instance (and disk) has a volume attached. */
  private async attachment(ref: string): Promise<{ instance: Instance; disk: DiskConfig } | undefined> {
    for (const inst of await this.d.instances.list()) {
      const disk = inst.config.disks.find((x) => x.volume === ref);
      if (disk) return { instance: inst, disk };
    }
    return undefined;
  }

  private async volumeView(v: VolumeRecord, attachments?: Map<string, { instance: string; disk: string }>): Promise<VolumeView> {
    const pool = await this.pool(v.pool);
    const ref = `${v.pool}/${v.name}`;
    let attachedTo = attachments?.get(ref);
    if (!attachments) {
      const a = await this.attachment(ref);
      if (a) attachedTo = { instance: a.instance.name, disk: a.disk.name };
    }
    const out: VolumeView = { ...v, ref, allocatedBytes: await this.backend(pool).allocatedBytes(v.path) };
    if (attachedTo) out.attachedTo = attachedTo;
    return out;
  }

  async listVolumes(pool?: string): Promise<VolumeView[]> {
    const pools = pool ? [await this.pool(pool)] : (await this.pools.list()).map((p) => p.value);
    const attachments = new Map<string, { instance: string; disk: string }>();
    for (const inst of await this.d.instances.list()) for (const x of inst.config.disks) if (x.volume) attachments.set(x.volume, { instance: inst.name, disk: x.name });
    const out: VolumeView[] = [];
    for (const p of pools) for (const v of await this.volumesOf(p.name)) out.push(await this.volumeView(v, attachments));
    return out;
  }

  async getVolume(ref: string): Promise<VolumeView> {
    return this.volumeView(await this.volume(ref));
  }

  async createVolume(poolName: string, body: unknown): Promise<VolumeView> {
    const req = parseInput(createVolumeSchema.extend({ name: nameSchema }), body);
    const pool = await this.pool(poolName);
    const b = this.backend(pool);
    if (!b.formats.includes(req.format)) throw new HfError('HF_ERR_UNSUPPORTED', `pool ${pool.name} (${pool.type}) cannot hold ${req.format} volumes`);
    const size = parseSize(req.size, 'size');
    if (size < 1024 * 1024 || size % 512 !== 0) throw new HfError('HF_ERR_INVALID_SIZE', 'a volume is at least 1 MiB and a whole number of 512-byte sectors');
    const col = this.volumes(pool.name);
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
      return this.volumeView(rec, new Map());
    }, this.d.log);
  }

  /** Grows a volume; live (block_resize) when its instance runs. */
  async resizeVolume(ref: string, sizeInput: string | number): Promise<VolumeView> {
    const v = await this.volume(ref);
    const size = parseSize(sizeInput, 'size');
    checkGrow(`volume ${ref}`, v.sizeBytes, size);
    const apply = async (): Promise<void> => {
      await this.volumes(v.pool).update(v.name, (r) => ({ ...r, sizeBytes: size }));
    };
    const a = await this.attachment(ref);
    if (a) {
      await this.d.instances.withInstance(a.instance.name, 'volume resize', async (inst, handle) => {
        const disk = inst.config.disks.find((x) => x.volume === ref);
        if (!disk) throw new HfError('HF_ERR_CONFLICT', `volume ${ref} was detached meanwhile: try again`);
        if (this.d.instances.allowed(inst, 'resize-disk').live) await liveHandle(inst, handle, 'resizeDisk').resizeDisk(disk.name, size);
        else await this.backend(await this.pool(v.pool)).resizeVolume(v.path, v.format, size);
        await apply();
      });
    } else {
      await this.backend(await this.pool(v.pool)).resizeVolume(v.path, v.format, size);
      await apply();
    }
    this.d.events.publish('storage.volume.resized', { ref, sizeBytes: size });
    return this.getVolume(ref);
  }

  async deleteVolume(ref: string): Promise<void> {
    const v = await this.volume(ref);
    const a = await this.attachment(ref);
    if (a) {
      throw new HfError('HF_ERR_CONFLICT', `volume ${ref} is attached to ${a.instance.name} (disk ${a.disk.name}): detach it first`, { details: { instance: a.instance.name, disk: a.disk.name } });
    }
    await this.volumes(v.pool).delete(v.name);
    await this.backend(await this.pool(v.pool)).deleteVolume(v.path);
    this.d.events.publish('storage.volume.deleted', { ref });
  }

  /** Attaches a volume to an instance: hot-plugged when it runs, recorded either way. */
  async attach(instance: string, body: unknown): Promise<{ instance: Instance; disk: DiskConfig; live: boolean }> {
    const req = parseInput(attachSchema, body);
    const v = await this.volume(req.volume);
    const ref = `${v.pool}/${v.name}`;
    const diskName = req.disk ?? v.name;
    return this.d.instances.withInstance(instance, 'volume attach', async (inst, handle) => {
      const live = this.d.instances.allowed(inst, 'attach-disk').live ? liveHandle(inst, handle, 'attachDisk') : undefined;
      const other = await this.attachment(ref);
      if (other) throw new HfError('HF_ERR_CONFLICT', `volume ${ref} is already attached to ${other.instance.name}`);
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
