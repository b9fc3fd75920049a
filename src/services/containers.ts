// What only containers have, next to the instance service that runs their lifecycle: exec,
// live cgroup figures, image imports (OCI layout, docker-archive, rootfs tarball) and the
// built-in container image builders. Snapshots and copies are the shared ones (SnapshotService,
// storage/copies.ts), through the container driver's capabilities.
import { join } from 'node:path';
import { HfError } from '../core/errors.js';
import { nameSchema, type Instance } from '../core/model/instance.js';
import type { Operation } from '../core/model/operation.js';
import type { ExecOptions, ExecSession, InstanceDriver } from '../drivers/driver.js';
import { parseInput } from '../core/validate.js';
import { z } from 'zod';
import { buildBusyboxImage, readBusyboxManifest, type BusyboxManifest } from '../images/container/busybox.js';
import { buildDebianImage, readDebianManifest, type DebianManifest } from '../images/container/debian.js';
import { IMPORT_FORMATS, importContainerImage } from '../images/container/oci.js';
import { imageChecksums } from '../images/digest.js';
import type { Logger } from '../util/log.js';
import type { EventBus } from './events.js';
import type { ImageBuilder, ImageService } from './images.js';
import type { InstanceService } from './instances.js';
import { liveHandle } from './instances/live-handle.js';
import type { OperationManager } from './operations.js';

export interface ContainerServiceDeps {
  instances: InstanceService;
  images: ImageService;
  operations: OperationManager;
  events: EventBus;
  /** The container driver, through the driver interface (its `describe` feeds `info`). */
  driver: InstanceDriver;
  /** Where image imports keep their downloads and unpacked layers. */
  cacheDir: string;
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
    return liveHandle(inst, this.d.instances.handle(name), 'exec').exec(command, opts);
  }

  /** The record plus what only a running container knows (cgroup usage, id map). */
  async info(name: string): Promise<{ instance: Instance; container: Record<string, unknown> }> {
    const inst = await this.container(name);
    const handle = this.d.instances.handle(name);
    const live = handle?.liveInfo ? await handle.liveInfo().catch(() => undefined) : undefined;
    const files = this.d.driver.describe ? await this.d.driver.describe(inst, this.d.instances.paths(name)) : {};
    return { instance: inst, container: { privileged: inst.config.privileged === true, ...files, live: live ?? null } };
  }

  // ---- images ------------------------------------------------------------------------------------

  /** Imports an OCI image or a rootfs tarball from a path on this host, as an operation. */
  async importImage(body: unknown): Promise<Operation> {
    const req = parseInput(importRequestSchema, body);
    await this.d.images.checkNewName(req.name);
    return this.d.operations.start('image.import', { kind: 'image', name: req.name }, async (ctx) => {
      const dest = this.d.images.dir(req.name);
      try {
        const m = await importContainerImage({ source: req.source, format: req.format, destDir: dest, workDir: this.d.cacheDir, progress: (p, msg) => ctx.progress(p, msg) });
        ctx.progress(95, 'computing the root filesystem’s digest');
        const sha256 = await imageChecksums(dest, { trees: ['rootfs'] });
        const rec = await this.d.images.register({
          name: req.name,
          type: 'container',
          description: req.description ?? `imported from ${m.format} ${req.source}`,
          source: 'import',
          rootfs: { path: join(dest, 'rootfs'), format: 'dir' },
          defaults: {},
          sizeBytes: m.sizeBytes,
          sha256,
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
  const describe = async (dir: string, m: BusyboxManifest) => ({
    description: `BusyBox ${m.busyboxVersion} system container (busybox init)`,
    rootfs: { path: join(dir, 'rootfs'), format: 'dir' as const },
    defaults: {},
    sizeBytes: m.sizeBytes,
    sha256: await imageChecksums(dir, { trees: ['rootfs'] }),
    createdAt: m.builtAt,
    details: { init: ['/sbin/init'], stopSignal: 'SIGTERM', busyboxVersion: m.busyboxVersion, busyboxSha256: m.sha256 },
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
  const describe = async (dir: string, m: DebianManifest) => ({
    description: `Debian 12 (${m.suite}) system container with sysvinit`,
    rootfs: { path: join(dir, 'rootfs'), format: 'dir' as const },
    defaults: {},
    sizeBytes: m.sizeBytes,
    sha256: await imageChecksums(dir, { trees: ['rootfs'] }),
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

