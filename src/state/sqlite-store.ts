// The SQLite implementation of StateStore: one database file in the daemon's data directory.
//
// Durability: WAL journal with synchronous=NORMAL. A transaction is committed once its frames are
// written to the WAL file, so a killed daemon (SIGKILL, OOM, crash) loses no committed write: the
// frames are in the OS page cache and are replayed on the next open. Only an OS crash or power
// loss can lose the last few committed transactions (never corrupt the database); synchronous=FULL
// would close that window at the cost of an fsync per commit, which is not worth it for state
// that is reconciled against the running system on start.
//
// Tables:
//   meta(id=1, revision, compact_revision): the store revision and, as etcd's compact revision,
//     the oldest revision still in the change log (0: nothing dropped yet);
//   kv(key, value JSON, create_rev, mod_rev, version, lease): the current entries;
//   changes(rev, seq, key, type, value JSON): a bounded change log (the last `historyLimit`
//     revisions) from which watches replay past revisions;
//   leases(id, ttl, expires_at): live leases (sqlite-leases.ts).
//
// Leases: every call first deletes the keys of leases expired by the store's clock (one indexed
// lookup when none has), so no read returns a key of an expired lease and watchers see the
// deletes; a timer does the same for a store nobody calls.
//
// Reads: JSON.parse dominates the cost of a large list (about 10 ms for 1,000 values of 2 KB on
// a slow core), so parsed values are cached by (key, modRevision) and handed out as deep copies,
// which costs a fraction of a parse. Revisions are never reused, so the cache cannot go stale.
//
// Writes run synchronously inside better-sqlite3 transactions (BEGIN IMMEDIATE), so they are
// atomic and strictly ordered; watch callbacks are called afterwards, from a microtask, one
// watcher queue at a time, never from inside a write (sqlite-watch.ts). Watch notification is
// in-process only: a second process writing the same file is not seen by this process's watchers.
import { resolve } from 'node:path';
import Database from 'better-sqlite3';
import { HfError, toHfError } from '../core/errors.js';
import { LeaseTable, checkTtl, leaseNotFound, leaseRowId } from './sqlite-leases.js';
import { compareHolds, migrate, prepareCompare, type CmpRow, type PreparedCompare } from './sqlite-schema.js';
import { ValueCache, checkDataPath, checkKey, errMessage, fromJson, prefixUpperBound, storageErrorCode, toJson } from './sqlite-values.js';
import { WatchHub, type Change } from './sqlite-watch.js';
import type {
  Compare,
  KvEntry,
  LeaseId,
  LeaseStatus,
  ListResult,
  PutOptions,
  StateStore,
  TxnOp,
  TxnResult,
  Watch,
  WatchEvent,
  WatchFailure,
  WatchOptions,
} from './store.js';

// Kept importable from here: callers and tests knew them as part of this module.
export { prefixUpperBound } from './sqlite-values.js';

export interface SqliteStateStoreOptions {
  /** How many revisions the change log keeps for watch replay (default 10,000). */
  historyLimit?: number;
  /** Milliseconds to wait for a lock held by another connection (default 5,000). */
  busyTimeoutMs?: number;
  /**
   * Upper bound, in bytes of JSON text, of the cache of parsed values that keeps list() from
   * re-parsing unchanged rows (default 32 MiB; 0 disables the cache).
   */
  cacheBytes?: number;
  /** Called when a watch callback throws (or its promise rejects). Default: a JSON line on stderr. */
  onWatcherError?: (err: unknown, ev: WatchEvent) => void;
  /** Milliseconds since the epoch, for lease expiry (default Date.now; tests drive their own). */
  clock?: () => number;
  /** How often a timer deletes the keys of expired leases (default 1,000 ms; 0: only when called). */
  sweepIntervalMs?: number;
}

const DEFAULT_HISTORY_LIMIT = 10_000;
const DEFAULT_BUSY_TIMEOUT_MS = 5_000;
const DEFAULT_CACHE_BYTES = 32 * 1024 * 1024;
const DEFAULT_SWEEP_INTERVAL_MS = 1_000;
/** Above this many uncached rows, list() reads the values in one range scan instead of one by one. */
const LIST_SCAN_MISSES = 32;

