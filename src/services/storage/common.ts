// Small pieces the storage services share: picking a disk, names, file helpers.
import { randomBytes } from 'node:crypto';
import { copyFile, link, stat } from 'node:fs/promises';
import { HfError } from '../../core/errors.js';
import type { ImageRecord } from '../../core/model/image.js';
import type { DiskConfig, Instance } from '../../core/model/instance.js';

/** The extra disks an imported image carries besides its first (OVAs with several disks). */
export function extraDisks(rec: ImageRecord): Array<{ name: string; path: string; format: 'qcow2' | 'raw' }> {
  const x = rec.details.extraDisks;
  if (!Array.isArray(x)) return [];
  const out: Array<{ name: string; path: string; format: 'qcow2' | 'raw' }> = [];
  for (const e of x as unknown[]) {
    const r = e as { name?: unknown; path?: unknown; format?: unknown };
    if (typeof r.name === 'string' && typeof r.path === 'string') out.push({ name: r.name, path: r.path, format: r.format === 'raw' ? 'raw' : 'qcow2' });
  }
  return out;
}

/** The named disk, or the instance's first hard disk. */
export function pickDisk(inst: Instance, name: string | undefined): DiskConfig {
  const disk = name ? inst.config.disks.find((x) => x.name === name) : inst.config.disks.find((x) => x.media === 'disk');
  if (!disk) throw new HfError('HF_ERR_VALIDATION', name ? `instance ${inst.name} has no disk "${name}"` : `instance ${inst.name} has no disk`);
  return disk;
}

/** A name of at most 63 characters (names are DNS labels): long ones get a random tail. */
export function uniqueName(base: string): string {
  if (base.length <= 63) return base;
  return `${base.slice(0, 54)}-${randomBytes(4).toString('hex')}`;
}

export async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

/** A hard link when both are on one filesystem (no space taken), else a copy. */
export async function linkOrCopy(from: string, to: string): Promise<void> {
  try {
    await link(from, to);
  } catch {
    await copyFile(from, to);
  }
}
