// What the API layer needs from the daemon: passed in, never reached through globals.
import type { EventBus } from '../services/events.js';
import type { HostInfo } from '../services/host.js';
import type { ImageService } from '../services/images.js';
import type { InstanceService } from '../services/instances.js';
import type { OperationManager } from '../services/operations.js';

export interface ApiServices {
  instances: InstanceService;
  operations: OperationManager;
  images: ImageService;
  events: EventBus;
  host: () => Promise<HostInfo>;
  version: string;
}