type KvRow = [key: string, value: string, createRev: number, modRev: number, version: number, lease: number];
type KvMetaRow = [key: string, createRev: number, modRev: number, version: number, lease: number];
type ChangeRow = [rev: number, key: string, type: string, value: string | null];
interface MetaRow {
  revision: number;
  compact_revision: number;
}

interface PreparedOp {
  type: 'put' | 'delete';
  key: string;
  /** JSON text, for puts. */
  json: string | null;
  /** Lease row id for puts (0: none). */
  lease: number;
}

function compactedFailure(from: number, meta: MetaRow): WatchFailure {
  const error = new HfError('HF_ERR_STATE_COMPACTED', `revision compacted: cannot watch from revision ${from}; the change log starts at revision ${meta.compact_revision}`, {
    details: { fromRevision: from, compactRevision: meta.compact_revision, revision: meta.revision },
  });
  return { kind: 'compacted', compactRevision: meta.compact_revision, error };
}

function logLine(fields: Record<string, unknown>): void {
  process.stderr.write(JSON.stringify({ t: new Date().toISOString(), ...fields }) + '\n');
}

export class SqliteStateStore implements StateStore {
  private readonly db: Database.Database;
  private readonly location: string;
  private readonly historyLimit: number;
  private readonly cache: ValueCache;
  private readonly clock: () => number;
  private readonly hub: WatchHub;
  private readonly leases: LeaseTable;
  private readonly sweeper: NodeJS.Timeout | undefined;
  private closed = false;

  private readonly stmt: {
    getMeta: Database.Statement<[], MetaRow>;
    setRevision: Database.Statement<[number]>;
    setCompactRevision: Database.Statement<[number]>;
    get: Database.Statement<[string], KvRow>;
    getCmp: Database.Statement<[string], CmpRow>;
    listFrom: Database.Statement<[string], KvRow>;
    listRange: Database.Statement<[string, string], KvRow>;
    metaFrom: Database.Statement<[string], KvMetaRow>;
    metaRange: Database.Statement<[string, string], KvMetaRow>;
    valueOf: Database.Statement<[string], string>;
    upsert: Database.Statement<[string, string, number, number, number]>;
    del: Database.Statement<[string], string>;
    logChange: Database.Statement<[number, number, string, string, string | null]>;
    changesSince: Database.Statement<[number], ChangeRow>;
    pruneChanges: Database.Statement<[number]>;
  };

  private readonly listTxn: Database.Transaction<(prefix: string) => ListResult>;

  private readonly writeTxn: Database.Transaction<(compares: PreparedCompare[], ops: PreparedOp[], now: number) => { result: TxnResult; changes: Change[] }>;

  private readonly revokeTxn: Database.Transaction<(row: number, now: number, mustBeLive: boolean) => Change[]>;

  /** Opens (creating when needed) the database at `file`; ':memory:' for a private in-memory store. */
  static open(file: string, opts: SqliteStateStoreOptions = {}): SqliteStateStore {
    const memory = file === ':memory:';
    if (!memory) checkDataPath(file);
    const location = memory ? file : resolve(file);
    let db: Database.Database | undefined;
    try {
      db = new Database(location, { timeout: opts.busyTimeoutMs ?? DEFAULT_BUSY_TIMEOUT_MS });
      return new SqliteStateStore(db, location, memory, opts);
    } catch (e) {
      try {
        db?.close();
      } catch {
        // already failing; the original error matters
      }
      if (e instanceof HfError) throw e;
      throw new HfError('HF_ERR_DATA_DIR', `cannot open state database ${location}: ${errMessage(e)}`, {
        cause: e,
        details: { path: location },
      });
    }
  }

