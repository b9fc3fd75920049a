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
//   meta(id=1, revision, compact_revision): the store revision and the highest revision that
//     has been dropped from the change log;
//   kv(key, value JSON, create_rev, mod_rev, version): the current entries;
//   changes(rev, seq, key, type, value JSON): a bounded change log (the last `historyLimit`
//     revisions) from which watches replay past revisions.
//
// Reads: JSON.parse dominates the cost of a large list (about 10 ms for 1,000 values of 2 KB on
// a slow core), so parsed values are cached by (key, modRevision) and handed out as deep copies,
// which costs a fraction of a parse. Revisions are never reused, so the cache cannot go stale.
//
// Writes run synchronously inside better-sqlite3 transactions (BEGIN IMMEDIATE), so they are
// atomic and strictly ordered; watch callbacks are called afterwards, from a microtask, one
// watcher queue at a time, never from inside a write. Watch notification is in-process only: a
// second process writing the same file is not seen by this process's watchers.
import { accessSync, constants as fsConstants, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import Database from 'better-sqlite3';
import { HfError, type ErrorCode } from '../core/errors.js';
import type { Compare, KvEntry, StateStore, TxnOp, TxnResult, Watch, WatchEvent } from './store.js';

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
}

const SCHEMA_VERSION = 1;
const DEFAULT_HISTORY_LIMIT = 10_000;
const DEFAULT_BUSY_TIMEOUT_MS = 5_000;
const DEFAULT_CACHE_BYTES = 32 * 1024 * 1024;
/** Above this many uncached rows, list() reads the values in one range scan instead of one by one. */
const LIST_SCAN_MISSES = 32;

type KvRow = [key: string, value: string, createRev: number, modRev: number, version: number];
type KvMetaRow = [key: string, createRev: number, modRev: number, version: number];
type ChangeRow = [rev: number, key: string, type: string, value: string | null];
interface MetaRow {
  revision: number;
  compact_revision: number;
}

interface Watcher {
  prefix: string;
  cb: (ev: WatchEvent) => void;
  /** Only events with a revision above this are delivered (replayed ones included). */
  afterRevision: number;
  queue: WatchEvent[];
  scheduled: boolean;
  cancelled: boolean;
}

/** A committed change, value still as JSON text: each watcher parses its own copy. */
interface Change {
  type: 'put' | 'delete';
  key: string;
  json: string;
  rev: number;
}

interface PreparedOp {
  type: 'put' | 'delete';
  key: string;
  /** JSON text, for puts. */
  json: string | null;
}

/**
 * The exclusive upper bound of the keys starting with `prefix`, in the code-point order that
 * SQLite's BINARY collation uses on UTF-8 text: the prefix with its last code point incremented
 * (trailing U+10FFFF dropped). `undefined` when there is no bound (empty prefix).
 */
export function prefixUpperBound(prefix: string): string | undefined {
  const cps = Array.from(prefix);
  while (cps.length > 0) {
    const last = cps.pop() as string;
    let cp = (last.codePointAt(0) as number) + 1;
    if (cp === 0xd800) cp = 0xe000; // skip the surrogate range: not valid code points
    if (cp <= 0x10ffff) return cps.join('') + String.fromCodePoint(cp);
  }
  return undefined;
}

function errCode(e: unknown): string | undefined {
  if (typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'string') return e.code;
  return undefined;
}

function errMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Storage-level failures (read-only file, disk full, I/O error) are data-directory problems. */
function storageErrorCode(e: unknown): ErrorCode {
  const code = errCode(e) ?? '';
  return /^SQLITE_(READONLY|CANTOPEN|FULL|IOERR|NOTADB|CORRUPT|PERM)/.test(code) ? 'HF_ERR_DATA_DIR' : 'HF_ERR_INTERNAL';
}

