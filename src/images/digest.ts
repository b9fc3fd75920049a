// Checksums of an image's files, as its record carries them (`sha256`, keyed by path in the
// image's directory): a file's SHA-256, and for a directory tree (a container's `rootfs/`) one
// digest of the whole tree. The tree digest covers what a copy must keep — each entry's path,
// type, permission bits, owner, and a file's content, a link's target, a device's numbers — and
// not what a copy may change (times, where a hard link's twin is, extended attributes).
import { createHash } from 'node:crypto';
import { lstat, readdir, readlink } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { join } from 'node:path';
import { HfError } from '../core/errors.js';
import { sha256File } from '../util/hash.js';

export type TreeEntryType = 'dir' | 'file' | 'symlink' | 'char' | 'block' | 'fifo';

/** One entry of a tree, in walk order (a directory before what it holds, names in byte order). */
export interface TreeEntry {
  /** Path relative to the tree's root, '/'-separated. */
  path: string;
  abs: string;
  type: TreeEntryType;
  stat: Stats;
  /** A symbolic link's target. */
  target?: string;
}

function typeOf(st: Stats): TreeEntryType | undefined {
  if (st.isDirectory()) return 'dir';
  if (st.isFile()) return 'file';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isCharacterDevice()) return 'char';
  if (st.isBlockDevice()) return 'block';
  if (st.isFIFO()) return 'fifo';
  return undefined; // sockets: nothing a copy could carry
}

/** Linux's major and minor device numbers of an `rdev`. */
export function deviceNumbers(rdev: number): { major: number; minor: number } {
  return { major: Math.floor(rdev / 256) & 0xfff, minor: (rdev & 0xff) | (Math.floor(rdev / 1048576) & 0xfff00) };
}

/** Every entry under `root` (not `root` itself), directories first, each directory's names in byte order. */
export async function walkTree(root: string): Promise<TreeEntry[]> {
  const out: TreeEntry[] = [];
  const visit = async (dir: string, rel: string): Promise<void> => {
    const names = (await readdir(dir)).sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
    for (const name of names) {
      const abs = join(dir, name);
      const path = rel ? `${rel}/${name}` : name;
      const st = await lstat(abs);
      const type = typeOf(st);
      if (!type) continue;
      out.push({ path, abs, type, stat: st, ...(type === 'symlink' ? { target: await readlink(abs) } : {}) });
      if (type === 'dir') await visit(abs, path);
    }
  };
  const st = await lstat(root).catch(() => undefined);
  if (!st?.isDirectory()) throw new HfError('HF_ERR_BAD_IMAGE', `${root} is not a directory`);
  await visit(root, '');
  return out;
}

/** The digest of the tree at `root` (hex): the same for any faithful copy of it. */
export async function treeDigest(root: string): Promise<string> {
  const h = createHash('sha256');
  for (const e of await walkTree(root)) {
    const st = e.stat;
    let what = '';
    if (e.type === 'file') what = `${st.size} ${await sha256File(e.abs)}`;
    else if (e.type === 'symlink') what = e.target ?? '';
    else if (e.type === 'char' || e.type === 'block') {
      const d = deviceNumbers(st.rdev);
      what = `${d.major},${d.minor}`;
    }
    h.update(JSON.stringify([e.path, e.type, st.mode & 0o7777, st.uid, st.gid, what]) + '\n');
  }
  return h.digest('hex');
}

/**
 * The `sha256` field of a new image's record: each of `files` (paths in `dir`) hashed, and each of
 * `trees` digested as a whole under its key with a trailing '/'.
 */
export async function imageChecksums(dir: string, entries: { files?: string[]; trees?: string[] }): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of entries.files ?? []) out[f] = await sha256File(join(dir, f));
  for (const t of entries.trees ?? []) out[`${t}/`] = await treeDigest(join(dir, t));
  return out;
}
