// The one tar reader (on tar-stream, which knows ustar, GNU long names/links and pax records):
// the table of contents of an archive — names, types, owners and where each entry's data sits —
// for OVAs (qemu-img then reads a disk straight out of the archive with the raw driver's
// offset/size, without unpacking it) and container root filesystem archives (checked member by
// member before anything is extracted, images/container/tar.ts).
import { createReadStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { extract, type Header } from 'tar-stream';

export type TarEntryType = 'file' | 'hardlink' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo' | 'other';

export interface TarEntry {
  name: string;
  type: TarEntryType;
  /** Target of a symbolic or hard link ('' otherwise). */
  linkname: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  /** Where the entry's data starts in the (uncompressed) archive. */
  offset: number;
}

export class TarError extends Error {}

const BLOCK = 512;

const TYPES: Partial<Record<Header['type'], TarEntryType>> = {
  file: 'file',
  'contiguous-file': 'file',
  link: 'hardlink',
  symlink: 'symlink',
  'character-device': 'char',
  'block-device': 'block',
  directory: 'dir',
  fifo: 'fifo',
};

/** tar-stream's messages, said in terms of what is wrong with the archive. */
function tarError(e: unknown): TarError {
  const msg = (e as Error).message ?? String(e);
  if (/Invalid tar header/i.test(msg)) return new TarError(`bad tar header: its checksum does not match (corrupt, or a compressed archive?): ${msg}`);
  if (/Unexpected end of data/i.test(msg)) return new TarError('the archive is truncated: an entry runs past the end of the archive');
  return new TarError(msg);
}

/** Lists the entries of an (uncompressed) tar archive read as a stream. Reads it once, to the end. */
export async function readTarEntries(input: AsyncIterable<Buffer>): Promise<TarEntry[]> {
  // Old (pre-ustar) headers are read too: their checksum is still checked.
  const ex = extract({ allowUnknownFormat: true } as Parameters<typeof extract>[0]);
  const src = Readable.from(input, { objectMode: false });
  src.on('error', (e) => ex.destroy(e));
  src.pipe(ex);
  const entries: TarEntry[] = [];
  try {
    for await (const entry of ex) {
      const h = entry.header;
      // The data follows the entry's own header (long-name and pax records come before it).
      entries.push({ name: h.name, type: TYPES[h.type] ?? 'other', linkname: h.linkname ?? '', size: h.size ?? 0, mode: h.mode ?? 0, uid: h.uid ?? 0, gid: h.gid ?? 0, offset: entry.offset + BLOCK });
      entry.resume();
    }
  } catch (e) {
    src.destroy();
    throw tarError(e);
  }
  return entries;
}

/** Lists a tar file on disk (an OVA). */
export function listTarFile(path: string): Promise<TarEntry[]> {
  return readTarEntries(createReadStream(path));
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

/** Whether a 512-byte block is a ustar header (format sniffing: magic and checksum). */
export function isTarHeader(b: Buffer): boolean {
  if (b.length < BLOCK) return false;
  if (!b.subarray(257, 262).equals(Buffer.from('ustar'))) return false;
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : b[i]!;
  const field = b.subarray(148, 156).toString('latin1').replace(/\0.*$/s, '').trim();
  return /^[0-7]+$/.test(field) && parseInt(field, 8) === sum;
}
