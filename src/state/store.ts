// The state store: a small key-value interface shaped after etcd v3 so that an etcd
// implementation can replace the SQLite one without touching any caller. Keys are strings
// ("/instances/web1"), values JSON. Every write bumps one store-wide revision; each entry keeps
// the revision that created it and the one that last modified it. Writes can be made conditional
// on a key's revisions, version, value or existence (compare-and-swap); watches stream changes
// under a prefix from a given revision; leases make keys that vanish when their owner stops
// renewing them (a host's heartbeat, a lock).
//
// The contract is what test/helpers/store-contract.ts checks: every implementation runs it.
import type { HfError } from '../core/errors.js';

/**
 * A lease id. A string because etcd's are 64-bit integers, more than a JS number holds exactly
 * (the etcd3 client hands them out as decimal strings too).
 */
export type LeaseId = string;

export interface KvEntry<T = unknown> {
  key: string;
  value: T;
  /** Store revision at which this key was created. */
  createRevision: number;
  /** Store revision of the last change to this key. */
  modRevision: number;
  /** Number of changes to this key since its creation (1 for a new key). */
  version: number;
  /** The lease the key is attached to; absent when none. */
  lease?: LeaseId;
}

/** What list() returns: the entries and the store revision they were read at (etcd's header revision). */
export interface ListResult<T = unknown> {
  entries: KvEntry<T>[];
  /** Watching from `revision + 1` afterwards misses no change and repeats none. */
  revision: number;
}

/**
 * A condition on one key for conditional writes (equality, as etcd's `=` compare). A missing
 * key has modRevision, createRevision and version 0:
 * - `{ modRevision: 0 }` means "the key must not exist"; `{ modRevision: N }` "last changed at N";
 * - `{ exists: true | false }`;
 * - `{ version: N }`, `{ createRevision: N }`;
 * - `{ value: V }`: the stored JSON text equals JSON.stringify(V) (byte comparison, as etcd's,
 *   so object key order matters); never holds for a missing key.
 */
export type Compare =
  | { key: string; modRevision: number }
  | { key: string; createRevision: number }
  | { key: string; version: number }
  | { key: string; exists: boolean }
  | { key: string; value: unknown };

export interface PutOptions {
  /** Attaches the key to this lease. Like etcd, a put without a lease detaches the key from any lease. */
  lease?: LeaseId;
}

export type TxnOp =
  | { type: 'put'; key: string; value: unknown; lease?: LeaseId }
  | { type: 'delete'; key: string };

export interface TxnResult {
  succeeded: boolean;
  /** Store revision after the transaction (unchanged when it did not succeed). */
  revision: number;
}

export interface WatchEvent<T = unknown> {
  type: 'put' | 'delete';
  key: string;
  /** The new value for a put; the last value for a delete. */
  value: T | undefined;
  modRevision: number;
}

/**
 * Why a watch ended. After any of these the watch delivers nothing more; the watcher lists
 * again and watches from the list's revision + 1.
 * - `compacted`: the start revision is older than the history the store keeps. `compactRevision`
 *   is the oldest revision a watch can start from now (etcd's ErrCompacted and CompactRevision).
 * - `closed`: the store was closed.
 * - `disconnected`: a remote store lost its connection (and may have missed changes).
 */
export type WatchFailure =
  | { kind: 'compacted'; compactRevision: number; error: HfError }
  | { kind: 'closed' | 'disconnected'; error: HfError };

export interface WatchOptions {
  /**
   * First revision to deliver, INCLUSIVE (as etcd's start_revision): every change with
   * modRevision >= fromRevision. Default: only changes made after the call.
   */
  fromRevision?: number;
  /** Called once when the watch ends by itself. Default: a JSON line on stderr. */
  onError?: (failure: WatchFailure) => void;
}

export interface Watch {
  cancel(): void;
}

export interface LeaseStatus {
  id: LeaseId;
  /** Seconds left before it expires (rounded up). */
  ttl: number;
  /** The TTL it was granted with. */
  grantedTtl: number;
  /** Keys attached to it, sorted. */
  keys: string[];
}

export interface StateStore {
  get<T = unknown>(key: string): Promise<KvEntry<T> | undefined>;
  /** Every entry whose key starts with `prefix`, sorted by key, and the revision they were read at. */
  list<T = unknown>(prefix: string): Promise<ListResult<T>>;
  /** Unconditional put; returns the new store revision. */
  put(key: string, value: unknown, opts?: PutOptions): Promise<number>;
  /** Unconditional delete; returns true when the key existed. */
  delete(key: string): Promise<boolean>;
  /**
   * Atomic: if every compare holds, apply all ops and return succeeded=true; otherwise apply
   * nothing and return succeeded=false. Like etcd's Txn(If(...).Then(...)).
   */
  txn(compares: Compare[], ops: TxnOp[]): Promise<TxnResult>;
  /** Current store revision. */
  revision(): Promise<number>;
  /**
   * Calls `cb` for every change under `prefix` from `opts.fromRevision` (inclusive; default:
   * changes after now), in revision order, never re-entrantly. A watch that cannot go on (start
   * revision compacted, store closed or disconnected) calls `opts.onError` once instead of
   * throwing; only invalid arguments throw.
   */
  watch<T = unknown>(prefix: string, cb: (ev: WatchEvent<T>) => void, opts?: WatchOptions): Watch;

  /** A new lease of `ttlSeconds` (a positive integer). */
  grant(ttlSeconds: number): Promise<LeaseId>;
  /** Renews the lease once for its full TTL and returns that TTL; HF_ERR_LEASE_NOT_FOUND when it expired or never existed. */
  keepAlive(id: LeaseId): Promise<number>;
  /** Ends the lease now and deletes its keys (watchers see the deletes); HF_ERR_LEASE_NOT_FOUND when unknown. */
  revoke(id: LeaseId): Promise<void>;
  /** The lease's remaining time and keys; undefined when it expired or never existed. */
  timeToLive(id: LeaseId): Promise<LeaseStatus | undefined>;

  /** Closes the store; active watches end with a `closed` failure. */
  close(): Promise<void>;
}
