// Container snapshots: a full copy of the root filesystem plus the definition (the instance
// config and container.json) in `<instance>/snapshots/<name>/`. Owners are kept as they are
// (the snapshot belongs to the same container and id range). Revert swaps trees by rename, so a
// failure half-way leaves the current root filesystem in place.
import { copyFile, mkdir, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import { instanceConfigSchema, nameSchema, type InstanceConfig } from '../../core/model/instance.js';
import { containerFiles } from './driver.js';
import { NO_SHIFT, copyTreeShifted } from './rootfs.js';

export const snapshotInfoSchema = z.object({
  name: nameSchema,
  createdAt: z.string(),
  /** The instance's config when the snapshot was taken (restored by revert). */
  config: instanceConfigSchema,
  /** Whether the container was running (it was frozen while copied). */
  stateful: z.boolean().default(false),
  files: z.number().int(),
  sizeBytes: z.number(),
  description: z.string().default(''),
});
export type SnapshotInfo = z.infer<typeof snapshotInfoSchema>;

function snapDir(dir: string, snap: string): string {
  return join(containerFiles(dir).snapshots, snap);
}

export async function listSnapshots(dir: string): Promise<SnapshotInfo[]> {
  let names: string[];
  try {
    names = await readdir(containerFiles(dir).snapshots);
  } catch {
    return [];
  }
  const out: SnapshotInfo[] = [];
  for (const n of names) {
    if (n.includes('.')) continue; // being deleted
    try {
      out.push(snapshotInfoSchema.parse(JSON.parse(await readFile(join(snapDir(dir, n), 'snapshot.json'), 'utf8'))));
    } catch {
      // a snapshot being written (no snapshot.json yet) or damaged: not listed
    }
  }
  return out.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

export async function getSnapshot(dir: string, snap: string): Promise<SnapshotInfo> {
  try {
    return snapshotInfoSchema.parse(JSON.parse(await readFile(join(snapDir(dir, snap), 'snapshot.json'), 'utf8')));
  } catch {
    throw new HfError('HF_ERR_NOT_FOUND', `snapshot "${snap}" not found`);
  }
}

/** Copies the root filesystem and definition into a new snapshot. Nothing is left on failure. */
export async function createSnapshot(dir: string, snap: string, config: InstanceConfig, opts: { stateful: boolean; description?: string }): Promise<SnapshotInfo> {
  const f = containerFiles(dir);
  const target = snapDir(dir, snap);
  await mkdir(f.snapshots, { recursive: true, mode: 0o711 });
  try {
    await mkdir(target, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new HfError('HF_ERR_ALREADY_EXISTS', `snapshot "${snap}" already exists`);
    throw e;
  }
  try {
    const stats = await copyTreeShifted(f.rootfs, join(target, 'rootfs'), NO_SHIFT);
    await copyFile(f.meta, join(target, 'container.json'));
    const info: SnapshotInfo = { name: snap, createdAt: new Date().toISOString(), config, stateful: opts.stateful, files: stats.files + stats.dirs + stats.symlinks + stats.hardlinks, sizeBytes: stats.bytes, description: opts.description ?? '' };
    // snapshot.json last: its presence marks a complete snapshot.
    await writeFile(join(target, 'snapshot.json'), JSON.stringify(info, null, 2) + '\n');
    return info;
  } catch (e) {
    await rm(target, { recursive: true, force: true });
    throw e;
  }
}

/** Replaces the root filesystem and container.json with the snapshot's; returns its config. */
export async function revertToSnapshot(dir: string, snap: string): Promise<SnapshotInfo> {
  const info = await getSnapshot(dir, snap);
  const f = containerFiles(dir);
  const src = snapDir(dir, snap);
  const incoming = join(dir, 'rootfs.incoming');
  const outgoing = join(dir, 'rootfs.outgoing');
  await rm(incoming, { recursive: true, force: true });
  await rm(outgoing, { recursive: true, force: true });
  try {
    await copyTreeShifted(join(src, 'rootfs'), incoming, NO_SHIFT);
  } catch (e) {
    await rm(incoming, { recursive: true, force: true });
    throw e;
  }
  await rename(f.rootfs, outgoing);
  try {
    await rename(incoming, f.rootfs);
  } catch (e) {
    await rename(outgoing, f.rootfs);
    throw e;
  }
  await copyFile(join(src, 'container.json'), f.meta);
  await rm(outgoing, { recursive: true, force: true });
  return info;
}

export async function deleteSnapshot(dir: string, snap: string): Promise<void> {
  await getSnapshot(dir, snap);
  const target = snapDir(dir, snap);
  // Rename first so a half-deleted snapshot is never listed.
  const doomed = `${target}.deleting`;
  await rename(target, doomed);
  await rm(doomed, { recursive: true, force: true });
}

export async function snapshotExists(dir: string, snap: string): Promise<boolean> {
  return stat(join(snapDir(dir, snap), 'snapshot.json')).then(() => true, () => false);
}
