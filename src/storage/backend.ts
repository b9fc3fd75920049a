// The storage backend interface: what the storage service needs from one kind of pool. Each
// type lives in its own folder under backends/ (dir today; LVM-thin, ZFS and Ceph RBD later):
// a backend knows where volumes and images go and how much room there is, nothing about
// instances or records. QEMU opens whatever `path` a backend hands out (a file for dir, a
// block device for LVM/ZFS zvols, an rbd: URL for Ceph).
import type { PoolRecord, PoolType, VolumeFormat } from './model.js';
import type { MarkerRead, PoolMarker } from './shared.js';

export interface PoolUsage {
  /** Size of the backing store (filesystem, VG, pool). */
  totalBytes: number;
  /** Used by anything (this pool's volumes and everything else on the same store). */
  usedBytes: number;
  /** What a new volume or image can still take. */
  freeBytes: number;
}

export interface StorageBackend {
  readonly type: PoolType;
  /** Volume formats this backend can hold (a block-device backend holds raw only). */
  readonly formats: readonly VolumeFormat[];
  /** Whether volumes of this backend can carry internal (qcow2) snapshots. */
  readonly internalSnapshots: boolean;
  /** Checks the location and prepares it (directories, …); throws HF_ERR_VALIDATION when unusable. */
  init(): Promise<void>;
  usage(): Promise<PoolUsage>;
  /** Where a volume lives (deterministic: the service records it). */
  volumePath(name: string, format: VolumeFormat): string;
  /** Creates a blank volume; on failure leaves nothing behind. */
  createVolume(name: string, format: VolumeFormat, sizeBytes: number): Promise<string>;
  deleteVolume(path: string): Promise<void>;
  /** Grows a volume that no running guest has open. */
  resizeVolume(path: string, format: VolumeFormat, sizeBytes: number): Promise<void>;
  /** Bytes a volume takes in the pool (allocated, not virtual). */
  allocatedBytes(path: string): Promise<number>;
  /** The directory an image kept in this pool owns. */
  imageDir(name: string): string;
  /** A scratch directory on the same store (a rename finishes a staged file). */
  stagingDir(): string;
  /** The directory that holds the disks of an instance kept in this pool (`--storage POOL`). */
  instanceDir(name: string): string;
  /** Shared pools: what marker the storage carries as this host sees it (never creates anything). */
  readMarker(): Promise<MarkerRead>;
  /** Shared pools: stamps the storage with the pool's marker (the creating host). */
  writeMarker(marker: PoolMarker): Promise<void>;
  /** Shared pools: removes the marker (the pool is deleted; the storage stays). */
  removeMarker(): Promise<void>;
}

export type BackendFactory = (pool: PoolRecord, deps: BackendDeps) => StorageBackend;

export interface BackendDeps {
  qemuImg: import('./qemu-img.js').QemuImg;
}
