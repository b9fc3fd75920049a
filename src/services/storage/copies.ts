// Instance copies: a new stopped instance from an existing one, one path for every type. The
// copy is created like any instance, then filled under its own lock; every step registers its
// undo, so a copy that fails at any step leaves no instance, file or volume behind.
//  - VMs: full (independent disks) or linked (qcow2 deltas on the same image); volumes are copied
//    into new volumes of their pool. The source must be stopped (a running guest's disks are not
//    consistent).
//  - types whose driver copies them (containers, `InstanceDriver.prepareCopy`): the driver fills
//    the new instance from the source at its create; a running source is frozen meanwhile.
import { basename, dirname, join, resolve } from 'node:path';
import { stat, statfs, rm } from 'node:fs/promises';
import { HfError } from '../../core/errors.js';
import type { DiskConfig, Instance, InstanceType } from '../../core/model/instance.js';
import type { Operation } from '../../core/model/operation.js';
import { parseInput } from '../../core/validate.js';
import type { InstanceDriver, InstanceHandle } from '../../drivers/driver.js';
import { checkRoom } from '../../storage/accounting.js';
import { DEFAULT_POOL, copySchema, type CopyRequest } from '../../storage/model.js';
import { readQcow2Backing, type QemuImg } from '../../storage/qemu-img.js';
import type { Logger } from '../../util/log.js';
import { UndoStack } from '../../util/undo.js';
import type { EventBus } from '../events.js';
import type { InstanceService } from '../instances.js';
import { liveHandle } from '../instances/live-handle.js';
import type { OperationContext, OperationManager } from '../operations.js';
import { uniqueName } from './common.js';
import type { StorageService } from './volumes.js';

export interface CopyServiceDeps {
  storage: StorageService;
  instances: InstanceService;
  operations: OperationManager;
  drivers: ReadonlyMap<InstanceType, InstanceDriver>;
  events: EventBus;
  log: Logger;
}

export class CopyService {
  private readonly qemuImg: QemuImg;

  constructor(private readonly d: CopyServiceDeps) {
    this.qemuImg = d.storage.qemuImg;
  }

