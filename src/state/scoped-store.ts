// A view of a StateStore that keeps some key prefixes in a per-host area. In a cluster, storage
// pools, volumes and images are this host's own (its disks, its files), while instances and
// networks are shared: `new ScopedStore(etcd, { scope: '/local/h1', prefixes: ['/volumes/', ...] })`
// stores key `/volumes/p/v` as `/local/h1/volumes/p/v` and hands it back as `/volumes/p/v`, in
// get, list, put, delete, txn (compares and ops), watch and a lease's keys. Other keys pass through.
//
// A list or watch prefix under a mapped prefix maps; one that has nothing to do with them passes
// through; one that would span a mapped prefix and other keys (list('/')) is refused: its answer
// would have to merge two ranges read at one revision, which no caller needs.
//
// Closing the view ends its own watches and refuses later calls; the inner store stays open (it is
// the caller's, and other views or the cluster code may share it).
import { HfError } from '../core/errors.js';
import type { Compare, KvEntry, LeaseId, LeaseStatus, ListResult, PutOptions, StateStore, TxnOp, TxnResult, Watch, WatchEvent, WatchFailure, WatchOptions } from './store.js';

/** The per-host area of `host` in a cluster's store: its pools, volumes and image records live under it. */
export function hostScope(host: string): string {
  return `/local/${host}`;
}

export interface ScopedStoreOptions {
  /** The per-host area, e.g. '/local/h1' (starts with '/', no trailing '/'). */
  scope: string;
  /** Key prefixes stored in the area, e.g. ['/volumes/', '/images/'] (each starts with '/'). */
  prefixes: string[];
}

