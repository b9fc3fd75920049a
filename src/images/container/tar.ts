// Root filesystem archives, checked before anything is written. A tar member with an absolute
// name, a ".." component, a hard link that points outside the tree, or a path that runs through
// a symbolic link of the same archive could write outside the container's root: such an archive
// is refused whole, before extraction starts, so nothing of it lands anywhere.
// The parser reads ustar, GNU (long names and links) and pax headers; gzip is decompressed in
// process, xz, bzip2 and zstd through Debian's tools.
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { HfError } from '../../core/errors.js';
import { run } from '../../util/exec.js';

export type TarEntryType = 'file' | 'hardlink' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo' | 'other';

export interface TarEntry {
  name: string;
  type: TarEntryType;
  linkname: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
}

const TYPES: Record<string, TarEntryType> = { '0': 'file', '\0': 'file', '7': 'file', '1': 'hardlink', '2': 'symlink', '3': 'char', '4': 'block', '5': 'dir', '6': 'fifo' };

function str(b: Buffer, start: number, len: number): string {
  const s = b.subarray(start, start + len);
  const z = s.indexOf(0);
  return (z >= 0 ? s.subarray(0, z) : s).toString('utf8');
}

function num(b: Buffer, start: number, len: number): number {
  const f = b.subarray(start, start + len);
  if (f[0]! & 0x80) {
    // base-256 (GNU) for large values
    let v = 0;
    for (let i = 1; i < f.length; i++) v = v * 256 + f[i]!;
    return v;
  }
  const s = str(b, start, len).trim();
  return s ? parseInt(s, 8) : 0;
}

function parsePax(data: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let i = 0;
  while (i < data.length) {
    const sp = data.indexOf(0x20, i);
    if (sp < 0) break;
    const len = Number(data.subarray(i, sp).toString());
    if (!Number.isFinite(len) || len <= 0) break;
    const rec = data.subarray(sp + 1, i + len - 1).toString('utf8');
    const eq = rec.indexOf('=');
    if (eq > 0) out[rec.slice(0, eq)] = rec.slice(eq + 1);
    i += len;
  }
  return out;
}

/** Parses tar headers from a stream of the (uncompressed) archive. */
export async function readTarEntries(stream: AsyncIterable<Buffer>): Promise<TarEntry[]> {
  const entries: TarEntry[] = [];
  let buf: Buffer = Buffer.alloc(0);
  let skip = 0;
  /** Collecting the data of a GNU long name/link or pax header. */
  let collect: { kind: 'L' | 'K' | 'x' | 'g'; size: number } | undefined;
  let longName: string | undefined;
  let longLink: string | undefined;
  let pax: Record<string, string> = {};
  let globalPax: Record<string, string> = {};
  let ended = false;
  for await (const chunk of stream) {
    if (ended) continue;
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
    for (;;) {
      if (skip > 0) {
        const n = Math.min(skip, buf.length);
        buf = buf.subarray(n);
        skip -= n;
        if (skip > 0) break;
      }
      if (collect) {
        const padded = Math.ceil(collect.size / 512) * 512;
        if (buf.length < padded) break;
        const data = buf.subarray(0, collect.size);
        if (collect.kind === 'L') longName = str(data, 0, data.length);
        else if (collect.kind === 'K') longLink = str(data, 0, data.length);
        else if (collect.kind === 'x') pax = parsePax(data);
        else globalPax = { ...globalPax, ...parsePax(data) };
        buf = buf.subarray(padded);
        collect = undefined;
        continue;
      }
      if (buf.length < 512) break;
      const h = buf.subarray(0, 512);
      buf = buf.subarray(512);
      if (h.every((x) => x === 0)) {
        ended = true;
        break;
      }
      let sum = 0;
      for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : h[i]!;
      if (sum !== num(h, 148, 8)) throw new HfError('HF_ERR_VALIDATION', 'not a tar archive (bad header checksum)');
      const flag = String.fromCharCode(h[156]!);
      const size = num(h, 124, 12);
      if (flag === 'L' || flag === 'K' || flag === 'x' || flag === 'g') {
        collect = { kind: flag, size };
        continue;
      }
      const magic = str(h, 257, 6);
      const prefix = magic === 'ustar' && h[345] !== 0 ? str(h, 345, 155) : '';
      let name = str(h, 0, 100);
      if (prefix) name = `${prefix}/${name}`;
      const merged = { ...globalPax, ...pax };
      name = merged.path ?? longName ?? name;
      const linkname = merged.linkpath ?? longLink ?? str(h, 157, 100);
      const type = TYPES[flag] ?? 'other';
      entries.push({ name, type, linkname, size: merged.size ? Number(merged.size) : size, mode: num(h, 100, 8), uid: num(h, 108, 8), gid: num(h, 116, 8) });
      longName = undefined;
      longLink = undefined;
      pax = {};
      const dataSize = type === 'file' ? (merged.size ? Number(merged.size) : size) : 0;
      skip = Math.ceil(dataSize / 512) * 512;
    }
  }
  return entries;
}

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
export function findUnsafeMembers(entries: TarEntry[]): UnsafeMember[] {
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
  const entries = await readTarEntries(stream);
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
