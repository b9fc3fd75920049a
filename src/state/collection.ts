// A typed collection of records under one key prefix of any StateStore ('/instances/' + id).
// Every value read is checked with the collection's schema, so a corrupt or outdated row is
// reported (HF_ERR_INTERNAL naming its key) instead of flowing into a service as a wrong type.
// Every value written is checked too, so the collection never writes a row it could not read.
// Updates are optimistic: read, apply, write conditionally on the modRevision that was read,
// retry when someone else wrote in between.
import { HfError, isHfError } from '../core/errors.js';
import type { KvEntry, LeaseId, StateStore, Watch, WatchEvent, WatchFailure } from './store.js';

export interface Versioned<T> {
  value: T;
  /** The entry's modRevision: pass it back to replace()/delete() for a conditional write. */
  revision: number;
}

/** Anything with a `parse` that returns a T or throws: a zod schema fits. */
export interface Schema<T> {
  parse(v: unknown): T;
}

export interface CollectionOptions {
  /**
   * Called when list() or watch() meets a row that fails the schema (the row is skipped).
   * Default: one JSON line on stderr.
   */
  onCorrupt?: (key: string, err: HfError) => void;
}

export interface CollectionEvent<T> {
  type: 'put' | 'delete';
  id: string;
  key: string;
  /** The new value for a put; the last value for a delete (undefined if that value was corrupt). */
  value: T | undefined;
  revision: number;
}

export interface CollectionWatchOptions {
  /** First revision to deliver, inclusive (as the store's watch). Default: changes after now. */
  fromRevision?: number;
  /** Called once when the watch ends by itself (compaction, store closed or disconnected). */
  onError?: (failure: WatchFailure) => void;
  /**
   * What to do with a put whose value fails the schema: 'skip' it (default, reported to
   * onCorrupt), or deliver it 'as-delete' (value undefined, also reported), which is what a
   * cache mirroring list() wants: list() leaves such a row out too.
   */
  corrupt?: 'skip' | 'as-delete';
}

export interface UpdateOptions {
  /** Attempts after the first one when another writer got in between (default 5). */
  retries?: number;
  /** Error for a missing record (default HF_ERR_NOT_FOUND naming the key). */
  notFound?: () => HfError;
}

const DEFAULT_RETRIES = 5;

function errMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function defaultOnCorrupt(key: string, err: HfError): void {
  process.stderr.write(JSON.stringify({ t: new Date().toISOString(), level: 'error', msg: 'corrupt state entry skipped', key, error: err.message }) + '\n');
}

const VALIDATED_CACHE_MAX = 50_000;

export class Collection<T> {
  private readonly onCorrupt: (key: string, err: HfError) => void;
  /** key → the modRevision whose stored value is known to be valid as it is. */
  private readonly validated = new Map<string, number>();

  constructor(
    private readonly store: StateStore,
    readonly prefix: string,
    private readonly schema: Schema<T>,
    opts: CollectionOptions = {},
  ) {
    if (!prefix.startsWith('/') || !prefix.endsWith('/') || prefix.length < 2) {
      // A prefix without a trailing '/' would also match its neighbours ('/instances' matches '/instances2/x').
      throw new HfError('HF_ERR_INTERNAL', `collection prefix must start and end with "/", got ${JSON.stringify(prefix)}`);
    }
    this.onCorrupt = opts.onCorrupt ?? defaultOnCorrupt;
  }

  /** The store key of a record. Ids are non-empty and contain no '/' (that would nest into another namespace). */
  key(id: string): string {
    if (typeof id !== 'string' || id.length === 0 || id.includes('/')) {
      throw new HfError('HF_ERR_VALIDATION', `invalid id ${JSON.stringify(id)} for ${this.prefix}: must be non-empty and contain no "/"`);
    }
    return this.prefix + id;
  }

  async get(id: string): Promise<Versioned<T> | undefined> {
    const key = this.key(id);
    const entry = await this.store.get(key);
    return entry === undefined ? undefined : { value: this.read(key, entry.value), revision: entry.modRevision };
  }

  async getOrThrow(id: string, notFound: () => HfError): Promise<Versioned<T>> {
    const v = await this.get(id);
    if (v === undefined) throw notFound();
    return v;
  }

