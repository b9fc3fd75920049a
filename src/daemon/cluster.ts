// A daemon's cluster membership, the process side: at start it opens the cluster's store (starting
// the host's etcd member first when it runs one) and moves SQLite records in after an init or a
// join; `init` and `join` prepare the PKI and etcd, write `cluster/cluster.json` and ask the daemon
// to restart into cluster mode in the same process (guests keep running, as across any daemon
// restart). The services see only a StateStore either way.
import { randomUUID } from 'node:crypto';
import { networkInterfaces } from 'node:os';
import { readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError, isHfError } from '../core/errors.js';
import { CLUSTER_PORT, ClusterPaths, ETCD_PREFIX, etcdUrls, readClusterConfig, removeClusterDir, writeClusterConfig, type ClusterConfig } from '../cluster/config.js';
import { EtcdSupervisor, addMember, etcdClient, removeMember, snapshot } from '../cluster/etcd-process.js';
import { fetchPinnedCa, requestJoin } from '../cluster/join-client.js';
import { createCa, createHostKeyAndCsr, signHostCert, writeHostPki, readHostPki, fingerprint, hostPkiPaths } from '../cluster/pki.js';
import { ETCD_DEFAULTS, parseInitialCluster } from '../cluster/etcd-args.js';
import { decodeJoinToken, tokenExpired } from '../cluster/token.js';
import type { EtcdSpace } from '../services/cluster/etcd-health.js';
import type { JoinAnswer, JoinManifest, EtcdMembership } from '../services/cluster/service.js';
import type { Etcd3 } from 'etcd3';
import { EtcdStateStore } from '../state/etcd-store.js';
import { hostScope, ScopedStore } from '../state/scoped-store.js';
import { SqliteStateStore } from '../state/sqlite-store.js';
import type { StateStore } from '../state/store.js';
import type { Logger } from '../util/log.js';
import type { DaemonConfig } from './config.js';

/**
 * Records that belong to one host (its pools, volumes and image files): kept under /local/<host>/
 * in etcd. Shared pools and their volumes (`/shared/…`) are the cluster's and pass through.
 */
export const LOCAL_PREFIXES = ['/storage-pools/', '/volumes/', '/images/'];

/** Where a host's own record of `key` (one of LOCAL_PREFIXES) is kept in the cluster's store. */
export function localKey(host: string, key: string): string {
  return hostScope(host) + key;
}

export interface ClusterRuntime {
  config: ClusterConfig;
  paths: ClusterPaths;
  /** What the services use: the cluster's keys, with this host's own records scoped. */
  store: StateStore;
  etcdStore: EtcdStateStore;
  supervisor?: EtcdSupervisor;
  membership: EtcdMembership;
  /**
   * The etcd database size against its quota, for the space alert: this host's own member where
   * it runs one; the user's etcd (assumed at etcd's default 2 GiB quota) otherwise; undefined on a
   * host that is only a client of the cluster's members (a member's host watches them).
   */
  etcdSpace?: () => Promise<EtcdSpace>;
  /** The member records changed: reach the etcd members they name (a cluster's own etcd; yours stays as configured). */
  refreshEndpoints(members: MemberEtcd[]): Promise<void>;
  close(): Promise<void>;
}

/** What a member record says of its etcd member, and (for a running daemon's updates) whether the host is online. */
export interface MemberEtcd {
  etcd?: { clientUrl: string };
  online?: boolean;
}

/**
 * The client URLs to reach etcd through. At a start: those `known` plus every member's. While
 * running (`running`): a member's URL is added once the member is online (its daemon opens the
 * store only after its etcd member started: before that, calls sent there would fail), and a URL
 * goes when no member record names it any more (the host was removed). undefined when that
 * changes nothing (or would leave none).
 */
