// The container driver: system containers on runc behind the same InstanceDriver interface as
// QEMU. Each container is an OCI bundle in its instance directory (rootfs/, config.json built at
// every start, container.json with what came from the image). runc runs it detached: no process
// of ours stays between the daemon and the container, init's stdio are a FIFO and the console
// log, and a restarted daemon re-attaches from the pid and start time in the instance record.
import { performance } from 'node:perf_hooks';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { lchown, mkdir, readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError } from '../../core/errors.js';
import { failpoint } from '../../util/failpoint.js';
import type { ImageRecord } from '../../core/model/image.js';
import type { Instance, InstanceConfig, RuntimeInfo } from '../../core/model/instance.js';
import { extractRootfsArchive } from '../../images/container/tar.js';
import type { Logger } from '../../util/log.js';
import { KeyedMutex } from '../../util/mutex.js';
import { isProcessAlive, readProcStat } from '../../util/proc.js';
import { transplantNetns } from './netns.js';
import type { InstanceDriver, InstanceHandle, InstancePaths, StartContext } from '../driver.js';
import { ContainerCgroup, containerCgroupPath, hostCgroupLayout, swapLimitSupported, type CgroupLayout } from './cgroups.js';
import { ensureFifo } from './console.js';
import { ContainerHandle, Monitor } from './handle.js';
import { copyTreeShifted, ensureTraversable, shiftTreeInPlace } from './rootfs.js';
import { Runc } from './runc.js';
import { CopySources, provisionCopy } from './copy.js';
import { createSnapshot, deleteSnapshot, listSnapshots, revertToSnapshot, snapshotExists } from './snapshots.js';
import { DEFAULT_SPARE_IMAGES, DEFAULT_SPARES_PER_IMAGE, SparePool } from './spare-pool.js';
import { blockOf, lowestFreeBlock } from './spares.js';
import { IDMAP_SIZE, buildOciSpec, checkContainerLimits, containerMetaSchema, containerResources, type ContainerMeta } from './spec.js';
import { CONTAINER_CAPABILITIES } from './capabilities.js';

export const DEFAULT_RUNC_ROOT = '/run/hyperfold/runc';
/** First host id given to containers; each gets the next free block of 65536. */
export const DEFAULT_IDMAP_BASE = 1_000_000;
/** How long the driver must be without creates and starts before the spare pool refills. */
const IDLE_SETTLE_MS = 50;

export interface ContainerDriverOptions {
  runcBinary?: string;
  /** runc's state directory (tmpfs). */
  runcRoot?: string;
  log: Logger;
  /** The daemon's data directory: directories from here down are made traversable for container roots. */
  dataDir: string;
  instancesDir: string;
  idmapBase?: number;
  /** How often liveness and OOM counters are read. */
  monitorIntervalMs?: number;
  /** Overrides the detected cgroup layout (tests). */
  cgroupLayout?: CgroupLayout;
  /**
   * Spare root filesystems kept ready per recently used image (see spare-pool.ts); 0 turns the
   * pool off. Default: HYPERFOLD_CONTAINER_SPARES, else 2.
   */
  sparesPerImage?: number;
  /** How many recently used images keep spares (default 4). */
  spareImages?: number;
}

/** The files of one container, all in its instance directory. */
export function containerFiles(dir: string) {
  return {
    rootfs: join(dir, 'rootfs'),
    meta: join(dir, 'container.json'),
    spec: join(dir, 'config.json'),
    pidFile: join(dir, 'init.pid'),
    runcLog: join(dir, 'runc.log'),
    consoleIn: join(dir, 'console.in'),
    snapshots: join(dir, 'snapshots'),
  };
}

export async function readMeta(dir: string): Promise<ContainerMeta> {
  let raw: string;
  try {
    raw = await readFile(containerFiles(dir).meta, 'utf8');
  } catch (e) {
    throw new HfError('HF_ERR_INTERNAL', `container metadata ${containerFiles(dir).meta} is missing: ${(e as Error).message}`, { cause: e });
  }
  return containerMetaSchema.parse(JSON.parse(raw));
}

