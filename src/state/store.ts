// The state store: a small key-value interface shaped after etcd v3 so that an etcd
// implementation can replace the SQLite one without touching any caller. Keys are strings
// ("/instances/web1"), values JSON. Every write bumps one store-wide revision; each entry keeps
// the revision that created it and the one that last modified it. Updates can be made
// conditional on an entry's modRevision (compare-and-swap); watches stream changes under a prefix.

export interface KvEntry<T = unknown> {
  key: string;
  value: T;
  /** Store revision at which this key was created. */
  createRevision: number;
  /** Store revision of the last change to this key. */
  modRevision: number;
  /** Number of changes to this key since its creation (1 for a new key). */
  version: number;
}

/**
 * A condition on a key for conditional writes:
 * - `modRevision: 0` means "the key must not exist";
 * - `modRevision: N` means "the key's last change was at revision N".
 */
export interface Compare {
  key: string;
  modRevision: number;
}

export type TxnOp =
  | { type: 'put'; key: string; value: unknown }
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

export interface Watch {
  cancel(): void;
}

export interface StateStore {
  get<T = unknown>(key: string): Promise<KvEntry<T> | undefined>;
  /** Every entry whose key starts with `prefix`, sorted by key. */
  list<T = unknown>(prefix: string): Promise<KvEntry<T>[]>;
  /** Unconditional put; returns the new store revision. */
  put(key: string, value: unknown): Promise<number>;
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
   * Calls `cb` for every change under `prefix` after `fromRevision` (exclusive; default: now).
   * Events are delivered in revision order.
   */
  watch<T = unknown>(prefix: string, cb: (ev: WatchEvent<T>) => void, fromRevision?: number): Watch;
  close(): Promise<void>;
}