export function memberEndpoints(known: string[], members: MemberEtcd[], running = false): string[] | undefined {
  const theirs = new Set(members.map((m) => m.etcd?.clientUrl).filter((u): u is string => !!u));
  const all = running
    ? [...new Set([...known.filter((u) => theirs.has(u)), ...members.filter((m) => m.online && m.etcd).map((m) => m.etcd!.clientUrl)])]
    : [...new Set([...known, ...theirs])];
  if (!all.length) return undefined;
  return all.length === known.length && all.every((u) => known.includes(u)) ? undefined : all;
}

/** The members Hyperfold runs take pings every second (etcd-args.ts): a member cut off is found within ~3 s. */
function keepalive(config: ClusterConfig): { keepaliveMs?: number } {
  return config.etcd.managed ? { keepaliveMs: 2_000 } : {};
}

/** etcd's own default backend quota, for an etcd the user runs. */
const ETCD_DEFAULT_QUOTA = 2 * 1024 ** 3;

async function newSupervisor(paths: ClusterPaths, config: Pick<ClusterConfig, 'hostName' | 'address' | 'etcd' | 'clusterName'>, log: Logger): Promise<EtcdSupervisor> {
  const { clientUrl, peerUrl } = etcdUrls(config.address);
  const pki = await readHostPki(paths.pkiDir);
  if (!pki) throw new HfError('HF_ERR_DATA_DIR', `the cluster certificates are missing from ${paths.pkiDir}`);
  const p = hostPkiPaths(paths.pkiDir);
  return new EtcdSupervisor(
    {
      name: config.hostName,
      dataDir: paths.etcdDir,
      clientUrls: [clientUrl],
      peerUrls: [peerUrl],
      initialCluster: parseInitialCluster(config.etcd.initialCluster ?? `${config.hostName}=${peerUrl}`),
      state: config.etcd.initialState ?? 'new',
      clusterToken: config.clusterName,
      tls: { certFile: p.cert, keyFile: p.key, caFile: p.ca },
    },
    { pki, logFile: paths.etcdLog, log },
  );
}

async function clientTls(paths: ClusterPaths, config: ClusterConfig): Promise<{ ca: string; cert: string; key: string }> {
  if (config.etcd.tls) {
    const [ca, cert, key] = await Promise.all([config.etcd.tls.ca, config.etcd.tls.cert, config.etcd.tls.key].map((f) => readFile(f, 'utf8')));
    return { ca: ca!, cert: cert!, key: key! };
  }
  const pki = await readHostPki(paths.pkiDir);
  if (!pki) throw new HfError('HF_ERR_DATA_DIR', `the cluster certificates are missing from ${paths.pkiDir}`);
  return { ca: pki.caPem, cert: pki.certPem, key: pki.keyPem };
}