/** readMeta, synchronously (the start path: one small file). */
export function readMetaSync(dir: string): ContainerMeta {
  let raw: string;
  try {
    raw = readFileSync(containerFiles(dir).meta, 'utf8');
  } catch (e) {
    throw new HfError('HF_ERR_INTERNAL', `container metadata ${containerFiles(dir).meta} is missing: ${(e as Error).message}`, { cause: e });
  }
  return containerMetaSchema.parse(JSON.parse(raw));
}

export async function writeMeta(dir: string, meta: ContainerMeta): Promise<void> {
  writeFileSync(containerFiles(dir).meta, JSON.stringify(meta, null, 2) + '\n', { mode: 0o600 });
}

/** What an image says about the container's init (from its `details`). */
export function metaFromImage(image: ImageRecord | undefined): Omit<ContainerMeta, 'idmap'> {
  const d = image?.details ?? {};
  const strs = (v: unknown): string[] | undefined => (Array.isArray(v) && v.every((x) => typeof x === 'string') && v.length ? (v as string[]) : undefined);
  return {
    version: 1,
    init: strs(d.init) ?? ['/sbin/init'],
    env: strs(d.env) ?? [],
    cwd: typeof d.cwd === 'string' && d.cwd ? d.cwd : '/',
    stopSignal: typeof d.stopSignal === 'string' ? d.stopSignal : 'SIGTERM',
    image: image?.name,
  };
}

export class ContainerDriver implements InstanceDriver {
  readonly type = 'container' as const;
  readonly capabilities = CONTAINER_CAPABILITIES;
  readonly runc: Runc;
  readonly layout: CgroupLayout;
  private readonly swapLimit: boolean;
  private readonly idLock = new KeyedMutex();
  private readonly copySources = new CopySources();
  readonly monitor: Monitor;
  readonly spares: SparePool;
  private runcRootReady = false;
  /** Directories already made traversable for container roots (see ensureTraversable). */
  private readonly traversable = new Set<string>();

  constructor(readonly opts: ContainerDriverOptions) {
    this.runc = new Runc(opts.runcBinary ?? 'runc', opts.runcRoot ?? DEFAULT_RUNC_ROOT);
    this.layout = opts.cgroupLayout ?? hostCgroupLayout();
    this.swapLimit = swapLimitSupported(this.layout);
    this.monitor = new Monitor(opts.monitorIntervalMs ?? 500);
    const envSpares = process.env.HYPERFOLD_CONTAINER_SPARES;
    const perImage = opts.sparesPerImage ?? (envSpares !== undefined && envSpares !== '' ? Number(envSpares) : DEFAULT_SPARES_PER_IMAGE);
    this.spares = new SparePool({
      dir: join(opts.dataDir, 'containers', 'spare'),
      perImage: Number.isInteger(perImage) && perImage >= 0 ? perImage : DEFAULT_SPARES_PER_IMAGE,
      maxImages: opts.spareImages ?? DEFAULT_SPARE_IMAGES,
      idmapSize: IDMAP_SIZE,
      log: opts.log,
      allocate: (claim) => this.allocateBlock(claim),
      idle: () => this.idle(),
    });
    // Adopt the spares an earlier daemon left and remove what a crash left, off the first create's path.
    setImmediate(() => void this.spares.load().catch((e: Error) => opts.log.warn('cannot load the spare root filesystems', { error: e.message })));
  }

  // Creates and starts in flight: the spare pool refills when there are none (and none for a moment).
  private busy = 0;
  private lastBusy = 0;

  private async tracked<T>(fn: () => Promise<T>): Promise<T> {
    this.busy++;
    try {
      return await fn();
    } finally {
      this.busy--;
      this.lastBusy = Date.now();
    }
  }

  /** Resolves once no create or start has been in flight for IDLE_SETTLE_MS (a create is followed by its start). */
  async idle(): Promise<void> {
    for (;;) {
      const left = this.busy > 0 ? IDLE_SETTLE_MS : this.lastBusy + IDLE_SETTLE_MS - Date.now();
      if (this.busy === 0 && left <= 0) return;
      await new Promise((r) => setTimeout(r, Math.max(5, left)).unref());
    }
  }

  // ---- create ----------------------------------------------------------------------------------

