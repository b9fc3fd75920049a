// What the API layer needs from the daemon: passed in, never reached through globals.
import type { ClusterRouting } from './forward.js';
import type { ContainerService } from '../services/containers.js';
import type { EventBus } from '../services/events.js';
import type { HostInfo } from '../core/model/host.js';
import type { ImageService } from '../services/images.js';
import type { InstanceService } from '../services/instances.js';
import type { NetworkService } from '../services/network/service.js';
import type { OperationManager } from '../services/operations.js';
import type { SnapshotService } from '../services/snapshots.js';
import type { CopyService, ImageTransferService, StorageService } from '../services/storage/index.js';

export interface ApiServices {
  instances: InstanceService;
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
  /** Where instances and operations live in a cluster: requests about another host's go there (absent on a single host). */
  cluster?: ClusterRouting;
}