function checkKey(key: string): void {
  if (typeof key !== 'string' || key.length === 0) throw new HfError('HF_ERR_VALIDATION', 'state key must be a non-empty string');
  if (/\p{Surrogate}/u.test(key)) throw new HfError('HF_ERR_VALIDATION', `state key ${JSON.stringify(key)} is not well-formed Unicode`);
}

function toJson(key: string, value: unknown): string {
  let json: string | undefined;
  try {
    json = JSON.stringify(value);
  } catch (e) {
    throw new HfError('HF_ERR_VALIDATION', `value for state key ${key} is not JSON-serializable: ${errMessage(e)}`, { cause: e });
  }
  if (json === undefined) throw new HfError('HF_ERR_VALIDATION', `value for state key ${key} is not JSON-serializable (${typeof value})`);
  return json;
}

/**
 * Deep copy of a value made by JSON.parse (plain objects, arrays, primitives): several times
 * faster than JSON.parse or structuredClone, which is what makes cached reads cheap.
 */
export function cloneJson<T>(v: T): T {
  if (v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) {
    const a = new Array<unknown>(v.length);
    for (let i = 0; i < v.length; i++) a[i] = cloneJson<unknown>(v[i]);
    return a as T;
  }
  const o: Record<string, unknown> = {};
  const src = v as Record<string, unknown>;
  for (const k in src) {
    if (k === '__proto__') Object.defineProperty(o, k, { value: cloneJson(src[k]), enumerable: true, writable: true, configurable: true });
    else o[k] = cloneJson(src[k]);
  }
  return o as T;
}

/**
 * Parsed values by key, valid for one modRevision (revisions are never reused, so a hit is always
 * the row's current value, whoever wrote it). Values in here are never handed out, only copies.
 * Bounded by the size of their JSON text; the oldest entries go first.
 */
class ValueCache {
  private readonly map = new Map<string, { modRev: number; value: unknown; size: number }>();
  private bytes = 0;

  constructor(private readonly maxBytes: number) {}

  /** A fresh copy of the cached value of `key` at `modRev`; undefined (never a JSON value) on a miss. */
  peek<T>(key: string, modRev: number): T | undefined {
    const hit = this.map.get(key);
    return hit !== undefined && hit.modRev === modRev ? cloneJson(hit.value as T) : undefined;
  }

  /** A fresh copy of the value of `key` at `modRev`, parsing `json` when not cached. */
  read<T>(key: string, modRev: number, json: string): T {
    const hit = this.map.get(key);
    if (hit !== undefined && hit.modRev === modRev) return cloneJson(hit.value as T);
    const value = fromJson<T>(key, json);
    if (json.length <= this.maxBytes) {
      this.drop(key);
      this.map.set(key, { modRev, value, size: json.length });
      this.bytes += json.length;
      for (const [k, e] of this.map) {
        if (this.bytes <= this.maxBytes) break;
        this.map.delete(k);
        this.bytes -= e.size;
      }
      return cloneJson(value);
    }
    return value;
  }

  drop(key: string): void {
    const e = this.map.get(key);
    if (e === undefined) return;
    this.map.delete(key);
    this.bytes -= e.size;
  }
}

function fromJson<T>(key: string, json: string): T {
  try {
    return JSON.parse(json) as T;
  } catch (e) {
    throw new HfError('HF_ERR_INTERNAL', `corrupt JSON in state entry ${key}: ${errMessage(e)}`, { cause: e, details: { key } });
  }
}

