// A local copy of one Collection, kept current by a watch, so that hot paths (listing, admission,
// waiting for a state) stay local reads when the store is remote (etcd). It lists, then watches
// from the list's revision + 1 (so it misses nothing and repeats nothing); when the watch ends
// (compaction, disconnect) it lists again and watches from there. Reads have the same shape as
// Collection's; writes go through to the store and return once the cache has seen them, so a
// caller reads its own writes.
import { HfError } from '../core/errors.js';
import type { Collection, CollectionEvent, UpdateOptions, Versioned } from './collection.js';
import { cloneJson } from './clone.js';
import type { LeaseId, Watch, WatchFailure } from './store.js';

export interface CachedCollectionOptions {
  /** Told every time the watch ended and the cache lists again (compaction, disconnect). */
  onResync?: (failure: WatchFailure) => void;
  /** Told when a list to resync failed (it is retried). */
  onListError?: (err: unknown) => void;
  /** First delay before retrying a failed list, doubled up to 10 s (default 200 ms). */
  retryMs?: number;
  /** How long a write waits for its own change to reach the cache (default 5,000 ms). */
  writeVisibleMs?: number;
}

/** A cached record with its JSON text (UTF-8), made the first time a page asks for it. */
interface Entry<T> extends Versioned<T> {
  json?: Buffer;
}

/** One record of a page: the cache's own value (read-only: never change it) and its JSON text. */
export interface PageEntry<T> {
  id: string;
  value: Readonly<T>;
  /** JSON.stringify(value) as UTF-8: a response joins these without encoding anything again. */
  json: Buffer;
}

export interface PageOptions<T> {
  /** Start after this id (the `next` of the previous page). */
  after?: string;
  /** At most this many records (default: all). */
  limit?: number;
  /** Only the records it accepts (counted against the limit after filtering). */
  filter?: (value: Readonly<T>) => boolean;
}

interface IdWaiter {
  id: string;
  check: () => void;
}

const MAX_RETRY_MS = 10_000;

export class CachedCollection<T> {
  private items = new Map<string, Entry<T>>();
  /** The ids in order, kept until an id comes or goes (a list sorts once, not per call). */
  private sorted: string[] | undefined;
  private rev = 0;
  private watch: Watch | undefined;
  /** Bumped by every (re)list: events of an older watch are ignored. */
  private generation = 0;
  private ready: Promise<void> | undefined;
  private failure: HfError | undefined;
  private closed = false;
  private readonly idWaiters = new Set<IdWaiter>();
  private readonly revWaiters = new Set<{ rev: number; resolve: () => void }>();

  constructor(
    readonly source: Collection<T>,
    private readonly opts: CachedCollectionOptions = {},
  ) {}

  /** Loads the records and starts following changes. Idempotent; reads wait for it. */
  start(): Promise<void> {
    this.ready ??= this.sync().catch((e: unknown) => {
      this.ready = undefined; // the next read tries again
      throw e;
    });
    return this.ready;
  }

  /** The store revision the cache reflects (at least). */
  get revision(): number {
    return this.rev;
  }

  async get(id: string): Promise<Versioned<T> | undefined> {
    await this.readable(id);
    const v = this.items.get(id);
    return v === undefined ? undefined : copy(v);
  }

  async getOrThrow(id: string, notFound: () => HfError): Promise<Versioned<T>> {
    const v = await this.get(id);
    if (v === undefined) throw notFound();
    return v;
  }

  /** Every record, sorted by id (as Collection.list). */
  async list(): Promise<Versioned<T>[]> {
    await this.readable();
    return this.ids().map((id) => copy(this.items.get(id) as Versioned<T>));
  }

  /**
   * A page of records in id order, without copies, with each record's JSON text (serialized once
   * per change of the record): what a big listing answers with, where copying and serializing
   * every record on every call would cost more than the rest. `next` is the last id when more
   * records follow.
   */
  async page(opts: PageOptions<T> = {}): Promise<{ entries: PageEntry<T>[]; next?: string }> {
    await this.readable();
    const ids = this.ids();
    let i = 0;
    if (opts.after !== undefined) {
      // First id greater than `after` (binary search; the same order as the sort).
      let hi = ids.length;
      while (i < hi) {
        const mid = (i + hi) >>> 1;
        if ((ids[mid] as string) <= opts.after) i = mid + 1;
        else hi = mid;
      }
    }
    const limit = opts.limit ?? Infinity;
    const entries: PageEntry<T>[] = [];
    for (; i < ids.length && entries.length < limit; i++) {
      const id = ids[i] as string;
      const e = this.items.get(id) as Entry<T>;
      if (opts.filter && !opts.filter(e.value)) continue;
      e.json ??= Buffer.from(JSON.stringify(e.value));
      entries.push({ id, value: e.value, json: e.json });
    }
    // More follow when a record the filter accepts lies beyond the last one taken.
    let more = false;
    if (entries.length === limit) {
      for (let j = i; j < ids.length && !more; j++) more = !opts.filter || opts.filter((this.items.get(ids[j] as string) as Entry<T>).value);
    }
    return more ? { entries, next: entries[entries.length - 1]?.id as string } : { entries };
  }

  async create(id: string, value: T, opts: { lease?: LeaseId } = {}): Promise<Versioned<T>> {
    return this.visible(await this.source.create(id, value, opts));
  }

  async update(id: string, fn: (cur: T) => T, opts: UpdateOptions = {}): Promise<Versioned<T>> {
    return this.visible(await this.source.update(id, fn, opts));
  }

  async replace(id: string, value: T, expectRevision: number): Promise<Versioned<T>> {
    return this.visible(await this.source.replace(id, value, expectRevision));
  }

