// The etcd implementation of StateStore, for clusters: every host's daemon talks to the same
// etcd, through the `etcd3` gRPC client.
//
// Mapping: store revisions are etcd revisions, txn is an etcd Txn, leases are etcd leases (the
// id as a decimal string), values are JSON text. All keys live under the store's namespace
// (`prefix`, trailing slashes dropped): key `/instances/a` of a store with prefix `/hyperfold/`
// is etcd key `/hyperfold/instances/a`. Callers never see the namespace; with one, keys and
// list/watch prefixes must start with '/' (so that one namespace's range cannot reach into a
// neighbour's like `/hyperfold2/...`), and the prefix '' means the whole namespace.
//
// Failures: every call has a short deadline (callTimeoutMs), so a dead or leaderless etcd fails
// a call in a few seconds with HF_ERR_CLUSTER_UNAVAILABLE, reads included (callers with a cache
// serve it stale). isAvailable()/onAvailability() follow the outcome of the latest call, and a
// probe (a linearizable read every probeIntervalMs) notices a change when nobody calls. Which
// failures are retried, and where, is explained in etcd-client.ts.
//
// Watches (etcd-watch.ts) reconnect by themselves and resume after the last event they
// delivered; a watch without fromRevision starts after the newest revision this client has seen
// (from any call or probe), so nothing committed after the watch() call is missed, and changes
// made by others shortly before it (up to one probe interval) may be delivered too.
import { CompareResult, CompareTarget, type Etcd3, type ICompare, type IKeyValue, type IRequestOp, type IResponseHeader, type KVClient } from 'etcd3';
import { HfError } from '../core/errors.js';
import { EtcdWatch, dropStream } from './etcd-watch.js';
import { checkEndpoints, isCompactedError, isConnectionError, isFutureRevisionError, isLeaseNotFound, isNotDelivered, makeClient, unavailable, type EtcdTls } from './etcd-client.js';
import { checkTtl, leaseNotFound } from './sqlite-leases.js';
import { prepareCompare } from './sqlite-schema.js';
import { checkKey, errMessage, fromJson, toJson } from './sqlite-values.js';
import type { Compare, KvEntry, LeaseId, LeaseStatus, ListResult, PutOptions, StateStore, TxnOp, TxnResult, Watch, WatchEvent, WatchOptions } from './store.js';

export type { EtcdTls } from './etcd-client.js';

export interface EtcdStoreOptions {
  /** Client URLs of the members, `http://host:port` (`https://` with `tls`). */
  endpoints: string[];
  tls?: EtcdTls;
  /** Namespace every key is stored under, e.g. '/hyperfold/' (default: none). */
  prefix?: string;
  /** How long open() waits for etcd to answer (default 5,000 ms). */
  dialTimeoutMs?: number;
  /** Deadline of each call, retries included (default 2,500 ms). */
  callTimeoutMs?: number;
  /** How often a probe checks that etcd answers (default 1,000 ms; 0: no probe). */
  probeIntervalMs?: number;
  /** Ping period that finds a dead connection (default 10,000 ms; see makeClient). */
  keepaliveMs?: number;
  /** Called when a watch callback throws (or its promise rejects). Default: a JSON line on stderr. */
  onWatcherError?: (err: unknown, ev: WatchEvent) => void;
}

/** Entries per page of a list (all pages read at the first page's revision). */
const LIST_PAGE = 1_000;
/** A list whose pinned revision gets compacted away half-way starts again, this many times. */
const LIST_ATTEMPTS = 3;
/** The largest etcd lease id (int64). */
const MAX_LEASE_ID = 2n ** 63n - 1n;

function logLine(fields: Record<string, unknown>): void {
  process.stderr.write(JSON.stringify({ t: new Date().toISOString(), ...fields }) + '\n');
}

/** The end of etcd's key range of every key starting with `prefix` (its last byte below 0xff incremented). */
function prefixEnd(prefix: Buffer): Buffer {
  for (let i = prefix.length - 1; i >= 0; i--) {
    if ((prefix[i] as number) < 0xff) {
      const end = Buffer.from(prefix.subarray(0, i + 1));
      end[i] = (prefix[i] as number) + 1;
      return end;
    }
  }
  return Buffer.from([0]); // no upper bound: to the end of the key space
}

/** The lease id as etcd takes it; HF_ERR_LEASE_NOT_FOUND when it cannot name a lease. */
function leaseArg(id: LeaseId): string {
  if (typeof id !== 'string' || !/^[1-9][0-9]{0,18}$/.test(id) || BigInt(id) > MAX_LEASE_ID) throw leaseNotFound(id);
  return id;
}

