// Shared pools, this host's side. The records are the cluster's (`/shared/storage-pools/<name>`,
// outside the per-host scope, so every host reads the same ones); whether a host can use a pool is
// its own finding, which it records for every host to read (`/shared/storage-pool-hosts/<pool>/<host>`).
// A host checks a pool (storage/shared.ts: the marker at the pool's path carries the pool's id)
// when it starts, when a pool appears or is re-created, every half minute (a share mounted or lost
// meanwhile), and before every use; an answer is written only when it changes. Like a controller, a change in the pool records only wakes a pass that
// reads every pool and this host's answers and checks what has no current answer; passes never
// overlap (one running, at most one queued), so a missed or repeated event costs nothing.
import { HfError } from '../../core/errors.js';
import { Collection } from '../../state/collection.js';
import type { StateStore, TxnOp, Watch } from '../../state/store.js';
import type { StorageBackend } from '../../storage/backend.js';
import { poolAccessSchema, poolRecordSchema, type PoolAccess, type PoolRecord } from '../../storage/model.js';
import { judgeMarker, type AccessVerdict, type MarkerRead } from '../../storage/shared.js';
import type { Logger } from '../../util/log.js';
import type { EventBus } from '../events.js';

export const SHARED_POOLS_PREFIX = '/shared/storage-pools/';
const ACCESS_PREFIX = '/shared/storage-pool-hosts/';
/** A watch that ended (store disconnected, history compacted) is made again after this. */
const REWATCH_MS = 500;
/** Every shared pool is looked at again this often. */
const RECHECK_MS = 30_000;
/** A storage that has not answered a look at its marker in this long is unavailable (a hung mount). */
const ANSWER_MS = 10_000;

/** Where the volumes of a pool are recorded: the cluster's keys for a shared pool, this host's for a local one. */
export function volumesPrefix(pool: Pick<PoolRecord, 'name' | 'shared'>): string {
  return pool.shared ? `/shared/volumes/${pool.name}/` : `/volumes/${pool.name}/`;
}

export function accessKey(pool: string, host: string): string {
  return `${ACCESS_PREFIX}${pool}/${host}`;
}

export interface SharedPoolsDeps {
  store: StateStore;
  hostName: string;
  backend: (pool: PoolRecord) => StorageBackend;
  events: EventBus;
  log: Logger;
  /** How often every shared pool is checked again (default 30 s). */
  recheckMs?: number;
  /** How long a look at a pool's marker may take before the pool counts as unavailable (default 10 s). */
  answerMs?: number;
}

export class SharedPools {
  readonly records: Collection<PoolRecord>;
  private watch: Watch | undefined;
  private rewatchTimer: NodeJS.Timeout | undefined;
  private recheckTimer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private queued: Promise<void> | undefined;
  private queuedAll = false;
  private closed = false;
  /** Marker reads still under way, by pool path: a hung mount ties up one I/O thread, not one per check. */
  private readonly reads = new Map<string, Promise<MarkerRead>>();

  constructor(private readonly d: SharedPoolsDeps) {
    this.records = new Collection<PoolRecord>(d.store, SHARED_POOLS_PREFIX, poolRecordSchema);
  }

  private access(pool: string): Collection<PoolAccess> {
    return new Collection<PoolAccess>(this.d.store, `${ACCESS_PREFIX}${pool}/`, poolAccessSchema);
  }

  /** Checks every shared pool now (a restart may find other mounts), then follows the records. */
  async start(): Promise<void> {
    this.follow();
    this.running = this.pass(true);
    await this.running.catch((e: unknown) => this.d.log.warn('shared pools: check failed', { error: (e as Error).message }));
    this.recheckTimer = setInterval(() => void this.kick(true), this.d.recheckMs ?? RECHECK_MS);
    this.recheckTimer.unref();
  }

  /** Stops following; a pass under way finishes. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.rewatchTimer) clearTimeout(this.rewatchTimer);
    if (this.recheckTimer) clearInterval(this.recheckTimer);
    this.watch?.cancel();
    this.watch = undefined;
    await this.queued?.catch(() => undefined);
    await this.running?.catch(() => undefined);
  }

  /**
   * Looks at the pool's storage from this host now and records the answer (when it changed).
   * A pool that is this host's storage is prepared too (its directories).
   */
  async check(pool: PoolRecord): Promise<AccessVerdict> {
    const b = this.d.backend(pool);
    let v = judgeMarker(pool, await this.readMarker(pool, b));
    if (v.available) {
      try {
        await b.init();
      } catch (e) {
        v = { available: false, reason: (e as Error).message };
      }
    }
    await this.record(pool, v);
    return v;
  }

  /** Throws HF_ERR_POOL_UNAVAILABLE (naming this host and why) unless this host can use the pool now. */
  async require(pool: PoolRecord): Promise<void> {
    const v = await this.check(pool);
    if (!v.available) {
      throw new HfError('HF_ERR_POOL_UNAVAILABLE', `shared storage pool ${pool.name} is not available on host ${this.d.hostName}: ${v.reason}`, {
        details: { pool: pool.name, host: this.d.hostName, reason: v.reason },
      });
    }
  }