/** Code-point order, as the stores sort keys (JS's default sort compares UTF-16 code units). */
function byCodePoint(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

export class ScopedStore implements StateStore {
  private readonly scope: string;
  private readonly prefixes: readonly string[];
  private readonly watches = new Map<Watch, (f: WatchFailure) => void>();
  private closed = false;

  constructor(
    private readonly inner: StateStore,
    opts: ScopedStoreOptions,
  ) {
    if (!/^\/./.test(opts.scope) || opts.scope.endsWith('/')) {
      throw new HfError('HF_ERR_INTERNAL', `scoped store: scope ${JSON.stringify(opts.scope)} must start with '/' and not end with it`);
    }
    if (opts.prefixes.length === 0 || opts.prefixes.some((p) => !p.startsWith('/') || p.startsWith(`${opts.scope}/`))) {
      throw new HfError('HF_ERR_INTERNAL', `scoped store: prefixes ${JSON.stringify(opts.prefixes)} must start with '/' and lie outside the scope ${opts.scope}`);
    }
    this.scope = opts.scope;
    this.prefixes = [...opts.prefixes];
  }

  async get<T = unknown>(key: string): Promise<KvEntry<T> | undefined> {
    this.checkOpen();
    const e = await this.inner.get<T>(this.innerKey(key));
    return e === undefined ? undefined : { ...e, key };
  }

  async list<T = unknown>(prefix: string): Promise<ListResult<T>> {
    this.checkOpen();
    const mapped = this.mapsPrefix(prefix, 'list');
    const r = await this.inner.list<T>(mapped ? this.scope + prefix : prefix);
    if (!mapped) return r;
    return { entries: r.entries.map((e) => ({ ...e, key: e.key.slice(this.scope.length) })), revision: r.revision };
  }

  async put(key: string, value: unknown, opts?: PutOptions): Promise<number> {
    this.checkOpen();
    return this.inner.put(this.innerKey(key), value, opts);
  }

  async delete(key: string): Promise<boolean> {
    this.checkOpen();
    return this.inner.delete(this.innerKey(key));
  }

  async txn(compares: Compare[], ops: TxnOp[]): Promise<TxnResult> {
    this.checkOpen();
    return this.inner.txn(
      compares.map((c) => ({ ...c, key: this.innerKey(c.key) })),
      ops.map((op) => ({ ...op, key: this.innerKey(op.key) })),
    );
  }

  async revision(): Promise<number> {
    this.checkOpen();
    return this.inner.revision();
  }

  watch<T = unknown>(prefix: string, cb: (ev: WatchEvent<T>) => void, opts: WatchOptions = {}): Watch {
    const mapped = this.mapsPrefix(prefix, 'watch');
    const report =
      opts.onError ??
      ((f: WatchFailure) => {
        if (f.kind !== 'closed') process.stderr.write(JSON.stringify({ t: new Date().toISOString(), level: 'error', msg: 'state watch ended', prefix, kind: f.kind, error: f.error.message }) + '\n');
      });
    if (this.closed) {
      queueMicrotask(() => report({ kind: 'closed', error: this.closedError() }));
      return { cancel: () => undefined };
    }
    let ended = false;
    const end = (f: WatchFailure): void => {
      if (ended) return;
      ended = true;
      this.watches.delete(handle);
      report(f);
    };
    const w = this.inner.watch<T>(
      mapped ? this.scope + prefix : prefix,
      (ev) => {
        if (!ended) cb(mapped ? { ...ev, key: ev.key.slice(this.scope.length) } : ev);
      },
      { ...opts, onError: end },
    );
    const handle: Watch = {
      cancel: () => {
        ended = true;
        this.watches.delete(handle);
        w.cancel();
      },
    };
    this.watches.set(handle, (f) => {
      w.cancel();
      queueMicrotask(() => end(f));
    });
    return handle;
  }

  async grant(ttlSeconds: number): Promise<LeaseId> {
    this.checkOpen();
    return this.inner.grant(ttlSeconds);
  }

  async keepAlive(id: LeaseId): Promise<number> {
    this.checkOpen();
    return this.inner.keepAlive(id);
  }

  async revoke(id: LeaseId): Promise<void> {
    this.checkOpen();
    return this.inner.revoke(id);
  }

  async timeToLive(id: LeaseId): Promise<LeaseStatus | undefined> {
    this.checkOpen();
    const s = await this.inner.timeToLive(id);
    return s === undefined ? undefined : { ...s, keys: s.keys.map((k) => this.outerKey(k)).sort(byCodePoint) };
  }

  /** Ends this view's watches (with `closed`) and refuses later calls; the inner store stays open. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const failure: WatchFailure = { kind: 'closed', error: this.closedError() };
    for (const [, fail] of [...this.watches]) fail(failure);
    this.watches.clear();
  }

  // ---- internals ----

  private isMapped(key: string): boolean {
    return this.prefixes.some((p) => key.startsWith(p));
  }

  private innerKey(key: string): string {
    if (typeof key === 'string' && key.startsWith(`${this.scope}/`)) {
      throw new HfError('HF_ERR_VALIDATION', `state key ${key} lies in the per-host area ${this.scope}: use the key without it`);
    }
    return typeof key === 'string' && this.isMapped(key) ? this.scope + key : key;
  }

  /** The caller's key of a key in the inner store. */
  private outerKey(key: string): string {
    if (!key.startsWith(`${this.scope}/`)) return key;
    const rest = key.slice(this.scope.length);
    return this.isMapped(rest) ? rest : key;
  }

  /** True when `prefix` lies under a mapped prefix; refuses one that spans mapped and other keys. */
  private mapsPrefix(prefix: string, what: 'list' | 'watch'): boolean {
    if (typeof prefix !== 'string') throw new HfError('HF_ERR_VALIDATION', `${what} prefix must be a string`);
    if (this.isMapped(prefix)) return true;
    const spanned = this.prefixes.filter((p) => p.startsWith(prefix));
    if (spanned.length > 0) {
      throw new HfError(
        'HF_ERR_INTERNAL',
        `cannot ${what} ${JSON.stringify(prefix)} through the scoped store: it spans the per-host prefixes ${spanned.join(', ')} and shared keys; ${what} each prefix on its own`,
      );
    }
    return false;
  }

  private closedError(): HfError {
    return new HfError('HF_ERR_INTERNAL', `scoped state store ${this.scope} is closed`);
  }

  private checkOpen(): void {
    if (this.closed) throw this.closedError();
  }
}