type Kind = 'read' | 'write';
/** gRPC call options (a deadline), as the etcd3 client's calls take them. */
type CallOptions = NonNullable<Parameters<KVClient['range']>[1]>;

/** How long a client replaced by setEndpoints() stays open for the calls and watch streams still on it. */
const RETIRE_MS = 30_000;

export class EtcdStateStore implements StateStore {
  private etcd: Etcd3;
  private endpoints: string[];
  private readonly tls: EtcdTls | undefined;
  private readonly keepaliveMs: number | undefined;
  /** Clients replaced by setEndpoints(), closed after RETIRE_MS (or with the store). */
  private readonly retired = new Map<Etcd3, NodeJS.Timeout>();
  /** The namespace as a key prefix ('' when none). */
  private readonly ns: string;
  private readonly callTimeoutMs: number;
  private readonly onWatcherError: (err: unknown, ev: WatchEvent) => void;
  private readonly watches = new Set<EtcdWatch>();
  private readonly listeners = new Set<(up: boolean) => void>();
  private available = true;
  /** The newest etcd revision any response showed: where a watch without fromRevision starts after. */
  private lastSeen = 0;
  private probe: NodeJS.Timeout | undefined;
  private probing = false;
  private closed = false;

  /** Connects and checks that etcd answers; HF_ERR_CLUSTER_UNAVAILABLE naming the endpoints when not. */
  static async open(opts: EtcdStoreOptions): Promise<EtcdStateStore> {
    const endpoints = checkEndpoints(opts.endpoints, opts.tls !== undefined);
    const prefix = opts.prefix ?? '';
    if (typeof prefix !== 'string' || (prefix !== '' && !prefix.startsWith('/'))) {
      throw new HfError('HF_ERR_VALIDATION', `etcd store prefix ${JSON.stringify(prefix)} must be empty or start with '/'`);
    }
    const store = new EtcdStateStore(makeClient(endpoints, opts.tls, opts.keepaliveMs), endpoints, prefix.replace(/\/+$/, ''), opts);
    try {
      await store.revisionWithin(opts.dialTimeoutMs ?? 5_000);
    } catch (e) {
      await store.close();
      throw new HfError('HF_ERR_CLUSTER_UNAVAILABLE', `cannot reach etcd at ${endpoints.join(', ')}: ${errMessage(e)}`, { cause: e, details: { endpoints } });
    }
    store.startProbe(opts.probeIntervalMs ?? 1_000);
    return store;
  }

  private constructor(etcd: Etcd3, endpoints: string[], ns: string, opts: EtcdStoreOptions) {
    this.etcd = etcd;
    this.endpoints = endpoints;
    this.tls = opts.tls;
    this.keepaliveMs = opts.keepaliveMs;
    this.ns = ns;
    this.callTimeoutMs = opts.callTimeoutMs ?? 2_500;
    this.onWatcherError =
      opts.onWatcherError ?? ((err, ev) => logLine({ level: 'error', msg: 'state watcher threw', key: ev.key, revision: ev.modRevision, error: errMessage(err) }));
  }

  /** The etcd client, for the cluster code (membership, maintenance). Closed with the store; ask again after setEndpoints(). */
  get client(): Etcd3 {
    return this.etcd;
  }

  /** The member URLs the store reaches. */
  get urls(): string[] {
    return [...this.endpoints];
  }

  /**
   * Reaches etcd through these members from now on (members were added or removed). Calls made
   * from here use a new client; the old one stays open for a while for what is still on it, so
   * its watch streams end then and resume on the new client from their last revision.
   */
  setEndpoints(urls: string[]): void {
    if (this.closed) return;
    const endpoints = checkEndpoints(urls, this.tls !== undefined);
    if (endpoints.length === this.endpoints.length && endpoints.every((u) => this.endpoints.includes(u))) return;
    const old = this.etcd;
    this.etcd = makeClient(endpoints, this.tls, this.keepaliveMs);
    this.endpoints = endpoints;
    const timer = setTimeout(() => {
      this.retired.delete(old);
      old.close();
    }, RETIRE_MS);
    timer.unref();
    this.retired.set(old, timer);
  }

  /** Whether the latest call (or probe) reached etcd. */
  isAvailable(): boolean {
    return this.available;
  }

  /** Calls `cb` on every change of isAvailable(); returns the unsubscribe function. */
  onAvailability(cb: (up: boolean) => void): () => void {
    this.listeners.add(cb);
    return () => this.listeners.delete(cb);
  }

