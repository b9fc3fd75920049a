// The cluster as the API sees it: its members (members.ts), join tokens, admitting a host (the
// member side of a join: its instances, networks, addresses and storage pools must fit), removing
// one, and where a request about an instance or an operation has to go (the API forwards it
// there); and the other hosts' images for the image service (their records in their areas of the
// store, their files from their cluster listeners). Keys: `/cluster/info`, `/cluster/pki/ca`,
// `/cluster/members/<host>`, `/cluster/alive/<host>` (leased), `/cluster/tokens/<id>` (leased),
// `/cluster/tokens-used/<id>` (leased).
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import { IMAGE_BYTES_HEADER, imageRecordSchema } from '../../core/model/image.js';
import type { Instance } from '../../core/model/instance.js';
import type { PlacementHost } from '../../core/placement.js';
import { networkSchema, ipReservationSchema, type Network, type IpReservation } from '../../network/model.js';
import { etcdUrls, urlHost } from '../../cluster/config.js';
import { getFromPeer } from '../../cluster/peer-client.js';
import { fingerprint, signHostCert } from '../../cluster/pki.js';
import { decodeJoinToken, encodeJoinToken, hashSecret, newJoinToken, secretMatches, tokenExpired } from '../../cluster/token.js';
import { hostScope } from '../../state/scoped-store.js';
import type { StateStore } from '../../state/store.js';
import type { Logger } from '../../util/log.js';
import type { ImagePeers, PeerImage } from '../images.js';
import type { InstanceService } from '../instances.js';
import type { ClusterMembers, HostView, Member } from './members.js';

export const clusterInfoSchema = z.object({ clusterId: z.string(), name: z.string(), createdAt: z.string() });
export type ClusterInfo = z.infer<typeof clusterInfoSchema>;

const caRecordSchema = z.object({ certPem: z.string(), keyPem: z.string() });
const tokenRecordSchema = z.object({ hash: z.string(), expiresAt: z.number(), createdBy: z.string() });
const usedTokenSchema = z.object({ usedBy: z.string(), at: z.string() });

/** What a joining host already holds that must fit into the cluster. */
export const joinManifestSchema = z.object({
  instances: z.array(z.string()).default([]),
  networks: z.array(networkSchema).default([]),
  ips: z.array(ipReservationSchema).default([]),
  /** Its storage pools: its own stay its own, unless a name is the cluster's shared pool's; its shared ones join the cluster's. */
  pools: z.array(z.object({ name: z.string(), shared: z.boolean().default(false), id: z.string().optional() })).default([]),
});
export type JoinManifest = z.infer<typeof joinManifestSchema>;

export const joinRequestSchema = z.object({
  token: z.string(),
  csrPem: z.string(),
  member: z.object({
    name: z.string(),
    address: z.string(),
    clusterPort: z.number().int(),
    cpus: z.number().int(),
    memoryMiB: z.number().int(),
    overcommit: z.object({ cpu: z.number(), memory: z.number() }),
    version: z.string(),
    qemuVersion: z.string().optional(),
  }),
  manifest: joinManifestSchema.default({}),
});
export type JoinRequest = z.infer<typeof joinRequestSchema>;

export interface JoinAnswer {
  clusterId: string;
  clusterName: string;
  caPem: string;
  certPem: string;
  leaseTtl: number;
  etcd: { endpoints: string[]; managed: boolean; member: boolean; initialCluster?: string };
}

/** What the daemon does to etcd's membership (the cluster library's helpers on the etcd client). */
export interface EtcdMembership {
  managed: boolean;
  /** Adds a voting member; answers etcd's --initial-cluster for it. */
  addMember(name: string, peerUrl: string): Promise<{ initialCluster: string }>;
  removeMember(name: string): Promise<void>;
}

/** The reason a clash refuses a join, one line per record. */
export interface Clash {
  kind: 'instance' | 'network' | 'address' | 'pool';
  name: string;
  why: string;
}

/** What the cluster needs from the storage pools (the storage service): a joining host's pools, a removed host's traces. */
export interface ClusterPools {
  joinClashes(pools: JoinManifest['pools']): Promise<Array<{ name: string; why: string }>>;
  forgetHost(host: string): Promise<void>;
}

export const MAX_ETCD_MEMBERS = 3;

export interface ClusterServiceOptions {
  store: StateStore;
  hostName: string;
  members: ClusterMembers;
  instances: InstanceService;
  etcd: EtcdMembership;
  leaseTtl: number;
  /** This host's PKI directory (ca.crt, host.crt, host.key). */
  pkiDir: string;
  /** The storage pools (absent where storage is not wired: no pool clashes then). */
  pools?: ClusterPools;
  log: Logger;
}

