// The pure bookkeeping behind spare root filesystems (no I/O): host id blocks and the pool of
// spares. A spare is a copy of an image's tree already shifted into one reserved id block, kept in
// `<data>/containers/spare/<image>/<block>/`; a create takes one by rename(2) instead of copying and
// chowning on the request's path, and the pool is refilled in the background.
//
// Id blocks: each unprivileged container owns one block of IDMAP_SIZE host ids starting at `base`.
// A block is used while an instance directory claims it (its container.json, or the owner of its
// rootfs while a create is in flight) or a spare directory is named after it (ready or being
// prepared). Both live on disk, so the allocation survives daemon restarts.
import { createHash } from 'node:crypto';
import { IDMAP_SIZE } from './spec.js';

/** Highest host id a block may reach (uid_t is 32 bits; (uid_t)-1 is "no id"). */
export const ID_LIMIT = 2 ** 32 - 2;

/** The block a host id lies in (blocks start at `base`, `size` apart), or undefined below `base`. */
export function blockOf(id: number, base: number, size = IDMAP_SIZE): number | undefined {
  if (!Number.isInteger(id) || id < base) return undefined;
  return base + Math.floor((id - base) / size) * size;
}

/** The lowest block not in use (`used` holds any ids inside used blocks), or undefined when none is left. */
export function lowestFreeBlock(used: Iterable<number>, base: number, size = IDMAP_SIZE, limit = ID_LIMIT): number | undefined {
  const taken = new Set<number>();
  for (const id of used) {
    const b = blockOf(id, base, size);
    if (b !== undefined) taken.add(b);
  }
  let b = base;
  while (taken.has(b)) b += size;
  return b + size - 1 > limit ? undefined : b;
}

/** Entries of a spare image directory: `<block>` (ready) or `<block>.tmp` (being prepared, or left by a crash). */
export function parseSpareName(name: string): { hostId: number; ready: boolean } | undefined {
  const m = /^([1-9][0-9]{0,9})(\.tmp)?$/.exec(name);
  if (!m) return undefined;
  const hostId = Number(m[1]);
  return hostId <= ID_LIMIT ? { hostId, ready: m[2] === undefined } : undefined;
}

/** What a spare is made from: an image's tree, as its record describes it now. */
export interface SpareSource {
  image: string;
  /** Changes when the image is rebuilt or replaced (see imageStamp). */
  stamp: string;
  rootfs: string;
  format: 'dir' | 'tar';
}

/** A short digest of what identifies an image's tree: a spare made under another stamp is stale. */
export function imageStamp(img: { name: string; createdAt: string; sha256?: Record<string, string>; rootfs?: { path: string; format: string } }): string {
  const sha = Object.entries(img.sha256 ?? {}).sort(([a], [b]) => a.localeCompare(b));
  return createHash('sha256')
    .update(JSON.stringify([img.name, img.createdAt, sha, img.rootfs?.path ?? null, img.rootfs?.format ?? null]))
    .digest('hex')
    .slice(0, 16);
}

export interface SparePlannerOptions {
  /** Spares kept ready per recently used image (0: no pool). */
  perImage: number;
  /** Images that keep spares; the least recently used beyond this lose theirs. */
  maxImages: number;
  /** After a failed preparation, the image is not retried for this long. */
  retryAfterMs?: number;
}

interface Pool {
  /** Ready spares, each with the stamp of the tree it was made from. */
  ready: Array<{ hostId: number; stamp: string }>;
  /** Preparations in flight. */
  preparing: number;
  /** Creates waiting for a spare of this image. */
  waiting: number;
  /** Set once the image is used in this daemon's life: only those are refilled. */
  source?: SpareSource;
  lastUsed: number;
  failedAt?: number;
}

/**
 * The pool's decisions: which spare a create takes, which are stale or evicted, what to prepare
 * next. The driver does the I/O and reports back (prepared / failed).
 */
export class SparePlanner {
  private readonly pools = new Map<string, Pool>();

  constructor(readonly opts: SparePlannerOptions) {}

  private pool(image: string): Pool {
    let p = this.pools.get(image);
    if (!p) this.pools.set(image, (p = { ready: [], preparing: 0, waiting: 0, lastUsed: 0 }));
    return p;
  }

  /** A ready spare found on disk at start (left by an earlier daemon). */
  adopt(image: string, hostId: number, stamp: string, lastUsed: number): void {
    const p = this.pool(image);
    if (p.ready.some((s) => s.hostId === hostId)) return;
    p.ready.push({ hostId, stamp });
    p.ready.sort((a, b) => a.hostId - b.hostId);
    p.lastUsed = Math.max(p.lastUsed, lastUsed);
  }

