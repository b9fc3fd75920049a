// Lease bookkeeping of the SQLite store: one row per live lease with its TTL and expiry time
// (milliseconds of the store's clock). The store deletes the keys of expired leases (see
// SqliteStateStore.sweep); this module only reads and writes the lease rows.
import type Database from 'better-sqlite3';
import { HfError } from '../core/errors.js';
import type { LeaseId } from './store.js';

type LeaseRow = [ttl: number, expiresAt: number];

export const LEASE_TABLES = `
  CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
  );
  CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at);
  CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease <> 0;
`;

/** Longest TTL accepted (etcd's MaxLeaseTTL is 9,000,000,000 s; a year is plenty here). */
const MAX_TTL_SECONDS = 365 * 24 * 3600;

export function leaseNotFound(id: LeaseId): HfError {
  return new HfError('HF_ERR_LEASE_NOT_FOUND', `lease ${id} not found (expired, revoked or never granted)`, { details: { lease: id } });
}

/** The row id of a lease id, or undefined when it cannot name any lease. */
export function leaseRowId(id: LeaseId): number | undefined {
  if (typeof id !== 'string' || !/^[1-9][0-9]{0,15}$/.test(id)) return undefined;
  const n = Number(id);
  return Number.isSafeInteger(n) ? n : undefined;
}

export function checkTtl(ttlSeconds: number): void {
  if (!Number.isInteger(ttlSeconds) || ttlSeconds < 1 || ttlSeconds > MAX_TTL_SECONDS) {
    throw new HfError('HF_ERR_VALIDATION', `lease TTL must be a whole number of seconds from 1 to ${MAX_TTL_SECONDS}, got ${ttlSeconds}`);
  }
}

export class LeaseTable {
  private readonly stmt: {
    insert: Database.Statement<[number, number]>;
    get: Database.Statement<[number], LeaseRow>;
    renew: Database.Statement<[number, number, number]>;
    remove: Database.Statement<[number]>;
    minExpiry: Database.Statement<[], number | null>;
    expired: Database.Statement<[number], number>;
    keys: Database.Statement<[number], string>;
  };

  constructor(db: Database.Database) {
    this.stmt = {
      insert: db.prepare<[number, number]>('INSERT INTO leases (ttl, expires_at) VALUES (?, ?)'),
      get: db.prepare<[number], LeaseRow>('SELECT ttl, expires_at FROM leases WHERE id = ?').raw(true),
      renew: db.prepare<[number, number, number]>('UPDATE leases SET expires_at = ? + ttl * 1000 WHERE id = ? AND expires_at > ?'),
      remove: db.prepare<[number]>('DELETE FROM leases WHERE id = ?'),
      minExpiry: db.prepare<[], number | null>('SELECT MIN(expires_at) FROM leases').pluck(true),
      expired: db.prepare<[number], number>('SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at, id').pluck(true),
      keys: db.prepare<[number], string>('SELECT key FROM kv WHERE lease = ? ORDER BY key').pluck(true),
    };
  }

  grant(ttlSeconds: number, now: number): LeaseId {
    return String(this.stmt.insert.run(ttlSeconds, now + ttlSeconds * 1000).lastInsertRowid);
  }

  /** The lease if it is live at `now`. */
  live(row: number, now: number): { ttl: number; expiresAt: number } | undefined {
    const r = this.stmt.get.get(row);
    return r === undefined || r[1] <= now ? undefined : { ttl: r[0], expiresAt: r[1] };
  }

  /** Renews a live lease for its full TTL; false when it is not live. */
  renew(row: number, now: number): boolean {
    return this.stmt.renew.run(now, row, now).changes > 0;
  }

  remove(row: number): void {
    this.stmt.remove.run(row);
  }

  /** True when some lease has expired at `now` (one indexed lookup: cheap enough for every call). */
  anyExpired(now: number): boolean {
    const min = this.stmt.minExpiry.get();
    return min !== null && min !== undefined && min <= now;
  }

  /** Row ids of the leases expired at `now`, oldest expiry first. */
  expired(now: number): number[] {
    return this.stmt.expired.all(now);
  }

  keys(row: number): string[] {
    return this.stmt.keys.all(row);
  }
}
