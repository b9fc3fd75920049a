// The storage model: pools (where volumes and images live), volumes (disks that exist on their
// own and are attached to instances) and snapshot records. Zod schemas, like the other models.
import { isAbsolute } from 'node:path';
import { z } from 'zod';
import { bootConfigSchema, nameSchema } from '../core/model/instance.js';
import type { PoolSummary } from './accounting.js';
import type { SnapshotNode } from './snapshot-tree.js';

/** The pool made on first start in the data directory; imports and publishes land there by default. */
export const DEFAULT_POOL = 'default';

/** Pool types. Only `dir` exists today; LVM-thin, ZFS and Ceph RBD plug in as more backends. */
export const POOL_TYPES = ['dir'] as const;
export type PoolType = (typeof POOL_TYPES)[number];

export const VOLUME_FORMATS = ['qcow2', 'raw'] as const;
export type VolumeFormat = (typeof VOLUME_FORMATS)[number];

export const poolRecordSchema = z.object({
  name: nameSchema,
  type: z.enum(POOL_TYPES),
  /** dir: the directory (absolute). Other backends: their own location (VG/thin pool, dataset…). */
  path: z.string().min(1),
  /**
   * Shared: storage every host of the cluster mounts at `path` (NFS, CephFS…). Its record and its
   * volumes' records are the cluster's, not one host's; each host checks it reaches the same
   * storage (the marker carrying `id`) and records whether it can use it.
   */
  shared: z.boolean().default(false),
  /** Shared pools: the random id the creating host stamped into the storage (its marker). */
  id: z.string().optional(),
  /** Shared pools: the host that created it. */
  createdBy: z.string().optional(),
  description: z.string().default(''),
  createdAt: z.string(),
});
export type PoolRecord = z.infer<typeof poolRecordSchema>;

export const createPoolSchema = z
  .object({
    name: nameSchema,
    type: z.enum(POOL_TYPES).default('dir'),
    path: z.string().min(1).refine((p) => p.startsWith('/'), { message: 'path must be absolute' }),
    shared: z.boolean().default(false).describe('storage that every host of the cluster mounts at this path (NFS, CephFS…): one pool for all of them'),
    description: z.string().max(1024).default(''),
  })
  .strict();

/** Whether one host can use a shared pool, as that host last checked (`/shared/storage-pool-hosts/<pool>/<host>`). */
export const poolAccessSchema = z.object({
  pool: nameSchema,
  host: z.string(),
  /** The pool id the check was made for (a pool re-created under the same name is checked again). */
  poolId: z.string(),
  available: z.boolean(),
  /** Why not, when not available. */
  reason: z.string().optional(),
  /** Since when this answer holds (it is written again only when it changes). */
  since: z.string(),
});
export type PoolAccess = z.infer<typeof poolAccessSchema>;

export const volumeRecordSchema = z.object({
  pool: nameSchema,
  name: nameSchema,
  format: z.enum(VOLUME_FORMATS),
  /** Where QEMU opens it (a file for dir pools, a block device for LVM…). */
  path: z.string().min(1),
  /** Virtual size as the guest sees it. */
  sizeBytes: z.number().int().nonnegative(),
  description: z.string().default(''),
  createdAt: z.string(),
});
export type VolumeRecord = z.infer<typeof volumeRecordSchema>;

export const createVolumeSchema = z
  .object({
    size: z.union([z.string(), z.number()]),
    format: z.enum(VOLUME_FORMATS).default('qcow2'),
    description: z.string().max(1024).default(''),
  })
  .strict();

export const snapshotRecordSchema = z.object({
  instance: nameSchema,
  name: nameSchema,
  /** The snapshot this one was taken on top of (the instance's current snapshot then). */
  parent: z.string().optional(),
  /** RAM and device state included (snapshot-save with a vmstate). */
  memory: z.boolean(),
  /** The instance state when it was taken. */
  takenWhile: z.enum(['running', 'paused', 'stopped']),
  /** The disks it covers (the instance's writable qcow2 disks then). */
  disks: z.array(z.string()),
  /** The disk whose image holds the VM state (memory snapshots). */
  vmstateDisk: z.string().optional(),
  description: z.string().default(''),
  createdAt: z.string(),
});
export type SnapshotRecord = z.infer<typeof snapshotRecordSchema>;