export class ClusterService {
  private tlsCache: { ca: string; cert: string; key: string } | undefined;

  constructor(private readonly o: ClusterServiceOptions) {}

  /** This host (the API's forwarding asks: is the record's host this one?). */
  get localHost(): string {
    return this.o.hostName;
  }

  async info(): Promise<ClusterInfo> {
    const e = await this.o.store.get('/cluster/info');
    if (!e) throw new HfError('HF_ERR_INTERNAL', 'the cluster record /cluster/info is missing');
    return clusterInfoSchema.parse(e.value);
  }

  /** The host's certificate material: its server and client certificate for the other hosts. */
  async tls(): Promise<{ ca: string; cert: string; key: string }> {
    if (!this.tlsCache) {
      const [ca, cert, key] = await Promise.all(['ca.crt', 'host.crt', 'host.key'].map((f) => readFile(join(this.o.pkiDir, f), 'utf8')));
      this.tlsCache = { ca: ca!, cert: cert!, key: key! };
    }
    return this.tlsCache;
  }

  async hosts(): Promise<HostView[]> {
    return this.o.members.views(await this.o.instances.list());
  }

  /** A single-use join token that expires after `ttlSeconds`. */
  async createToken(ttlSeconds: number): Promise<{ token: string; expiresAt: string }> {
    if (!Number.isInteger(ttlSeconds) || ttlSeconds < 10 || ttlSeconds > 7 * 86400) {
      throw new HfError('HF_ERR_VALIDATION', 'a token lives between 10 seconds and 7 days');
    }
    const info = await this.info();
    const t = newJoinToken(info.clusterId, fingerprint((await this.tls()).ca), ttlSeconds);
    const lease = await this.o.store.grant(ttlSeconds);
    await this.o.store.put(`/cluster/tokens/${t.id}`, { hash: hashSecret(t.secret), expiresAt: t.expiresAt, createdBy: this.o.hostName }, { lease });
    return { token: encodeJoinToken(t), expiresAt: new Date(t.expiresAt * 1000).toISOString() };
  }

  /**
   * The member side of a join: checks the token (single use), the host's name and what it brings,
   * signs its certificate, records it as a member and, while the cluster has fewer than three etcd
   * members, adds it to etcd. Nothing changes unless every check passes.
   */
  async admit(raw: unknown): Promise<JoinAnswer> {
    const req = joinRequestSchema.parse(raw);
    const info = await this.info();
    const t = decodeJoinToken(req.token);
    if (t.clusterId !== info.clusterId) throw new HfError('HF_ERR_TOKEN_INVALID', `the join token belongs to another cluster (${t.clusterId}), not to ${info.name} (${info.clusterId})`);
    if (tokenExpired(t)) throw new HfError('HF_ERR_TOKEN_INVALID', `the join token expired at ${new Date(t.expiresAt * 1000).toISOString()}: get a new one with \`hyperfold cluster token\``);
    const tokenKey = `/cluster/tokens/${t.id}`;
    const entry = await this.o.store.get(tokenKey);
    if (!entry) {
      const used = await this.o.store.get(`/cluster/tokens-used/${t.id}`);
      if (used) {
        const u = usedTokenSchema.parse(used.value);
        throw new HfError('HF_ERR_TOKEN_INVALID', `the join token was already used (by host ${u.usedBy} at ${u.at}): a token admits one host`);
      }
      throw new HfError('HF_ERR_TOKEN_INVALID', 'the join token is unknown to this cluster (expired or revoked)');
    }
    const rec = tokenRecordSchema.parse(entry.value);
    if (!secretMatches(t.secret, rec.hash)) throw new HfError('HF_ERR_TOKEN_INVALID', 'the join token does not match the one issued (wrong secret)');

    const name = req.member.name;
    if (await this.o.members.get(name)) {
      throw new HfError('HF_ERR_ALREADY_EXISTS', `a host named ${name} is already a member of the cluster: every host needs its own name (HYPERFOLD_HOST_NAME)`);
    }
    const clashes = await this.clashes(req.manifest);
    if (clashes.length) {
      throw new HfError('HF_ERR_NAME_CLASH', `host ${name} holds records that clash with the cluster's: ${clashes.map((c) => `${c.kind} ${c.name} (${c.why})`).join('; ')}. Rename or remove them on ${name}, then join again`, { details: { clashes } });
    }

    const members = await this.o.members.list();
    const etcdMembers = members.filter((m) => m.etcd);
    const runsEtcd = this.o.etcd.managed && etcdMembers.length < MAX_ETCD_MEMBERS;
    const member: Member = {
      ...req.member,
      ...(runsEtcd ? { etcd: etcdUrls(req.member.address) } : {}),
      maintenance: false,
      joinedAt: new Date().toISOString(),
    };
    // One transaction: the token is consumed and the name taken, or neither (two joins with one
    // token or one name: one wins).
    const usedLease = await this.o.store.grant(Math.max(60, rec.expiresAt - Math.floor(Date.now() / 1000)));
    const won = await this.o.store.txn(
      [
        { key: tokenKey, modRevision: entry.modRevision },
        { key: `/cluster/members/${name}`, modRevision: 0 },
      ],
      [
        { type: 'delete', key: tokenKey },
        { type: 'put', key: `/cluster/tokens-used/${t.id}`, value: { usedBy: name, at: new Date().toISOString() }, lease: usedLease },
        { type: 'put', key: `/cluster/members/${name}`, value: member },
      ],
    );
    if (!won.succeeded) throw new HfError('HF_ERR_TOKEN_INVALID', `the join token was used by another join at the same moment, or host ${name} joined meanwhile`);

    try {
      const ca = caRecordSchema.parse((await this.o.store.get('/cluster/pki/ca'))?.value);
      const certPem = await signHostCert({ certPem: ca.certPem, keyPem: ca.keyPem }, req.csrPem, { hostName: name, ips: [req.member.address] });
      let initialCluster: string | undefined;
      if (runsEtcd) initialCluster = (await this.o.etcd.addMember(name, member.etcd!.peerUrl)).initialCluster;
      const endpoints = [...etcdMembers.map((m) => m.etcd!.clientUrl), ...(member.etcd ? [member.etcd.clientUrl] : [])];
      this.o.log.info('host admitted', { host: name, address: req.member.address, etcdMember: runsEtcd });
      return {
        clusterId: info.clusterId,
        clusterName: info.name,
        caPem: ca.certPem,
        certPem,
        leaseTtl: this.o.leaseTtl,
        etcd: { endpoints, managed: this.o.etcd.managed, member: runsEtcd, ...(initialCluster ? { initialCluster } : {}) },
      };
    } catch (e) {
      await this.o.store.delete(`/cluster/members/${name}`).catch(() => undefined);
      throw e;
    }
  }

