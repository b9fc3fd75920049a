// The etcd command line of one cluster member (etcd 3.4), built from a plain description: pure,
// no I/O. Every flag is written `--flag=value` (one argv item), so the supervisor can find its
// own etcd again by `--data-dir=DIR` in /proc/PID/cmdline.
//
// Choices:
// * TLS everywhere, with client certificates required on both the client and the peer port: the
//   host's one certificate (cluster/pki.ts) is its peer and client certificate.
// * Heartbeat 200 ms and election timeout 2 s (etcd: 100 ms / 1 s): hosts run guests and builds
//   on few cores, and a member starved for a second must not cost the cluster a leader election.
// * Compaction by revision, keeping the last 10,000 revisions: the history a watch can resume from
//   is the same as the SQLite store's change log (`historyLimit`), so a daemon behaves alike on
//   both stores, and the database is bounded by the number of writes whatever their rate (a
//   periodic window of an hour on a busy host — progress of many operations — has no such bound).
//   etcd 3.4 compacts in revision mode every 5 minutes.
// * A 512 MiB backend quota (etcd: 2 GiB): the cluster's records are small; a runaway writer hits
//   the quota (etcd then refuses writes with an alarm) long before it fills a host's disk.
// * A snapshot every 10,000 applied entries (etcd 3.4: 100,000; 3.5 lowered it to this): bounds
//   the raft log a member holds in memory.
// * v2 API off; logs as JSON lines (zap) to stderr, which the supervisor appends to a file.
import { HfError } from '../core/errors.js';

export interface EtcdMember {
  name: string;
  peerUrls: string[];
}

export interface EtcdTlsFiles {
  certFile: string;
  keyFile: string;
  caFile: string;
}

export type EtcdCompaction = { mode: 'revision'; retain: number } | { mode: 'periodic'; retention: string };

export interface EtcdMemberConfig {
  name: string;
  dataDir: string;
  /** URLs other members reach this one by (advertised); also listened on unless listenPeerUrls is given. */
  peerUrls: string[];
  /** URLs clients reach this member by (advertised); also listened on unless listenClientUrls is given. */
  clientUrls: string[];
  /** What to listen on when it differs from what is advertised (e.g. https://0.0.0.0:2380). */
  listenPeerUrls?: string[];
  listenClientUrls?: string[];
  /** Every member of the cluster this member starts into, itself included. */
  initialCluster: EtcdMember[];
  /** 'new' for the first member of a new cluster; 'existing' for one added by memberAdd. */
  state: 'new' | 'existing';
  /** Makes a new cluster's id unique (etcd's --initial-cluster-token); the cluster's name fits. */
  clusterToken?: string;
  tls: EtcdTlsFiles;
  heartbeatMs?: number;
  electionMs?: number;
  quotaBackendBytes?: number;
  compaction?: EtcdCompaction;
  snapshotCount?: number;
}

export const ETCD_DEFAULTS = {
  heartbeatMs: 200,
  electionMs: 2000,
  quotaBackendBytes: 512 * 1024 * 1024,
  compaction: { mode: 'revision', retain: 10_000 } as EtcdCompaction,
  snapshotCount: 10_000,
} as const;

/** name=url,name=url… (a member with several peer URLs appears once per URL, as etcd wants it). */
export function formatInitialCluster(members: EtcdMember[]): string {
  return members.flatMap((m) => m.peerUrls.map((u) => `${m.name}=${u}`)).join(',');
}

/** Parses `formatInitialCluster`'s text (or etcd's, e.g. from `etcdctl member add`) back into members. */
export function parseInitialCluster(text: string): EtcdMember[] {
  const byName = new Map<string, EtcdMember>();
  for (const item of text.split(',').map((s) => s.trim()).filter(Boolean)) {
    const eq = item.indexOf('=');
    if (eq < 0) throw new HfError('HF_ERR_VALIDATION', `invalid initial cluster entry "${item}": expected name=url`);
    const name = item.slice(0, eq);
    const url = item.slice(eq + 1);
    const m = byName.get(name) ?? { name, peerUrls: [] };
    m.peerUrls.push(url);
    byName.set(name, m);
  }
  return [...byName.values()];
}