/** Per instance: the snapshot its disks currently descend from (parent of the next one). */
export const snapshotHeadSchema = z.object({ instance: nameSchema, current: z.string().optional() });
export type SnapshotHead = z.infer<typeof snapshotHeadSchema>;

/** Disk image formats an import accepts (sniffed from the file; `ova` is a tar of OVF + disks). */
export const IMPORT_FORMATS = ['qcow2', 'raw', 'vmdk', 'vhd', 'vhdx', 'vdi', 'ova'] as const;
export type ImportFormat = (typeof IMPORT_FORMATS)[number];

// ---- requests (the API validates bodies with these; the services parse them again) ----------

export const importImageSchema = z
  .object({
    name: nameSchema,
    /** An absolute path on the daemon's host, or an http(s) URL. */
    source: z.string().min(1),
    format: z.enum(IMPORT_FORMATS).optional(),
    pool: nameSchema.default(DEFAULT_POOL),
    description: z.string().max(1024).optional(),
    /** How VMs made from the image boot (default: from disk, BIOS — or UEFI when the OVF says so). */
    boot: bootConfigSchema.optional(),
    vcpus: z.number().int().min(1).max(512).optional(),
    memory: z.union([z.string(), z.number()]).optional(),
    /** Also create a stopped VM from the image, with the OVF's CPUs, memory and disks. */
    instance: nameSchema.optional(),
  })
  .strict();
export type ImportImageRequest = z.output<typeof importImageSchema>;

export const exportSchema = z
  .object({
    file: z.string().min(1).refine((p) => isAbsolute(p), { message: 'file must be an absolute path on the host' }),
    format: z.enum(['qcow2', 'raw', 'vmdk']).default('qcow2'),
    disk: nameSchema.optional(),
  })
  .strict();

export const publishSchema = z.object({ as: nameSchema, description: z.string().max(1024).optional() }).strict();
export const copySchema = z.object({ name: nameSchema, linked: z.boolean().default(false), description: z.string().max(1024).optional() }).strict();
export type CopyRequest = z.output<typeof copySchema>;
export const attachSchema = z.object({ volume: z.string().min(1), disk: nameSchema.optional() }).strict();

export const createSnapshotSchema = z
  .object({
    name: nameSchema,
    memory: z.boolean().default(false).describe('include RAM and device state (running VMs): revert returns to the running moment'),
    description: z.string().max(1024).default(''),
  })
  .strict();
export type CreateSnapshotRequest = z.output<typeof createSnapshotSchema>;

// ---- views (what the API answers; the CLI reads these) ------------------------------------------

export interface PoolView extends PoolRecord {
  /** What the answering host sees (zeros where the pool is unavailable to it). */
  usage: PoolSummary;
  /** Whether the answering host can use the pool now (a local pool: always). */
  available: boolean;
  /** Why not, when not available. */
  reason?: string;
  /** Shared pools: every host's last check, by host name. */
  hosts?: PoolAccess[];
}

export interface VolumeView extends VolumeRecord {
  ref: string;
  allocatedBytes: number;
  attachedTo?: { instance: string; disk: string };
}

export interface SnapshotListing {
  instance: string;
  current?: string;
  snapshots: SnapshotRecord[];
  tree: SnapshotNode[];
  /** The tree as text lines (what `snapshot list` prints). */
  text: string[];
}

/** Splits "pool/name" (a volume reference); throws a message string on bad input. */
export function parseVolumeRef(ref: string): { pool: string; name: string } {
  const parts = ref.split('/');
  if (parts.length !== 2) throw new Error(`"${ref}" is not a volume reference: use POOL/NAME`);
  const [pool, name] = parts as [string, string];
  if (!nameSchema.safeParse(pool).success) throw new Error(`"${pool}" is not a valid pool name`);
  if (!nameSchema.safeParse(name).success) throw new Error(`"${name}" is not a valid volume name`);
  return { pool, name };
}
