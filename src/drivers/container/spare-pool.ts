// The pool of spare root filesystems (the I/O around SparePlanner, see spares.ts). A spare is
// `<data>/containers/spare/<image>/<block>/` with
//   rootfs/      the image's tree, owned by the id block (uid/gid 0 inside = <block> outside)
//   console.in   the container's console FIFO (making one takes a process: done here, not at start)
//   spare.json   what it was made from (image stamp, source path and inode) and for which block
// and is prepared as `<block>.tmp/`, renamed when complete. A create takes one with rename(2) into
// its instance directory (O(1), atomic); the pool is then refilled in the background, one spare at a
// time, by a worker thread at a low priority. The directory names reserve their blocks (the driver's
// allocator reads them), so the allocation is derived from the disk and survives restarts; what a
// crash leaves (`*.tmp`, half-taken spares, spares of images since deleted or rebuilt) is removed when
// the pool loads, and ready spares are reused.
import { renameSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { lstat, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import type { ImageRecord } from '../../core/model/image.js';
import type { Logger } from '../../util/log.js';
import { ensureFifo } from './console.js';
import { copyTreeShifted, shiftTreeInPlace, type SpareJob } from './rootfs.js';
import { SparePlanner, imageStamp, parseSpareName, type SpareSource } from './spares.js';
import type { SpareWorkerData, SpareWorkerReply, SpareWorkerRequest } from './spare-worker.js';

export const DEFAULT_SPARES_PER_IMAGE = 2;
export const DEFAULT_SPARE_IMAGES = 4;
/** nice value of the preparing thread while no create waits for it. */
const BACKGROUND_NICE = 10;
/** The worker thread ends after this long without a job. */
const WORKER_LINGER_MS = 1000;
/** How often the images that spares were made from are checked (deleted or rebuilt: spares dropped). */
const SWEEP_MS = 60_000;
/** A create waits at most this long for a spare being prepared, then copies itself. */
const MAX_WAIT_MS = 10_000;

const spareMetaSchema = z.object({
  version: z.literal(1),
  image: z.string(),
  hostId: z.number().int(),
  size: z.number().int(),
  stamp: z.string(),
  source: z.string(),
  sourceIno: z.number(),
  preparedAt: z.string(),
});
type SpareMeta = z.infer<typeof spareMetaSchema>;

export interface SparePoolOptions {
  /** `<data>/containers/spare` (same filesystem as the instances: taking is a rename). */
  dir: string;
  perImage: number;
  maxImages: number;
  idmapSize: number;
  log: Logger;
  /** The driver's allocator: picks the lowest free block and calls `claim` with it under the id lock. */
  allocate(claim: (hostId: number) => Promise<void>): Promise<number>;
  /** Resolves when no create or start is in flight (refills wait for it unless a create waits for a spare). */
  idle?(): Promise<void>;
}

export interface SpareStatus {
  image: string;
  ready: number[];
  preparing: number;
}

export class SparePool {
  readonly planner: SparePlanner;
  private loading: Promise<void> | undefined;
  private pumping: Promise<void> | undefined;
  private rerun = false;
  private readonly waiters = new Map<string, Array<(hostId: number | undefined) => void>>();
  /** Ends the refill's wait for a quiet host (a create waits for a spare). */
  private nudge: (() => void) | undefined;
  /** The tree each image's spares were made from (path and inode): gone or replaced → spares dropped. */
  private readonly origins = new Map<string, { path: string; ino: number }>();
  private lastSweep = 0;
  private readonly urgent = new Int32Array(new SharedArrayBuffer(4));
  private worker: Worker | undefined;
  private workerBroken = false;
  private workerIdle: NodeJS.Timeout | undefined;
  private jobSeq = 0;
  private readonly jobs = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();

  /** Set when the instances turn out to be on another filesystem (a spare cannot be renamed there). */
  private crossDevice = false;

  constructor(private readonly opts: SparePoolOptions) {
    this.planner = new SparePlanner({ perImage: opts.perImage, maxImages: opts.maxImages });
  }

  get enabled(): boolean {
    return this.opts.perImage > 0 && !this.crossDevice;
  }

  spareDir(image: string, hostId: number, tmp = false): string {
    return join(this.opts.dir, image, tmp ? `${hostId}.tmp` : String(hostId));
  }

  /** Every block a spare directory names (ready, being prepared, or left by a crash): the allocator's view. */
  async claimedBlocks(): Promise<number[]> {
    const out: number[] = [];
    const images = await readdir(this.opts.dir).catch(() => [] as string[]);
    await Promise.all(
      images.map(async (image) => {
        for (const n of await readdir(join(this.opts.dir, image)).catch(() => [] as string[])) {
          const p = parseSpareName(n);
          if (p) out.push(p.hostId);
        }
      }),
    );
    return out;
  }

  status(): SpareStatus[] {
    return this.planner.images().map((image) => ({ image, ready: this.planner.ready(image), preparing: this.planner.preparing(image) }));
  }

  /** Once per daemon: adopts the ready spares on disk and removes what a crash left. */
  load(): Promise<void> {
    if (!this.loading) {
      this.loading = this.scan();
      // Images deleted while nobody creates containers: their spares go within a minute or so.
      setInterval(() => void this.sweep().catch(() => undefined), SWEEP_MS).unref();
    }
    return this.loading;
  }

  private async scan(): Promise<void> {
    const images = await readdir(this.opts.dir).catch(() => [] as string[]);
    for (const image of images) {
      const idir = join(this.opts.dir, image);
      for (const n of await readdir(idir).catch(() => [] as string[])) {
        const p = parseSpareName(n);
        const dir = join(idir, n);
        // With the pool off (perImage 0), spares of an earlier configuration go: they hold id blocks.
        const meta = p?.ready && this.enabled ? await this.validate(image, p.hostId, dir) : undefined;
        if (p && meta) {
          this.planner.adopt(image, p.hostId, meta.stamp, Date.parse(meta.preparedAt) || 0);
          this.origins.set(image, { path: meta.source, ino: meta.sourceIno });
          continue;
        }
        // A `.tmp` is being prepared by nobody now: this runs before this daemon prepares any. Its
        // block stays reserved until the directory is gone, so the removal need not be awaited.
        this.opts.log.debug('removing a leftover spare', { dir });
        void rm(dir, { recursive: true, force: true }).catch((e: Error) => this.opts.log.warn('cannot remove a leftover spare', { dir, error: e.message }));
      }
    }
    const n = this.status().reduce((s, x) => s + x.ready.length, 0);
    if (n) this.opts.log.debug('spare root filesystems adopted', { spares: n });
  }

  /** A ready spare is kept when complete and made from a tree that still exists unchanged. */
  private async validate(image: string, hostId: number, dir: string): Promise<SpareMeta | undefined> {
    try {
      const meta = spareMetaSchema.parse(JSON.parse(await readFile(join(dir, 'spare.json'), 'utf8')));
      if (meta.image !== image || meta.hostId !== hostId || meta.size !== this.opts.idmapSize) return undefined;
      const root = await lstat(join(dir, 'rootfs'));
      if (!root.isDirectory() || root.uid !== hostId) return undefined;
      if ((await stat(meta.source)).ino !== meta.sourceIno) return undefined;
      return meta;
    } catch {
      return undefined;
    }
  }

  /**
   * Moves a ready spare of `image` into place (its rootfs to `dst.rootfs`, its FIFO to `dst.fifo`)
   * and returns its block; undefined when there is none (the caller copies the image itself). A
   * create that finds the pool empty waits for a spare prepared at once (the worker's copy is
   * quicker than the daemon's own), unless `perImage` creates wait already. Either way the pool is
   * refilled afterwards, in the background.
   */
  async take(image: ImageRecord, dst: { rootfs: string; fifo: string }): Promise<number | undefined> {
    if (!this.enabled || !image.rootfs) return undefined;
    await this.load();
    const source: SpareSource = { image: image.name, stamp: imageStamp(image), rootfs: image.rootfs.path, format: image.rootfs.format };
    const { stale, evicted } = this.planner.use(source, Date.now());
    if (stale.length) this.discard(image.name, stale, 'the image changed');
    for (const e of evicted) this.discard(e.image, e.hostIds, 'image not used recently');
    try {
      for (;;) {
        let hostId = this.planner.take(image.name);
        if (hostId === undefined && this.planner.wait(image.name, Date.now())) hostId = await this.waitFor(image.name);
        if (hostId === undefined) return undefined;
        const dir = this.spareDir(image.name, hostId);
        try {
          renameSync(join(dir, 'rootfs'), dst.rootfs);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'EXDEV') {
            // The instances live on another filesystem: spares cannot be moved there, ever.
            this.opts.log.warn('spare root filesystems turned off: the instances are on another filesystem than the spares', { spares: this.opts.dir });
            this.crossDevice = true;
            this.discard(image.name, [hostId, ...this.planner.drop(image.name)], 'cannot be moved to the instances');
            for (const other of this.planner.images()) this.wake(other, true);
            return undefined;
          }
          this.discard(image.name, [hostId], `cannot take it: ${(e as Error).message}`);
          continue;
        }
        // The block stays claimed throughout: by the spare's directory, then by the instance's rootfs.
        try {
          renameSync(join(dir, 'console.in'), dst.fifo);
        } catch {
          // the start makes one
        }
        void rm(dir, { recursive: true, force: true }).catch(() => undefined);
        return hostId;
      }
    } finally {
      this.schedule();
    }
  }

  /** Waits (counted by planner.wait) for the next spare of `image`, or undefined when its preparation fails or takes too long. */
  private waitFor(image: string): Promise<number | undefined> {
    return new Promise((resolve) => {
      const list = this.waiters.get(image) ?? [];
      this.waiters.set(image, list);
      const timer = setTimeout(() => done(undefined), MAX_WAIT_MS);
      const done = (hostId: number | undefined) => {
        clearTimeout(timer);
        const i = list.indexOf(done);
        if (i >= 0) list.splice(i, 1);
        if (list.length === 0 && this.waiters.get(image) === list) this.waiters.delete(image);
        this.planner.unwait(image);
        this.setUrgent();
        resolve(hostId);
      };
      list.push(done);
      this.setUrgent();
      this.schedule();
      this.nudge?.();
    });
  }

  /** Hands new spares to waiting creates; after a failure (or a drop), the waiters copy for themselves. */
  private wake(image: string, failed: boolean): void {
    const list = this.waiters.get(image);
    if (!list) return;
    for (const w of [...list]) {
      const hostId = this.planner.take(image);
      if (hostId !== undefined) w(hostId);
      else if (failed) w(undefined);
    }
  }

  private setUrgent(): void {
    Atomics.store(this.urgent, 0, this.planner.urgent() ? 1 : 0);
  }

  /** Deletes spares in the background (their blocks stay reserved until their directories are gone). */
  private discard(image: string, hostIds: number[], why: string): void {
    for (const hostId of hostIds) {
      this.opts.log.debug('dropping a spare root filesystem', { image, hostId, why });
      void rm(this.spareDir(image, hostId), { recursive: true, force: true }).catch((e: Error) => this.opts.log.warn('cannot remove a spare', { image, hostId, error: e.message }));
    }
  }

  /** Starts refilling (once at a time), after the current request's own steps. */
  private schedule(): void {
    if (!this.enabled) return;
    if (this.pumping) {
      this.rerun = true;
      return;
    }
    this.pumping = new Promise<void>((resolve) => setImmediate(resolve))
      .then(() => this.pump())
      .catch((e: Error) => this.opts.log.warn('spare pool', { error: e.message }))
      .finally(() => {
        this.pumping = undefined;
        if (this.rerun) {
          this.rerun = false;
          this.schedule();
        }
      });
  }

  private async pump(): Promise<void> {
    while (this.enabled) {
      // Refills wait for a quiet moment (no create or start in flight), unless a create waits or
      // an image has no spare left: then they run beside the requests (at a low priority).
      if (!this.planner.urgent() && !this.planner.starved() && this.opts.idle && this.planner.next(Date.now(), true)) {
        await new Promise<void>((resolve) => {
          this.nudge = resolve;
          void this.opts.idle!().then(resolve);
        });
        this.nudge = undefined;
      }
      await this.sweep();
      const source = this.planner.next(Date.now());
      if (!source) return;
      await this.prepareOne(source);
    }
  }

  /** Drops the spares of images whose tree is gone or replaced (deleted, rebuilt, re-imported). */
  private async sweep(): Promise<void> {
    if (Date.now() - this.lastSweep < SWEEP_MS / 2) return;
    this.lastSweep = Date.now();
    for (const [image, o] of this.origins) {
      const ino = await stat(o.path).then((s) => s.ino, () => undefined);
      if (ino === o.ino) continue;
      this.origins.delete(image);
      this.discard(image, this.planner.drop(image), 'the image is gone or rebuilt');
      this.wake(image, true);
    }
  }

  private async prepareOne(source: SpareSource): Promise<void> {
    let hostId: number | undefined;
    const t0 = Date.now();
    try {
      const ino = (await stat(source.rootfs)).ino;
      await mkdir(join(this.opts.dir, source.image), { recursive: true, mode: 0o700 });
      hostId = await this.opts.allocate((id) => mkdir(this.spareDir(source.image, id, true), { mode: 0o700 }));
      const tmp = this.spareDir(source.image, hostId, true);
      await this.runJob({ src: source.rootfs, format: source.format, dst: join(tmp, 'rootfs'), toBase: hostId, size: this.opts.idmapSize, fifo: join(tmp, 'console.in') });
      const meta: SpareMeta = { version: 1, image: source.image, hostId, size: this.opts.idmapSize, stamp: source.stamp, source: source.rootfs, sourceIno: ino, preparedAt: new Date().toISOString() };
      await writeFile(join(tmp, 'spare.json'), JSON.stringify(meta) + '\n', { mode: 0o600 });
      await rename(tmp, this.spareDir(source.image, hostId));
      this.origins.set(source.image, { path: source.rootfs, ino });
      if (!this.planner.prepared(source, hostId)) this.discard(source.image, [hostId], 'no longer wanted');
      else this.opts.log.debug('spare root filesystem ready', { image: source.image, hostId, ms: Date.now() - t0 });
      this.wake(source.image, false);
    } catch (e) {
      this.planner.failed(source.image, Date.now());
      this.opts.log.warn('cannot prepare a spare root filesystem', { image: source.image, error: (e as Error).message });
      if (hostId !== undefined) await rm(this.spareDir(source.image, hostId, true), { recursive: true, force: true }).catch(() => undefined);
      this.wake(source.image, true);
    }
  }

  // ---- the worker thread ------------------------------------------------------------------------

  private runJob(job: SpareJob): Promise<void> {
    const w = this.startWorker();
    if (!w) return prepareInProcess(job);
    if (this.workerIdle) clearTimeout(this.workerIdle);
    const id = ++this.jobSeq;
    return new Promise<void>((resolve, reject) => {
      this.jobs.set(id, { resolve, reject });
      w.postMessage({ id, job } satisfies SpareWorkerRequest);
    }).finally(() => {
      if (this.jobs.size === 0 && this.worker) {
        this.workerIdle = setTimeout(() => this.stopWorker(), WORKER_LINGER_MS);
        this.workerIdle.unref();
      }
    });
  }

  private startWorker(): Worker | undefined {
    if (this.worker || this.workerBroken) return this.worker;
    let answered = false;
    const data: SpareWorkerData = { urgent: this.urgent.buffer as SharedArrayBuffer, nice: BACKGROUND_NICE };
    let w: Worker;
    try {
      w = new Worker(new URL('./spare-worker.js', import.meta.url), { workerData: data });
    } catch (e) {
      this.workerBroken = true;
      this.opts.log.warn('spare worker unavailable: preparing in the daemon thread', { error: (e as Error).message });
      return undefined;
    }
    w.unref();
    w.on('message', (m: SpareWorkerReply) => {
      answered = true;
      const job = this.jobs.get(m.id);
      if (!job) return;
      this.jobs.delete(m.id);
      if (m.ok) job.resolve();
      else job.reject(new Error(m.error));
    });
    const fail = (e: Error) => {
      if (this.worker === w) this.worker = undefined;
      if (!answered) this.workerBroken = true;
      for (const j of this.jobs.values()) j.reject(e);
      this.jobs.clear();
    };
    w.on('error', fail);
    w.on('exit', (code) => fail(new Error(`spare worker exited (${code})`)));
    this.worker = w;
    return w;
  }

  private stopWorker(): void {
    const w = this.worker;
    if (!w || this.jobs.size > 0) return;
    this.worker = undefined;
    void w.terminate();
  }
}

/** Without a worker thread: the asynchronous copy (slower, but it does not block the daemon). */
async function prepareInProcess(job: SpareJob): Promise<void> {
  const shift = { fromBase: 0, toBase: job.toBase, size: job.size };
  if (job.format === 'dir') await copyTreeShifted(job.src, job.dst, shift);
  else {
    const { extractRootfsArchive } = await import('../../images/container/tar.js');
    await mkdir(job.dst, { mode: 0o755 });
    await extractRootfsArchive(job.src, job.dst);
    await shiftTreeInPlace(job.dst, shift);
  }
  if (job.fifo) await ensureFifo(job.fifo);
}