  private constructor(db: Database.Database, location: string, memory: boolean, opts: SqliteStateStoreOptions) {
    this.db = db;
    this.location = location;
    this.historyLimit = Math.max(1, Math.floor(opts.historyLimit ?? DEFAULT_HISTORY_LIMIT));
    this.cache = new ValueCache(Math.max(0, opts.cacheBytes ?? DEFAULT_CACHE_BYTES));
    this.clock = opts.clock ?? Date.now;
    this.hub = new WatchHub({
      onWatcherError:
        opts.onWatcherError ?? ((err, ev) => logLine({ level: 'error', msg: 'state watcher threw', key: ev.key, revision: ev.modRevision, error: errMessage(err) })),
      // Closing the store is deliberate: only an unexpected end is worth a line.
      onUnhandledFailure: (f) => {
        if (f.kind !== 'closed') logLine({ level: 'error', msg: 'state watch ended', kind: f.kind, error: f.error.message });
      },
    });

    db.pragma(`busy_timeout = ${Math.max(0, Math.floor(opts.busyTimeoutMs ?? DEFAULT_BUSY_TIMEOUT_MS))}`);
    if (!memory) {
      const mode = db.pragma('journal_mode = WAL', { simple: true });
      if (mode !== 'wal') {
        throw new HfError('HF_ERR_DATA_DIR', `cannot open state database ${location}: the filesystem does not support WAL mode (journal_mode=${String(mode)})`);
      }
    }
    db.pragma('synchronous = NORMAL');
    db.pragma('foreign_keys = OFF');
    migrate(db, location);

    const kvCols = 'key, value, create_rev, mod_rev, version, lease';
    const metaCols = 'key, create_rev, mod_rev, version, lease';
    this.stmt = {
      getMeta: db.prepare<[], MetaRow>('SELECT revision, compact_revision FROM meta WHERE id = 1'),
      setRevision: db.prepare<[number]>('UPDATE meta SET revision = ? WHERE id = 1'),
      setCompactRevision: db.prepare<[number]>('UPDATE meta SET compact_revision = ? WHERE id = 1'),
      get: db.prepare<[string], KvRow>(`SELECT ${kvCols} FROM kv WHERE key = ?`).raw(true),
      getCmp: db.prepare<[string], CmpRow>('SELECT value, create_rev, mod_rev, version FROM kv WHERE key = ?').raw(true),
      listFrom: db.prepare<[string], KvRow>(`SELECT ${kvCols} FROM kv WHERE key >= ? ORDER BY key`).raw(true),
      listRange: db.prepare<[string, string], KvRow>(`SELECT ${kvCols} FROM kv WHERE key >= ? AND key < ? ORDER BY key`).raw(true),
      // Served by the covering index kv_meta2: no value pages are read.
      metaFrom: db.prepare<[string], KvMetaRow>(`SELECT ${metaCols} FROM kv WHERE key >= ? ORDER BY key`).raw(true),
      metaRange: db.prepare<[string, string], KvMetaRow>(`SELECT ${metaCols} FROM kv WHERE key >= ? AND key < ? ORDER BY key`).raw(true),
      valueOf: db.prepare<[string], string>('SELECT value FROM kv WHERE key = ?').pluck(true),
      upsert: db.prepare<[string, string, number, number, number]>(
        `INSERT INTO kv (key, value, create_rev, mod_rev, version, lease) VALUES (?, ?, ?, ?, 1, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, mod_rev = excluded.mod_rev, version = version + 1, lease = excluded.lease`,
      ),
      del: db.prepare<[string], string>('DELETE FROM kv WHERE key = ? RETURNING value').pluck(true),
      logChange: db.prepare<[number, number, string, string, string | null]>('INSERT INTO changes (rev, seq, key, type, value) VALUES (?, ?, ?, ?, ?)'),
      changesSince: db.prepare<[number], ChangeRow>('SELECT rev, key, type, value FROM changes WHERE rev > ? ORDER BY rev, seq').raw(true),
      pruneChanges: db.prepare<[number]>('DELETE FROM changes WHERE rev < ?'),
    };
    this.leases = new LeaseTable(db);

    this.listTxn = db.transaction((prefix: string): ListResult => {
      const upper = prefixUpperBound(prefix);
      const metas = upper === undefined ? this.stmt.metaFrom.all(prefix) : this.stmt.metaRange.all(prefix, upper);
      const out: KvEntry[] = new Array<KvEntry>(metas.length);
      const missed: number[] = [];
      for (let i = 0; i < metas.length; i++) {
        const [key, createRevision, modRevision, version, lease] = metas[i] as KvMetaRow;
        const value = this.cache.peek<unknown>(key, modRevision);
        if (value === undefined) missed.push(i);
        else out[i] = entry(key, value, createRevision, modRevision, version, lease);
      }
      // Same snapshot, so a range scan returns the same rows in the same order.
      const rows = missed.length > LIST_SCAN_MISSES ? (upper === undefined ? this.stmt.listFrom.all(prefix) : this.stmt.listRange.all(prefix, upper)) : undefined;
      for (const i of missed) {
        const [key, createRevision, modRevision, version, lease] = metas[i] as KvMetaRow;
        const row = rows?.[i];
        const json = row !== undefined && row[0] === key ? row[1] : (this.stmt.valueOf.get(key) as string);
        out[i] = entry(key, this.cache.read<unknown>(key, modRevision, json), createRevision, modRevision, version, lease);
      }
      return { entries: out, revision: (this.stmt.getMeta.get() as MetaRow).revision };
    });

    this.writeTxn = db.transaction((compares: PreparedCompare[], ops: PreparedOp[], now: number) => {
      const meta = this.stmt.getMeta.get() as MetaRow;
      for (const c of compares) {
        if (!compareHolds(c, this.stmt.getCmp.get(c.key))) return { result: { succeeded: false, revision: meta.revision }, changes: [] };
      }
      for (const op of ops) {
        // Thrown inside the transaction: nothing of it is applied.
        if (op.lease !== 0 && this.leases.live(op.lease, now) === undefined) throw leaseNotFound(String(op.lease));
      }
      const changes = this.apply(ops, meta);
      return { result: { succeeded: true, revision: changes.length === 0 ? meta.revision : meta.revision + 1 }, changes };
    });

    this.revokeTxn = db.transaction((row: number, now: number, mustBeLive: boolean): Change[] => {
      if (mustBeLive && this.leases.live(row, now) === undefined) throw leaseNotFound(String(row));
      const ops = this.leases.keys(row).map((key): PreparedOp => ({ type: 'delete', key, json: null, lease: 0 }));
      const changes = this.apply(ops, this.stmt.getMeta.get() as MetaRow);
      this.leases.remove(row);
      return changes;
    });

    const every = Math.max(0, Math.floor(opts.sweepIntervalMs ?? DEFAULT_SWEEP_INTERVAL_MS));
    if (every > 0) {
      this.sweeper = setInterval(() => {
        try {
          this.expire();
        } catch (e) {
          logLine({ level: 'error', msg: 'lease sweep failed', error: errMessage(e) });
        }
      }, every);
      this.sweeper.unref();
    }
  }