/** Fails with HF_ERR_DATA_DIR unless `file` can be created or opened read-write. */
function checkDataPath(file: string): void {
  const path = resolve(file);
  const dir = dirname(path);
  const fail = (why: string, cause?: unknown): never => {
    throw new HfError('HF_ERR_DATA_DIR', `cannot open state database ${path}: ${why}`, { cause, details: { path, dir } });
  };
  let dirStat;
  try {
    dirStat = statSync(dir);
  } catch (e) {
    return fail(errCode(e) === 'ENOENT' ? `directory ${dir} does not exist` : `cannot access directory ${dir} (${errMessage(e)})`, e);
  }
  if (!dirStat.isDirectory()) return fail(`${dir} is not a directory`);
  try {
    accessSync(dir, fsConstants.W_OK | fsConstants.X_OK);
  } catch (e) {
    return fail(`directory ${dir} is not writable (the database and its -wal/-shm files live there)`, e);
  }
  let fileStat;
  try {
    fileStat = statSync(path);
  } catch {
    return; // does not exist yet: created on open
  }
  if (!fileStat.isFile()) return fail('not a regular file');
  try {
    accessSync(path, fsConstants.R_OK | fsConstants.W_OK);
  } catch (e) {
    return fail('file is not readable and writable', e);
  }
}

export class SqliteStateStore implements StateStore {
  private readonly db: Database.Database;
  private readonly location: string;
  private readonly historyLimit: number;
  private readonly cache: ValueCache;
  private readonly onWatcherError: (err: unknown, ev: WatchEvent) => void;
  private readonly watchers = new Set<Watcher>();
  private closed = false;

  private readonly stmt: {
    getMeta: Database.Statement<[], MetaRow>;
    setRevision: Database.Statement<[number]>;
    setCompactRevision: Database.Statement<[number]>;
    get: Database.Statement<[string], KvRow>;
    getModRev: Database.Statement<[string], number>;
    listFrom: Database.Statement<[string], KvRow>;
    listRange: Database.Statement<[string, string], KvRow>;
    metaFrom: Database.Statement<[string], KvMetaRow>;
    metaRange: Database.Statement<[string, string], KvMetaRow>;
    valueOf: Database.Statement<[string], string>;
    upsert: Database.Statement<[string, string, number, number]>;
    del: Database.Statement<[string], string>;
    logChange: Database.Statement<[number, number, string, string, string | null]>;
    changesSince: Database.Statement<[number], ChangeRow>;
    pruneChanges: Database.Statement<[number]>;
  };

  /**
   * list() in one read transaction (one snapshot): the keys and revisions come from the covering
   * index; values are read only for rows whose (key, modRevision) is not cached.
   */
  private readonly listTxn: Database.Transaction<(prefix: string) => KvEntry[]>;