  async get<T = unknown>(key: string): Promise<KvEntry<T> | undefined> {
    const k = this.etcdKey(key);
    const r = await this.call(`get ${key}`, 'read', (o) => this.etcd.kv.range({ key: k }, o));
    const kv = r.kvs[0];
    return kv === undefined ? undefined : this.entry<T>(kv);
  }

  async list<T = unknown>(prefix: string): Promise<ListResult<T>> {
    const start = this.etcdPrefix(prefix);
    const end = prefixEnd(start);
    for (let attempt = 1; ; attempt++) {
      const entries: KvEntry<T>[] = [];
      let revision = 0;
      let from = start;
      try {
        for (;;) {
          const page = await this.call(`list ${prefix}`, 'read', (o) =>
            this.etcd.kv.range({ key: from, range_end: end, limit: LIST_PAGE, ...(revision > 0 && { revision }) }, o),
          );
          if (revision === 0) revision = Number(page.header.revision);
          for (const kv of page.kvs) entries.push(this.entry<T>(kv));
          const last = page.kvs[page.kvs.length - 1];
          if (!page.more || last === undefined) return { entries, revision };
          from = Buffer.concat([last.key, Buffer.from([0])]);
        }
      } catch (e) {
        if (!isCompactedError(e) || attempt >= LIST_ATTEMPTS) throw e;
      }
    }
  }

  async put(key: string, value: unknown, opts: PutOptions = {}): Promise<number> {
    const k = this.etcdKey(key);
    const json = toJson(key, value);
    const lease = opts.lease === undefined ? undefined : leaseArg(opts.lease);
    const r = await this.call(`put ${key}`, 'write', (o) => this.etcd.kv.put({ key: k, value: Buffer.from(json), ...(lease !== undefined && { lease }) }, o), lease);
    return Number(r.header.revision);
  }

  async delete(key: string): Promise<boolean> {
    const k = this.etcdKey(key);
    const r = await this.call(`delete ${key}`, 'write', (o) => this.etcd.kv.deleteRange({ key: k }, o));
    return Number(r.deleted) > 0;
  }

  async txn(compares: Compare[], ops: TxnOp[]): Promise<TxnResult> {
    const compare = compares.map((c): ICompare => {
      const p = prepareCompare(c);
      const key = this.etcdKey(p.key);
      switch (p.target) {
        case 'modRevision':
          return { key, target: CompareTarget.Mod, result: CompareResult.Equal, mod_revision: p.n };
        case 'createRevision':
          return { key, target: CompareTarget.Create, result: CompareResult.Equal, create_revision: p.n };
        case 'version':
          return { key, target: CompareTarget.Version, result: CompareResult.Equal, version: p.n };
        case 'exists':
          return { key, target: CompareTarget.Create, result: p.exists ? CompareResult.Greater : CompareResult.Equal, create_revision: 0 };
        case 'value':
          // etcd never holds a value compare on a missing key, as the contract wants.
          return { key, target: CompareTarget.Value, result: CompareResult.Equal, value: Buffer.from(p.json) };
      }
    });
    const seen = new Set<string>();
    let lease: string | undefined;
    const success = ops.map((op): IRequestOp => {
      const key = this.etcdKey(op.key);
      if (seen.has(op.key)) throw new HfError('HF_ERR_VALIDATION', `state key ${op.key} appears more than once in one transaction`);
      seen.add(op.key);
      if (op.type === 'delete') return { request_delete_range: { key } };
      if (op.type !== 'put') throw new HfError('HF_ERR_VALIDATION', `unknown transaction op type ${String((op as { type: unknown }).type)}`);
      const value = Buffer.from(toJson(op.key, op.value));
      if (op.lease === undefined) return { request_put: { key, value } };
      lease = leaseArg(op.lease);
      return { request_put: { key, value, lease } };
    });
    const r = await this.call('txn', 'write', (o) => this.etcd.kv.txn({ compare, success, failure: [] }, o), lease);
    return { succeeded: r.succeeded, revision: Number(r.header.revision) };
  }

  async revision(): Promise<number> {
    return this.revisionWithin(this.callTimeoutMs);
  }

  /**
   * Drops etcd's history before `revision` (etcd's Compact, waiting until it is done): watches
   * from an older revision then fail with `compacted`. At or below the current compact revision
   * it changes nothing; above the store's revision it is refused.
   */
  async compact(revision: number): Promise<void> {
    if (!Number.isInteger(revision) || revision < 0) throw new HfError('HF_ERR_VALIDATION', `cannot compact to revision ${revision}`);
    if (revision === 0) return;
    try {
      await this.call(`compact ${revision}`, 'write', (o) => this.etcd.kv.compact({ revision, physical: true }, o));
    } catch (e) {
      if (isCompactedError(e)) return;
      if (isFutureRevisionError(e)) throw new HfError('HF_ERR_VALIDATION', `cannot compact to revision ${revision}: it is newer than the store's`, { cause: e });
      throw e;
    }
  }