  /** Every host's last answer about this pool (answers about an earlier pool of the same name left out). */
  async hosts(pool: PoolRecord): Promise<PoolAccess[]> {
    return (await this.access(pool.name).list()).map((a) => a.value).filter((a) => a.poolId === pool.id);
  }

  /** The delete ops of every host's answer about a pool (they go with the pool record, in one transaction). */
  async forgetOps(pool: string): Promise<TxnOp[]> {
    const { entries } = await this.d.store.list(`${ACCESS_PREFIX}${pool}/`);
    return entries.map((e) => ({ type: 'delete', key: e.key }));
  }

  /** Drops a removed host's answers. */
  async forgetHost(host: string): Promise<void> {
    const { entries } = await this.d.store.list(ACCESS_PREFIX);
    for (const e of entries) if (e.key.endsWith(`/${host}`)) await this.d.store.delete(e.key);
  }

  /** The record of this host's answer for a new pool it creates (written with the pool record). */
  firstAnswer(pool: PoolRecord): { key: string; value: PoolAccess } {
    return { key: accessKey(pool.name, this.d.hostName), value: poolAccessSchema.parse({ pool: pool.name, host: this.d.hostName, poolId: pool.id, available: true, since: new Date().toISOString() }) };
  }

  // ---- internals ----

  /** The backend's marker read, bounded in time; a read that has not ended is waited for again, not repeated. */
  private async readMarker(pool: PoolRecord, b: StorageBackend): Promise<MarkerRead> {
    let read = this.reads.get(pool.path);
    if (!read) {
      read = b.readMarker().finally(() => this.reads.delete(pool.path));
      this.reads.set(pool.path, read);
    }
    const ms = this.d.answerMs ?? ANSWER_MS;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<MarkerRead>((resolve) => {
      timer = setTimeout(() => resolve({ kind: 'error', message: `the storage did not answer within ${ms / 1000} s (a hung mount?)` }), ms);
    });
    try {
      return await Promise.race([read, late]);
    } finally {
      clearTimeout(timer);
    }
  }

  private async record(pool: PoolRecord, v: AccessVerdict): Promise<void> {
    if (!pool.id) return;
    const col = this.access(pool.name);
    const cur = (await col.get(this.d.hostName))?.value;
    if (cur && cur.poolId === pool.id && cur.available === v.available && cur.reason === v.reason) return;
    const rec = poolAccessSchema.parse({ pool: pool.name, host: this.d.hostName, poolId: pool.id, available: v.available, ...(v.reason ? { reason: v.reason } : {}), since: new Date().toISOString() });
    // Only while the pool exists: a check that races the pool's delete leaves no answer behind.
    const r = await this.d.store.txn([{ key: SHARED_POOLS_PREFIX + pool.name, exists: true }], [{ type: 'put', key: accessKey(pool.name, this.d.hostName), value: rec }]);
    if (!r.succeeded) return;
    if (v.available) this.d.log.info('shared storage pool available', { pool: pool.name, path: pool.path });
    else this.d.log.warn('shared storage pool unavailable on this host', { pool: pool.name, path: pool.path, reason: v.reason });
    this.d.events.publish('storage.pool.access', { pool: pool.name, host: this.d.hostName, available: v.available, ...(v.reason ? { reason: v.reason } : {}) });
  }

  private follow(): void {
    if (this.closed) return;
    this.watch = this.d.store.watch(SHARED_POOLS_PREFIX, () => void this.kick(), {
      onError: (f) => {
        if (this.closed || f.kind === 'closed') return;
        this.d.log.warn('shared pools: store watch ended, watching again', { reason: f.kind });
        // Watch again from "now" and check everything: nothing missed is lost.
        this.rewatchTimer = setTimeout(() => {
          this.follow();
          void this.kick();
        }, REWATCH_MS);
        this.rewatchTimer.unref();
      },
    });
  }

  /** Asks for a pass (`all`: over every pool); calls during a pass share the one queued after it. Never rejects. */
  private kick(all = false): Promise<void> {
    if (this.queued) {
      this.queuedAll ||= all;
      return this.queued;
    }
    this.queuedAll = all;
    const next = (async () => {
      await this.running?.catch(() => undefined);
      this.queued = undefined;
      if (this.closed) return;
      this.running = this.pass(this.queuedAll);
      await this.running.catch((e: unknown) => this.d.log.warn('shared pools: check failed', { error: (e as Error).message }));
    })();
    this.queued = next;
    return next;
  }

  /** Checks every shared pool (`all`), or those this host has no answer about for their current id. */
  private async pass(all = false): Promise<void> {
    for (const { value: pool } of await this.records.list()) {
      if (!all && (await this.access(pool.name).get(this.d.hostName))?.value.poolId === pool.id) continue;
      await this.check(pool);
    }
  }
}