  /** A new instance from another: see the head of this file for what each type copies. */
  async copy(src: string, body: unknown): Promise<Operation> {
    const req = parseInput(copySchema, body);
    const inst = await this.d.instances.get(src);
    if ((await this.d.instances.list()).some((i) => i.name === req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance "${req.name}" already exists`);
    const driver = inst.type === 'vm' ? undefined : this.driverCopy(inst);
    if (driver && req.linked) throw new HfError('HF_ERR_UNSUPPORTED', `${inst.type}s have no linked copies: a ${inst.type} copy is a full copy of its root filesystem`);
    this.d.instances.precheck(inst, 'copy');
    return this.d.operations.start('instance.copy', { kind: 'instance', name: req.name }, (ctx) =>
      this.d.instances.withInstance(
        src,
        'copy',
        async (cur, handle) => {
          // Live only where the driver has "copy-live" (a container, frozen while copied).
          const live = this.d.instances.allowed(cur, 'copy').live ? liveHandle(cur, handle) : undefined;
          if (driver) return this.copyByDriver(driver, cur, live, req, ctx);
          return this.copyVm(cur, req.name, req, ctx);
        },
        ctx,
      ),
    );
  }

  private driverCopy(inst: Instance): InstanceDriver & Required<Pick<InstanceDriver, 'prepareCopy'>> {
    const driver = this.d.drivers.get(inst.type);
    if (!driver?.prepareCopy) throw new HfError('HF_ERR_UNSUPPORTED', `copying ${inst.type} instances is not supported on this host`);
    return driver as InstanceDriver & Required<Pick<InstanceDriver, 'prepareCopy'>>;
  }

  /** Under the source's lock; a running source (`handle` given: the copy runs live) is frozen while the driver copies it. */
  private async copyByDriver(
    driver: Required<Pick<InstanceDriver, 'prepareCopy'>>,
    src: Instance,
    handle: InstanceHandle | undefined,
    req: CopyRequest,
    ctx: OperationContext,
  ): Promise<Record<string, unknown>> {
    const dst = req.name;
    // A paused source is frozen already.
    const freeze = handle !== undefined && src.state === 'running';
    return UndoStack.run(async (undo) => {
      if (freeze) {
        ctx.progress(5, `freezing ${src.name}`);
        await handle.pause();
        undo.add(`thaw ${src.name}`, () => handle.resume());
      }
      const release = await driver.prepareCopy(src, this.d.instances.paths(src.name), dst);
      let copied: Instance;
      try {
        ctx.progress(10, 'copying the root filesystem');
        const c = { ...src.config, ...src.pending };
        await this.d.instances.create({
          name: dst,
          type: src.type,
          vcpus: c.vcpus,
          memory: c.memoryMiB,
          privileged: c.privileged === true,
          ...(c.pidsLimit !== undefined ? { pidsLimit: c.pidsLimit } : {}),
          restartPolicy: c.restartPolicy,
          autostart: c.autostart,
          description: req.description ?? src.description,
        }, { undo, ctx });
        copied = await this.d.instances.withInstance(dst, 'copy', () => this.d.instances.patch(dst, (r) => (src.image ? { ...r, image: src.image } : r)), ctx);
      } finally {
        release();
      }
      if (freeze) await handle.resume();
      undo.commit();
      this.d.events.publish('instance.copied', { name: dst, from: src.name, linked: false });
      return { instance: copied.name, from: src.name, linked: false };
    }, this.d.log);
  }

  private async copyVm(src: Instance, dst: string, req: CopyRequest, ctx: OperationContext): Promise<Record<string, unknown>> {
    const linked = req.linked;
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
        description: req.description ?? (src.description ? `${src.description} (copy of ${src.name})` : `copy of ${src.name}`),
      };
      if (c.maxVcpus !== undefined) body.maxVcpus = c.maxVcpus;
      if (c.maxMemoryMiB !== undefined) body.maxMemory = c.maxMemoryMiB;
      if (c.nics.length) body.nics = c.nics.map((n) => ({ network: n.network }));
      // A VM kept in a storage pool is copied into the same pool.
      if (src.storage) body.storage = src.storage;
      await this.d.instances.create(body, { undo, ctx });

      const result = await this.d.instances.withInstance(dst, 'copy', async () => {
        const dir = await this.d.storage.disksDir({ name: dst, storage: src.storage });
        const dirPool = src.storage ?? DEFAULT_POOL;
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
            const v = await this.d.storage.volume(disk.volume);
            const pool = await this.d.storage.pool(v.pool);
            const b = this.d.storage.backend(pool);
            const volName = uniqueName(`${dst}-${disk.name}`);
            await this.d.storage.usable(pool);
            if (await this.d.storage.volumes(pool).get(volName)) throw new HfError('HF_ERR_ALREADY_EXISTS', `volume ${v.pool}/${volName} already exists`);
            const est = await this.qemuImg.measure(v.path, v.format, v.format);
            checkRoom(pool.name, `copy of volume ${disk.volume}`, est.required, (await b.usage()).freeBytes);
            const path = b.volumePath(volName, v.format);
            undo.add('remove copied volume', () => rm(path, { force: true }));
            await this.qemuImg.convert(v.path, path, { outFormat: v.format, srcFormat: v.format, onProgress: progress });
            await this.d.storage.volumes(pool).create(volName, { ...v, name: volName, path, description: `copy of ${disk.volume}`, createdAt: new Date().toISOString() });
            undo.add('unregister copied volume', () => this.d.storage.volumes(pool).delete(volName).then(() => undefined));
            disks.push({ ...disk, path, volume: `${v.pool}/${volName}` });
            kinds[disk.name] = `volume ${v.pool}/${volName}`;
          } else {
            const backing = disk.format === 'qcow2' ? await readQcow2Backing(disk.path) : undefined;
            const backingPath = backing ? resolve(dirname(disk.path), backing) : undefined;
            const out = join(dir, basename(disk.path));
            const est = await this.qemuImg.measure(disk.path, disk.format, disk.format);
            const fs = await statfs(dir);
            checkRoom(dirPool, `copy of ${src.name}/${disk.name}`, linked && backingPath ? Math.min(est.required, (await stat(disk.path)).size) : est.required, fs.bavail * fs.bsize);
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
      }, ctx);
      this.d.events.publish('instance.copied', { name: dst, from: src.name, linked });
      return result;
    }, this.d.log);
  }
}
