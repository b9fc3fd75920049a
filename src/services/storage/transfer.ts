// Image transfer: import (a disk image or an OVA, from a host path or an http(s) URL), export of
// an instance's disk to a file on the host, and publish (a stopped VM's disk flattened into an
// image). Each runs as an operation; its files are staged in the pool and moved into place at
// the end, and every step that changes the world registers its undo, so a failure leaves no
// staging file, image directory, image row or instance behind.
import { chmod, mkdir, mkdtemp, rename, rm, stat, statfs } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join } from 'node:path';
import { HfError } from '../../core/errors.js';
import type { ImageRecord } from '../../core/model/image.js';
import type { BootConfig, DiskConfig, Instance } from '../../core/model/instance.js';
import type { Operation } from '../../core/model/operation.js';
import { parseSize } from '../../core/units.js';
import { parseInput } from '../../core/validate.js';
import { imageChecksums } from '../../images/digest.js';
import { checkRoom } from '../../storage/accounting.js';
import { download } from '../../storage/download.js';
import { inspectSource, type DiskSource } from '../../storage/import.js';
import { DEFAULT_POOL, exportSchema, importImageSchema, publishSchema, type ImportImageRequest, type PoolRecord } from '../../storage/model.js';
import type { QemuImg } from '../../storage/qemu-img.js';
import { sha256File } from '../../util/hash.js';
import type { Logger } from '../../util/log.js';
import { UndoStack } from '../../util/undo.js';
import type { EventBus } from '../events.js';
import type { ImageService } from '../images.js';
import type { InstanceService } from '../instances.js';
import type { OperationContext, OperationManager } from '../operations.js';
import { exists, extraDisks, linkOrCopy, pickDisk } from './common.js';
import type { StorageService } from './volumes.js';

export interface ImageTransferDeps {
  storage: StorageService;
  instances: InstanceService;
  images: ImageService;
  operations: OperationManager;
  events: EventBus;
  log: Logger;
}

export class ImageTransferService {
  /** Image names an import or publish in flight is making (refused to a second one). */
  private readonly busyImages = new Set<string>();
  private readonly qemuImg: QemuImg;

  constructor(private readonly d: ImageTransferDeps) {
    this.qemuImg = d.storage.qemuImg;
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
    const pool = await this.d.storage.pool(req.pool);
    // An image record is this host's (images live per host): its files belong in a pool of its own.
    if (pool.shared) throw new HfError('HF_ERR_UNSUPPORTED', `pool ${pool.name} is shared, and images live per host for now: import into a pool of this host (e.g. default)`);
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
    if (this.busyImages.has(name)) throw new HfError('HF_ERR_BUSY', `image "${name}" is being created right now`);
    await this.d.images.checkNewName(name);
  }

  private async doImport(
    ctx: OperationContext,
    req: ImportImageRequest,
    pool: PoolRecord,
    isUrl: boolean,
    memoryMiB: number | undefined,
  ): Promise<Record<string, unknown>> {
    const b = this.d.storage.backend(pool);
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
      const sha256 = await imageChecksums(staging, { files: files.map((f) => f.file) });
      const sourceSha256 = await sha256File(src);

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
        sourceSha256,
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
      undo.add('unregister image', () => this.d.images.delete(req.name, []).catch(() => undefined));
      await this.d.images.register(rec);
      ctx.progress(96, `image ${req.name} registered`);

      let instance: string | undefined;
      if (req.instance) {
        ctx.progress(97, `creating instance ${req.instance}`);
        await this.createFromImage(req.instance, rec, undo, ctx);
        instance = req.instance;
      }
      await rm(staging, { recursive: true, force: true });
      this.d.events.publish('image.imported', { name: req.name });
      return { image: req.name, sizeBytes, sha256, sourceSha256, ...(instance ? { instance } : {}), ...(ovf ? { ovf: details.ovf } : {}) };
    }, this.d.log);
  }

  /** A stopped VM from an image, with the image's default CPUs/memory and all its disks. */
  private async createFromImage(name: string, rec: ImageRecord, undo: UndoStack, ctx: OperationContext): Promise<Instance> {
    const body: Record<string, unknown> = { name, type: 'vm', image: rec.name };
    if (rec.defaults.vcpus !== undefined) body.vcpus = rec.defaults.vcpus;
    if (rec.defaults.memoryMiB !== undefined) body.memory = rec.defaults.memoryMiB;
    const inst = await this.d.instances.create(body, { undo, ctx });
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
    }, ctx);
  }

  /** Writes one disk of a stopped instance to a file on the host (qcow2, raw or streamOptimized VMDK). */
  async exportInstance(name: string, body: unknown): Promise<Operation> {
    const req = parseInput(exportSchema, body);
    const inst = await this.d.instances.get(name);
    this.d.instances.precheck(inst, 'export');
    if (await exists(req.file)) throw new HfError('HF_ERR_ALREADY_EXISTS', `${req.file} already exists: export never overwrites`);
    const dirSt = await stat(dirname(req.file)).catch(() => undefined);
    if (!dirSt?.isDirectory()) throw new HfError('HF_ERR_VALIDATION', `${dirname(req.file)} is not a directory`);
    pickDisk(inst, req.disk);
    return this.d.operations.start('instance.export', { kind: 'instance', name }, (ctx) =>
      this.d.instances.withInstance(name, 'export', async (cur) => {
        this.d.instances.allowed(cur, 'export');
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
      }, ctx),
    );
  }

  /** Turns a stopped VM's disk into a read-only image (flattened); kernel/initrd are copied along. */
  async publish(name: string, body: unknown): Promise<Operation> {
    const req = parseInput(publishSchema, body);
    const inst = await this.d.instances.get(name);
    this.d.instances.precheck(inst, 'publish');
    pickDisk(inst, undefined);
    await this.checkNewImageName(req.as);
    this.busyImages.add(req.as);
    return this.d.operations.start('instance.publish', { kind: 'image', name: req.as }, (ctx) =>
      this.d.instances
        .withInstance(name, 'publish', async (cur) => {
          this.d.instances.allowed(cur, 'publish');
          const disk = pickDisk(cur, undefined);
          const pool = await this.d.storage.pool(DEFAULT_POOL);
          const b = this.d.storage.backend(pool);
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
            // Every file of the image, so that another host can fetch it and check what it got.
            const sha256 = await imageChecksums(finalDir, { files: ['disk.qcow2', ...(boot.kind === 'kernel' ? [boot.kernel, boot.initrd].filter((f): f is string => !!f).map((f) => basename(f)) : [])] });
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
            // Registered before the step: a register that wrote the row and then failed is undone too.
            undo.add('unregister image', () => this.d.images.delete(req.as, []).catch(() => undefined));
            await this.d.images.register(rec);
            await rm(staging, { recursive: true, force: true });
            this.d.events.publish('image.published', { name: req.as, from: name });
            return { image: req.as, sizeBytes, sha256 };
          }, this.d.log);
        }, ctx)
        .finally(() => this.busyImages.delete(req.as)),
    );
  }
}