  /** Records of a joining host that cannot move into the cluster as they are. */
  async clashes(m: JoinManifest): Promise<Clash[]> {
    const out: Clash[] = [];
    for (const name of m.instances) {
      const inst = await this.o.instances.find(name);
      if (inst) out.push({ kind: 'instance', name, why: `an instance of that name lives on ${inst.host}` });
    }
    const merged = new Set<string>();
    for (const n of m.networks) {
      const e = await this.o.store.get<Network>(`/networks/${n.name}`);
      if (!e) continue;
      const mine = networkSchema.parse(e.value);
      if (sameNetwork(mine, n)) merged.add(n.name);
      // A network of the same name that none of the host's NICs uses (every host makes a `default`
      // with a subnet of its own) gives way to the cluster's.
      else if (!m.ips.some((r) => r.network === n.name)) continue;
      else out.push({ kind: 'network', name: n.name, why: `the cluster's network ${n.name} is ${describeNet(mine)}, this host's is ${describeNet(n)}` });
    }
    for (const r of m.ips) {
      if (!merged.has(r.network)) continue;
      const e = await this.o.store.get<IpReservation>(`/network-ips/${r.network}@${r.ip}`);
      if (e && (e.value as IpReservation).instance !== r.instance) out.push({ kind: 'address', name: `${r.network} ${r.ip}`, why: `held by ${(e.value as IpReservation).instance} in the cluster and by ${r.instance} here` });
    }
    for (const c of (await this.o.pools?.joinClashes(m.pools)) ?? []) out.push({ kind: 'pool', ...c });
    return out;
  }

  /**
   * Removes a member. Refused while instances live on it unless `force` (then they are left in
   * the store for a user to delete: a guest is never assumed gone). Its etcd member goes too.
   */
  async remove(name: string, opts: { force?: boolean } = {}): Promise<void> {
    const m = await this.o.members.getOrThrow(name);
    const held = (await this.o.instances.list()).filter((i) => i.host === name);
    if (held.length && !opts.force) {
      throw new HfError('HF_ERR_HOST_IN_USE', `host ${name} holds ${held.length} instance(s): ${held.slice(0, 10).map((i) => i.name).join(', ')}${held.length > 10 ? ', …' : ''}. Move or delete them first, or --force`, { details: { instances: held.map((i) => i.name) } });
    }
    if (m.etcd && this.o.etcd.managed) await this.o.etcd.removeMember(name);
    await this.o.store.delete(`/cluster/members/${name}`);
    await this.o.store.delete(`/cluster/alive/${name}`);
    await this.o.pools?.forgetHost(name);
    this.o.log.info('host removed', { host: name, force: !!opts.force, instances: held.length });
  }