  /** The database file (absolute), or ':memory:'. */
  get path(): string {
    return this.location;
  }

  async get<T = unknown>(key: string): Promise<KvEntry<T> | undefined> {
    this.checkOpen();
    this.expire();
    const row = this.sql(() => this.stmt.get.get(key));
    if (row === undefined) return undefined;
    const [k, json, createRevision, modRevision, version, lease] = row;
    return entry(k, this.cache.read<T>(k, modRevision, json), createRevision, modRevision, version, lease);
  }

  async list<T = unknown>(prefix: string): Promise<ListResult<T>> {
    this.checkOpen();
    this.expire();
    return this.sql(() => this.listTxn(prefix)) as ListResult<T>;
  }

  async put(key: string, value: unknown, opts: PutOptions = {}): Promise<number> {
    return this.write([], [{ type: 'put', key, value, lease: opts.lease }]).result.revision;
  }

  async delete(key: string): Promise<boolean> {
    return this.write([], [{ type: 'delete', key }]).changed > 0;
  }

  async txn(compares: Compare[], ops: TxnOp[]): Promise<TxnResult> {
    return this.write(compares, ops).result;
  }

  async revision(): Promise<number> {
    this.checkOpen();
    this.expire();
    return this.sql(() => (this.stmt.getMeta.get() as MetaRow).revision);
  }

  /** The oldest revision a watch can start from (etcd's compact revision; 0 when nothing was dropped). */
  async compactRevision(): Promise<number> {
    this.checkOpen();
    return this.sql(() => (this.stmt.getMeta.get() as MetaRow).compact_revision);
  }