  watch<T = unknown>(prefix: string, cb: (ev: WatchEvent<T>) => void, opts: WatchOptions = {}): Watch {
    if (typeof prefix !== 'string') throw new HfError('HF_ERR_VALIDATION', 'watch prefix must be a string');
    const from = opts.fromRevision;
    if (from !== undefined && (!Number.isInteger(from) || from < 0)) {
      throw new HfError('HF_ERR_VALIDATION', `watch fromRevision must be a non-negative integer, got ${from}`);
    }
    const key = this.etcdPrefix(prefix);
    const onError =
      opts.onError ??
      ((f) => {
        if (f.kind !== 'closed') logLine({ level: 'error', msg: 'state watch ended', prefix, kind: f.kind, error: f.error.message });
      });
    const w = new EtcdWatch(
      {
        open: () => this.etcd.watchClient.watch(),
        key,
        rangeEnd: prefixEnd(key),
        storeKey: (k) => this.storeKey(k),
        cb: cb as (ev: WatchEvent) => void,
        onError,
        onWatcherError: this.onWatcherError,
        onDisconnect: (err) => logLine({ level: 'warn', msg: 'state watch disconnected; resuming', prefix, error: errMessage(err) }),
        onEnd: (ended) => this.watches.delete(ended),
      },
      // etcd's revisions start at 1; its start_revision 0 would mean "from now".
      from === undefined ? this.lastSeen + 1 : Math.max(1, from),
      prefix,
    );
    if (this.closed) {
      w.fail({ kind: 'closed', error: this.closedError() });
    } else {
      this.watches.add(w);
      w.start();
    }
    return w;
  }

  async grant(ttlSeconds: number): Promise<LeaseId> {
    checkTtl(ttlSeconds);
    const r = await this.call('lease grant', 'write', (o) => this.etcd.leaseClient.leaseGrant({ TTL: ttlSeconds, ID: 0 }, o));
    if (r.error) throw new HfError('HF_ERR_INTERNAL', `etcd refused a lease of ${ttlSeconds} s: ${r.error}`);
    return String(r.ID);
  }

  async keepAlive(id: LeaseId): Promise<number> {
    const ID = leaseArg(id);
    const r = await this.call(`keep-alive of lease ${id}`, 'read', (o) => this.keepAliveOnce(ID, o), id);
    const ttl = Number(r.TTL);
    if (!(ttl > 0)) throw leaseNotFound(id);
    return ttl;
  }

  async revoke(id: LeaseId): Promise<void> {
    const ID = leaseArg(id);
    await this.call(`revoke of lease ${id}`, 'write', (o) => this.etcd.leaseClient.leaseRevoke({ ID }, o), id);
  }

