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

/** Why a request cannot be admitted: one resource, a message without the instance's name, the numbers. */
export interface ResourceProblem {
  resource: 'vcpus' | 'memory';
  message: string;
  details: Record<string, unknown>;
}

/** What the active instances of a host may commit in total: its capacity × the overcommit ratios. */
export function commitLimits(host: HostCapacity, policy: OvercommitPolicy): { vcpus: number; memoryMiB: number } {
  return { vcpus: Math.floor(host.cpus * policy.cpu), memoryMiB: Math.floor(host.memoryMiB * policy.memory) };
}

/** Why `req` alone is larger than the host, or undefined when it fits. */
export function fitsHostProblem(req: ResourceRequest, host: HostCapacity): ResourceProblem | undefined {
  if (req.vcpus > host.cpus) {
    return { resource: 'vcpus', message: `${req.vcpus} vCPUs is more than the host's ${host.cpus} CPUs`, details: { requested: req.vcpus, available: host.cpus, resource: 'vcpus' } };
  }
  if (req.memoryMiB > host.memoryMiB) {
    return { resource: 'memory', message: `memory ${formatMiB(req.memoryMiB)} is more than the host's ${formatMiB(host.memoryMiB)}`, details: { requested: req.memoryMiB, available: host.memoryMiB, resource: 'memory' } };
  }
  return undefined;
}

/**
 * Why committing `req` next to `committed` would break the overcommit policy, or undefined when
 * it stays within it. Only the commitment: callers check `fitsHostProblem` first.
 */
export function commitProblem(req: ResourceRequest, committed: { vcpus: number; memoryMiB: number }, host: HostCapacity, policy: OvercommitPolicy): ResourceProblem | undefined {
  const limit = commitLimits(host, policy);
  if (committed.vcpus + req.vcpus > limit.vcpus) {
    return {
      resource: 'vcpus',
      message: `would commit ${committed.vcpus + req.vcpus} vCPUs, above the limit of ${limit.vcpus} (${host.cpus} CPUs × overcommit ${policy.cpu})`,
      details: { resource: 'vcpus', committed: committed.vcpus, requested: req.vcpus, limit: limit.vcpus },
    };
  }
  if (committed.memoryMiB + req.memoryMiB > limit.memoryMiB) {
    return {
      resource: 'memory',
      message: `would commit ${formatMiB(committed.memoryMiB + req.memoryMiB)} of memory, above the limit of ${formatMiB(limit.memoryMiB)} (${formatMiB(host.memoryMiB)} × overcommit ${policy.memory})`,
      details: { resource: 'memory', committed: committed.memoryMiB, requested: req.memoryMiB, limit: limit.memoryMiB },
    };
  }
  return undefined;
}

/** An instance alone must fit on the host (no single guest larger than the machine). */
export function checkFitsHost(req: ResourceRequest, host: HostCapacity): void {
  const p = fitsHostProblem(req, host);
  if (p) throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `${req.name}: ${p.message}`, { details: p.details });
}

/** Starting `req` must keep the host's commitments within the overcommit policy. */
export function checkCanCommit(req: ResourceRequest, committed: { vcpus: number; memoryMiB: number }, host: HostCapacity, policy: OvercommitPolicy): void {
  checkFitsHost(req, host);
  const p = commitProblem(req, committed, host, policy);
  if (p) throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `${req.name}: starting it ${p.message}`, { details: p.details });
}