  /**
   * Drops the change log before `revision` (etcd's Compact): watches from an older revision then
   * fail with `compacted`. Compacting to a revision at or below the current compact revision
   * changes nothing; a revision above the store's is refused.
   */
  async compact(revision: number): Promise<void> {
    this.checkOpen();
    this.sql(() =>
      this.db.transaction(() => {
        const meta = this.stmt.getMeta.get() as MetaRow;
        if (!Number.isInteger(revision) || revision < 0 || revision > meta.revision) {
          throw new HfError('HF_ERR_VALIDATION', `cannot compact to revision ${revision}: the store is at revision ${meta.revision}`);
        }
        if (revision <= meta.compact_revision) return;
        this.stmt.pruneChanges.run(revision);
        this.stmt.setCompactRevision.run(revision);
      }).immediate(),
    );
  }

  watch<T = unknown>(prefix: string, cb: (ev: WatchEvent<T>) => void, opts: WatchOptions = {}): Watch {
    if (typeof prefix !== 'string') throw new HfError('HF_ERR_VALIDATION', 'watch prefix must be a string');
    const from = opts.fromRevision;
    if (from !== undefined && (!Number.isInteger(from) || from < 0)) {
      throw new HfError('HF_ERR_VALIDATION', `watch fromRevision must be a non-negative integer, got ${from}`);
    }
    if (this.closed) return this.hub.failed(opts.onError, { kind: 'closed', error: this.closedError() });
    let meta: MetaRow;
    const replay: WatchEvent[] = [];
    try {
      this.expire();
      meta = this.sql(() => this.stmt.getMeta.get() as MetaRow);
      if (from !== undefined && from < meta.compact_revision) return this.hub.failed(opts.onError, compactedFailure(from, meta));
      // History read synchronously: later commits are dispatched behind it, so no gap and no
      // duplicate (everything here runs on one thread).
      const rows = from === undefined ? [] : this.sql(() => this.stmt.changesSince.all(from - 1));
      for (const [rev, key, type, value] of rows) {
        if (!key.startsWith(prefix)) continue;
        replay.push({ type: type === 'delete' ? 'delete' : 'put', key, value: value === null ? undefined : fromJson<unknown>(key, value), modRevision: rev });
      }
    } catch (e) {
      return this.hub.failed(opts.onError, { kind: 'disconnected', error: toHfError(e) });
    }
    const after = from === undefined ? meta.revision : from - 1;
    return this.hub.add(prefix, cb as (ev: WatchEvent) => void, opts.onError, after, replay);
  }

  async grant(ttlSeconds: number): Promise<LeaseId> {
    this.checkOpen();
    checkTtl(ttlSeconds);
    const now = this.clock();
    this.expire(now);
    return this.sql(() => this.leases.grant(ttlSeconds, now));
  }

  async keepAlive(id: LeaseId): Promise<number> {
    this.checkOpen();
    const now = this.clock();
    this.expire(now);
    const row = leaseRowId(id);
    if (row === undefined) throw leaseNotFound(id);
    return this.sql(() =>
      this.db.transaction(() => {
        const lease = this.leases.live(row, now);
        if (lease === undefined || !this.leases.renew(row, now)) throw leaseNotFound(id);
        return lease.ttl;
      }).immediate(),
    );
  }

  async revoke(id: LeaseId): Promise<void> {
    this.checkOpen();
    const now = this.clock();
    this.expire(now);
    const row = leaseRowId(id);
    if (row === undefined) throw leaseNotFound(id);
    this.afterCommit(this.sql(() => this.revokeTxn.immediate(row, now, true)));
  }

  async timeToLive(id: LeaseId): Promise<LeaseStatus | undefined> {
    this.checkOpen();
    const now = this.clock();
    this.expire(now);
    const row = leaseRowId(id);
    if (row === undefined) return undefined;
    return this.sql(() => {
      const lease = this.leases.live(row, now);
      if (lease === undefined) return undefined;
      return { id, ttl: Math.ceil((lease.expiresAt - now) / 1000), grantedTtl: lease.ttl, keys: this.leases.keys(row) };
    });
  }

