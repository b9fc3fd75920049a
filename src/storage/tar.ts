// Reads the table of contents of a tar archive (an OVA is a plain tar): entry names, types and
// where each file's data sits, so qemu-img can read a disk straight out of the archive (raw
// driver with offset/size) without unpacking it. Understands ustar, GNU long names and pax
// `path`/`size` records. Pure logic over a read callback; a file-backed helper is below.
import { open } from 'node:fs/promises';

export interface TarEntry {
  name: string;
  /** '0' file, '5' directory, '2' symlink, … (after long-name/pax records are folded in). */
  type: string;
  /** Offset of the data in the archive. */
  offset: number;
  size: number;
}

export class TarError extends Error {}

const BLOCK = 512;

function str(b: Buffer, off: number, len: number): string {
  const s = b.subarray(off, off + len);
  const z = s.indexOf(0);
  return (z < 0 ? s : s.subarray(0, z)).toString('utf8');
}

function octal(b: Buffer, off: number, len: number): number {
  // GNU base-256 for large sizes: high bit of the first byte set.
  if ((b[off]! & 0x80) !== 0) {
    let v = 0;
    for (let i = off + 1; i < off + len; i++) v = v * 256 + b[i]!;
    return v;
  }
  const s = str(b, off, len).trim();
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw new TarError(`bad number "${s}" in tar header`);
  return parseInt(s, 8);
}

export function isTarHeader(b: Buffer): boolean {
  if (b.length < BLOCK) return false;
  const magic = str(b, 257, 6);
  if (!magic.startsWith('ustar')) return false;
  return checksumOk(b);
}

function checksumOk(b: Buffer): boolean {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : b[i]!;
  try {
    return sum === octal(b, 148, 8);
  } catch {
    return false;
  }
}

function parsePax(data: string): Record<string, string> {
  const out: Record<string, string> = {};
  let i = 0;
  while (i < data.length) {
    const sp = data.indexOf(' ', i);
    if (sp < 0) break;
    const len = Number(data.slice(i, sp));
    if (!Number.isInteger(len) || len <= 0) break;
    const rec = data.slice(sp + 1, i + len - 1);
    const eq = rec.indexOf('=');
    if (eq > 0) out[rec.slice(0, eq)] = rec.slice(eq + 1);
    i += len;
  }
  return out;
}

/** Lists a tar archive through `read(offset, length)`; `total` is the archive's size. */
export async function listTar(read: (offset: number, length: number) => Promise<Buffer>, total: number): Promise<TarEntry[]> {
  const out: TarEntry[] = [];
  let pos = 0;
  let longName: string | undefined;
  let pax: Record<string, string> = {};
  while (pos + BLOCK <= total) {
    const h = await read(pos, BLOCK);
    if (h.every((x) => x === 0)) break;
    if (!checksumOk(h)) throw new TarError(`bad tar header checksum at offset ${pos}`);
    const type = String.fromCharCode(h[156] || 0x30);
    let size = octal(h, 124, 12);
    const dataOff = pos + BLOCK;
    if (dataOff + size > total) throw new TarError(`tar entry at offset ${pos} runs past the end of the archive (truncated?)`);
    if (type === 'L') {
      longName = str(await read(dataOff, size), 0, size);
    } else if (type === 'x') {
      pax = parsePax((await read(dataOff, size)).toString('utf8'));
    } else if (type === 'g') {
      // global pax header: nothing we need
    } else {
      const prefix = str(h, 345, 155);
      let name = longName ?? pax.path ?? (prefix ? `${prefix}/${str(h, 0, 100)}` : str(h, 0, 100));
      if (pax.size !== undefined && /^\d+$/.test(pax.size)) size = Number(pax.size);
      name = name.replace(/^\.\//, '');
      out.push({ name, type: type === '\0' ? '0' : type, offset: dataOff, size });
      longName = undefined;
      pax = {};
    }
    pos = dataOff + Math.ceil(size / BLOCK) * BLOCK;
  }
  return out;
}

/** Lists a tar file on disk. */
export async function listTarFile(path: string): Promise<TarEntry[]> {
  const fh = await open(path, 'r');
  try {
    const { size } = await fh.stat();
    return await listTar(async (offset, length) => {
      const b = Buffer.alloc(length);
      const { bytesRead } = await fh.read(b, 0, length, offset);
      return b.subarray(0, bytesRead);
    }, size);
  } finally {
    await fh.close();
  }
}

/** Reads one entry's data (small files: the OVF, the manifest). */
export async function readTarEntry(path: string, e: TarEntry, maxBytes = 4 * 1024 * 1024): Promise<Buffer> {
  if (e.size > maxBytes) throw new TarError(`${e.name} is ${e.size} bytes: more than the ${maxBytes} expected`);
  const fh = await open(path, 'r');
  try {
    const b = Buffer.alloc(e.size);
    await fh.read(b, 0, e.size, e.offset);
    return b;
  } finally {
    await fh.close();
  }
}
