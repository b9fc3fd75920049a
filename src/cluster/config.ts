// A host's cluster membership on disk: `<data>/cluster/cluster.json` (what cluster, this host's
// address and ports, how to reach etcd, whether this host runs an etcd member) next to its PKI
// (`<data>/cluster/pki/`) and, on hosts that run one, the etcd member's data (`<data>/cluster/etcd`).
// No file: a single host on SQLite, as before.
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { HfError } from '../core/errors.js';

export const CLUSTER_PORT = 8444;
export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
/** An address as the host part of a URL (IPv6 in brackets). */
export function urlHost(address: string): string {
  return address.includes(':') ? `[${address}]` : address;
}

/** The client and peer URLs of the etcd member a host at `address` runs. */
export function etcdUrls(address: string): { clientUrl: string; peerUrl: string } {
  const h = urlHost(address);
  return { clientUrl: `https://${h}:${ETCD_CLIENT_PORT}`, peerUrl: `https://${h}:${ETCD_PEER_PORT}` };
}

/** Keys of the cluster live under this prefix in etcd (a user's own etcd may hold other things). */
export const ETCD_PREFIX = '/hyperfold/';

export const clusterConfigSchema = z.object({
  clusterId: z.string(),
  clusterName: z.string(),
  hostName: z.string(),
  /** This host's address on the network between hosts: etcd, the cluster listener and VXLAN use it. */
  address: z.string(),
  /** HTTPS listener for the other hosts (forwarded requests, joins): mutual TLS with the cluster CA. */
  clusterPort: z.number().int().default(CLUSTER_PORT),
  etcd: z.object({
    endpoints: z.array(z.string()).min(1),
    /** Hyperfold starts and supervises etcd (false: the user's own etcd, given with --etcd). */
    managed: z.boolean(),
    /** This host runs an etcd member (the first three members do). */
    member: z.boolean(),
    /** Client certificate files for a user's own etcd (managed etcd uses the host's cluster certificate). */
    tls: z.object({ ca: z.string(), cert: z.string(), key: z.string() }).optional(),
    /** How the member was bootstrapped: `new` (init) or `existing` (join); only read at its first start. */
    initialCluster: z.string().optional(),
    initialState: z.enum(['new', 'existing']).optional(),
  }),
  /** Heartbeat lease TTL in seconds: a host whose lease expires is offline. */
  leaseTtl: z.number().int().min(1).default(10),
  /** SQLite records still to be moved into etcd at the next start (set by init and join). */
  pendingMove: z.boolean().default(false),
  joinedAt: z.string(),
});
export type ClusterConfig = z.infer<typeof clusterConfigSchema>;

export class ClusterPaths {
  constructor(readonly dataDir: string) {}
  get dir(): string { return join(this.dataDir, 'cluster'); }
  get configFile(): string { return join(this.dir, 'cluster.json'); }
  get pkiDir(): string { return join(this.dir, 'pki'); }
  get etcdDir(): string { return join(this.dir, 'etcd'); }
  get etcdLog(): string { return join(this.dir, 'etcd.log'); }
  /** The SQLite state kept after its records moved into etcd. */
  get sqliteBackup(): string { return join(this.dataDir, 'state.db.pre-cluster'); }
}

export async function readClusterConfig(paths: ClusterPaths): Promise<ClusterConfig | undefined> {
  let text: string;
  try {
    text = await readFile(paths.configFile, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const parsed = clusterConfigSchema.safeParse(JSON.parse(text));
  if (!parsed.success) throw new HfError('HF_ERR_DATA_DIR', `${paths.configFile} is damaged: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
  return parsed.data;
}

/** Written to a temporary file and renamed: a crash leaves the old file or the new one. */
export async function writeClusterConfig(paths: ClusterPaths, config: ClusterConfig): Promise<void> {
  await mkdir(paths.dir, { recursive: true, mode: 0o700 });
  const tmp = `${paths.configFile}.tmp`;
  await writeFile(tmp, JSON.stringify(config, null, 2) + '\n', { mode: 0o600 });
  await rename(tmp, paths.configFile);
}

/** Forgets the membership (a failed init or join, or `cluster remove` of this host). */
export async function removeClusterDir(paths: ClusterPaths): Promise<void> {
  await rm(paths.dir, { recursive: true, force: true });
}