  /** Deletes the keys of every lease expired by the store's clock now; returns how many leases ended. */
  async sweep(): Promise<number> {
    this.checkOpen();
    return this.sweepAt(this.clock());
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.sweeper !== undefined) clearInterval(this.sweeper);
    this.hub.failAll({ kind: 'closed', error: this.closedError() });
    this.db.close();
  }

  // ---- internals ----

  private write(compares: Compare[], ops: TxnOp[]): { result: TxnResult; changed: number } {
    this.checkOpen();
    const pc = compares.map(prepareCompare);
    const seen = new Set<string>();
    const prepared: PreparedOp[] = ops.map((op) => {
      checkKey(op.key);
      if (seen.has(op.key)) throw new HfError('HF_ERR_VALIDATION', `state key ${op.key} appears more than once in one transaction`);
      seen.add(op.key);
      if (op.type === 'delete') return { type: 'delete', key: op.key, json: null, lease: 0 };
      if (op.type !== 'put') throw new HfError('HF_ERR_VALIDATION', `unknown transaction op type ${String((op as { type: unknown }).type)}`);
      let lease = 0;
      if (op.lease !== undefined) {
        const row = leaseRowId(op.lease);
        if (row === undefined) throw leaseNotFound(op.lease);
        lease = row;
      }
      return { type: 'put', key: op.key, json: toJson(op.key, op.value), lease };
    });
    const now = this.clock();
    this.expire(now);
    const { result, changes } = this.sql(() => this.writeTxn.immediate(pc, prepared, now));
    this.afterCommit(changes);
    return { result, changed: changes.length };
  }

  /** Applies ops at the next revision inside a write transaction; bumps the revision only if something changed. */
  private apply(ops: PreparedOp[], meta: MetaRow): Change[] {
    const rev = meta.revision + 1;
    const changes: Change[] = [];
    for (const op of ops) {
      if (op.type === 'put') {
        const json = op.json as string;
        this.stmt.upsert.run(op.key, json, rev, rev, op.lease);
        this.stmt.logChange.run(rev, changes.length, op.key, 'put', json);
        changes.push({ type: 'put', key: op.key, json, rev });
      } else {
        const prev = this.stmt.del.get(op.key);
        if (prev === undefined) continue; // deleting a missing key changes nothing (no new revision)
        this.stmt.logChange.run(rev, changes.length, op.key, 'delete', prev);
        changes.push({ type: 'delete', key: op.key, json: prev, rev });
      }
    }
    if (changes.length === 0) return changes;
    this.stmt.setRevision.run(rev);
    const keepFrom = rev - this.historyLimit + 1;
    if (keepFrom > meta.compact_revision) {
      this.stmt.pruneChanges.run(keepFrom);
      this.stmt.setCompactRevision.run(keepFrom);
    }
    return changes;
  }

  private afterCommit(changes: Change[]): void {
    for (const c of changes) if (c.type === 'delete') this.cache.drop(c.key);
    if (changes.length > 0) this.hub.dispatch(changes);
  }

  /** Ends the leases expired at `now` (each at its own revision, as etcd does). */
  private expire(now = this.clock()): void {
    if (this.sql(() => this.leases.anyExpired(now))) this.sweepAt(now);
  }

  private sweepAt(now: number): number {
    const rows = this.sql(() => this.leases.expired(now));
    for (const row of rows) this.afterCommit(this.sql(() => this.revokeTxn.immediate(row, now, false)));
    return rows.length;
  }

  private closedError(): HfError {
    return new HfError('HF_ERR_INTERNAL', `state store ${this.location} is closed`);
  }

  private checkOpen(): void {
    if (this.closed) throw this.closedError();
  }

  /** Runs a database call, turning SQLite errors into HfErrors that name the database. */
  private sql<R>(fn: () => R): R {
    try {
      return fn();
    } catch (e) {
      if (e instanceof HfError) throw e;
      throw new HfError(storageErrorCode(e), `state database ${this.location}: ${errMessage(e)}`, { cause: e, details: { path: this.location } });
    }
  }
}

function entry<T>(key: string, value: T, createRevision: number, modRevision: number, version: number, lease: number): KvEntry<T> {
  return lease === 0 ? { key, value, createRevision, modRevision, version } : { key, value, createRevision, modRevision, version, lease: String(lease) };
}