  /** The next provision of `dstName` copies `src` instead of an image (copy.ts). */
  prepareCopy(src: Instance, srcPaths: InstancePaths, dstName: string): Promise<() => void> {
    return this.copySources.prepare(src, srcPaths, dstName);
  }

  provision(instance: Instance, image: ImageRecord | undefined, paths: InstancePaths, progress?: (percent: number, message: string) => void): Promise<Instance> {
    return this.tracked(() => this.provisionTracked(instance, image, paths, progress));
  }

  private async provisionTracked(instance: Instance, image: ImageRecord | undefined, paths: InstancePaths, progress?: (percent: number, message: string) => void): Promise<Instance> {
    await this.runc.path();
    checkContainerLimits(instance.config);
    const f = containerFiles(paths.dir);
    const copy = this.copySources.get(instance.name);
    if (!copy && !image) throw new HfError('HF_ERR_VALIDATION', 'a container needs an image (e.g. busybox; see `hyperfold image list`)');
    if (!copy && image && !image.rootfs) throw new HfError('HF_ERR_VALIDATION', `image "${image.name}" has no root filesystem`);
    // The instance directory is new (a same-named one may have been deleted): check it again.
    this.traversable.delete(paths.dir);
    ensureTraversable(paths.dir, this.opts.dataDir, this.traversable);
    const privileged = instance.config.privileged === true;
    // The fast path: a spare of the image, already shifted into its own block, moved in by rename.
    if (!copy && image?.rootfs && !privileged) {
      const t0 = performance.now();
      const hostId = await this.spares.take(image, { rootfs: f.rootfs, fifo: f.consoleIn });
      if (hostId !== undefined) {
        await writeMeta(paths.dir, { ...metaFromImage(image), idmap: { hostId, size: IDMAP_SIZE } });
        progress?.(100, 'root filesystem ready (spare)');
        this.opts.log.debug('root filesystem from a spare', { name: instance.name, hostId, ms: Math.round((performance.now() - t0) * 10) / 10 });
        return instance;
      }
    }
    // The id range is chosen and its root directory made under one lock: the next allocation sees it.
    const idmap = privileged ? undefined : { hostId: await this.allocateBlock((hostId) => claimRootfs(f.rootfs, hostId)), size: IDMAP_SIZE };
    const toBase = idmap?.hostId ?? 0;
    progress?.(5, 'copying the root filesystem');
    // Making the console FIFO takes a process: now, beside the copy, rather than at the first start.
    const fifo = ensureFifo(f.consoleIn).catch(() => undefined); // start makes it otherwise
    if (copy) {
      await provisionCopy(copy, paths.dir, idmap, progress);
    } else if (image?.rootfs?.format === 'tar') {
      await mkdir(f.rootfs, { recursive: true });
      await extractRootfsArchive(image.rootfs.path, f.rootfs);
      if (idmap) await shiftTreeInPlace(f.rootfs, { fromBase: 0, toBase, size: IDMAP_SIZE });
      await writeMeta(paths.dir, { ...metaFromImage(image), idmap });
    } else if (image?.rootfs) {
      // An unshifted copy (privileged) keeps the owners it gets: no chown of a root-owned tree.
      await copyTreeShifted(image.rootfs.path, f.rootfs, { fromBase: 0, toBase, size: IDMAP_SIZE }, (s) => progress?.(50, `copied ${s.files} files`));
      await writeMeta(paths.dir, { ...metaFromImage(image), idmap });
    }
    await fifo;
    progress?.(100, 'root filesystem ready');
    return instance;
  }

  /**
   * Picks the lowest free block of host ids and claims it (`claim`, under the id lock, so the next
   * allocation sees it). A block is used when some container's container.json names it (or, while
   * its create is in flight, its rootfs is owned by the block) or a spare directory is named after it.
   */
  async allocateBlock(claim: (hostId: number) => Promise<void>): Promise<number> {
    return this.idLock.run('idmap', 'allocate', async () => {
      const [fromInstances, fromSpares] = await Promise.all([this.instanceBlocks(), this.spares.claimedBlocks()]);
      const hostId = lowestFreeBlock([...fromInstances, ...fromSpares], this.idmapBase, IDMAP_SIZE);
      if (hostId === undefined) throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', 'no free host id range left for another unprivileged container');
      await claim(hostId);
      return hostId;
    });
  }