/** Opens the cluster's store when this host is a member; undefined on a single host. */
export async function openCluster(dataDir: string, hostName: string, log: Logger): Promise<ClusterRuntime | undefined> {
  const paths = new ClusterPaths(dataDir);
  let config = await readClusterConfig(paths);
  if (!config) return undefined;
  if (config.hostName !== hostName) {
    throw new HfError('HF_ERR_DATA_DIR', `this data directory belongs to cluster host ${config.hostName}, but the daemon runs as ${hostName} (set HYPERFOLD_HOST_NAME=${config.hostName})`);
  }
  let supervisor: EtcdSupervisor | undefined;
  if (config.etcd.managed && config.etcd.member) {
    supervisor = await newSupervisor(paths, config, log.child({ component: 'etcd' }));
    await supervisor.start();
  }
  let etcdStore: EtcdStateStore;
  try {
    const tls = await clientTls(paths, config);
    etcdStore = await EtcdStateStore.open({ endpoints: config.etcd.endpoints, tls, prefix: ETCD_PREFIX, ...keepalive(config) });
    // Members that joined since this host last started run etcd members too: reach all of them,
    // so that losing any one (this host's own included) leaves the store reachable.
    if (config.etcd.managed) {
      const all = memberEndpoints(config.etcd.endpoints, (await etcdStore.list<MemberEtcd>('/cluster/members/')).entries.map((e) => e.value));
      if (all) {
        await etcdStore.close();
        etcdStore = await EtcdStateStore.open({ endpoints: all, tls, prefix: ETCD_PREFIX, ...keepalive(config) });
        config = { ...config, etcd: { ...config.etcd, endpoints: all } };
        await writeClusterConfig(paths, config);
      }
    }
  } catch (e) {
    await supervisor?.stop();
    throw e;
  }
  const store = new ScopedStore(etcdStore, { scope: hostScope(hostName), prefixes: LOCAL_PREFIXES });
  if (config.pendingMove) {
    await moveSqliteIntoCluster(dataDir, paths, store, log);
    config = { ...config, pendingMove: false, etcd: { ...config.etcd, initialState: 'existing' } };
    await writeClusterConfig(paths, config);
  }
  const store0 = etcdStore;
  let live: ClusterConfig = config;
  // A member's own database (sizes differ a little between members): a client of its URL alone.
  let own: Etcd3 | undefined;
  let etcdSpace: (() => Promise<EtcdSpace>) | undefined;
  if (supervisor) {
    const pki = (await readHostPki(paths.pkiDir))!;
    etcdSpace = async () => {
      own ??= etcdClient([etcdUrls(live.address).clientUrl], pki);
      return { dbSizeBytes: Number((await own.maintenance.status()).dbSize), quotaBytes: ETCD_DEFAULTS.quotaBackendBytes };
    };
  } else if (!config.etcd.managed) {
    etcdSpace = async () => ({ dbSizeBytes: Number((await store0.client.maintenance.status()).dbSize), quotaBytes: ETCD_DEFAULT_QUOTA });
  }
  const membership: EtcdMembership = {
    managed: config.etcd.managed,
    addMember: async (name, peerUrl) => addMember(store0.client, name, peerUrl),
    removeMember: async (name) => removeMember(store0.client, name),
  };
  return {
    config,
    paths,
    store,
    etcdStore,
    membership,
    ...(supervisor ? { supervisor } : {}),
    ...(etcdSpace ? { etcdSpace } : {}),
    refreshEndpoints: async (members) => {
      if (!live.etcd.managed) return;
      const all = memberEndpoints(store0.urls, members, true);
      if (!all) return;
      store0.setEndpoints(all);
      live = { ...live, etcd: { ...live.etcd, endpoints: all } };
      await writeClusterConfig(paths, live);
      log.info('etcd members changed: reaching them now', { endpoints: all });
    },
    close: async () => {
      own?.close();
      await etcdStore.close();
      await supervisor?.stop();
    },
  };
}

/**
 * Copies this host's SQLite records into the cluster (its pools, volumes and images under its own
 * scope) and keeps the SQLite file as `state.db.pre-cluster`. A record the cluster already holds
 * (a merged network, the network version key) stays the cluster's. Idempotent: a move cut short
 * by a crash is finished at the next start.
 */
export async function moveSqliteIntoCluster(dataDir: string, paths: ClusterPaths, store: StateStore, log: Logger): Promise<{ moved: number; kept: number }> {
  const file = join(dataDir, 'state.db');
  if (!(await stat(file).catch(() => undefined))) return { moved: 0, kept: 0 };
  const sqlite = SqliteStateStore.open(file);
  let moved = 0;
  let kept = 0;
  try {
    const { entries } = await sqlite.list('/');
    for (const e of entries) {
      if (e.lease !== undefined || e.key.startsWith('/cluster/')) continue; // heartbeats and locks of a past life
      const r = await store.txn([{ key: e.key, modRevision: 0 }], [{ type: 'put', key: e.key, value: e.value }]);
      if (r.succeeded) moved++;
      else kept++;
    }
  } finally {
    await sqlite.close();
  }
  await rename(file, paths.sqliteBackup);
  for (const ext of ['-wal', '-shm']) await rm(file + ext, { force: true });
  log.info('moved the SQLite state into the cluster', { moved, keptClusterRecords: kept, backup: paths.sqliteBackup });
  return { moved, kept };
}