  async timeToLive(id: LeaseId): Promise<LeaseStatus | undefined> {
    let ID: string;
    try {
      ID = leaseArg(id);
    } catch {
      return undefined;
    }
    const r = await this.call(`time-to-live of lease ${id}`, 'read', (o) => this.etcd.leaseClient.leaseTimeToLive({ ID, keys: true }, o));
    const ttl = Number(r.TTL);
    if (!(ttl > 0)) return undefined; // -1: expired or never granted
    const mine = Buffer.from(this.ns === '' ? '' : `${this.ns}/`);
    const keys = r.keys
      .filter((k) => k.subarray(0, mine.length).equals(mine))
      .sort(Buffer.compare)
      .map((k) => this.storeKey(k));
    return { id, ttl, grantedTtl: Number(r.grantedTTL), keys };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.probe);
    for (const w of [...this.watches]) w.fail({ kind: 'closed', error: this.closedError() });
    this.listeners.clear();
    for (const [old, timer] of this.retired) {
      clearTimeout(timer);
      old.close();
    }
    this.retired.clear();
    this.etcd.close();
  }

  // ---- internals ----

  /**
   * Runs one etcd call with a deadline of `timeoutMs` for all its attempts. A read is tried again
   * (on another member when there is one) after any connection failure, a write only when it
   * never reached etcd. A connection failure at the end is HF_ERR_CLUSTER_UNAVAILABLE; an unknown
   * lease (when the call names `lease`) HF_ERR_LEASE_NOT_FOUND; anything else HF_ERR_INTERNAL.
   */
  private async call<R extends { header?: IResponseHeader }>(
    what: string,
    kind: Kind,
    fn: (opts: CallOptions) => Promise<R>,
    lease?: LeaseId,
    timeoutMs = this.callTimeoutMs,
  ): Promise<R> {
    this.checkOpen();
    const deadline = Date.now() + timeoutMs;
    for (let attempt = 1; ; attempt++) {
      try {
        const r = await fn({ deadline });
        if (r.header !== undefined) this.lastSeen = Math.max(this.lastSeen, Number(r.header.revision));
        this.setAvailable(true);
        return r;
      } catch (e) {
        if (this.closed) throw this.closedError();
        const again = kind === 'read' ? isConnectionError(e) : isNotDelivered(e);
        if (again && attempt < this.endpoints.length && Date.now() < deadline) continue;
        if (isConnectionError(e)) {
          this.setAvailable(false);
          throw unavailable(this.endpoints, what, e);
        }
        this.setAvailable(true);
        if (lease !== undefined && isLeaseNotFound(e)) throw leaseNotFound(lease);
        throw this.unexpected(what, e);
      }
    }
  }

  private async revisionWithin(timeoutMs: number): Promise<number> {
    const key = Buffer.from(this.ns === '' ? '/' : this.ns);
    const r = await this.call('revision', 'read', (o) => this.etcd.kv.range({ key, count_only: true }, o), undefined, timeoutMs);
    return Number(r.header.revision);
  }

  /** One renewal through a keep-alive stream of its own (the response's TTL is 0 for an unknown lease). */
  private async keepAliveOnce(ID: string, opts: CallOptions): Promise<{ TTL: string; header: IResponseHeader }> {
    const stream = await this.etcd.leaseClient.leaseKeepAlive(opts);
    try {
      return await new Promise((resolve, reject) => {
        stream.on('data', resolve);
        stream.on('error', reject);
        stream.on('end', () => reject(new Error('the keep-alive stream ended without an answer')));
        stream.write({ ID });
      });
    } finally {
      dropStream(stream);
    }
  }

  private startProbe(everyMs: number): void {
    if (everyMs <= 0) return;
    this.probe = setInterval(() => {
      if (this.probing || this.closed) return;
      this.probing = true;
      this.revision()
        .catch(() => undefined) // call() has recorded the outcome
        .finally(() => (this.probing = false));
    }, everyMs);
    this.probe.unref();
  }

  private setAvailable(up: boolean): void {
    if (this.available === up || this.closed) return;
    this.available = up;
    for (const cb of [...this.listeners]) {
      try {
        cb(up);
      } catch (e) {
        logLine({ level: 'error', msg: 'availability listener threw', error: errMessage(e) });
      }
    }
  }

  /** A failure that is not about reaching etcd: what etcd said, as HF_ERR_INTERNAL. */
  private unexpected(what: string, e: unknown): HfError {
    if (e instanceof HfError) return e;
    if (isCompactedError(e)) return new HfError('HF_ERR_STATE_COMPACTED', `etcd ${what}: ${errMessage(e)}`, { cause: e });
    return new HfError('HF_ERR_INTERNAL', `etcd ${what}: ${errMessage(e)}`, { cause: e });
  }

  private etcdKey(key: string): Buffer {
    checkKey(key);
    if (this.ns !== '' && !key.startsWith('/')) throw new HfError('HF_ERR_VALIDATION', `state key ${JSON.stringify(key)} must start with '/'`);
    return Buffer.from(this.ns + key);
  }

  private etcdPrefix(prefix: string): Buffer {
    if (typeof prefix !== 'string') throw new HfError('HF_ERR_VALIDATION', 'state key prefix must be a string');
    if (this.ns === '') return Buffer.from(prefix);
    if (prefix === '') return Buffer.from(`${this.ns}/`);
    if (!prefix.startsWith('/')) throw new HfError('HF_ERR_VALIDATION', `state key prefix ${JSON.stringify(prefix)} must start with '/'`);
    return Buffer.from(this.ns + prefix);
  }

  private storeKey(key: Buffer): string {
    return key.toString('utf8').slice(this.ns.length);
  }

  private entry<T>(kv: IKeyValue): KvEntry<T> {
    const key = this.storeKey(kv.key);
    const e: KvEntry<T> = {
      key,
      value: fromJson<T>(key, kv.value.toString('utf8')),
      createRevision: Number(kv.create_revision),
      modRevision: Number(kv.mod_revision),
      version: Number(kv.version),
    };
    if (kv.lease !== '0' && kv.lease !== '') e.lease = String(kv.lease);
    return e;
  }

  private closedError(): HfError {
    return new HfError('HF_ERR_INTERNAL', `state store on etcd ${this.endpoints.join(', ')} is closed`);
  }

  private checkOpen(): void {
    if (this.closed) throw this.closedError();
  }
}