  /** Every record, sorted by id. Rows failing the schema are skipped and reported to onCorrupt. */
  async list(): Promise<Versioned<T>[]> {
    return (await this.listAt()).items.map(({ value, revision }) => ({ value, revision }));
  }

  /**
   * Every record (as list(), with its id) and the store revision they were read at: watching
   * from `revision + 1` afterwards misses no change and repeats none.
   */
  async listAt(): Promise<{ items: (Versioned<T> & { id: string })[]; revision: number }> {
    const { entries, revision } = await this.store.list(this.prefix);
    const items: (Versioned<T> & { id: string })[] = [];
    for (const entry of entries) {
      if (entry.key.includes('/', this.prefix.length)) continue; // a nested namespace, not ours
      const v = this.tryRead(entry);
      if (v !== undefined) items.push({ id: entry.key.slice(this.prefix.length), value: v.value, revision: v.revision });
    }
    return { items, revision };
  }

  /**
   * Creates the record; HF_ERR_ALREADY_EXISTS when the id is taken. With `lease`, the record
   * vanishes when the lease ends (HF_ERR_LEASE_NOT_FOUND when it already has).
   */
  async create(id: string, value: T, opts: { lease?: LeaseId } = {}): Promise<Versioned<T>> {
    const key = this.key(id);
    const checked = this.check(key, value);
    const res = await this.store.txn([{ key, modRevision: 0 }], [{ type: 'put', key, value: checked, lease: opts.lease }]);
    if (!res.succeeded) throw new HfError('HF_ERR_ALREADY_EXISTS', `${key} already exists`, { details: { key } });
    return { value: checked, revision: res.revision };
  }

  /**
   * Read-modify-write with compare-and-swap on the modRevision: `fn` gets the current value (a
   * fresh copy it may mutate) and returns the new one. When another writer changed the record in
   * between, the whole cycle runs again (so `fn` may be called several times and should have no
   * side effects beyond its result), up to `retries` more times, then HF_ERR_CONFLICT. Whatever
   * `fn` throws is thrown unchanged and nothing is written. A record attached to a lease stays
   * attached.
   */
  async update(id: string, fn: (cur: T) => T, opts: UpdateOptions = {}): Promise<Versioned<T>> {
    const key = this.key(id);
    const retries = Math.max(0, Math.floor(opts.retries ?? DEFAULT_RETRIES));
    for (let attempt = 0; attempt <= retries; attempt++) {
      const cur = await this.store.get(key);
      if (cur === undefined) throw opts.notFound ? opts.notFound() : new HfError('HF_ERR_NOT_FOUND', `${key} not found`, { details: { key } });
      const next = this.check(key, fn(this.read(key, cur.value)));
      const res = await this.store.txn([{ key, modRevision: cur.modRevision }], [{ type: 'put', key, value: next, lease: cur.lease }]);
      if (res.succeeded) return { value: next, revision: res.revision };
    }
    throw new HfError('HF_ERR_CONFLICT', `${key} kept changing concurrently; gave up after ${retries + 1} attempts`, {
      details: { key, attempts: retries + 1 },
    });
  }

  /**
   * Writes `value` only if the record is still at `expectRevision` (0: only if it does not
   * exist). HF_ERR_CONFLICT when it changed; HF_ERR_NOT_FOUND when it no longer exists.
   */
  async replace(id: string, value: T, expectRevision: number): Promise<Versioned<T>> {
    const key = this.key(id);
    const checked = this.check(key, value);
    const res = await this.store.txn([{ key, modRevision: expectRevision }], [{ type: 'put', key, value: checked }]);
    if (res.succeeded) return { value: checked, revision: res.revision };
    const now = await this.store.get(key);
    if (now === undefined) throw new HfError('HF_ERR_NOT_FOUND', `${key} not found`, { details: { key } });
    throw new HfError('HF_ERR_CONFLICT', `${key} was modified (revision ${now.modRevision}, expected ${expectRevision})`, {
      details: { key, expectedRevision: expectRevision, revision: now.modRevision },
    });
  }

  /**
   * Deletes the record; false when it did not exist. With `expectRevision`, only if the record is
   * still at that revision: HF_ERR_CONFLICT when it changed since.
   */
  async delete(id: string, expectRevision?: number): Promise<boolean> {
    return (await this.remove(id, expectRevision)) !== undefined;
  }