/** The address other hosts reach this one at: --address, else the listen address, else the first non-loopback IPv4. */
export function chooseAddress(given: string | undefined, daemon: DaemonConfig): string {
  if (given) return given;
  const h = daemon.listenHost;
  if (h && h !== '0.0.0.0' && h !== '::' && !h.startsWith('127.') && h !== '::1' && h !== 'localhost') return h;
  for (const addrs of Object.values(networkInterfaces())) {
    for (const a of addrs ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  throw new HfError('HF_ERR_VALIDATION', 'cannot tell which address the other hosts reach this one at: give --address');
}

export interface InitRequest {
  name?: string;
  address?: string;
  leaseTtl?: number;
  /** A user's own etcd instead of a managed one. */
  etcd?: { endpoints: string[]; ca: string; cert: string; key: string };
}

/**
 * Makes this host a one-member cluster: a CA, this host's certificate, etcd (started here, or the
 * user's), the cluster's records in it. Writes cluster.json with the SQLite move pending; the
 * caller restarts the daemon to switch over. Leaves nothing behind when a step fails.
 */
export async function initCluster(dataDir: string, daemon: DaemonConfig, req: InitRequest, log: Logger): Promise<ClusterConfig> {
  const paths = new ClusterPaths(dataDir);
  const existing = await readClusterConfig(paths);
  if (existing) throw new HfError('HF_ERR_ALREADY_CLUSTERED', `this host is already host ${existing.hostName} of cluster ${existing.clusterName} (${existing.clusterId})`);
  const address = chooseAddress(req.address, daemon);
  const clusterName = req.name ?? 'hyperfold';
  const clusterId = randomUUID();
  let supervisor: EtcdSupervisor | undefined;
  let store: EtcdStateStore | undefined;
  try {
    const ca = await createCa(paths.pkiDir, clusterName);
    const { keyPem, csrPem } = await createHostKeyAndCsr(paths.pkiDir, daemon.hostName);
    const certPem = await signHostCert({ certPem: ca.certPem, keyPem: ca.keyPem }, csrPem, { hostName: daemon.hostName, ips: [address] });
    await writeHostPki(paths.pkiDir, { caPem: ca.certPem, certPem, keyPem });
    const { clientUrl, peerUrl } = etcdUrls(address);
    const config: ClusterConfig = {
      clusterId,
      clusterName,
      hostName: daemon.hostName,
      address,
      clusterPort: CLUSTER_PORT,
      etcd: req.etcd
        ? { endpoints: req.etcd.endpoints, managed: false, member: false, tls: { ca: req.etcd.ca, cert: req.etcd.cert, key: req.etcd.key } }
        : { endpoints: [clientUrl], managed: true, member: true, initialCluster: `${daemon.hostName}=${peerUrl}`, initialState: 'new' },
      leaseTtl: req.leaseTtl ?? 10,
      pendingMove: true,
      joinedAt: new Date().toISOString(),
    };
    if (config.etcd.managed) {
      supervisor = await newSupervisor(paths, config, log.child({ component: 'etcd' }));
      await supervisor.start();
    }
    store = await EtcdStateStore.open({ endpoints: config.etcd.endpoints, tls: await clientTls(paths, config), prefix: ETCD_PREFIX });
    const put = await store.txn(
      [{ key: '/cluster/info', modRevision: 0 }],
      [
        { type: 'put', key: '/cluster/info', value: { clusterId, name: clusterName, createdAt: config.joinedAt } },
        { type: 'put', key: '/cluster/pki/ca', value: { certPem: ca.certPem, keyPem: ca.keyPem } },
      ],
    );
    if (!put.succeeded) {
      const other = (await store.get<{ name: string; clusterId: string }>('/cluster/info'))?.value;
      throw new HfError('HF_ERR_ALREADY_CLUSTERED', `that etcd already holds cluster ${other?.name} (${other?.clusterId}): join it with a token instead`);
    }
    await writeClusterConfig(paths, config);
    log.info('cluster initialised', { cluster: clusterName, clusterId, address, caFingerprint: fingerprint(ca.certPem) });
    return config;
  } catch (e) {
    await removeClusterDir(paths);
    throw e;
  } finally {
    await store?.close();
    await supervisor?.stop();
  }
}

export interface JoinLocalRequest {
  url: string;
  token: string;
  address?: string;
}

/**
 * The joining host's side: pins the CA, sends its CSR, description and what it holds, and on
 * success writes its PKI and cluster.json (the SQLite move pending); the caller restarts the daemon.
 */
export async function joinCluster(
  dataDir: string,
  daemon: DaemonConfig,
  req: JoinLocalRequest,
  self: { manifest: JoinManifest; cpus: number; memoryMiB: number; version: string; qemuVersion?: string },
  log: Logger,
): Promise<ClusterConfig> {
  const paths = new ClusterPaths(dataDir);
  const existing = await readClusterConfig(paths);
  if (existing) throw new HfError('HF_ERR_ALREADY_CLUSTERED', `this host is already host ${existing.hostName} of cluster ${existing.clusterName} (${existing.clusterId}): remove it from that cluster first`);
  const token = decodeJoinToken(req.token);
  if (tokenExpired(token)) throw new HfError('HF_ERR_TOKEN_INVALID', `the join token expired at ${new Date(token.expiresAt * 1000).toISOString()}: get a new one with \`hyperfold cluster token\``);
  const address = chooseAddress(req.address, daemon);
  try {
    const caPem = await fetchPinnedCa(req.url, token.caFingerprint);
    const { keyPem, csrPem } = await createHostKeyAndCsr(paths.pkiDir, daemon.hostName);
    const answer = await requestJoin<JoinAnswer>(req.url, caPem, {
      token: req.token,
      csrPem,
      member: { name: daemon.hostName, address, clusterPort: CLUSTER_PORT, cpus: self.cpus, memoryMiB: self.memoryMiB, overcommit: daemon.overcommit, version: self.version, ...(self.qemuVersion ? { qemuVersion: self.qemuVersion } : {}) },
      manifest: self.manifest,
    });
    await writeHostPki(paths.pkiDir, { caPem, certPem: answer.certPem, keyPem });
    const config: ClusterConfig = {
      clusterId: answer.clusterId,
      clusterName: answer.clusterName,
      hostName: daemon.hostName,
      address,
      clusterPort: CLUSTER_PORT,
      etcd: {
        endpoints: answer.etcd.endpoints,
        managed: answer.etcd.managed,
        member: answer.etcd.member,
        ...(answer.etcd.initialCluster ? { initialCluster: answer.etcd.initialCluster, initialState: 'existing' as const } : {}),
      },
      leaseTtl: answer.leaseTtl,
      pendingMove: true,
      joinedAt: new Date().toISOString(),
    };
    await writeClusterConfig(paths, config);
    log.info('joined the cluster', { cluster: answer.clusterName, via: req.url, etcdMember: answer.etcd.member });
    return config;
  } catch (e) {
    await removeClusterDir(paths);
    throw isHfError(e) ? e : new HfError('HF_ERR_INTERNAL', `join failed: ${(e as Error).message}`, { cause: e });
  }
}

/** `hyperfold cluster backup`: an etcd snapshot of the whole cluster state into `file` on this host. */
export async function backupCluster(rt: ClusterRuntime, file: string): Promise<{ file: string; bytes: number }> {
  await snapshot(rt.etcdStore.client, file);
  return { file, bytes: (await stat(file)).size };
}
