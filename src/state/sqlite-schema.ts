// The SQLite store's schema (creation and migration of older files) and the evaluation of txn
// compares against a stored row.
import type Database from 'better-sqlite3';
import { HfError } from '../core/errors.js';
import { LEASE_TABLES } from './sqlite-leases.js';
import { checkKey, toJson } from './sqlite-values.js';
import type { Compare } from './store.js';

export const SCHEMA_VERSION = 2;

/** The columns of a row a compare looks at. */
export type CmpRow = [value: string, createRev: number, modRev: number, version: number];

/** A compare with its target named and a value compare's JSON text computed once. */
export type PreparedCompare = { key: string; target: 'modRevision' | 'createRevision' | 'version'; n: number } | { key: string; target: 'exists'; exists: boolean } | { key: string; target: 'value'; json: string };

const COMPARE_TARGETS = ['modRevision', 'createRevision', 'version', 'exists', 'value'] as const;

export function prepareCompare(c: Compare): PreparedCompare {
  checkKey(c.key);
  const targets = COMPARE_TARGETS.filter((t) => t in c);
  if (targets.length !== 1) throw new HfError('HF_ERR_VALIDATION', `compare on ${c.key} must name exactly one of ${COMPARE_TARGETS.join(', ')}`);
  if ('exists' in c) {
    if (typeof c.exists !== 'boolean') throw new HfError('HF_ERR_VALIDATION', `compare on ${c.key}: exists must be a boolean`);
    return { key: c.key, target: 'exists', exists: c.exists };
  }
  if ('value' in c) return { key: c.key, target: 'value', json: toJson(c.key, c.value) };
  const target = targets[0] as 'modRevision' | 'createRevision' | 'version';
  const n = (c as Record<string, unknown>)[target];
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0) {
    throw new HfError('HF_ERR_VALIDATION', `compare on ${c.key}: ${target} must be a non-negative integer, got ${String(n)}`);
  }
  return { key: c.key, target, n };
}

/** Whether a compare holds for a key's row (undefined: missing, whose revisions and version are 0). */
export function compareHolds(c: PreparedCompare, row: CmpRow | undefined): boolean {
  switch (c.target) {
    case 'exists':
      return (row !== undefined) === c.exists;
    case 'value':
      return row !== undefined && row[0] === c.json;
    case 'createRevision':
      return (row?.[1] ?? 0) === c.n;
    case 'modRevision':
      return (row?.[2] ?? 0) === c.n;
    case 'version':
      return (row?.[3] ?? 0) === c.n;
  }
}

/**
 * Creates the tables or brings an older file up to date, in one transaction. Version 2 added
 * leases (kv.lease, the leases table) and gave meta.compact_revision etcd's meaning (the oldest
 * revision kept, where version 1 stored the newest one dropped).
 */
export function migrate(db: Database.Database, location: string): void {
  db.transaction(() => {
    const version = db.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) {
      throw new HfError('HF_ERR_DATA_DIR', `state database ${location} has schema version ${version}, newer than this Hyperfold supports (${SCHEMA_VERSION})`);
    }
    db.exec(`
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
        version INTEGER NOT NULL,
        lease INTEGER NOT NULL DEFAULT 0
      );
      CREATE TABLE IF NOT EXISTS changes (
        rev INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        key TEXT NOT NULL,
        type TEXT NOT NULL CHECK (type IN ('put', 'delete')),
        value TEXT,
        PRIMARY KEY (rev, seq)
      );
    `);
    if (version === 1) {
      db.exec(`
        ALTER TABLE kv ADD COLUMN lease INTEGER NOT NULL DEFAULT 0;
        DROP INDEX IF EXISTS kv_meta;
        UPDATE meta SET compact_revision = compact_revision + 1 WHERE compact_revision > 0;
      `);
    }
    db.exec(`
      CREATE INDEX IF NOT EXISTS kv_meta2 ON kv (key, create_rev, mod_rev, version, lease);
      ${LEASE_TABLES}
      PRAGMA user_version = ${SCHEMA_VERSION};
    `);
  }).immediate();
}