  async delete(id: string, expectRevision?: number): Promise<boolean> {
    const rev = await this.source.remove(id, expectRevision);
    if (rev === undefined) return false;
    await this.reach(rev, this.opts.writeVisibleMs ?? 5_000);
    return true;
  }

  /**
   * Resolves with the record (undefined: absent) as soon as `predicate` holds for its value
   * (undefined when absent), checked now and on every change the watch brings; HF_ERR_TIMEOUT
   * after `timeoutMs`.
   */
  async waitFor(id: string, predicate: (value: T | undefined) => boolean, timeoutMs: number): Promise<Versioned<T> | undefined> {
    await this.readable(id);
    const now = this.items.get(id);
    if (predicate(now?.value)) return now === undefined ? undefined : copy(now);
    return new Promise<Versioned<T> | undefined>((resolve, reject) => {
      const waiter: IdWaiter = {
        id,
        check: () => {
          let done: boolean;
          const v = this.failure === undefined ? this.items.get(id) : undefined;
          try {
            if (this.failure !== undefined) throw this.failure;
            done = predicate(v?.value);
          } catch (e) {
            finish();
            reject(e);
            return;
          }
          if (!done) return;
          finish();
          resolve(v === undefined ? undefined : copy(v));
        },
      };
      const timer = setTimeout(() => {
        finish();
        reject(new HfError('HF_ERR_TIMEOUT', `${this.source.prefix}${id} did not reach the expected state within ${timeoutMs} ms`, { details: { key: this.source.prefix + id, timeoutMs } }));
      }, timeoutMs);
      const finish = (): void => {
        clearTimeout(timer);
        this.idWaiters.delete(waiter);
      };
      this.idWaiters.add(waiter);
      if (this.failure !== undefined) waiter.check(); // failed while this call was getting here
    });
  }

  /** Stops following the store; pending waits fail. */
  close(): void {
    if (this.closed) return;
    this.fail(new HfError('HF_ERR_INTERNAL', `cache of ${this.source.prefix} is closed`));
  }

  // ---- internals ----

  private ids(): string[] {
    this.sorted ??= [...this.items.keys()].sort();
    return this.sorted;
  }

  private async readable(id?: string): Promise<void> {
    if (id !== undefined) this.source.key(id); // the same id checks as the collection
    await this.start();
    if (this.failure !== undefined) throw this.failure;
  }

  /** List, then watch from the list's revision + 1. */
  private async sync(): Promise<void> {
    const gen = ++this.generation;
    this.watch?.cancel();
    this.watch = undefined;
    const { items, revision } = await this.source.listAt();
    if (this.closed || gen !== this.generation) return;
    this.items = new Map(items.map(({ id, value, revision: r }) => [id, { value, revision: r }]));
    this.sorted = undefined;
    this.advance(revision);
    for (const w of [...this.idWaiters]) w.check();
    this.watch = this.source.watch((ev) => this.apply(gen, ev), {
      fromRevision: revision + 1,
      corrupt: 'as-delete',
      onError: (f) => this.onWatchEnd(gen, f),
    });
  }

  private apply(gen: number, ev: CollectionEvent<T>): void {
    if (gen !== this.generation || this.closed) return;
    if (ev.type === 'put' && ev.value !== undefined) {
      if (!this.items.has(ev.id)) this.sorted = undefined;
      this.items.set(ev.id, { value: ev.value, revision: ev.revision });
    } else if (this.items.delete(ev.id)) this.sorted = undefined;
    this.advance(ev.revision);
    for (const w of [...this.idWaiters]) if (w.id === ev.id) w.check();
  }

  private onWatchEnd(gen: number, f: WatchFailure): void {
    if (gen !== this.generation || this.closed) return;
    this.opts.onResync?.(f);
    if (f.kind === 'closed') {
      this.fail(f.error);
      return;
    }
    void this.resync();
  }

  /** Lists again until it works (or the cache is closed); reads serve the old copy meanwhile. */
  private async resync(): Promise<void> {
    let delay = this.opts.retryMs ?? 200;
    while (!this.closed) {
      try {
        await this.sync();
        return;
      } catch (e) {
        this.opts.onListError?.(e);
        await new Promise<void>((r) => setTimeout(r, delay).unref());
        delay = Math.min(delay * 2, MAX_RETRY_MS);
      }
    }
  }

  private advance(rev: number): void {
    if (rev <= this.rev) return;
    this.rev = rev;
    for (const w of [...this.revWaiters]) {
      if (w.rev <= rev) {
        this.revWaiters.delete(w);
        w.resolve();
      }
    }
  }

  /** Waits until the cache reflects revision `rev`, at most `ms` (a write succeeded either way). */
  private async reach(rev: number, ms: number): Promise<void> {
    if (this.rev >= rev || this.ready === undefined) return;
    let timer: NodeJS.Timeout | undefined;
    await new Promise<void>((resolve) => {
      const w = { rev, resolve };
      this.revWaiters.add(w);
      timer = setTimeout(() => {
        this.revWaiters.delete(w);
        resolve();
      }, ms);
    });
    clearTimeout(timer);
  }

  private async visible(v: Versioned<T>): Promise<Versioned<T>> {
    await this.reach(v.revision, this.opts.writeVisibleMs ?? 5_000);
    return v;
  }

  private fail(err: HfError): void {
    this.closed = true;
    this.failure = err;
    this.generation++;
    this.watch?.cancel();
    this.watch = undefined;
    for (const w of [...this.idWaiters]) w.check();
    for (const w of [...this.revWaiters]) w.resolve();
    this.revWaiters.clear();
  }
}

function copy<T>(v: Versioned<T>): Versioned<T> {
  return { value: cloneJson(v.value), revision: v.revision };
}
