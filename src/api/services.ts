// What the API layer needs from the daemon: passed in, never reached through globals.
import type { ClusterRouting } from './forward.js';
import type { ContainerService } from '../services/containers.js';
import type { EventBus } from '../services/events.js';
import type { HostInfo } from '../core/model/host.js';
import type { ImageService } from '../services/images.js';
import type { InstanceService } from '../services/instances.js';
import type { NetworkService } from '../services/network/service.js';
import type { OperationManager } from '../services/operations.js';
import type { PlacementService } from '../services/placement.js';
import type { SnapshotService } from '../services/snapshots.js';
import type { ClusterService } from '../services/cluster/service.js';
import type { CopyService, ImageTransferService, StorageService } from '../services/storage/index.js';

export interface ApiServices {
  instances: InstanceService;
  /** Which host a new instance goes to (this one alone, until the daemon is clustered). */
  placement: PlacementService;
  operations: OperationManager;
  images: ImageService;
  events: EventBus;
  host: () => Promise<HostInfo>;
  version: string;
  /** Container exec, info and image imports (absent where containers are not wired). */
  containers?: ContainerService;
  /** Pools and volumes; image import/export/publish; copies (absent in tests that do not need them). */
  storage?: StorageService;
  transfers?: ImageTransferService;
  copies?: CopyService;
  snapshots?: SnapshotService;
  /** Networks, NICs, firewall, port forwards (absent in tests that do not need them). */
  networks?: NetworkService;
  /** True while the cluster's store cannot be reached: answers then come from local caches and say so (X-Hyperfold-Stale). */
  stale?: () => boolean;
  /** Where instances and operations live in a cluster: requests about another host's go there (absent on a single host). */
  cluster?: ClusterRouting;
  /** The cluster verbs (init, join, token, members, backup); always present, answers "not clustered" on a single host. */
  clusterControl?: ClusterControl;
}

export interface ClusterStatus {
  clustered: boolean;
  host: string;
  cluster?: { clusterId: string; name: string; createdAt: string };
  address?: string;
  etcd?: { endpoints: string[]; managed: boolean; member: boolean };
  leaseTtl?: number;
}

/** What the daemon does for the cluster routes (init and join restart it into cluster mode). */
export interface ClusterControl {
  status(): Promise<ClusterStatus>;
  /** The cluster service when this host is a member (tokens, members, admission, routing). */
  service(): ClusterService | undefined;
  init(body: { name?: string; address?: string; leaseTtl?: number; etcd?: { endpoints: string[]; ca: string; cert: string; key: string } }): Promise<ClusterStatus>;
  join(body: { url: string; token: string; address?: string }): Promise<ClusterStatus>;
  /** This host's CA certificate (public: a joining host pins it by the token's fingerprint). */
  caPem(): Promise<string>;
  backup(file: string): Promise<{ file: string; bytes: number }>;
}
