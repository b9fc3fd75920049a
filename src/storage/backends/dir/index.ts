// The `dir` backend: a directory on any local filesystem, or on a share every host mounts
// (a shared pool). Volumes are files (`<path>/volumes/<name>.<format>`), images are directories
// (`<path>/images/<name>/`), the disks of instances kept in the pool are in
// `<path>/instances/<name>/`, and staging happens in `<path>/.staging/` so finishing is a rename
// on the same filesystem. A shared pool's marker is `<path>/.hyperfold-pool`.
// Thin provisioning comes from the filesystem (sparse raw files) and qcow2.
import { access, constants, mkdir, readFile, rename, rm, stat, statfs, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError } from '../../../core/errors.js';
import type { BackendDeps, PoolUsage, StorageBackend } from '../../backend.js';
import type { PoolRecord, VolumeFormat } from '../../model.js';
import { POOL_MARKER_FILE, poolMarkerSchema, type MarkerRead, type PoolMarker } from '../../shared.js';

export class DirBackend implements StorageBackend {
  readonly type = 'dir' as const;
  readonly formats = ['qcow2', 'raw'] as const;
  readonly internalSnapshots = true;

  constructor(private readonly pool: PoolRecord, private readonly deps: BackendDeps) {}

  async init(): Promise<void> {
    const p = this.pool.path;
    if (!p.startsWith('/')) throw new HfError('HF_ERR_VALIDATION', `pool ${this.pool.name}: path "${p}" must be absolute`);
    try {
      await mkdir(p, { recursive: true, mode: 0o700 });
      const st = await stat(p);
      if (!st.isDirectory()) throw new Error('not a directory');
      await access(p, constants.W_OK);
      for (const d of ['volumes', 'images', '.staging']) await mkdir(join(p, d), { recursive: true, mode: 0o700 });
    } catch (e) {
      if (e instanceof HfError) throw e;
      throw new HfError('HF_ERR_VALIDATION', `pool ${this.pool.name}: ${p} cannot hold a pool: ${(e as Error).message}`, { cause: e });
    }
  }

  async usage(): Promise<PoolUsage> {
    const s = await statfs(this.pool.path);
    const totalBytes = s.blocks * s.bsize;
    return { totalBytes, usedBytes: totalBytes - s.bfree * s.bsize, freeBytes: s.bavail * s.bsize };
  }

  volumePath(name: string, format: VolumeFormat): string {
    return join(this.pool.path, 'volumes', `${name}.${format}`);
  }

  async createVolume(name: string, format: VolumeFormat, sizeBytes: number): Promise<string> {
    const path = this.volumePath(name, format);
    try {
      await this.deps.qemuImg.createBlank(path, sizeBytes, format);
    } catch (e) {
      await rm(path, { force: true });
      throw e;
    }
    return path;
  }

  async deleteVolume(path: string): Promise<void> {
    await rm(path, { force: true });
  }

  async resizeVolume(path: string, format: VolumeFormat, sizeBytes: number): Promise<void> {
    await this.deps.qemuImg.resize(path, format, sizeBytes);
  }

  async allocatedBytes(path: string): Promise<number> {
    try {
      return (await stat(path)).blocks * 512;
    } catch {
      return 0;
    }
  }

  imageDir(name: string): string {
    return join(this.pool.path, 'images', name);
  }

  stagingDir(): string {
    return join(this.pool.path, '.staging');
  }

  instanceDir(name: string): string {
    return join(this.pool.path, 'instances', name);
  }

  async readMarker(): Promise<MarkerRead> {
    try {
      if (!(await stat(this.pool.path)).isDirectory()) return { kind: 'error', message: 'not a directory' };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'missing' };
      return { kind: 'error', message: (e as Error).message };
    }
    let text: string;
    try {
      text = await readFile(join(this.pool.path, POOL_MARKER_FILE), 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'none' };
      return { kind: 'error', message: `cannot read the pool marker: ${(e as Error).message}` };
    }
    try {
      return { kind: 'marker', marker: poolMarkerSchema.parse(JSON.parse(text)) };
    } catch {
      return { kind: 'error', message: `the pool marker ${POOL_MARKER_FILE} is not readable (damaged?)` };
    }
  }

  async writeMarker(marker: PoolMarker): Promise<void> {
    // Whole or not at all: another host may read it at any moment.
    const file = join(this.pool.path, POOL_MARKER_FILE);
    const tmp = `${file}.${process.pid}.tmp`;
    try {
      await writeFile(tmp, JSON.stringify(marker) + '\n', { mode: 0o644 });
      await rename(tmp, file);
    } catch (e) {
      await rm(tmp, { force: true });
      throw new HfError('HF_ERR_VALIDATION', `pool ${this.pool.name}: cannot write the pool marker in ${this.pool.path}: ${(e as Error).message}`, { cause: e });
    }
  }

  async removeMarker(): Promise<void> {
    await rm(join(this.pool.path, POOL_MARKER_FILE), { force: true });
  }
}
