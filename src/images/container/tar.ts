// Root filesystem archives, checked before anything is written. A tar member with an absolute
// name, a ".." component, a hard link that points outside the tree, or a path that runs through
// a symbolic link of the same archive could write outside the container's root: such an archive
// is refused whole, before extraction starts, so nothing of it lands anywhere.
// The members are listed by the shared tar reader (storage/tar.ts, on tar-stream); gzip is
// decompressed in process, xz, bzip2 and zstd through Debian's tools.
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { HfError } from '../../core/errors.js';
import { readTarEntries, TarError, type TarEntry } from '../../util/tar.js';
import { run } from '../../util/exec.js';

export type { TarEntry, TarEntryType } from '../../util/tar.js';

/** Normalizes a member name ("./a//b/" → "a/b"); returns undefined for the archive root. */
export function normalizeMember(name: string): string | undefined {
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  return parts.length ? parts.join('/') : undefined;
}

export interface UnsafeMember {
  name: string;
  reason: string;
}

/** Every member that could write outside the extraction root (pure). */
export function findUnsafeMembers(entries: ReadonlyArray<Pick<TarEntry, 'name' | 'type' | 'linkname'>>): UnsafeMember[] {
  const bad: UnsafeMember[] = [];
  const symlinks = new Set<string>();
  for (const e of entries) {
    if (e.name.startsWith('/')) {
      bad.push({ name: e.name, reason: 'absolute path' });
      continue;
    }
    if (e.name.split('/').includes('..')) {
      bad.push({ name: e.name, reason: '".." in the path' });
      continue;
    }
    const norm = normalizeMember(e.name);
    if (norm === undefined) continue;
    const parts = norm.split('/');
    for (let i = 1; i < parts.length; i++) {
      const parent = parts.slice(0, i).join('/');
      if (symlinks.has(parent)) {
        bad.push({ name: e.name, reason: `path runs through the symbolic link ${parent}` });
        break;
      }
    }
    if (e.type === 'hardlink') {
      if (e.linkname.startsWith('/')) bad.push({ name: e.name, reason: `hard link to the absolute path ${e.linkname}` });
      else if (e.linkname.split('/').includes('..')) bad.push({ name: e.name, reason: `hard link to ${e.linkname} (".." in the target)` });
    }
    if (e.type === 'symlink') symlinks.add(norm);
    else symlinks.delete(norm);
  }
  return bad;
}

/** Opens an archive as a stream of uncompressed tar bytes (gzip in process; xz, bzip2, zstd by their tools). */
async function tarStream(file: string): Promise<{ stream: AsyncIterable<Buffer>; done: () => Promise<void> }> {
  const fh = await open(file, 'r');
  const head = Buffer.alloc(6);
  try {
    await fh.read(head, 0, 6, 0);
  } finally {
    await fh.close();
  }
  let tool: string | undefined;
  if (head[0] === 0x1f && head[1] === 0x8b) {
    return { stream: createReadStream(file).pipe(createGunzip()), done: async () => undefined };
  }
  if (head.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) tool = 'xz';
  else if (head.subarray(0, 3).toString() === 'BZh') tool = 'bzip2';
  else if (head.readUInt32LE(0) === 0xfd2fb528) tool = 'zstd';
  if (!tool) return { stream: createReadStream(file), done: async () => undefined };
  const child = spawn(tool, ['-dc', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  const failed = new Promise<void>((resolve, reject) => {
    child.once('error', (e) => reject(new HfError('HF_ERR_MISSING_DEPENDENCY', `${tool} is needed to read ${file}: ${e.message}`)));
    child.once('close', (code) => (code === 0 || code === null ? resolve() : reject(new HfError('HF_ERR_VALIDATION', `${tool} could not decompress ${file} (exit ${code})`))));
  });
  return { stream: child.stdout as Readable, done: () => failed };
}

/** Lists an archive's members; refuses it (HF_ERR_VALIDATION) when any member is unsafe. */
export async function checkRootfsArchive(file: string): Promise<TarEntry[]> {
  const { stream, done } = await tarStream(file);
  let entries: TarEntry[];
  try {
    entries = await readTarEntries(stream);
  } catch (e) {
    await done(); // a decompressor that failed says why better than the truncated stream does
    if (e instanceof TarError) throw new HfError('HF_ERR_VALIDATION', `${file} is not a readable tar archive: ${e.message}`, { cause: e });
    throw e;
  }
  await done();
  if (entries.length === 0) throw new HfError('HF_ERR_VALIDATION', `${file} is empty or not a tar archive`);
  const bad = findUnsafeMembers(entries);
  if (bad.length) {
    throw new HfError('HF_ERR_VALIDATION', `refusing archive ${file}: ${bad.length} member(s) would land outside the root, e.g. ${bad[0]!.name} (${bad[0]!.reason})`, {
      details: { unsafe: bad.slice(0, 20) },
    });
  }
  return entries;
}

/**
 * Checks then extracts a root filesystem archive into `dest` (which must exist), keeping
 * numeric owners and modes. Nothing is written when the check fails.
 */
export async function extractRootfsArchive(file: string, dest: string): Promise<{ entries: number }> {
  const entries = await checkRootfsArchive(file);
  await run('tar', ['--extract', '--file', file, '--directory', dest, '--numeric-owner', '--preserve-permissions', '--same-owner', '--no-overwrite-dir', '--warning=no-unknown-keyword'], {
    errorCode: 'HF_ERR_VALIDATION',
    timeoutMs: 30 * 60_000,
  });
  return { entries: entries.length };
}
