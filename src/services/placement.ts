// The placement service: asks a directory of hosts how they stand now (and, for an instance kept
// in a shared storage pool, which hosts reach the pool) and lets the pure scheduler
// (core/placement.ts) pick one. A single daemon's directory is itself, built from its instance
// records; a clustered daemon passes the cluster's directory instead.
import { isActive } from '../core/lifecycle.js';
import type { Instance } from '../core/model/instance.js';
import { place, type PlacementDecision, type PlacementHost, type PlacementRequest } from '../core/placement.js';
import type { HostCapacity, OvercommitPolicy } from '../core/resources.js';

export type HostDirectory = () => Promise<PlacementHost[]>;

export interface PlacementDeps {
  hosts: HostDirectory;
  /** The hosts that can use a storage pool now (a shared pool's), or undefined when not known. */
  poolHosts?: (pool: string) => Promise<string[] | undefined>;
}

export class PlacementService {
  constructor(private readonly d: PlacementDeps) {}

  /** The host for `req` and why; an HfError when none can take it (see `place`). */
  async choose(req: PlacementRequest): Promise<PlacementDecision> {
    const storageHosts = req.storage !== undefined && this.d.poolHosts ? await this.d.poolHosts(req.storage) : undefined;
    return place(storageHosts ? { ...req, storageHosts } : req, await this.d.hosts());
  }
}

/**
 * The directory of a host that is not in a cluster: this host, online, with what its active
 * instances commit and how many instances of each placement group it holds.
 */
export function singleHostDirectory(opts: {
  hostName: string;
  capacity: () => HostCapacity;
  overcommit: OvercommitPolicy;
  instances: () => Promise<Instance[]>;
}): HostDirectory {
  return async () => {
    const committed = { vcpus: 0, memoryMiB: 0 };
    const groups: Record<string, number> = {};
    for (const i of await opts.instances()) {
      if (i.host !== opts.hostName) continue;
      if (isActive(i.state)) {
        committed.vcpus += i.config.vcpus;
        committed.memoryMiB += i.config.memoryMiB;
      }
      const g = i.placement?.group;
      if (g !== undefined) groups[g] = (groups[g] ?? 0) + 1;
    }
    const cap = opts.capacity();
    return [{ name: opts.hostName, state: 'online', cpus: cap.cpus, memoryMiB: cap.memoryMiB, overcommit: opts.overcommit, committed, groups }];
  };
}
