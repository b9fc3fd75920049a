// An image: what instances are created from (a VM boot source and disk template, or a
// container root filesystem), and the pure rules for moving one between hosts: which files its
// checksums name, where they live on the host that made it, and how its record reads once the
// files sit in another directory.
import { z } from 'zod';
import { HfError } from '../errors.js';
import { bootConfigSchema, nameSchema } from './instance.js';

export const imageRecordSchema = z.object({
  name: nameSchema,
  type: z.enum(['vm', 'container']),
  description: z.string(),
  /** builtin: made by a builder on this host; import: from a file; publish: from an instance. */
  source: z.enum(['builtin', 'import', 'publish']),
  /** VMs: how instances made from this image boot (kernel paths are absolute). */
  boot: bootConfigSchema.optional(),
  /** VMs: the disk template that instances get a linked clone (qcow2 overlay) or a copy of. */
  disk: z.object({ path: z.string(), format: z.enum(['qcow2', 'raw']) }).optional(),
  /** Containers: the root filesystem (a directory tree or a tarball). */
  rootfs: z.object({ path: z.string(), format: z.enum(['dir', 'tar']) }).optional(),
  /** Defaults an instance made from it starts with (e.g. from an OVF). */
  defaults: z.object({ vcpus: z.number().optional(), memoryMiB: z.number().optional() }).default({}),
  sizeBytes: z.number(),
  /**
   * The image's files and their SHA-256 (hex), by path relative to the image's directory: every
   * file the image consists of. A key ending in `/` names a directory tree (a container's
   * `rootfs/`), its value the tree's digest (images/digest.ts). Another host that fetches the
   * image checks what it receives against these.
   */
  sha256: z.record(z.string(), z.string()).default({}),
  createdAt: z.string(),
  details: z.record(z.string(), z.unknown()).default({}),
});
export type ImageRecord = z.infer<typeof imageRecordSchema>;

/** An image as a cluster lists it: the record, and which hosts hold it (in a cluster only). */
export type ImageView = ImageRecord & { hosts?: string[] };

/** The response header in which a host sending an image's files says how many bytes of file data follow. */
export const IMAGE_BYTES_HEADER = 'x-hyperfold-image-bytes';

/** The checksum keys of an image, split into files and directory trees (keys ending in `/`, given without it). */
export interface ImageEntries {
  files: string[];
  trees: string[];
}

/**
 * The files and trees an image's checksums name (sorted). Each key must be a plain relative path
 * inside the image's directory; one that is not (absolute, `..`, empty parts) or that lies inside
 * another is refused: such a record cannot be moved as it is.
 */
export function imageEntries(rec: Pick<ImageRecord, 'name' | 'sha256'>): ImageEntries {
  const files: string[] = [];
  const trees: string[] = [];
  for (const key of Object.keys(rec.sha256).sort()) {
    const tree = key.endsWith('/');
    const path = tree ? key.slice(0, -1) : key;
    const parts = path.split('/');
    if (!path || path.startsWith('/') || parts.some((p) => p === '' || p === '.' || p === '..')) {
      throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": its checksum key ${JSON.stringify(key)} is not a path inside the image's directory`);
    }
    if (!/^[0-9a-f]{64}$/.test(rec.sha256[key]!)) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": the checksum of ${key} is not a SHA-256 in hex`);
    (tree ? trees : files).push(path);
  }
  const all = [...files, ...trees];
  for (const t of trees) {
    const inside = all.find((p) => p !== t && p.startsWith(`${t}/`));
    if (inside) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": ${inside} lies inside the tree ${t}/, which is checksummed as a whole`);
  }
  return { files, trees };
}

/** The absolute paths of a record that must point at its own files for it to work elsewhere. */
function ownPaths(rec: ImageRecord): Array<{ what: string; path: string }> {
  const out: Array<{ what: string; path: string }> = [];
  if (rec.boot?.kind === 'kernel') {
    out.push({ what: 'kernel', path: rec.boot.kernel });
    if (rec.boot.initrd) out.push({ what: 'initrd', path: rec.boot.initrd });
  }
  if (rec.disk) out.push({ what: 'disk', path: rec.disk.path });
  if (rec.rootfs) out.push({ what: 'root filesystem', path: rec.rootfs.path });
  const extra = rec.details.extraDisks;
  if (Array.isArray(extra)) {
    for (const x of extra as Array<{ name?: unknown; path?: unknown }>) if (typeof x?.path === 'string') out.push({ what: `disk ${String(x.name)}`, path: x.path });
  }
  return out;
}

/**
 * The directory that holds an image's files on the host that made it: `details.dir` when the
 * record names one (an image kept in another storage pool), else the one its paths share under
 * their checksum keys (`<dir>/disk.qcow2` with a key `disk.qcow2`) — its disk's or root
 * filesystem's first, which are always its own; a kernel may come from elsewhere.
 */
export function imageFilesDir(rec: ImageRecord): string {
  if (typeof rec.details.dir === 'string' && rec.details.dir.startsWith('/')) return rec.details.dir;
  const { files, trees } = imageEntries(rec);
  const keys = [...files, ...trees].sort((a, b) => b.length - a.length);
  const dirsOf = (paths: string[]): Set<string> => {
    const dirs = new Set<string>();
    for (const path of paths) {
      const key = keys.find((k) => path.endsWith(`/${k}`));
      if (key) dirs.add(path.slice(0, -(key.length + 1)));
    }
    return dirs;
  };
  const primary = dirsOf([rec.disk?.path, rec.rootfs?.path].filter((p): p is string => p !== undefined));
  const dirs = primary.size ? primary : dirsOf(ownPaths(rec).map((p) => p.path));
  if (dirs.size === 1) return [...dirs][0]!;
  if (dirs.size === 0) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": none of its paths names a file its checksums cover: the record cannot be moved to another host`);
  throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": its paths lie in different directories (${[...dirs].join(', ')}): the record cannot be moved to another host`);
}

/** `s` with the directory `from` (a prefix ending a path component) replaced by `to`; undefined when `s` is not under `from`. */
function moved(s: string, from: string, to: string): string | undefined {
  if (s === from) return to;
  return s.startsWith(`${from}/`) ? to + s.slice(from.length) : undefined;
}

function rewrite(v: unknown, from: string, to: string): unknown {
  if (typeof v === 'string') return moved(v, from, to) ?? v;
  if (Array.isArray(v)) return v.map((x) => rewrite(x, from, to));
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, rewrite(x, from, to)]));
  return v;
}

/**
 * The record as a host keeps it once the image's files sit in `dir` on that host: every path
 * under the files' old directory moves under `dir`; `details` drops what named the old host's
 * storage (`dir`, `pool`) and says where the image came from. Refuses (HF_ERR_UNSUPPORTED) a
 * record whose kernel, disks or root filesystem lie outside its own directory: those files would
 * not come along.
 */
export function relocateImage(rec: ImageRecord, dir: string, origin: { host: string; at: string }): ImageRecord {
  const from = imageFilesDir(rec);
  for (const { what, path } of ownPaths(rec)) {
    if (moved(path, from, dir) === undefined) {
      throw new HfError('HF_ERR_UNSUPPORTED', `image "${rec.name}" on host ${origin.host}: its ${what} ${path} lies outside the image's directory ${from}, so it cannot be fetched (publish an instance made from it instead: a published image carries its kernel)`);
    }
  }
  const { dir: _dir, pool: _pool, ...details } = rec.details;
  const out = rewrite({ ...rec, details }, from, dir) as ImageRecord;
  return { ...out, details: { ...out.details, fetchedFrom: origin.host, fetchedAt: origin.at } };
}