  /** Every member as the scheduler sees it: state, capacity, what its active instances commit, its groups. */
  async placementHosts(): Promise<PlacementHost[]> {
    const insts = await this.o.instances.list();
    const views = await this.o.members.views(insts);
    const members = new Map((await this.o.members.list()).map((m) => [m.name, m]));
    return views.map((v) => {
      const groups: Record<string, number> = {};
      for (const i of insts) if (i.host === v.name && i.placement?.group) groups[i.placement.group] = (groups[i.placement.group] ?? 0) + 1;
      return { name: v.name, state: v.state, cpus: v.cpus, memoryMiB: v.memoryMiB, overcommit: members.get(v.name)?.overcommit ?? { cpu: 1, memory: 1 }, committed: v.allocated, groups };
    });
  }

  /** Which host holds this instance (undefined when there is no such instance). */
  async instanceHost(name: string): Promise<string | undefined> {
    return (await this.o.instances.find(name))?.host;
  }

  async operationHost(id: string): Promise<string | undefined> {
    const e = await this.o.store.get<{ host?: string }>(`/operations/${id}`);
    return e?.value.host;
  }

  /** How to reach a member's cluster listener; a clear error when it is unknown or offline. */
  async endpoint(host: string): Promise<{ url: string; tls: { ca: string; cert: string; key: string } }> {
    const m = await this.o.members.get(host);
    if (!m) throw new HfError('HF_ERR_HOST_NOT_FOUND', `host ${host} is not a member of this cluster`);
    if (!(await this.o.members.isOnline(host))) {
      throw new HfError('HF_ERR_HOST_OFFLINE', `host ${host} is offline (no heartbeat): the request cannot reach it`, { details: { host } });
    }
    return { url: `https://${urlHost(m.address)}:${m.clusterPort}`, tls: await this.tls() };
  }

  /** Which of `hosts` are offline (this host never is). */
  async offline(hosts: Iterable<string>): Promise<Set<string>> {
    const out = new Set<string>();
    for (const h of new Set(hosts)) if (h !== this.o.hostName && !(await this.o.members.isOnline(h))) out.add(h);
    return out;
  }

  /**
   * The other hosts as the image service needs them: their image records (each host's own, under
   * its area of the store, read as they are now) and their image files, downloaded from their
   * cluster listeners with this host's certificate.
   */
  imagePeers(): ImagePeers {
    return {
      localHost: this.o.hostName,
      records: async (name) => {
        const out: PeerImage[] = [];
        for (const m of await this.o.members.list()) {
          if (m.name === this.o.hostName) continue;
          const prefix = `${hostScope(m.name)}/images/`;
          const values = name === undefined ? (await this.o.store.list(prefix)).entries.map((e) => e.value) : [(await this.o.store.get(prefix + name))?.value];
          const online = await this.o.members.isOnline(m.name);
          for (const v of values) {
            const rec = imageRecordSchema.safeParse(v);
            if (rec.success) out.push({ host: m.name, online, record: rec.data });
          }
        }
        return out;
      },
      download: async (host, name, signal) => {
        const ep = await this.endpoint(host);
        const res = await getFromPeer(`${ep.url}/api/v1/images/${encodeURIComponent(name)}/files`, ep.tls, { host, signal });
        const bytes = Number(res.headers[IMAGE_BYTES_HEADER]);
        return { stream: res, ...(Number.isFinite(bytes) && bytes >= 0 ? { bytes } : {}) };
      },
    };
  }

  /** Instances of offline hosts show state `unknown`: what their guests do now nobody here knows. */
  async present(list: Instance[]): Promise<Instance[]> {
    const offline = await this.offline(list.map((i) => i.host));
    if (!offline.size) return list;
    return list.map((i) => (offline.has(i.host) ? ({ ...i, state: 'unknown' } as unknown as Instance) : i));
  }
}

function sameNetwork(a: Network, b: Network): boolean {
  return a.mode === b.mode && a.subnet === b.subnet && a.gateway === b.gateway && (a.domain ?? '') === (b.domain ?? '') && (a.vlan ?? 0) === (b.vlan ?? 0);
}

function describeNet(n: Network): string {
  return `${n.mode}${n.subnet ? ` ${n.subnet}` : ''}${n.gateway ? ` via ${n.gateway}` : ''}`;
}