function checkUrls(what: string, urls: string[]): void {
  if (urls.length === 0) throw new HfError('HF_ERR_VALIDATION', `etcd member config: ${what} is empty`);
  for (const u of urls) {
    let parsed: URL;
    try {
      parsed = new URL(u);
    } catch {
      throw new HfError('HF_ERR_VALIDATION', `etcd member config: ${what} has an invalid URL "${u}"`);
    }
    if (parsed.protocol !== 'https:') throw new HfError('HF_ERR_VALIDATION', `etcd member config: ${what} URL "${u}" is not https (the cluster uses TLS only)`);
    if (!parsed.port) throw new HfError('HF_ERR_VALIDATION', `etcd member config: ${what} URL "${u}" has no port`);
  }
}

/** The etcd argv (without the binary). Throws on a config etcd would refuse at start. */
export function etcdArgs(o: EtcdMemberConfig): string[] {
  if (!o.name || /[=,\s]/.test(o.name)) throw new HfError('HF_ERR_VALIDATION', `etcd member config: invalid member name "${o.name}"`);
  checkUrls('peerUrls', o.peerUrls);
  checkUrls('clientUrls', o.clientUrls);
  const listenPeer = o.listenPeerUrls ?? o.peerUrls;
  const listenClient = o.listenClientUrls ?? o.clientUrls;
  checkUrls('listenPeerUrls', listenPeer);
  checkUrls('listenClientUrls', listenClient);
  const self = o.initialCluster.find((m) => m.name === o.name);
  if (!self) throw new HfError('HF_ERR_VALIDATION', `etcd member config: the initial cluster does not list this member (${o.name})`);
  if ([...self.peerUrls].sort().join(',') !== [...o.peerUrls].sort().join(',')) {
    throw new HfError('HF_ERR_VALIDATION', `etcd member config: the initial cluster gives ${o.name} peer URLs ${self.peerUrls.join(',')}, not ${o.peerUrls.join(',')}`);
  }
  const heartbeat = o.heartbeatMs ?? ETCD_DEFAULTS.heartbeatMs;
  const election = o.electionMs ?? ETCD_DEFAULTS.electionMs;
  // etcd itself refuses an election timeout under five heartbeats: say so before it starts.
  if (!(heartbeat > 0 && election >= 5 * heartbeat)) throw new HfError('HF_ERR_VALIDATION', `etcd member config: election timeout ${election} ms must be at least 5 heartbeats (${heartbeat} ms)`);
  const compaction = o.compaction ?? ETCD_DEFAULTS.compaction;
  const args = [
    `--name=${o.name}`,
    `--data-dir=${o.dataDir}`,
    `--listen-peer-urls=${listenPeer.join(',')}`,
    `--initial-advertise-peer-urls=${o.peerUrls.join(',')}`,
    `--listen-client-urls=${listenClient.join(',')}`,
    `--advertise-client-urls=${o.clientUrls.join(',')}`,
    `--initial-cluster=${formatInitialCluster(o.initialCluster)}`,
    `--initial-cluster-state=${o.state}`,
  ];
  if (o.clusterToken) args.push(`--initial-cluster-token=${o.clusterToken}`);
  args.push(
    `--cert-file=${o.tls.certFile}`,
    `--key-file=${o.tls.keyFile}`,
    `--trusted-ca-file=${o.tls.caFile}`,
    '--client-cert-auth=true',
    `--peer-cert-file=${o.tls.certFile}`,
    `--peer-key-file=${o.tls.keyFile}`,
    `--peer-trusted-ca-file=${o.tls.caFile}`,
    '--peer-client-cert-auth=true',
    `--heartbeat-interval=${heartbeat}`,
    `--election-timeout=${election}`,
    `--quota-backend-bytes=${o.quotaBackendBytes ?? ETCD_DEFAULTS.quotaBackendBytes}`,
    // Clients ping every 2 s to find a member cut off by the network (etcd's default refuses pings under 5 s).
    '--grpc-keepalive-min-time=1s',
    `--auto-compaction-mode=${compaction.mode}`,
    `--auto-compaction-retention=${compaction.mode === 'revision' ? compaction.retain : compaction.retention}`,
    `--snapshot-count=${o.snapshotCount ?? ETCD_DEFAULTS.snapshotCount}`,
    '--enable-v2=false',
    '--logger=zap',
    '--log-outputs=stderr',
  );
  return args;
}
