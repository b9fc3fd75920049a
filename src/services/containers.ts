// What only containers have, next to the instance service that runs their lifecycle: exec,
// live cgroup figures, snapshots and copies (root filesystem plus definition), image imports
// (OCI layout, docker-archive, rootfs tarball) and the built-in container image builders.
import { join } from 'node:path';
import { HfError } from '../core/errors.js';
import { isActive } from '../core/lifecycle.js';
import { nameSchema, type Instance } from '../core/model/instance.js';
import type { Operation } from '../core/model/operation.js';
import type { ExecOptions, ExecSession, InstanceHandle } from '../drivers/driver.js';
import type { SnapshotRecord } from '../storage/model.js';
import type { UndoStack } from '../util/undo.js';
import { parseInput } from '../core/validate.js';
import { z } from 'zod';
import type { DataPaths } from '../daemon/config.js';
import { readMeta, type ContainerDriver } from '../drivers/container/driver.js';
import { createSnapshot, deleteSnapshot, listSnapshots, revertToSnapshot, snapshotExists, type SnapshotInfo } from '../drivers/container/snapshots.js';
import { buildBusyboxImage, readBusyboxManifest, type BusyboxManifest } from '../images/container/busybox.js';
import { buildDebianImage, readDebianManifest, type DebianManifest } from '../images/container/debian.js';
import { IMPORT_FORMATS, importContainerImage } from '../images/container/oci.js';
import type { Logger } from '../util/log.js';
import type { EventBus } from './events.js';
import type { ImageBuilder, ImageService } from './images.js';
import type { InstanceService } from './instances.js';
import type { OperationContext, OperationManager } from './operations.js';

export interface ContainerServiceDeps {
  instances: InstanceService;
  images: ImageService;
  operations: OperationManager;
  events: EventBus;
  driver: ContainerDriver;
  paths: DataPaths;
  log: Logger;
}

export const execRequestSchema = z
  .object({
    command: z.array(z.string()).min(1, { message: 'give the command to run, e.g. ["ps"]' }),
    env: z.record(z.string(), z.string()).optional(),
    cwd: z.string().startsWith('/').optional(),
    /** Text fed to the command's standard input (then closed). */
    stdin: z.string().max(8 * 1024 * 1024).optional(),
    /** Seconds before the command is killed. */
    timeout: z.number().int().min(1).max(3600).default(300),
  })
  .strict();

/** An interactive session (websocket): no stdin text or timeout; a terminal when `tty` is set. */
export const execSessionSchema = z
  .object({
    command: z.array(z.string()).min(1, { message: 'give the command to run, e.g. ["sh"]' }),
    env: z.record(z.string(), z.string()).optional(),
    cwd: z.string().startsWith('/').optional(),
    tty: z.boolean().default(false),
    cols: z.number().int().min(1).max(1000).default(80),
    rows: z.number().int().min(1).max(1000).default(24),
  })
  .strict();

export const snapshotRequestSchema = z.object({ name: nameSchema, description: z.string().max(1024).optional() }).strict();
export const copyRequestSchema = z.object({ name: nameSchema, description: z.string().max(1024).optional() }).strict();
export const importRequestSchema = z
  .object({
    name: nameSchema,
    /** Path on the daemon's host: an OCI layout directory, a docker-archive tarball or a rootfs tarball. */
    source: z.string().startsWith('/', { message: 'source must be an absolute path on the host' }),
    format: z.enum(IMPORT_FORMATS).optional(),
    description: z.string().max(1024).optional(),
  })
  .strict();

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  truncated: boolean;
}

const MAX_OUTPUT = 8 * 1024 * 1024;

export class ContainerService {
  constructor(private readonly d: ContainerServiceDeps) {}

  private async container(name: string): Promise<Instance> {
    const inst = await this.d.instances.get(name);
    if (inst.type !== 'container') throw new HfError('HF_ERR_UNSUPPORTED', `instance "${name}" is a ${inst.type}, not a container`);
    return inst;
  }

  private dir(name: string): string {
    return this.d.instances.paths(name).dir;
  }

  // ---- exec and live state -----------------------------------------------------------------------

