// Pieces of the SQLite store that need no database: JSON encoding and its checks, the parsed-value
// cache, key ranges for prefixes, and the data-path checks done before opening the file.
import { accessSync, constants as fsConstants, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { HfError, type ErrorCode } from '../core/errors.js';
import { cloneJson } from './clone.js';

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

export function errCode(e: unknown): string | undefined {
  if (typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'string') return e.code;
  return undefined;
}

export function errMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Storage-level failures (read-only file, disk full, I/O error) are data-directory problems. */
export function storageErrorCode(e: unknown): ErrorCode {
  const code = errCode(e) ?? '';
  return /^SQLITE_(READONLY|CANTOPEN|FULL|IOERR|NOTADB|CORRUPT|PERM)/.test(code) ? 'HF_ERR_DATA_DIR' : 'HF_ERR_INTERNAL';
}

export function checkKey(key: string): void {
  if (typeof key !== 'string' || key.length === 0) throw new HfError('HF_ERR_VALIDATION', 'state key must be a non-empty string');
  if (/\p{Surrogate}/u.test(key)) throw new HfError('HF_ERR_VALIDATION', `state key ${JSON.stringify(key)} is not well-formed Unicode`);
}

export function toJson(key: string, value: unknown): string {
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
 * Parsed values by key, valid for one modRevision (revisions are never reused, so a hit is always
 * the row's current value, whoever wrote it). Values in here are never handed out, only copies.
 * Bounded by the size of their JSON text; the oldest entries go first.
 */
export class ValueCache {
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

export function fromJson<T>(key: string, json: string): T {
  try {
    return JSON.parse(json) as T;
  } catch (e) {
    throw new HfError('HF_ERR_INTERNAL', `corrupt JSON in state entry ${key}: ${errMessage(e)}`, { cause: e, details: { key } });
  }
}

/** Fails with HF_ERR_DATA_DIR unless `file` can be created or opened read-write. */
export function checkDataPath(file: string): void {
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