  private readonly writeTxn: Database.Transaction<(compares: Compare[], ops: PreparedOp[]) => { result: TxnResult; changes: Change[] }>;

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
    this.onWatcherError =
      opts.onWatcherError ??
      ((err, ev) => {
        const line = { t: new Date().toISOString(), level: 'error', msg: 'state watcher threw', key: ev.key, revision: ev.modRevision, error: errMessage(err) };
        process.stderr.write(JSON.stringify(line) + '\n');
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

    const userVersion = db.pragma('user_version', { simple: true }) as number;
    if (userVersion > SCHEMA_VERSION) {
      throw new HfError('HF_ERR_DATA_DIR', `state database ${location} has schema version ${userVersion}, newer than this Hyperfold supports (${SCHEMA_VERSION})`);
    }
    db.exec(`
      BEGIN IMMEDIATE;
      CREATE TABLE IF NOT EXISTS meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL,
        compact_revision INTEGER NOT NULL
      );
      INSERT OR IGNORE INTO meta (id, revision, compact_revision) VALUES (1, 0, 0);
      CREATE TABLE IF NOT EXISTS kv (
        key TEXT NOT NULL PRIMARY KEY,
        value TEXT NOT NULL CHECK (json_valid(value)),
        create_rev INTEGER NOT NULL,
        mod_rev INTEGER NOT NULL,
        version INTEGER NOT NULL
      );
      CREATE INDEX IF NOT EXISTS kv_meta ON kv (key, create_rev, mod_rev, version);
      CREATE TABLE IF NOT EXISTS changes (
        rev INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        key TEXT NOT NULL,
        type TEXT NOT NULL CHECK (type IN ('put', 'delete')),
        value TEXT,
        PRIMARY KEY (rev, seq)
      );
      PRAGMA user_version = ${SCHEMA_VERSION};
      COMMIT;
    `);

    const kvCols = 'key, value, create_rev, mod_rev, version';
    const metaCols = 'key, create_rev, mod_rev, version';
    this.stmt = {
      getMeta: db.prepare<[], MetaRow>('SELECT revision, compact_revision FROM meta WHERE id = 1'),
      setRevision: db.prepare<[number]>('UPDATE meta SET revision = ? WHERE id = 1'),
      setCompactRevision: db.prepare<[number]>('UPDATE meta SET compact_revision = ? WHERE id = 1'),
      get: db.prepare<[string], KvRow>(`SELECT ${kvCols} FROM kv WHERE key = ?`).raw(true),
      getModRev: db.prepare<[string], number>('SELECT mod_rev FROM kv WHERE key = ?').pluck(true),
      listFrom: db.prepare<[string], KvRow>(`SELECT ${kvCols} FROM kv WHERE key >= ? ORDER BY key`).raw(true),
      listRange: db.prepare<[string, string], KvRow>(`SELECT ${kvCols} FROM kv WHERE key >= ? AND key < ? ORDER BY key`).raw(true),
      // Served by the covering index kv_meta: no value pages are read.
      metaFrom: db.prepare<[string], KvMetaRow>(`SELECT ${metaCols} FROM kv WHERE key >= ? ORDER BY key`).raw(true),
      metaRange: db.prepare<[string, string], KvMetaRow>(`SELECT ${metaCols} FROM kv WHERE key >= ? AND key < ? ORDER BY key`).raw(true),
      valueOf: db.prepare<[string], string>('SELECT value FROM kv WHERE key = ?').pluck(true),
      upsert: db.prepare<[string, string, number, number]>(
        `INSERT INTO kv (key, value, create_rev, mod_rev, version) VALUES (?, ?, ?, ?, 1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, mod_rev = excluded.mod_rev, version = version + 1`,
      ),
      del: db.prepare<[string], string>('DELETE FROM kv WHERE key = ? RETURNING value').pluck(true),
      logChange: db.prepare<[number, number, string, string, string | null]>('INSERT INTO changes (rev, seq, key, type, value) VALUES (?, ?, ?, ?, ?)'),
      changesSince: db.prepare<[number], ChangeRow>('SELECT rev, key, type, value FROM changes WHERE rev > ? ORDER BY rev, seq').raw(true),
      pruneChanges: db.prepare<[number]>('DELETE FROM changes WHERE rev <= ?'),
    };

    this.listTxn = db.transaction((prefix: string): KvEntry[] => {
      const upper = prefixUpperBound(prefix);
      const metas = upper === undefined ? this.stmt.metaFrom.all(prefix) : this.stmt.metaRange.all(prefix, upper);
      const out: KvEntry[] = new Array<KvEntry>(metas.length);
      const missed: number[] = [];
      for (let i = 0; i < metas.length; i++) {
        const [key, createRevision, modRevision, version] = metas[i] as KvMetaRow;
        const value = this.cache.peek<unknown>(key, modRevision);
        if (value === undefined) missed.push(i);
        else out[i] = { key, value, createRevision, modRevision, version };
      }
      // Same snapshot, so a range scan returns the same rows in the same order.
      const rows = missed.length > LIST_SCAN_MISSES ? (upper === undefined ? this.stmt.listFrom.all(prefix) : this.stmt.listRange.all(prefix, upper)) : undefined;
      for (const i of missed) {
        const [key, createRevision, modRevision, version] = metas[i] as KvMetaRow;
        const row = rows?.[i];
        const json = row !== undefined && row[0] === key ? row[1] : (this.stmt.valueOf.get(key) as string);
        out[i] = { key, value: this.cache.read<unknown>(key, modRevision, json), createRevision, modRevision, version };
      }
      return out;
    });

    this.writeTxn = db.transaction((compares: Compare[], ops: PreparedOp[]) => {
      const meta = this.stmt.getMeta.get() as MetaRow;
      for (const c of compares) {
        const modRev = this.stmt.getModRev.get(c.key) ?? 0;
        if (modRev !== c.modRevision) return { result: { succeeded: false, revision: meta.revision }, changes: [] };
      }
      const rev = meta.revision + 1;
      const changes: Change[] = [];
      for (const op of ops) {
        if (op.type === 'put') {
          const json = op.json as string;
          this.stmt.upsert.run(op.key, json, rev, rev);
          this.stmt.logChange.run(rev, changes.length, op.key, 'put', json);
          changes.push({ type: 'put', key: op.key, json, rev });
        } else {
          const prev = this.stmt.del.get(op.key);
          if (prev === undefined) continue; // deleting a missing key changes nothing (no new revision)
          this.stmt.logChange.run(rev, changes.length, op.key, 'delete', prev);
          changes.push({ type: 'delete', key: op.key, json: prev, rev });
        }
      }
      if (changes.length === 0) return { result: { succeeded: true, revision: meta.revision }, changes };
      this.stmt.setRevision.run(rev);
      const keepAfter = rev - this.historyLimit;
      if (keepAfter > meta.compact_revision) {
        this.stmt.pruneChanges.run(keepAfter);
        this.stmt.setCompactRevision.run(keepAfter);
      }
      return { result: { succeeded: true, revision: rev }, changes };
    });
  }

  /** The database file (absolute), or ':memory:'. */
  get path(): string {
    return this.location;
  }

  async get<T = unknown>(key: string): Promise<KvEntry<T> | undefined> {
    this.checkOpen();
    const row = this.sql(() => this.stmt.get.get(key));
    return row === undefined ? undefined : this.toEntry<T>(row);
  }

  async list<T = unknown>(prefix: string): Promise<KvEntry<T>[]> {
    this.checkOpen();
    return this.sql(() => this.listTxn(prefix)) as KvEntry<T>[];
  }

  async put(key: string, value: unknown): Promise<number> {
    return this.write([], [{ type: 'put', key, value }]).result.revision;
  }

  async delete(key: string): Promise<boolean> {
    return this.write([], [{ type: 'delete', key }]).changed > 0;
  }

  async txn(compares: Compare[], ops: TxnOp[]): Promise<TxnResult> {
    return this.write(compares, ops).result;
  }

  async revision(): Promise<number> {
    this.checkOpen();
    return this.sql(() => (this.stmt.getMeta.get() as MetaRow).revision);
  }

  /** The highest revision no longer in the change log; watching from below it fails. */
  async compactRevision(): Promise<number> {
    this.checkOpen();
    return this.sql(() => (this.stmt.getMeta.get() as MetaRow).compact_revision);
  }

  watch<T = unknown>(prefix: string, cb: (ev: WatchEvent<T>) => void, fromRevision?: number): Watch {
    this.checkOpen();
    const meta = this.sql(() => this.stmt.getMeta.get() as MetaRow);
    const w: Watcher = {
      prefix,
      cb: cb as (ev: WatchEvent) => void,
      afterRevision: meta.revision,
      queue: [],
      scheduled: false,
      cancelled: false,
    };
    if (fromRevision !== undefined) {
      if (!Number.isInteger(fromRevision) || fromRevision < 0) {
        throw new HfError('HF_ERR_VALIDATION', `watch fromRevision must be a non-negative integer, got ${fromRevision}`);
      }
      if (fromRevision < meta.compact_revision) {
        throw new HfError('HF_ERR_CONFLICT', `revision compacted: cannot watch from revision ${fromRevision}; the change log starts after revision ${meta.compact_revision}`, {
          details: { fromRevision, compactRevision: meta.compact_revision, revision: meta.revision },
        });
      }
      w.afterRevision = fromRevision;
      // Replay synchronously-read history; later commits are queued behind it, so no gap and no
      // duplicate (everything here runs on one thread).
      const rows = this.sql(() => this.stmt.changesSince.all(fromRevision));
      for (const [rev, key, type, value] of rows) {
        if (!key.startsWith(prefix)) continue;
        w.queue.push({
          type: type === 'delete' ? 'delete' : 'put',
          key,
          value: value === null ? undefined : fromJson<unknown>(key, value),
          modRevision: rev,
        });
      }
      this.schedule(w);
    }
    this.watchers.add(w);
    return {
      cancel: () => {
        w.cancelled = true;
        w.queue.length = 0;
        this.watchers.delete(w);
      },
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.watchers) {
      w.cancelled = true;
      w.queue.length = 0;
    }
    this.watchers.clear();
    this.db.close();
  }

  // ---- internals ----

  private write(compares: Compare[], ops: TxnOp[]): { result: TxnResult; changed: number } {
    this.checkOpen();
    for (const c of compares) {
      checkKey(c.key);
      if (!Number.isInteger(c.modRevision) || c.modRevision < 0) {
        throw new HfError('HF_ERR_VALIDATION', `compare on ${c.key}: modRevision must be a non-negative integer, got ${c.modRevision}`);
      }
    }
    const seen = new Set<string>();
    const prepared: PreparedOp[] = ops.map((op) => {
      checkKey(op.key);
      if (seen.has(op.key)) throw new HfError('HF_ERR_VALIDATION', `state key ${op.key} appears more than once in one transaction`);
      seen.add(op.key);
      if (op.type === 'put') return { type: 'put', key: op.key, json: toJson(op.key, op.value) };
      if (op.type === 'delete') return { type: 'delete', key: op.key, json: null };
      throw new HfError('HF_ERR_VALIDATION', `unknown transaction op type ${String((op as { type: unknown }).type)}`);
    });
    const { result, changes } = this.sql(() => this.writeTxn.immediate(compares, prepared));
    for (const c of changes) if (c.type === 'delete') this.cache.drop(c.key);
    if (changes.length > 0) this.dispatch(changes);
    return { result, changed: changes.length };
  }

  /** Queues committed changes for every interested watcher (each gets its own parsed copy). */
  private dispatch(changes: Change[]): void {
    for (const w of this.watchers) {
      let added = false;
      for (const c of changes) {
        if (c.rev > w.afterRevision && c.key.startsWith(w.prefix)) {
          w.queue.push({ type: c.type, key: c.key, value: JSON.parse(c.json) as unknown, modRevision: c.rev });
          added = true;
        }
      }
      if (added) this.schedule(w);
    }
  }

  private schedule(w: Watcher): void {
    if (w.scheduled || w.queue.length === 0) return;
    w.scheduled = true;
    queueMicrotask(() => this.drain(w));
  }

  /** Delivers a watcher's queue in order; events queued by its own callback are delivered here too. */
  private drain(w: Watcher): void {
    try {
      while (!w.cancelled && w.queue.length > 0) {
        const ev = w.queue.shift() as WatchEvent;
        try {
          const r = w.cb(ev) as unknown;
          if (r instanceof Promise) r.catch((err: unknown) => this.reportWatcherError(err, ev));
        } catch (err) {
          this.reportWatcherError(err, ev);
        }
      }
    } finally {
      w.scheduled = false;
    }
  }

  private reportWatcherError(err: unknown, ev: WatchEvent): void {
    try {
      this.onWatcherError(err, ev);
    } catch {
      // an error reporter that throws must not break delivery either
    }
  }

  private toEntry<T>(row: KvRow): KvEntry<T> {
    const [key, value, createRevision, modRevision, version] = row;
    return { key, value: this.cache.read<T>(key, modRevision, value), createRevision, modRevision, version };
  }

  private checkOpen(): void {
    if (this.closed) throw new HfError('HF_ERR_INTERNAL', `state store ${this.location} is closed`);
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
