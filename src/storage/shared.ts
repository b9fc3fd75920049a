// Shared pools: how a host tells that the path it mounts is the pool's storage and not something
// else at the same path (an unmounted share's empty mount point, another export). The host that
// creates the pool stamps the storage with a marker carrying a random id, recorded in the pool
// record; every host reads the marker as it sees it and compares. Pure, apart from the marker's
// shape: backends read and write it (a file in a directory pool).
import { randomUUID } from 'node:crypto';
import { z } from 'zod';
import type { PoolRecord } from './model.js';

/** The marker's file name in a directory pool. */
export const POOL_MARKER_FILE = '.hyperfold-pool';

export const poolMarkerSchema = z.object({
  pool: z.string(),
  id: z.string().min(1),
  createdBy: z.string(),
  createdAt: z.string(),
});
export type PoolMarker = z.infer<typeof poolMarkerSchema>;

/** What a host finds at a shared pool's location. */
export type MarkerRead =
  /** The location itself is absent (the share is not mounted and the mount point is gone). */
  | { kind: 'missing' }
  /** The location is there but carries no marker (an empty mount point, another directory). */
  | { kind: 'none' }
  | { kind: 'marker'; marker: PoolMarker }
  /** The location or its marker cannot be read (permissions, not a directory, garbage). */
  | { kind: 'error'; message: string };

export interface AccessVerdict {
  available: boolean;
  reason?: string;
}

export function newPoolMarker(pool: string, host: string): PoolMarker {
  return { pool, id: randomUUID(), createdBy: host, createdAt: new Date().toISOString() };
}

/** Whether what a host found at the pool's location is the pool's storage. */
export function judgeMarker(pool: Pick<PoolRecord, 'name' | 'path' | 'id'>, seen: MarkerRead): AccessVerdict {
  switch (seen.kind) {
    case 'missing':
      return { available: false, reason: `${pool.path} does not exist on this host (is the shared storage mounted?)` };
    case 'none':
      return { available: false, reason: `${pool.path} holds no pool marker: it is not pool ${pool.name}'s storage here (is the shared storage mounted?)` };
    case 'error':
      return { available: false, reason: `${pool.path}: ${seen.message}` };
    case 'marker':
      if (seen.marker.id === pool.id) return { available: true };
      return {
        available: false,
        reason: `${pool.path} holds the marker of another storage (pool ${seen.marker.pool}, id ${seen.marker.id}, made by ${seen.marker.createdBy}), not pool ${pool.name}'s (id ${pool.id ?? 'none'}): another storage is mounted there`,
      };
  }
}

/** Whether two paths name the same location (trailing slashes aside). */
export function samePath(a: string, b: string): boolean {
  const strip = (p: string): string => (p.length > 1 ? p.replace(/\/+$/, '') : p);
  return strip(a) === strip(b);
}
