// What the QEMU driver can do, for the lifecycle table (core/lifecycle.ts): VMs have block disks
// that hot-plug and resize over QMP, memory snapshots (savevm), and a serial console. No exec
// (no guest agent yet) and no live migration yet.
import type { Capability } from '../../core/lifecycle.js';

export const QEMU_CAPABILITIES: ReadonlySet<Capability> = new Set<Capability>([
  'disks',
  'console',
  'live-resources',
  'hotplug-disk',
  'hotplug-nic',
  'resize-disk-live',
  'snapshot-live',
  'snapshot-memory',
  'snapshot-offline',
  'revert-live',
]);