  /** Runs a command in a running container and returns its exit code and output. */
  async exec(name: string, body: unknown): Promise<ExecResult> {
    const req = parseInput(execRequestSchema, body);
    const session = await this.startExec(name, req.command, { tty: false, env: req.env, cwd: req.cwd });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let size = 0;
    let truncated = false;
    const take = (into: Buffer[]) => (b: Buffer) => {
      if (size + b.length > MAX_OUTPUT) {
        truncated = true;
        b = b.subarray(0, Math.max(0, MAX_OUTPUT - size));
      }
      size += b.length;
      if (b.length) into.push(b);
    };
    session.onStdout(take(out));
    session.onStderr(take(err));
    if (req.stdin !== undefined) session.stdin(req.stdin);
    session.closeStdin();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      session.kill('SIGKILL');
    }, req.timeout * 1000);
    const exitCode = await session.exit.finally(() => clearTimeout(timer));
    return { exitCode, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), timedOut, truncated };
  }

  /** Starts an interactive session (the websocket route streams it); the caller ends it. */
  async openExec(name: string, body: unknown): Promise<ExecSession> {
    const req = parseInput(execSessionSchema, body);
    return this.startExec(name, req.command, { tty: req.tty, env: req.env, cwd: req.cwd, cols: req.cols, rows: req.rows });
  }

  private async startExec(name: string, command: string[], opts: ExecOptions): Promise<ExecSession> {
    const inst = await this.container(name);
    this.d.instances.allowed(inst, 'exec');
    const handle = this.d.instances.handle(name);
    // The record said running, but the process is gone or not supervised yet.
    if (!handle?.exec) throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', `container "${name}" is not running: start it before running commands in it`);
    return handle.exec(command, opts);
  }

  /** The record plus what only a running container knows (cgroup usage, id map). */
  async info(name: string): Promise<{ instance: Instance; container: Record<string, unknown> }> {
    const inst = await this.container(name);
    const meta = await readMeta(this.dir(name)).catch(() => undefined);
    const handle = this.d.instances.handle(name);
    const live = handle?.liveInfo ? await handle.liveInfo().catch(() => undefined) : undefined;
    return {
      instance: inst,
      container: {
        privileged: inst.config.privileged === true,
        idmap: meta?.idmap ?? null,
        init: meta?.init,
        stopSignal: meta?.stopSignal,
        cgroupMode: this.d.driver.layout.mode,
        snapshots: (await listSnapshots(this.dir(name))).length,
        live: live ?? null,
      },
    };
  }

  // ---- snapshots ---------------------------------------------------------------------------------

  async listSnapshots(name: string): Promise<SnapshotInfo[]> {
    await this.container(name);
    return listSnapshots(this.dir(name));
  }

  /** Copies the root filesystem and definition; a running container is frozen while copied. */
  async createSnapshot(name: string, body: unknown): Promise<Operation> {
    const req = parseInput(snapshotRequestSchema, body);
    await this.container(name);
    if (await snapshotExists(this.dir(name), req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `snapshot "${req.name}" of ${name} already exists`);
    return this.d.operations.start('container.snapshot.create', { kind: 'instance', name }, (ctx) =>
      this.d.instances.withInstance(name, 'snapshot', (inst, handle) => this.snapshotLocked(inst, handle, req.name, req.description, ctx)),
    );
  }

  /** Under the instance's lock. */
  private async snapshotLocked(inst: Instance, handle: InstanceHandle | undefined, snap: string, description: string | undefined, ctx: OperationContext): Promise<SnapshotInfo> {
    const freeze = handle !== undefined && inst.state === 'running';
    if (freeze) {
      ctx.progress(5, 'freezing the container');
      await handle.pause();
    }
    try {
      ctx.progress(10, 'copying the root filesystem');
      const info = await createSnapshot(this.dir(inst.name), snap, { ...inst.config, ...inst.pending }, { stateful: freeze, description });
      this.d.events.publish('instance.snapshot.created', { name: inst.name, snapshot: snap });
      return info;
    } finally {
      if (freeze) await handle.resume();
    }
  }

  /** Puts the root filesystem and definition back as they were in the snapshot (container stopped). */
  async revertSnapshot(name: string, snap: string): Promise<Operation> {
    const inst = await this.container(name);
    if (isActive(inst.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `container "${name}" is ${inst.state}: stop it before reverting to a snapshot`);
    if (!(await snapshotExists(this.dir(name), snap))) throw new HfError('HF_ERR_NOT_FOUND', `snapshot "${snap}" of ${name} not found`);
    return this.d.operations.start('container.snapshot.revert', { kind: 'instance', name }, (ctx) => this.revertUnlocked(name, snap, ctx));
  }

  private revertUnlocked(name: string, snap: string, ctx: OperationContext): Promise<{ reverted: string }> {
    return this.d.instances.withInstance(name, 'revert', async (cur) => {
      if (isActive(cur.state)) throw new HfError('HF_ERR_INSTANCE_RUNNING', `container "${name}" is ${cur.state}: stop it before reverting`);
      ctx.progress(10, 'copying the snapshot back');
      const info = await revertToSnapshot(this.dir(name), snap);
      // The definition comes back too; attachments (NICs, disks) stay as they are now.
      await this.d.instances.patch(name, (r) => ({ ...r, config: { ...info.config, nics: r.config.nics, disks: r.config.disks }, pending: {} }));
      this.d.events.publish('instance.snapshot.reverted', { name, snapshot: snap });
      return { reverted: snap };
    });
  }

  async deleteSnapshot(name: string, snap: string): Promise<void> {
    await this.container(name);
    await this.d.instances.withInstance(name, 'snapshot delete', () => deleteSnapshot(this.dir(name), snap));
    this.d.events.publish('instance.snapshot.deleted', { name, snapshot: snap });
  }

  // ---- copies --------------------------------------------------------------------------------------

  /** A new stopped container with a copy of the root filesystem (in its own id range) and the definition. */
  async copy(src: string, body: unknown): Promise<Operation> {
    const req = parseInput(copyRequestSchema, body);
    await this.container(src);
    const exists = await this.d.instances.get(req.name).then(() => true, () => false);
    if (exists) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance "${req.name}" already exists`);
    return this.d.operations.start('container.copy', { kind: 'instance', name: req.name }, (ctx) =>
      this.d.instances.withInstance(src, 'copy', (inst, handle) => this.copyLocked(inst, handle, req.name, req.description, ctx)),
    );
  }

  /** Under the source's lock; a running source is frozen while its tree is copied. */
  private async copyLocked(inst: Instance, handle: InstanceHandle | undefined, dst: string, description: string | undefined, ctx: OperationContext): Promise<{ name: string; from: string }> {
    const src = inst.name;
    const meta = await readMeta(this.dir(src));
    const freeze = handle !== undefined && inst.state === 'running';
    if (freeze) {
      ctx.progress(5, `freezing ${src}`);
      await handle.pause();
    }
    const release = this.d.driver.prepareCopy(dst, { dir: this.dir(src), meta, privileged: inst.config.privileged === true });
    try {
      ctx.progress(10, 'copying the root filesystem');
      const c = { ...inst.config, ...inst.pending };
      await this.d.instances.create({
        name: dst,
        type: 'container',
        vcpus: c.vcpus,
        memory: c.memoryMiB,
        privileged: c.privileged === true,
        ...(c.pidsLimit !== undefined ? { pidsLimit: c.pidsLimit } : {}),
        restartPolicy: c.restartPolicy,
        autostart: c.autostart,
        description: description ?? inst.description,
      });
      const copied = await this.d.instances.patch(dst, (r) => ({ ...r, image: inst.image }));
      this.d.events.publish('instance.copied', { name: dst, from: src });
      return { name: copied.name, from: src };
    } finally {
      release();
      if (freeze) await handle.resume();
    }
  }

  // ---- plug-ins for the shared snapshot and copy services (/api/v1/instances/:name/snapshots, /copy) ----

  /** Container snapshots under the shared snapshot records and tree (SnapshotService.registerProvider). */
  snapshotProvider() {
    return {
      plan: (inst: Instance, req: { name: string; memory: boolean; description: string }, parent: string | undefined): SnapshotRecord => {
        if (req.memory) throw new HfError('HF_ERR_UNSUPPORTED', 'containers have no memory snapshots: their snapshots copy the root filesystem (a running container is frozen meanwhile)');
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
      },
      create: async (inst: Instance, handle: InstanceHandle | undefined, rec: SnapshotRecord, ctx: OperationContext, undo: UndoStack): Promise<void> => {
        await this.snapshotLocked(inst, handle, rec.name, rec.description, ctx);
        undo.add('delete container snapshot files', () => deleteSnapshot(this.dir(inst.name), rec.name));
      },
      revert: async (inst: Instance, rec: SnapshotRecord, ctx: OperationContext): Promise<Record<string, unknown>> => this.revertUnlocked(inst.name, rec.name, ctx),
      delete: async (inst: Instance, _handle: InstanceHandle | undefined, rec: SnapshotRecord): Promise<void> => {
        if (await snapshotExists(this.dir(inst.name), rec.name)) await deleteSnapshot(this.dir(inst.name), rec.name);
      },
    };
  }

  /** Container copies for the shared copy route (StorageService.registerCopyProvider); called under the source's lock. */
  copyProvider() {
    return {
      copy: async (src: Instance, dst: string, opts: { linked: boolean }, ctx: OperationContext): Promise<unknown> => {
        if (opts.linked) throw new HfError('HF_ERR_UNSUPPORTED', 'containers have no linked copies: a container copy is a full copy of the root filesystem');
        return this.copyLocked(src, this.d.instances.handle(src.name), dst, undefined, ctx);
      },
    };
  }

  // ---- images ------------------------------------------------------------------------------------

  /** Imports an OCI image or a rootfs tarball from a path on this host, as an operation. */
  async importImage(body: unknown): Promise<Operation> {
    const req = parseInput(importRequestSchema, body);
    if (await this.d.images.find(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `image "${req.name}" already exists`);
    if (this.d.images.buildable().includes(req.name)) throw new HfError('HF_ERR_CONFLICT', `"${req.name}" is the name of a built-in image`);
    return this.d.operations.start('image.import', { kind: 'image', name: req.name }, async (ctx) => {
      const dest = this.d.images.dir(req.name);
      try {
        const m = await importContainerImage({ source: req.source, format: req.format, destDir: dest, workDir: this.d.paths.cacheDir, progress: (p, msg) => ctx.progress(p, msg) });
        const rec = await this.d.images.register({
          name: req.name,
          type: 'container',
          description: req.description ?? `imported from ${m.format} ${req.source}`,
          source: 'import',
          rootfs: { path: join(dest, 'rootfs'), format: 'dir' },
          defaults: {},
          sizeBytes: m.sizeBytes,
          sha256: {},
          createdAt: m.importedAt,
          details: { init: m.init, env: m.env, cwd: m.cwd, stopSignal: 'SIGTERM', format: m.format, source: m.source },
        });
        return { name: rec.name, format: m.format, init: m.init, sizeBytes: m.sizeBytes };
      } catch (e) {
        const { rm } = await import('node:fs/promises');
        await rm(dest, { recursive: true, force: true });
        throw e;
      }
    });
  }
}

// ---- built-in container images -------------------------------------------------------------------

/** `busybox`: built from the host's busybox-static on first use (it takes well under a second). */
export function busyboxImageBuilder(): ImageBuilder {
  let building: Promise<BusyboxManifest> | undefined;
  const describe = (dir: string, m: BusyboxManifest) => ({
    description: `BusyBox ${m.busyboxVersion} system container (busybox init)`,
    rootfs: { path: join(dir, 'rootfs'), format: 'dir' as const },
    defaults: {},
    sizeBytes: m.sizeBytes,
    sha256: { busybox: m.sha256 },
    createdAt: m.builtAt,
    details: { init: ['/sbin/init'], stopSignal: 'SIGTERM', busyboxVersion: m.busyboxVersion },
  });
  const make = (dir: string, progress?: (p: number, m: string) => void) => (building ??= buildBusyboxImage(dir, progress).finally(() => (building = undefined)));
  return {
    name: 'busybox',
    type: 'container',
    description: 'BusyBox system container from Debian busybox-static',
    build: async ({ destDir, progress }) => describe(destDir, await make(destDir, progress)),
    adopt: async (destDir) => {
      const m = (await readBusyboxManifest(destDir)) ?? (await make(destDir).catch(() => undefined));
      return m ? describe(destDir, m) : undefined;
    },
  };
}

/** `debian-12`: debootstrap of bookworm (cached), sysvinit as PID 1. */
export function debianImageBuilder(): ImageBuilder {
  const describe = (dir: string, m: DebianManifest) => ({
    description: `Debian 12 (${m.suite}) system container with sysvinit`,
    rootfs: { path: join(dir, 'rootfs'), format: 'dir' as const },
    defaults: {},
    sizeBytes: m.sizeBytes,
    sha256: {},
    createdAt: m.builtAt,
    details: { init: ['/usr/local/sbin/hyperfold-init'], stopSignal: 'SIGPWR', suite: m.suite, mirror: m.mirror, packages: m.packages, files: m.files },
  });
  return {
    name: 'debian-12',
    type: 'container',
    description: 'Debian 12 system container built with debootstrap',
    build: async ({ destDir, cacheDir, progress, signal }) => describe(destDir, await buildDebianImage(destDir, cacheDir, progress, signal)),
    adopt: async (destDir) => {
      const m = await readDebianManifest(destDir);
      return m ? describe(destDir, m) : undefined;
    },
  };
}

export function containerImageBuilders(): ImageBuilder[] {
  return [busyboxImageBuilder(), debianImageBuilder()];
}

