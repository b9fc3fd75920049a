// The members of a cluster and whether each is alive. Every host keeps a member record
// (`/cluster/members/<host>`: address, ports, capacity, versions, maintenance) and a heartbeat key
// (`/cluster/alive/<host>`) on an etcd lease it renews: when the lease expires the key vanishes
// and every other host sees that host offline, at once, through its watch. Both prefixes are
// kept in local caches, so "is host X online?" is a memory read on every request.
import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import type { Instance } from '../../core/model/instance.js';
import type { HostState, HostView } from '../../core/model/cluster.js';

export type { HostState, HostView };
import { isActive } from '../../core/lifecycle.js';
import { CachedCollection } from '../../state/cached-collection.js';
import { Collection } from '../../state/collection.js';
import type { LeaseId, StateStore, Watch } from '../../state/store.js';
import type { Logger } from '../../util/log.js';

export const memberSchema = z.object({
  name: z.string(),
  address: z.string(),
  clusterPort: z.number().int(),
  /** The member runs an etcd member (the first three do): its client and peer URLs. */
  etcd: z.object({ clientUrl: z.string(), peerUrl: z.string() }).optional(),
  cpus: z.number().int(),
  memoryMiB: z.number().int(),
  overcommit: z.object({ cpu: z.number(), memory: z.number() }),
  version: z.string(),
  qemuVersion: z.string().optional(),
  maintenance: z.boolean().default(false),
  joinedAt: z.string(),
});
export type Member = z.infer<typeof memberSchema>;

export const aliveSchema = z.object({
  host: z.string(),
  at: z.string(),
  memoryUsedMiB: z.number(),
  loadavg: z.number(),
});
export type Alive = z.infer<typeof aliveSchema>;

/** offline without a heartbeat (or a record); maintenance when a user flagged it; online otherwise. */
function hostState(m: Member | undefined, alive: boolean): HostState {
  if (!m || !alive) return 'offline';
  return m.maintenance ? 'maintenance' : 'online';
}

export interface MembersOptions {
  store: StateStore;
  hostName: string;
  leaseTtl: number;
  log: Logger;
  /** This host's record as it is now (capacity and versions are refreshed at every start). */
  self: () => Promise<Omit<Member, 'maintenance' | 'joinedAt'>>;
  usage: () => Alive;
}

export class ClusterMembers {
  readonly members: CachedCollection<Member>;
  readonly alive: CachedCollection<Alive>;
  private lease: LeaseId | undefined;
  private timer: NodeJS.Timeout | undefined;
  private beating: Promise<void> | undefined;
  private closed = false;

  constructor(private readonly o: MembersOptions) {
    const onListError = (e: unknown) => o.log.warn('cluster records: list failed, retrying', { error: (e as Error).message });
    this.members = new CachedCollection(new Collection(o.store, '/cluster/members/', memberSchema), { onListError });
    this.alive = new CachedCollection(new Collection(o.store, '/cluster/alive/', aliveSchema), { onListError });
  }

  /** Registers this host (keeping its maintenance flag and join time) and starts its heartbeat. */
  async start(): Promise<void> {
    await Promise.all([this.members.start(), this.alive.start()]);
    const self = await this.o.self();
    const prev = (await this.members.source.get(this.o.hostName))?.value;
    await this.o.store.put(`/cluster/members/${this.o.hostName}`, { ...self, maintenance: prev?.maintenance ?? false, joinedAt: prev?.joinedAt ?? new Date().toISOString() } satisfies Member);
    await this.beat();
    const every = Math.max(250, Math.floor((this.o.leaseTtl * 1000) / 3));
    this.timer = setInterval(() => void this.beat(), every);
    this.timer.unref();
  }

  /**
   * One heartbeat: renews the lease (a new one when it expired, e.g. after etcd was unreachable
   * for longer than the TTL) and rewrites the alive key with the host's usage and the time.
   */
  beat(): Promise<void> {
    this.beating ??= (async () => {
      try {
        if (this.lease) {
          try {
            await this.o.store.keepAlive(this.lease);
          } catch (e) {
            if ((e as HfError).code !== 'HF_ERR_LEASE_NOT_FOUND') throw e;
            this.lease = undefined;
          }
        }
        this.lease ??= await this.o.store.grant(this.o.leaseTtl);
        if (this.closed) return;
        await this.o.store.put(`/cluster/alive/${this.o.hostName}`, this.o.usage(), { lease: this.lease });
      } catch (e) {
        this.o.log.warn('heartbeat failed', { error: (e as Error).message });
      } finally {
        this.beating = undefined;
      }
    })();
    return this.beating;
  }

