// What the container driver can do, for the lifecycle table (core/lifecycle.ts): exec and live
// cgroup limits; NICs move into its network namespace while it runs; snapshots and copies of its
// root filesystem (a running container is frozen meanwhile). It has no block disks and no memory
// snapshots, and a snapshot revert needs it stopped.
import type { Capability } from '../../core/lifecycle.js';

export const CONTAINER_CAPABILITIES: ReadonlySet<Capability> = new Set<Capability>([
  'console',
  'exec',
  'live-resources',
  'hotplug-nic',
  'snapshot-live',
  'snapshot-offline',
  'copy-live',
]);