  /** The blocks the instance directories hold, from their container.json (or rootfs owner while a create is in flight). */
  private async instanceBlocks(): Promise<number[]> {
    let names: string[] = [];
    try {
      names = await readdir(this.opts.instancesDir);
    } catch {
      // none yet
    }
    const used: number[] = [];
    await Promise.all(
      names.map(async (n) => {
        const dir = join(this.opts.instancesDir, n);
        let text: string | undefined;
        try {
          text = await readFile(join(dir, 'container.json'), 'utf8');
        } catch {
          // no metadata yet: a create in flight owns its rootfs directory
        }
        if (text !== undefined) {
          try {
            const m = JSON.parse(text) as { idmap?: { hostId?: unknown } };
            if (typeof m.idmap?.hostId === 'number') used.push(m.idmap.hostId);
            return;
          } catch {
            // unreadable metadata: fall back to the owner of the tree
          }
        }
        try {
          const st = await stat(join(dir, 'rootfs'));
          const b = blockOf(st.uid, this.idmapBase, IDMAP_SIZE);
          if (b !== undefined) used.push(b);
        } catch {
          // not a container
        }
      }),
    );
    return used;
  }

  private get idmapBase(): number {
    return this.opts.idmapBase ?? DEFAULT_IDMAP_BASE;
  }

  async check(instance: Instance): Promise<void> {
    await this.runc.path();
    checkContainerLimits(instance.config);
  }

  // ---- start / attach ----------------------------------------------------------------------------

  start(instance: Instance, ctx: StartContext): Promise<InstanceHandle> {
    return this.tracked(() => this.startTracked(instance, ctx));
  }

  private async startTracked(instance: Instance, ctx: StartContext): Promise<InstanceHandle> {
    const t0 = performance.now();
    const f = containerFiles(ctx.paths.dir);
    // The small files of the start are read and written synchronously: each round trip through the
    // thread pool costs more than the call itself on a busy host, and this is the start's critical path.
    const meta = readMetaSync(ctx.paths.dir);
    const id = instance.id;
    const cgroupsPath = containerCgroupPath(id);
    const spec = buildOciSpec({ hostname: instance.name, rootfs: f.rootfs, config: instance.config, meta, cgroupsPath, swapLimit: this.swapLimit });
    ensureTraversable(ctx.paths.dir, this.opts.dataDir, this.traversable);
    writeFileSync(f.spec, JSON.stringify(spec), { mode: 0o600 });
    rmSync(f.pidFile, { force: true });
    if (!this.runcRootReady) {
      mkdirSync(this.runc.root, { recursive: true, mode: 0o700 });
      this.runcRootReady = true;
    }
    await ensureFifo(f.consoleIn);
    ctx.progress?.(30, 'starting the container (runc)');
    // With NICs, the network layer prepared a namespace (config.netns): create the container,
    // move the interfaces into its own namespace, then start it (see netns.ts).
    const netns = instance.config.netns;
    const runcT0 = performance.now();
    const stdio = { stdin: f.consoleIn, out: ctx.paths.consoleLog };
    try {
      if (netns) await this.runc.create(id, ctx.paths.dir, f.pidFile, stdio, f.runcLog);
      else await this.runc.runDetached(id, ctx.paths.dir, f.pidFile, stdio, f.runcLog);
    } catch (e) {
      // A leftover of an earlier run under the same id (the daemon died mid-cleanup): remove and retry once.
      if (!/already exists/.test((e as Error).message)) throw e;
      await this.runc.delete(id, true);
      if (netns) await this.runc.create(id, ctx.paths.dir, f.pidFile, stdio, f.runcLog);
      else await this.runc.runDetached(id, ctx.paths.dir, f.pidFile, stdio, f.runcLog);
    }
    const runcMs = Math.round((performance.now() - runcT0) * 10) / 10;
    const beforeRuncMs = Math.round((runcT0 - t0) * 10) / 10;
    const pid = Number(readFileSync(f.pidFile, 'utf8').trim());
    const st = readProcStat(pid);
    if (!st) {
      await this.runc.delete(id, true);
      throw new HfError('HF_ERR_HYPERVISOR', `the container's init (pid ${pid}) exited at once: see \`hyperfold console ${instance.name} --log\``);
    }
    failpoint('launch.after-spawn');
    if (netns) {
      try {
        await transplantNetns(netns, pid);
        await this.runc.start(id);
      } catch (e) {
        await this.runc.delete(id, true);
        throw e;
      }
    }
    const runtime: RuntimeInfo = {
      pid,
      pidStartTime: st.startTime,
      startedAt: new Date().toISOString(),
      details: {
        containerId: id,
        runcRoot: this.runc.root,
        cgroup: cgroupsPath,
        cgroupMode: this.layout.mode,
        privileged: instance.config.privileged === true,
        idmap: meta.idmap ? `${meta.idmap.hostId}:${meta.idmap.size}` : null,
      },
    };
    const handle = new ContainerHandle(this, runtime, ctx.paths, meta, ctx, f.consoleIn);
    await handle.init();
    ctx.progress?.(100, 'running');
    this.opts.log.debug('container started', { name: instance.name, pid, id, ms: { beforeRunc: beforeRuncMs, runc: runcMs, total: Math.round((performance.now() - t0) * 10) / 10 } });
    return handle;
  }