  async close(opts: { leave?: boolean } = {}): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    await this.beating;
    // A daemon that stops is offline at once (its guests keep running); a crash waits for the TTL.
    if (this.lease && opts.leave !== false) await this.o.store.revoke(this.lease).catch(() => undefined);
    this.members.close();
    this.alive.close();
  }

  /**
   * Calls `cb` when the set of members or of online hosts changes (a join, a removal, a host going
   * offline or coming back), not at every heartbeat. Returns the unsubscribe.
   */
  onChange(cb: () => void): () => void {
    let stopped = false;
    let w: Watch | undefined;
    const online = new Set<string>();
    const follow = () => {
      w = this.o.store.watch(
        '/cluster/',
        (ev) => {
          if (ev.key.startsWith('/cluster/members/')) return cb();
          if (!ev.key.startsWith('/cluster/alive/')) return;
          const host = ev.key.slice('/cluster/alive/'.length);
          if (ev.type === 'put' && !online.has(host)) {
            online.add(host);
            cb();
          } else if (ev.type === 'delete' && online.delete(host)) cb();
        },
        {
          // A watch that ended (compaction, closed store) starts again; what it missed is a change.
          onError: (f) => {
            if (stopped || f.kind === 'closed') return;
            setTimeout(() => {
              if (stopped) return;
              follow();
              cb();
            }, 500).unref();
          },
        },
      );
    };
    void this.alive.list().then((all) => {
      for (const a of all) online.add(a.value.host);
    });
    follow();
    return () => {
      stopped = true;
      w?.cancel();
    };
  }

  /** Online members other than this host, with their addresses (the VXLAN peers). */
  async onlinePeers(): Promise<{ host: string; address: string }[]> {
    const out: { host: string; address: string }[] = [];
    for (const m of await this.list()) if (m.name !== this.o.hostName && (await this.isOnline(m.name))) out.push({ host: m.name, address: m.address });
    return out;
  }

  async list(): Promise<Member[]> {
    return (await this.members.list()).map((m) => m.value);
  }

  async get(name: string): Promise<Member | undefined> {
    return (await this.members.get(name))?.value;
  }

  async getOrThrow(name: string): Promise<Member> {
    const m = await this.get(name);
    if (!m) throw new HfError('HF_ERR_HOST_NOT_FOUND', `host ${name} is not a member of this cluster`);
    return m;
  }

  /** online: heartbeat present; maintenance: flagged by a user (and alive); offline otherwise. */
  async stateOf(name: string): Promise<HostState> {
    const [m, a] = await Promise.all([this.members.get(name), this.alive.get(name)]);
    return hostState(m?.value, a !== undefined);
  }

  async isOnline(name: string): Promise<boolean> {
    return (await this.alive.get(name)) !== undefined;
  }

  /** Every member with its state, capacity, what its active instances hold, and its last heartbeat. */
  async views(instances: Instance[]): Promise<HostView[]> {
    const [members, alive] = await Promise.all([this.members.list(), this.alive.list()]);
    const aliveBy = new Map<string, Alive>();
    for (const a of alive) aliveBy.set(a.value.host, a.value);
    return members.map(({ value: m }) => {
      const mine = instances.filter((i) => i.host === m.name);
      const active = mine.filter((i) => isActive(i.state));
      const a = aliveBy.get(m.name);
      const view: HostView = {
        name: m.name,
        state: hostState(m, a !== undefined),
        address: m.address,
        etcdMember: m.etcd !== undefined,
        cpus: m.cpus,
        memoryMiB: m.memoryMiB,
        allocated: { vcpus: active.reduce((s, i) => s + i.config.vcpus, 0), memoryMiB: active.reduce((s, i) => s + i.config.memoryMiB, 0) },
        instances: mine.length,
        version: m.version,
      };
      if (a) {
        view.memoryUsedMiB = a.memoryUsedMiB;
        view.lastHeartbeat = a.at;
      }
      if (m.qemuVersion) view.qemuVersion = m.qemuVersion;
      return view;
    });
  }

}
