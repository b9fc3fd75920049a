// Resource admission: pure checks of a request against the host's capacity and the configured
// overcommit ratios. Create checks one instance against the host; start also counts what the
// instances already running on the host have committed.
import { HfError } from './errors.js';
import { formatMiB } from './units.js';

export interface HostCapacity {
  cpus: number;
  memoryMiB: number;
}

export interface OvercommitPolicy {
  /** Total vCPUs of running instances may reach cpus × this. */
  cpu: number;
  /** Total memory of running instances may reach memory × this. */
  memory: number;
}

export interface ResourceRequest {
  name: string;
  vcpus: number;
  memoryMiB: number;
}

/** An instance alone must fit on the host (no single guest larger than the machine). */
export function checkFitsHost(req: ResourceRequest, host: HostCapacity): void {
  if (req.vcpus > host.cpus) {
    throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `${req.name}: ${req.vcpus} vCPUs is more than the host's ${host.cpus} CPUs`, {
      details: { requested: req.vcpus, available: host.cpus, resource: 'vcpus' },
    });
  }
  if (req.memoryMiB > host.memoryMiB) {
    throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `${req.name}: memory ${formatMiB(req.memoryMiB)} is more than the host's ${formatMiB(host.memoryMiB)}`, {
      details: { requested: req.memoryMiB, available: host.memoryMiB, resource: 'memory' },
    });
  }
}

/** Starting `req` must keep the host's commitments within the overcommit policy. */
export function checkCanCommit(req: ResourceRequest, committed: { vcpus: number; memoryMiB: number }, host: HostCapacity, policy: OvercommitPolicy): void {
  checkFitsHost(req, host);
  const cpuLimit = Math.floor(host.cpus * policy.cpu);
  if (committed.vcpus + req.vcpus > cpuLimit) {
    throw new HfError(
      'HF_ERR_INSUFFICIENT_RESOURCES',
      `${req.name}: starting it would commit ${committed.vcpus + req.vcpus} vCPUs, above the limit of ${cpuLimit} (${host.cpus} CPUs × overcommit ${policy.cpu})`,
      { details: { resource: 'vcpus', committed: committed.vcpus, requested: req.vcpus, limit: cpuLimit } },
    );
  }
  const memLimit = Math.floor(host.memoryMiB * policy.memory);
  if (committed.memoryMiB + req.memoryMiB > memLimit) {
    throw new HfError(
      'HF_ERR_INSUFFICIENT_RESOURCES',
      `${req.name}: starting it would commit ${formatMiB(committed.memoryMiB + req.memoryMiB)} of memory, above the limit of ${formatMiB(memLimit)} (${formatMiB(host.memoryMiB)} × overcommit ${policy.memory})`,
      { details: { resource: 'memory', committed: committed.memoryMiB, requested: req.memoryMiB, limit: memLimit } },
    );
  }
}