  /**
   * A create from `source` is under way: the image becomes recently used (it is refilled from now
   * on). Returns the spares to delete: this image's stale ones (made from another build of it) and
   * every spare of images evicted as least recently used.
   */
  use(source: SpareSource, now: number): { stale: number[]; evicted: Array<{ image: string; hostIds: number[] }> } {
    const p = this.pool(source.image);
    p.source = source;
    p.lastUsed = Math.max(now, p.lastUsed + 1);
    const stale = p.ready.filter((s) => s.stamp !== source.stamp).map((s) => s.hostId);
    p.ready = p.ready.filter((s) => s.stamp === source.stamp);
    return { stale, evicted: this.evict() };
  }

  /** Takes the lowest ready spare of an image (call `use` first, which drops stale ones). */
  take(image: string): number | undefined {
    const p = this.pools.get(image);
    return p?.ready.shift()?.hostId;
  }

  /**
   * A create found no ready spare: it may wait for one (true) while fewer than `perImage` creates
   * wait already; the others copy the image themselves. A waiting create counts in what `next`
   * prepares, ahead of refilling, until `unwait`.
   */
  wait(image: string, now: number): boolean {
    const p = this.pools.get(image);
    if (!p?.source || this.opts.perImage <= 0 || p.waiting >= this.opts.perImage) return false;
    if (p.failedAt !== undefined && now - p.failedAt < (this.opts.retryAfterMs ?? 60_000)) return false;
    p.waiting++;
    return true;
  }

  unwait(image: string): void {
    const p = this.pools.get(image);
    if (p) p.waiting = Math.max(0, p.waiting - 1);
  }

  waiting(image: string): number {
    return this.pools.get(image)?.waiting ?? 0;
  }

  /** Some create waits: preparing is urgent (no waiting for the host to be quiet, normal priority). */
  urgent(): boolean {
    for (const p of this.pools.values()) if (p.waiting > 0) return true;
    return false;
  }

  /** Some image in use has no ready spare left (creates come faster than quiet moments): refill now. */
  starved(): boolean {
    for (const p of this.pools.values()) if (p.source && p.ready.length === 0 && this.opts.perImage > 0) return true;
    return false;
  }

  ready(image: string): number[] {
    return this.pools.get(image)?.ready.map((s) => s.hostId) ?? [];
  }

  preparing(image: string): number {
    return this.pools.get(image)?.preparing ?? 0;
  }

  images(): string[] {
    return [...this.pools.keys()];
  }

  /**
   * The next image to prepare a spare for, counted as in flight unless `peek` (images with waiting
   * creates first, then the most recently used); undefined when the pools are full.
   */
  next(now: number, peek = false): SpareSource | undefined {
    if (this.opts.perImage <= 0) return undefined;
    const retry = this.opts.retryAfterMs ?? 60_000;
    const want = [...this.pools.values()]
      .filter((p) => p.source && p.ready.length + p.preparing < this.opts.perImage + p.waiting && (p.failedAt === undefined || now - p.failedAt >= retry))
      .sort((a, b) => Number(b.waiting > 0) - Number(a.waiting > 0) || b.lastUsed - a.lastUsed);
    const p = want[0];
    if (!p?.source) return undefined;
    if (!peek) p.preparing++;
    return p.source;
  }

  /**
   * A preparation ended with a spare in `hostId`. True: it is ready (kept). False: the image was
   * evicted, rebuilt or dropped meanwhile, or the pool is full: the caller deletes it.
   */
  prepared(source: SpareSource, hostId: number): boolean {
    const p = this.pools.get(source.image);
    if (!p) return false;
    p.preparing = Math.max(0, p.preparing - 1);
    p.failedAt = undefined;
    if (!p.source || p.source.stamp !== source.stamp || p.ready.length >= this.opts.perImage + p.waiting) return false;
    p.ready.push({ hostId, stamp: source.stamp });
    p.ready.sort((a, b) => a.hostId - b.hostId);
    return true;
  }

  failed(image: string, now: number): void {
    const p = this.pools.get(image);
    if (!p) return;
    p.preparing = Math.max(0, p.preparing - 1);
    p.failedAt = now;
  }

  /** Forgets an image (deleted, or its tree is gone): returns its ready spares, to delete. */
  drop(image: string): number[] {
    const p = this.pools.get(image);
    if (!p) return [];
    const ids = p.ready.map((s) => s.hostId);
    p.ready = [];
    p.source = undefined;
    if (p.preparing === 0 && p.waiting === 0) this.pools.delete(image);
    return ids;
  }

  /** Images beyond `maxImages` by last use lose their spares and stop being refilled. */
  private evict(): Array<{ image: string; hostIds: number[] }> {
    const order = [...this.pools.entries()].sort(([, a], [, b]) => b.lastUsed - a.lastUsed);
    const out: Array<{ image: string; hostIds: number[] }> = [];
    for (const [image] of order.slice(Math.max(0, this.opts.maxImages))) {
      const hostIds = this.drop(image);
      if (hostIds.length) out.push({ image, hostIds });
    }
    return out;
  }
}
