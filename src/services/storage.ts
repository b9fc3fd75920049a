// The storage service: pools and volumes, image import / export / publish, instance copies
// (full and linked) and who-uses-what. Pools are records (`/storage-pools/<name>`) served by a
// backend per type (src/storage/backends); volumes are records (`/volumes/<pool>/<name>`) whose
// attachment lives in the instance's disks (DiskConfig.volume = "pool/name"), so there is one
// truth. Long actions run as operations with progress; every multi-step change registers undo
// steps, so a failure leaves no partial file and no record.
import { randomBytes } from 'node:crypto';
import { chmod, copyFile, link, mkdir, mkdtemp, rename, rm, stat, statfs } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { z } from 'zod';
import { ERROR_CODES, HfError, type ErrorCode } from '../core/errors.js';
import { isActive } from '../core/lifecycle.js';
import type { ImageRecord } from '../core/model/image.js';
import { bootConfigSchema, nameSchema, type BootConfig, type DiskConfig, type Instance } from '../core/model/instance.js';
import type { Operation } from '../core/model/operation.js';
import { parseSize } from '../core/units.js';
import { parseInput } from '../core/validate.js';
import type { DataPaths } from '../daemon/config.js';
import { Collection } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import { checkGrow, checkRoom, summarizePool, type PoolSummary } from '../storage/accounting.js';
import type { StorageBackend } from '../storage/backend.js';
import { backendFor } from '../storage/backends/index.js';
import { download } from '../storage/download.js';
import { IMPORT_FORMATS, inspectSource, type DiskSource } from '../storage/import.js';
import {
  createPoolSchema,
  createVolumeSchema,
  parseVolumeRef,
  poolRecordSchema,
  volumeRecordSchema,
  type PoolRecord,
  type VolumeRecord,
} from '../storage/model.js';
import { QemuImg, readQcow2Backing, sha256File } from '../storage/qemu-img.js';
import type { Logger } from '../util/log.js';
import { UndoStack } from '../util/undo.js';
import type { EventBus } from './events.js';
import type { ImageService } from './images.js';
import type { InstanceService } from './instances.js';
import type { OperationContext, OperationManager } from './operations.js';

export const DEFAULT_POOL = 'default';

export interface StorageServiceDeps {
  store: StateStore;
  paths: DataPaths;
  operations: OperationManager;
  instances: InstanceService;
  images: ImageService;
  events: EventBus;
  log: Logger;
  qemuImg?: QemuImg;
}

export interface PoolView extends PoolRecord {
  usage: PoolSummary;
}

export interface VolumeView extends VolumeRecord {
  ref: string;
  allocatedBytes: number;
  attachedTo?: { instance: string; disk: string };
}

/** Copies of instances of other types (containers) plug in here. */
export interface CopyProvider {
  copy(src: Instance, dst: string, opts: { linked: boolean }, ctx: OperationContext): Promise<unknown>;
}

export const importImageSchema = z
  .object({
    name: nameSchema,
    /** An absolute path on the daemon's host, or an http(s) URL. */
    source: z.string().min(1),
    format: z.enum(IMPORT_FORMATS).optional(),
    pool: nameSchema.default(DEFAULT_POOL),
    description: z.string().max(1024).optional(),
    /** How VMs made from the image boot (default: from disk, BIOS — or UEFI when the OVF says so). */
    boot: bootConfigSchema.optional(),
    vcpus: z.number().int().min(1).max(512).optional(),
    memory: z.union([z.string(), z.number()]).optional(),
    /** Also create a stopped VM from the image, with the OVF's CPUs, memory and disks. */
    instance: nameSchema.optional(),
  })
  .strict();

export const exportSchema = z
  .object({
    file: z.string().min(1).refine((p) => isAbsolute(p), { message: 'file must be an absolute path on the host' }),
    format: z.enum(['qcow2', 'raw', 'vmdk']).default('qcow2'),
    disk: nameSchema.optional(),
  })
  .strict();

export const publishSchema = z.object({ as: nameSchema, description: z.string().max(1024).optional() }).strict();
export const copySchema = z.object({ name: nameSchema, linked: z.boolean().default(false) }).strict();
export const attachSchema = z.object({ volume: z.string().min(1), disk: nameSchema.optional() }).strict();

