// Pool accounting: what a pool holds and whether something fits. Pure.
import { HfError } from '../core/errors.js';
import { formatBytes } from '../core/units.js';
import type { PoolUsage } from './backend.js';

export interface VolumeUsage {
  /** Bytes it takes now. */
  allocatedBytes: number;
  /** Size the guest sees (what it may grow to). */
  virtualBytes: number;
}

export interface PoolSummary extends PoolUsage {
  volumes: number;
  /** Sum of what this pool's volumes take now. */
  allocatedBytes: number;
  /** Sum of their virtual sizes (thin provisioning promises). */
  provisionedBytes: number;
  /** provisioned / total: above 1 the pool is overcommitted. */
  overcommit: number;
}

export function summarizePool(usage: PoolUsage, volumes: VolumeUsage[]): PoolSummary {
  const allocatedBytes = volumes.reduce((s, v) => s + v.allocatedBytes, 0);
  const provisionedBytes = volumes.reduce((s, v) => s + v.virtualBytes, 0);
  return {
    ...usage,
    volumes: volumes.length,
    allocatedBytes,
    provisionedBytes,
    overcommit: usage.totalBytes > 0 ? Math.round((provisionedBytes / usage.totalBytes) * 100) / 100 : 0,
  };
}

/** Room kept free on a pool so that running guests can still grow their thin disks a little. */
export const POOL_RESERVE_BYTES = 0;

/** Throws HF_ERR_POOL_FULL when `requiredBytes` (plus the reserve) does not fit in `freeBytes`. */
export function checkRoom(pool: string, what: string, requiredBytes: number, freeBytes: number, reserveBytes = POOL_RESERVE_BYTES): void {
  if (requiredBytes + reserveBytes <= freeBytes) return;
  throw new HfError('HF_ERR_POOL_FULL', `pool ${pool} is out of space: ${what} needs ${formatBytes(requiredBytes)}, ${formatBytes(Math.max(0, freeBytes))} free`, {
    details: { pool, requiredBytes, freeBytes },
  });
}

/** A new size for a disk: must grow it (shrinking would cut the guest's file system). */
export function checkGrow(what: string, currentBytes: number, requestedBytes: number): void {
  if (!Number.isSafeInteger(requestedBytes) || requestedBytes <= 0) throw new HfError('HF_ERR_INVALID_SIZE', `${what}: size must be a positive number of bytes`);
  if (requestedBytes % 512 !== 0) throw new HfError('HF_ERR_INVALID_SIZE', `${what}: size must be a multiple of 512 bytes (got ${requestedBytes})`);
  if (requestedBytes < currentBytes) {
    throw new HfError('HF_ERR_VALIDATION', `${what}: shrinking from ${formatBytes(currentBytes)} to ${formatBytes(requestedBytes)} is refused (it would cut the guest's data); only growing is supported`);
  }
  if (requestedBytes === currentBytes) throw new HfError('HF_ERR_VALIDATION', `${what} is already ${formatBytes(currentBytes)}`);
}