  /**
   * delete() that tells the store revision of the delete (undefined when there was nothing to
   * delete), so a caller can wait for a watch-fed cache to reach it.
   */
  async remove(id: string, expectRevision?: number): Promise<number | undefined> {
    const key = this.key(id);
    if (expectRevision === 0) return undefined; // "must not exist": nothing to delete either way
    const compare = expectRevision === undefined ? { key, exists: true } : { key, modRevision: expectRevision };
    const res = await this.store.txn([compare], [{ type: 'delete', key }]);
    if (res.succeeded) return res.revision;
    const now = await this.store.get(key);
    if (now === undefined || expectRevision === undefined) return undefined;
    throw new HfError('HF_ERR_CONFLICT', `${key} was modified (revision ${now.modRevision}, expected ${expectRevision})`, {
      details: { key, expectedRevision: expectRevision, revision: now.modRevision },
    });
  }

  /**
   * Calls `cb` for every change to the collection from `opts.fromRevision` (inclusive; default:
   * changes after now), in revision order. A put whose value fails the schema is reported to
   * onCorrupt and skipped (or delivered as a delete, see `corrupt`); a delete is always delivered
   * (value undefined if the last value was corrupt). When the watch cannot go on, `opts.onError`
   * is called once (see StateStore.watch).
   */
  watch(cb: (ev: CollectionEvent<T>) => void, opts: CollectionWatchOptions = {}): Watch {
    return this.store.watch(
      this.prefix,
      (ev: WatchEvent) => {
        const id = ev.key.slice(this.prefix.length);
        if (id.includes('/')) return;
        let value: T | undefined;
        if (ev.value !== undefined) {
          try {
            value = this.read(ev.key, ev.value);
          } catch (e) {
            this.report(ev.key, e);
            if (ev.type === 'put') {
              if (opts.corrupt !== 'as-delete') return;
              return cb({ type: 'delete', id, key: ev.key, value: undefined, revision: ev.modRevision });
            }
          }
        }
        return cb({ type: ev.type, id, key: ev.key, value, revision: ev.modRevision });
      },
      { fromRevision: opts.fromRevision, onError: opts.onError },
    );
  }

  // ---- internals ----

  /** Parses a stored value; HF_ERR_INTERNAL naming the key when it does not fit the schema. */
  private read(key: string, raw: unknown): T {
    try {
      return this.schema.parse(raw);
    } catch (e) {
      throw new HfError('HF_ERR_INTERNAL', `corrupt state entry ${key}: ${errMessage(e)}`, { cause: e, details: { key } });
    }
  }

  private tryRead(entry: KvEntry): Versioned<T> | undefined {
    // A (key, revision) pair never changes its value. Once a revision parsed to exactly what is
    // stored (true of everything written through check()), later reads skip the schema: parsing
    // dominates listing large collections. The store hands out a fresh copy every time.
    if (this.validated.get(entry.key) === entry.modRevision) return { value: entry.value as T, revision: entry.modRevision };
    try {
      const value = this.read(entry.key, entry.value);
      if (JSON.stringify(value) === JSON.stringify(entry.value)) {
        this.validated.set(entry.key, entry.modRevision);
        if (this.validated.size > VALIDATED_CACHE_MAX) this.validated.delete(this.validated.keys().next().value as string);
      }
      return { value, revision: entry.modRevision };
    } catch (e) {
      this.report(entry.key, e);
      return undefined;
    }
  }

  private report(key: string, e: unknown): void {
    try {
      this.onCorrupt(key, isHfError(e) ? e : new HfError('HF_ERR_INTERNAL', `corrupt state entry ${key}: ${errMessage(e)}`, { cause: e }));
    } catch {
      // a throwing reporter must not turn one bad row into a failed list
    }
  }

  /** Validates a value before writing it, so the collection never stores a row it cannot read back. */
  private check(key: string, value: T): T {
    try {
      return this.schema.parse(value);
    } catch (e) {
      if (isHfError(e)) throw e;
      throw new HfError('HF_ERR_VALIDATION', `invalid value for ${key}: ${errMessage(e)}`, { cause: e, details: { key } });
    }
  }
}