export class StorageService {
  private readonly pools: Collection<PoolRecord>;
  private readonly qemuImg: QemuImg;
  private readonly busyImages = new Set<string>();
  private readonly copyProviders = new Map<string, CopyProvider>();

  constructor(private readonly d: StorageServiceDeps) {
    this.pools = new Collection<PoolRecord>(d.store, '/storage-pools/', poolRecordSchema);
    this.qemuImg = d.qemuImg ?? new QemuImg();
    d.images.setUsageResolver((rec) => this.imageUsers(rec));
  }

  /** Creates the `default` pool (the data directory) on first start and prepares every pool. */
  async init(): Promise<void> {
    if (!(await this.pools.get(DEFAULT_POOL))) {
      try {
        await this.pools.create(DEFAULT_POOL, { name: DEFAULT_POOL, type: 'dir', path: this.d.paths.root, description: 'the data directory', createdAt: new Date().toISOString() });
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

  registerCopyProvider(type: string, p: CopyProvider): void {
    this.copyProviders.set(type, p);
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

  private volumes(pool: string): Collection<VolumeRecord> {
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
        if (handle && isActive(inst.state)) {
          if (!handle.resizeDisk) throw new HfError('HF_ERR_UNSUPPORTED', `${inst.type} instances cannot resize disks live`);
          await handle.resizeDisk(disk.name, size);
        } else if (inst.state === 'stopped' || inst.state === 'crashed' || inst.state === 'error') {
          await this.backend(await this.pool(v.pool)).resizeVolume(v.path, v.format, size);
        } else {
          throw new HfError('HF_ERR_BUSY', `instance ${inst.name} is ${inst.state}: try again when it is done`);
        }
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
      if (inst.type !== 'vm') throw new HfError('HF_ERR_UNSUPPORTED', `volumes attach to VMs only (${inst.name} is a ${inst.type})`);
      const other = await this.attachment(ref);
      if (other) throw new HfError('HF_ERR_CONFLICT', `volume ${ref} is already attached to ${other.instance.name}`);
      if (inst.config.disks.some((x) => x.name === diskName)) {
        throw new HfError('HF_ERR_ALREADY_EXISTS', `instance ${inst.name} already has a disk named "${diskName}": give another name with --as`);
      }
      const disk: DiskConfig = { name: diskName, path: v.path, format: v.format, media: 'disk', bus: 'virtio', readonly: false, volume: ref };
      let live = false;
      const undo = new UndoStack(this.d.log);
      try {
        if (handle && isActive(inst.state)) {
          if (!handle.attachDisk) throw new HfError('HF_ERR_UNSUPPORTED', `${inst.type} instances cannot hot-plug disks`);
          if (inst.state !== 'running' && inst.state !== 'paused') throw new HfError('HF_ERR_BUSY', `instance ${inst.name} is ${inst.state}: try again when it is done`);
          await handle.attachDisk(disk);
          undo.add('hot-unplug disk', () => handle.detachDisk?.(disk.name));
          live = true;
        }
        const updated = await this.d.instances.patch(inst.name, (r) => ({ ...r, config: { ...r.config, disks: [...r.config.disks, disk] } }));
        undo.commit();
        this.d.events.publish('storage.volume.attached', { ref, instance: inst.name, disk: disk.name, live });
        return { instance: updated, disk, live };
      } catch (e) {
        await undo.unwind();
        throw e;
      }
    });
  }

  async detach(instance: string, volumeRef: string): Promise<{ instance: Instance; live: boolean }> {
    const r = this.ref(volumeRef);
    const ref = `${r.pool}/${r.name}`;
    return this.d.instances.withInstance(instance, 'volume detach', async (inst, handle) => {
      const disk = inst.config.disks.find((x) => x.volume === ref);
      if (!disk) throw new HfError('HF_ERR_VOLUME_NOT_FOUND', `volume ${ref} is not attached to ${inst.name}`);
      let live = false;
      if (handle && isActive(inst.state)) {
        if (!handle.detachDisk) throw new HfError('HF_ERR_UNSUPPORTED', `${inst.type} instances cannot hot-unplug disks`);
        await handle.detachDisk(disk.name);
        live = true;
      }
      const updated = await this.d.instances.patch(inst.name, (x) => ({ ...x, config: { ...x.config, disks: x.config.disks.filter((y) => y.volume !== ref) } }));
      this.d.events.publish('storage.volume.detached', { ref, instance: inst.name, live });
      return { instance: updated, live };
    });
  }

  // ---- images ----------------------------------------------------------------------------------

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

  /** Imports a disk image or an OVA as an image (an operation). */
  async importImage(body: unknown): Promise<Operation> {
    const req = parseInput(importImageSchema, body);
    const isUrl = /^https?:\/\//i.test(req.source);
    if (!isUrl) {
      if (!isAbsolute(req.source)) throw new HfError('HF_ERR_VALIDATION', `source must be an absolute path on the host or an http(s) URL (got "${req.source}")`);
      const st = await stat(req.source).catch(() => undefined);
      if (!st) throw new HfError('HF_ERR_NOT_FOUND', `${req.source} does not exist`);
      if (!st.isFile()) throw new HfError('HF_ERR_VALIDATION', `${req.source} is not a regular file`);
    }
    await this.checkNewImageName(req.name);
    const pool = await this.pool(req.pool);
    if (req.instance && (await this.d.instances.list()).some((i) => i.name === req.instance)) {
      throw new HfError('HF_ERR_ALREADY_EXISTS', `instance "${req.instance}" already exists`);
    }
    const memoryMiB = req.memory === undefined ? undefined : typeof req.memory === 'number' ? req.memory : Math.floor(parseSize(req.memory, 'memory') / 1048576);
    this.busyImages.add(req.name);
    try {
      return await this.d.operations.start('image.import', { kind: 'image', name: req.name }, async (ctx) => {
        try {
          return await this.doImport(ctx, req, pool, isUrl, memoryMiB);
        } finally {
          this.busyImages.delete(req.name);
        }
      });
    } catch (e) {
      this.busyImages.delete(req.name);
      throw e;
    }
  }

  private async checkNewImageName(name: string): Promise<void> {
    if (!nameSchema.safeParse(name).success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid image name`);
    if (this.busyImages.has(name)) throw new HfError('HF_ERR_BUSY', `image "${name}" is being created right now`);
    if (await this.d.images.find(name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `image "${name}" already exists`);
    if (this.d.images.buildable().includes(name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `"${name}" is the name of a built-in image`);
  }

  private async doImport(
    ctx: OperationContext,
    req: z.output<typeof importImageSchema>,
    pool: PoolRecord,
    isUrl: boolean,
    memoryMiB: number | undefined,
  ): Promise<Record<string, unknown>> {
    const b = this.backend(pool);
    await b.init();
    return UndoStack.run(async (undo) => {
      await mkdir(b.stagingDir(), { recursive: true });
      const staging = await mkdtemp(join(b.stagingDir(), `import-${req.name}-`));
      undo.add('remove staging directory', () => rm(staging, { recursive: true, force: true }));
      // (the staging directory also goes on success, below)

      let src = req.source;
      const srcName = isUrl ? basename(new URL(req.source).pathname) || 'download' : basename(req.source);
      if (isUrl) {
        ctx.progress(1, `downloading ${req.source}`);
        src = join(staging, srcName.replace(/[^\w.-]/g, '_') || 'download');
        await download(req.source, src, {
          onProgress: (pct) => ctx.progress(1 + pct * 0.29, `downloading ${srcName}: ${pct}%`),
        });
      }

      ctx.progress(30, `inspecting ${srcName}`);
      const inspected = await inspectSource(this.qemuImg, src, { format: req.format, name: srcName });
      const ovf = inspected.kind === 'ova' ? inspected.ovf : undefined;
      if (ovf) {
        ctx.message(`OVF: ${ovf.name ?? '(unnamed)'}, ${ovf.vcpus ?? '?'} vCPUs, ${ovf.memoryMiB ?? '?'} MiB, ${ovf.disks.length} disk(s), firmware ${ovf.firmware}`);
        for (const w of ovf.warnings) ctx.message(`OVF: ${w}`);
        if (inspected.kind === 'ova' && inspected.manifestChecked) ctx.message(`manifest: ${inspected.manifestChecked} digest(s) verified`);
      }

      // Room: what the converted disks will take.
      let required = 0;
      for (const disk of inspected.disks) required += (await this.qemuImg.measure(disk.spec, 'qcow2', disk.qemuFormat)).required;
      checkRoom(pool.name, `image ${req.name}`, required, (await b.usage()).freeBytes);

      const finalDir = b.imageDir(req.name);
      if (await exists(finalDir)) throw new HfError('HF_ERR_ALREADY_EXISTS', `${finalDir} already exists (left over from an earlier image?): remove it first`);
      const files: Array<{ file: string; source: DiskSource }> = [];
      const share = 60 / inspected.disks.length;
      for (const [i, disk] of inspected.disks.entries()) {
        const file = i === 0 ? 'disk.qcow2' : `disk${i}.qcow2`;
        const base = 30 + i * share;
        ctx.progress(base, `converting ${disk.label} (${disk.format}) to qcow2`);
        await this.qemuImg.convert(disk.spec, join(staging, file), {
          outFormat: 'qcow2',
          srcFormat: disk.qemuFormat,
          onProgress: (p) => ctx.progress(base + (p * share) / 100, `converting ${disk.label}: ${Math.floor(p)}%`),
        });
        const check = await this.qemuImg.check(join(staging, file), 'qcow2');
        if (!check.ok) throw new HfError('HF_ERR_BAD_IMAGE', `the converted ${file} fails qemu-img check: ${check.message}`);
        files.push({ file, source: disk });
      }

      ctx.progress(92, 'computing checksums');
      const sha256: Record<string, string> = {};
      for (const f of files) sha256[f.file] = await sha256File(join(staging, f.file));
      sha256.source = await sha256File(src);

      await mkdir(finalDir, { recursive: true, mode: 0o755 });
      undo.add('remove image directory', () => rm(finalDir, { recursive: true, force: true }));
      let sizeBytes = 0;
      for (const f of files) {
        await rename(join(staging, f.file), join(finalDir, f.file));
        await chmod(join(finalDir, f.file), 0o444);
        sizeBytes += (await stat(join(finalDir, f.file))).size;
      }

      const boot: BootConfig = req.boot ?? { kind: 'disk', firmware: ovf?.firmware ?? 'bios' };
      const defaults: ImageRecord['defaults'] = {};
      const vcpus = req.vcpus ?? ovf?.vcpus;
      const mem = memoryMiB ?? ovf?.memoryMiB;
      if (vcpus !== undefined) defaults.vcpus = vcpus;
      if (mem !== undefined) defaults.memoryMiB = mem;
      const details: Record<string, unknown> = {
        pool: pool.name,
        sourceFile: srcName,
        sourceFormat: inspected.kind === 'ova' ? 'ova' : inspected.disks[0].format,
        virtualSize: inspected.disks[0]!.virtualSize,
        extraDisks: files.slice(1).map((f, i) => ({ name: `disk${i + 1}`, path: join(finalDir, f.file), format: 'qcow2' })),
      };
      if (finalDir !== this.d.images.dir(req.name)) details.dir = finalDir;
      if (ovf) details.ovf = { name: ovf.name, os: ovf.os, vcpus: ovf.vcpus, memoryMiB: ovf.memoryMiB, firmware: ovf.firmware, disks: ovf.disks.length, nics: ovf.nics, warnings: ovf.warnings };
      const rec: ImageRecord = {
        name: req.name,
        type: 'vm',
        description: req.description ?? (ovf?.name ? `${ovf.name}${ovf.os ? ` (${ovf.os})` : ''}` : `imported from ${srcName}`),
        source: 'import',
        boot,
        disk: { path: join(finalDir, 'disk.qcow2'), format: 'qcow2' },
        defaults,
        sizeBytes,
        sha256,
        createdAt: new Date().toISOString(),
        details,
      };
      await this.d.images.register(rec);
      undo.add('unregister image', () => this.d.images.delete(req.name, []).catch(() => undefined));
      ctx.progress(96, `image ${req.name} registered`);

      let instance: string | undefined;
      if (req.instance) {
        ctx.progress(97, `creating instance ${req.instance}`);
        await this.createFromImage(req.instance, rec, undo);
        instance = req.instance;
      }
      await rm(staging, { recursive: true, force: true });
      this.d.events.publish('image.imported', { name: req.name });
      return { image: req.name, sizeBytes, sha256, ...(instance ? { instance } : {}), ...(ovf ? { ovf: details.ovf } : {}) };
    }, this.d.log);
  }

  /** A stopped VM from an image, with the image's default CPUs/memory and all its disks. */
  private async createFromImage(name: string, rec: ImageRecord, undo: UndoStack): Promise<Instance> {
    const body: Record<string, unknown> = { name, type: 'vm', image: rec.name };
    if (rec.defaults.vcpus !== undefined) body.vcpus = rec.defaults.vcpus;
    if (rec.defaults.memoryMiB !== undefined) body.memory = rec.defaults.memoryMiB;
    const inst = await this.d.instances.create(body);
    undo.add(`delete instance ${name}`, () => this.awaitOp(this.d.instances.delete(name, { force: true })).then(() => undefined));
    const extras = extraDisks(rec);
    if (!extras.length) return inst;
    return this.d.instances.withInstance(name, 'create', async () => {
      const dir = this.d.instances.paths(name).dir;
      const disks: DiskConfig[] = [];
      for (const x of extras) {
        const path = join(dir, `${x.name}.qcow2`);
        await this.qemuImg.createOverlay(path, x.path, x.format);
        disks.push({ name: x.name, path, format: 'qcow2', media: 'disk', readonly: false });
      }
      return this.d.instances.patch(name, (r) => ({ ...r, config: { ...r.config, disks: [...r.config.disks, ...disks] } }));
    });
  }

  /** Writes one disk of a stopped instance to a file on the host (qcow2, raw or streamOptimized VMDK). */
  async exportInstance(name: string, body: unknown): Promise<Operation> {
    const req = parseInput(exportSchema, body);
    const inst = await this.d.instances.get(name);
    if (inst.type !== 'vm') throw new HfError('HF_ERR_UNSUPPORTED', `export is for VMs (${name} is a ${inst.type})`);
    if (await exists(req.file)) throw new HfError('HF_ERR_ALREADY_EXISTS', `${req.file} already exists: export never overwrites`);
    const dirSt = await stat(dirname(req.file)).catch(() => undefined);
    if (!dirSt?.isDirectory()) throw new HfError('HF_ERR_VALIDATION', `${dirname(req.file)} is not a directory`);
    pickDisk(inst, req.disk);
    if (isActive(inst.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance ${name} is ${inst.state}: stop it before exporting (a running guest's disk is not consistent)`);
    return this.d.operations.start('instance.export', { kind: 'instance', name }, (ctx) =>
      this.d.instances.withInstance(name, 'export', async (cur) => {
        if (isActive(cur.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance ${name} is ${cur.state}: stop it before exporting`);
        const disk = pickDisk(cur, req.disk);
        return UndoStack.run(async (undo) => {
          const est = await this.qemuImg.measure(disk.path, req.format === 'raw' ? 'raw' : 'qcow2', disk.format);
          const fs = await statfs(dirname(req.file));
          checkRoom(dirname(req.file), `export of ${name}/${disk.name}`, est.required, fs.bavail * fs.bsize);
          undo.add('remove partial export', () => rm(req.file, { force: true }));
          ctx.progress(2, `converting ${disk.name} to ${req.format}`);
          await this.qemuImg.convert(disk.path, req.file, {
            outFormat: req.format,
            srcFormat: disk.format,
            options: req.format === 'vmdk' ? 'subformat=streamOptimized' : undefined,
            onProgress: (p) => ctx.progress(2 + p * 0.9, `converting ${disk.name}: ${Math.floor(p)}%`),
          });
          ctx.progress(93, 'computing checksum');
          const sha256 = await sha256File(req.file);
          const sizeBytes = (await stat(req.file)).size;
          return { file: req.file, format: req.format, disk: disk.name, sizeBytes, sha256 };
        }, this.d.log);
      }),
    );
  }

  /** Turns a stopped VM's disk into a read-only image (flattened); kernel/initrd are copied along. */
  async publish(name: string, body: unknown): Promise<Operation> {
    const req = parseInput(publishSchema, body);
    const inst = await this.d.instances.get(name);
    if (inst.type !== 'vm') throw new HfError('HF_ERR_UNSUPPORTED', `publish is for VMs (${name} is a ${inst.type})`);
    if (isActive(inst.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance ${name} is ${inst.state}: stop it before publishing`);
    pickDisk(inst, undefined);
    await this.checkNewImageName(req.as);
    this.busyImages.add(req.as);
    return this.d.operations.start('instance.publish', { kind: 'image', name: req.as }, (ctx) =>
      this.d.instances
        .withInstance(name, 'publish', async (cur) => {
          if (isActive(cur.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance ${name} is ${cur.state}: stop it before publishing`);
          const disk = pickDisk(cur, undefined);
          const pool = await this.pool(DEFAULT_POOL);
          const b = this.backend(pool);
          return UndoStack.run(async (undo) => {
            const est = await this.qemuImg.measure(disk.path, 'qcow2', disk.format);
            checkRoom(pool.name, `image ${req.as}`, est.required, (await b.usage()).freeBytes);
            await mkdir(b.stagingDir(), { recursive: true });
            const staging = await mkdtemp(join(b.stagingDir(), `publish-${req.as}-`));
            undo.add('remove staging directory', () => rm(staging, { recursive: true, force: true }));
            ctx.progress(2, `flattening ${name}/${disk.name} into an image`);
            await this.qemuImg.convert(disk.path, join(staging, 'disk.qcow2'), {
              outFormat: 'qcow2',
              srcFormat: disk.format,
              onProgress: (p) => ctx.progress(2 + p * 0.85, `converting ${disk.name}: ${Math.floor(p)}%`),
            });
            const check = await this.qemuImg.check(join(staging, 'disk.qcow2'), 'qcow2');
            if (!check.ok) throw new HfError('HF_ERR_BAD_IMAGE', `the published disk fails qemu-img check: ${check.message}`);
            const finalDir = this.d.images.dir(req.as);
            if (await exists(finalDir)) throw new HfError('HF_ERR_ALREADY_EXISTS', `${finalDir} already exists: remove it first`);
            await mkdir(finalDir, { recursive: true, mode: 0o755 });
            undo.add('remove image directory', () => rm(finalDir, { recursive: true, force: true }));
            await rename(join(staging, 'disk.qcow2'), join(finalDir, 'disk.qcow2'));
            // Kernel-boot images (like tiny): the image must boot on its own, even once the
            // source image is gone, so its kernel and initrd come along.
            let boot: BootConfig = cur.config.boot;
            if (boot.kind === 'kernel') {
              const kernel = join(finalDir, 'vmlinuz');
              await linkOrCopy(boot.kernel, kernel);
              const next: BootConfig = { kind: 'kernel', kernel, cmdline: boot.cmdline };
              if (boot.initrd) {
                next.initrd = join(finalDir, 'initrd.img');
                await linkOrCopy(boot.initrd, next.initrd);
              }
              boot = next;
            }
            const sha256: Record<string, string> = { 'disk.qcow2': await sha256File(join(finalDir, 'disk.qcow2')) };
            await chmod(join(finalDir, 'disk.qcow2'), 0o444);
            const sizeBytes = (await stat(join(finalDir, 'disk.qcow2'))).size;
            const rec: ImageRecord = {
              name: req.as,
              type: 'vm',
              description: req.description ?? `published from ${name}${cur.image ? ` (made from ${cur.image})` : ''}`,
              source: 'publish',
              boot,
              disk: { path: join(finalDir, 'disk.qcow2'), format: 'qcow2' },
              defaults: { vcpus: cur.config.vcpus, memoryMiB: cur.config.memoryMiB },
              sizeBytes,
              sha256,
              createdAt: new Date().toISOString(),
              details: { pool: DEFAULT_POOL, publishedFrom: name, ...(cur.image ? { parentImage: cur.image } : {}) },
            };
            await this.d.images.register(rec);
            await rm(staging, { recursive: true, force: true });
            this.d.events.publish('image.published', { name: req.as, from: name });
            return { image: req.as, sizeBytes, sha256 };
          }, this.d.log);
        })
        .finally(() => this.busyImages.delete(req.as)),
    );
  }

  // ---- copies ----------------------------------------------------------------------------------

  /** A new instance from a stopped one: full (independent disks) or linked (qcow2 deltas on the image). */
  async copy(src: string, body: unknown): Promise<Operation> {
    const req = parseInput(copySchema, body);
    const inst = await this.d.instances.get(src);
    if ((await this.d.instances.list()).some((i) => i.name === req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance "${req.name}" already exists`);
    const provider = inst.type === 'vm' ? undefined : this.copyProviders.get(inst.type);
    if (inst.type !== 'vm' && !provider) throw new HfError('HF_ERR_UNSUPPORTED', `copying ${inst.type} instances is not supported on this host yet`);
    if (isActive(inst.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance ${src} is ${inst.state}: stop it before copying (a running guest's disks are not consistent)`);
    return this.d.operations.start('instance.copy', { kind: 'instance', name: req.name }, (ctx) =>
      this.d.instances.withInstance(src, 'copy', async (cur) => {
        if (isActive(cur.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance ${src} is ${cur.state}: stop it before copying`);
        if (provider) return provider.copy(cur, req.name, { linked: req.linked }, ctx);
        return this.copyVm(cur, req.name, req.linked, ctx);
      }),
    );
  }

  private async copyVm(src: Instance, dst: string, linked: boolean, ctx: OperationContext): Promise<Record<string, unknown>> {
    return UndoStack.run(async (undo) => {
      const c = src.config;
      const body: Record<string, unknown> = {
        name: dst,
        type: 'vm',
        vcpus: c.vcpus,
        memory: c.memoryMiB,
        boot: c.boot,
        accel: c.accel,
        devices: c.devices,
        restartPolicy: c.restartPolicy,
        description: src.description ? `${src.description} (copy of ${src.name})` : `copy of ${src.name}`,
      };
      if (c.maxVcpus !== undefined) body.maxVcpus = c.maxVcpus;
      if (c.maxMemoryMiB !== undefined) body.maxMemory = c.maxMemoryMiB;
      if (c.nics.length) body.nics = c.nics.map((n) => ({ network: n.network }));
      await this.d.instances.create(body);
      undo.add(`delete instance ${dst}`, () => this.awaitOp(this.d.instances.delete(dst, { force: true })).then(() => undefined));

      const result = await this.d.instances.withInstance(dst, 'copy', async () => {
        const dir = this.d.instances.paths(dst).dir;
        const disks: DiskConfig[] = [];
        const writable = c.disks.filter((x) => x.media === 'disk' && !x.readonly);
        const kinds: Record<string, string> = {};
        let done = 0;
        for (const disk of c.disks) {
          if (disk.media !== 'disk' || disk.readonly) {
            disks.push({ ...disk }); // ISOs and read-only disks are shared
            kinds[disk.name] = 'shared';
            continue;
          }
          const base = 5 + (done / writable.length) * 90;
          const step = 90 / writable.length;
          const progress = (p: number): void => ctx.progress(base + (p * step) / 100, `copying ${disk.name}: ${Math.floor(p)}%`);
          if (disk.volume) {
            // A volume is copied into a new volume of the same pool.
            const v = await this.volume(disk.volume);
            const pool = await this.pool(v.pool);
            const b = this.backend(pool);
            const volName = uniqueName(`${dst}-${disk.name}`);
            if (await this.volumes(v.pool).get(volName)) throw new HfError('HF_ERR_ALREADY_EXISTS', `volume ${v.pool}/${volName} already exists`);
            const est = await this.qemuImg.measure(v.path, v.format, v.format);
            checkRoom(pool.name, `copy of volume ${disk.volume}`, est.required, (await b.usage()).freeBytes);
            const path = b.volumePath(volName, v.format);
            undo.add('remove copied volume', () => rm(path, { force: true }));
            await this.qemuImg.convert(v.path, path, { outFormat: v.format, srcFormat: v.format, onProgress: progress });
            await this.volumes(v.pool).create(volName, { ...v, name: volName, path, description: `copy of ${disk.volume}`, createdAt: new Date().toISOString() });
            undo.add('unregister copied volume', () => this.volumes(v.pool).delete(volName).then(() => undefined));
            disks.push({ ...disk, path, volume: `${v.pool}/${volName}` });
            kinds[disk.name] = `volume ${v.pool}/${volName}`;
          } else {
            const backing = disk.format === 'qcow2' ? await readQcow2Backing(disk.path) : undefined;
            const backingPath = backing ? resolve(dirname(disk.path), backing) : undefined;
            const out = join(dir, basename(disk.path));
            const est = await this.qemuImg.measure(disk.path, disk.format, disk.format);
            const fs = await statfs(dir);
            checkRoom(DEFAULT_POOL, `copy of ${src.name}/${disk.name}`, linked && backingPath ? Math.min(est.required, (await stat(disk.path)).size) : est.required, fs.bavail * fs.bsize);
            if (linked && backingPath) {
              const bfmt = (await this.qemuImg.info(backingPath)).format === 'raw' ? 'raw' : 'qcow2';
              // Only what differs from the image is written: the copy is a delta on the same image.
              await this.qemuImg.convert(disk.path, out, { outFormat: 'qcow2', srcFormat: 'qcow2', backing: { path: backingPath, format: bfmt }, onProgress: progress });
              kinds[disk.name] = `linked (backing ${backingPath})`;
            } else {
              if (linked) ctx.message(`disk ${disk.name} has no image behind it: copied in full`);
              await this.qemuImg.convert(disk.path, out, { outFormat: disk.format, srcFormat: disk.format, onProgress: progress });
              kinds[disk.name] = 'full';
            }
            disks.push({ ...disk, path: out });
          }
          done++;
        }
        await this.d.instances.patch(dst, (r) => {
          const next: Instance = { ...r, config: { ...r.config, disks } };
          if (src.image) next.image = src.image;
          return next;
        });
        return { instance: dst, from: src.name, linked, disks: kinds };
      });
      this.d.events.publish('instance.copied', { name: dst, from: src.name, linked });
      return result;
    }, this.d.log);
  }

  /** Waits for an operation started by another service; its failure becomes ours. */
  async awaitOp(started: Promise<Operation>): Promise<Operation> {
    const op = await started;
    const done = await this.d.operations.wait(op.id, Infinity);
    if (done.status === 'failure') {
      const code = (done.error?.code && done.error.code in ERROR_CODES ? done.error.code : 'HF_ERR_INTERNAL') as ErrorCode;
      throw new HfError(code, done.error?.message ?? `${done.type} failed`);
    }
    return done;
  }
}

function extraDisks(rec: ImageRecord): Array<{ name: string; path: string; format: 'qcow2' | 'raw' }> {
  const x = rec.details.extraDisks;
  if (!Array.isArray(x)) return [];
  const out: Array<{ name: string; path: string; format: 'qcow2' | 'raw' }> = [];
  for (const e of x as unknown[]) {
    const r = e as { name?: unknown; path?: unknown; format?: unknown };
    if (typeof r.name === 'string' && typeof r.path === 'string') out.push({ name: r.name, path: r.path, format: r.format === 'raw' ? 'raw' : 'qcow2' });
  }
  return out;
}

function pickDisk(inst: Instance, name: string | undefined): DiskConfig {
  const disk = name ? inst.config.disks.find((x) => x.name === name) : inst.config.disks.find((x) => x.media === 'disk');
  if (!disk) throw new HfError('HF_ERR_VALIDATION', name ? `instance ${inst.name} has no disk "${name}"` : `instance ${inst.name} has no disk`);
  return disk;
}

function uniqueName(base: string): string {
  if (base.length <= 63) return base;
  return `${base.slice(0, 54)}-${randomBytes(4).toString('hex')}`;
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

async function linkOrCopy(from: string, to: string): Promise<void> {
  try {
    await link(from, to);
  } catch {
    await copyFile(from, to);
  }
}