  async attach(instance: Instance, ctx: StartContext): Promise<InstanceHandle | null> {
    const rt = instance.runtime;
    if (!rt || typeof rt.details.containerId !== 'string') return null;
    if (!isProcessAlive(rt.pid, rt.pidStartTime)) return null;
    let meta: ContainerMeta;
    try {
      meta = await readMeta(ctx.paths.dir);
    } catch {
      meta = { version: 1, init: ['/sbin/init'], env: [], cwd: '/', stopSignal: 'SIGTERM' };
    }
    const handle = new ContainerHandle(this, rt, ctx.paths, meta, ctx, containerFiles(ctx.paths.dir).consoleIn);
    await handle.init();
    return handle;
  }

  async cleanup(instance: Instance, paths: InstancePaths): Promise<void> {
    const f = containerFiles(paths.dir);
    await this.runc.delete(instance.id, true).catch(() => undefined);
    await rm(f.pidFile, { force: true });
  }

  // ---- snapshots (snapshots.ts) and what the files say, for the shared services ----------------

  async createRootfsSnapshot(instance: Instance, paths: InstancePaths, tag: string, opts: { stateful: boolean }): Promise<void> {
    await createSnapshot(paths.dir, tag, { ...instance.config, ...instance.pending }, { stateful: opts.stateful });
  }

  async revertRootfsSnapshot(_instance: Instance, paths: InstancePaths, tag: string): Promise<InstanceConfig> {
    return (await revertToSnapshot(paths.dir, tag)).config;
  }

  async deleteRootfsSnapshot(_instance: Instance, paths: InstancePaths, tag: string): Promise<void> {
    if (await snapshotExists(paths.dir, tag)) await deleteSnapshot(paths.dir, tag);
  }

  async describe(instance: Instance, paths: InstancePaths): Promise<Record<string, unknown>> {
    const meta = await readMeta(paths.dir).catch(() => undefined);
    return {
      privileged: instance.config.privileged === true,
      idmap: meta?.idmap ?? null,
      init: meta?.init,
      stopSignal: meta?.stopSignal,
      cgroupMode: this.layout.mode,
      snapshots: (await listSnapshots(paths.dir)).length,
    };
  }

  cgroupOf(containerId: string): ContainerCgroup {
    return new ContainerCgroup(this.layout, containerCgroupPath(containerId));
  }

  /** Live limits for `runc update` (and the same checks as at create). */
  resourcesFor(config: Pick<InstanceConfig, 'vcpus' | 'memoryMiB' | 'pidsLimit'>) {
    return containerResources(config, { swapLimit: this.swapLimit });
  }
}

/** Claims a block for a create that copies: its rootfs directory, owned by the block's root. */
async function claimRootfs(rootfs: string, hostId: number): Promise<void> {
  await mkdir(rootfs, { mode: 0o755 });
  await lchown(rootfs, hostId, hostId);
}
