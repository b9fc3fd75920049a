// Moving an image's files between hosts. The sending host packs the files its record's checksums
// name into one tar stream (each file; each tree with everything in it). The receiving host
// unpacks that stream into a directory of its own and accepts it only if every file matches the
// checksum the record carries — the record as the receiver read it from the cluster's store, not
// anything the stream says: a file is hashed as it is written, a tree is digested once unpacked.
// Trees go through a staging archive and the one checked extraction path for root filesystems
// (container/tar.ts), so ownership, modes and device nodes come out as the system's tar makes them.
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, type Stats } from 'node:fs';
import { lstat, mkdir, open, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { extract, pack as tarPack, type Extract, type Header, type Pack } from 'tar-stream';
import { HfError, toHfError } from '../core/errors.js';
import { imageEntries, type ImageRecord } from '../core/model/image.js';
import { extractRootfsArchive, normalizeMember } from './container/tar.js';
import { deviceNumbers, treeDigest, walkTree, type TreeEntryType } from './digest.js';

type ImageSums = Pick<ImageRecord, 'name' | 'sha256'>;
type Headers = Partial<Header> & Pick<Header, 'name'>;
/** One member of an archive being read: its header and a stream of its data. */
type TarMember = Extract extends AsyncIterable<infer M> ? M : never;

interface PackItem {
  name: string;
  abs: string;
  type: TreeEntryType;
  stat: Stats;
  target?: string;
}

export interface PackedImage {
  /** The tar stream; destroying it stops the packing. */
  stream: Readable;
  /** Bytes of file data it carries (the receiver's progress). */
  bytes: number;
}

const TAR_TYPES: Record<TreeEntryType, Header['type']> = {
  dir: 'directory',
  file: 'file',
  symlink: 'symlink',
  char: 'character-device',
  block: 'block-device',
  fifo: 'fifo',
};

/**
 * The image's files in `dir` as one tar stream. Everything is looked at before the stream starts:
 * a file or tree the checksums name that is not there refuses the whole image (HF_ERR_BAD_IMAGE).
 */
export async function packImageFiles(dir: string, rec: ImageSums): Promise<PackedImage> {
  const { files, trees } = imageEntries(rec);
  if (!files.length && !trees.length) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}" carries no checksums of its files (made by an older version): rebuild or re-import it`);
  const items: PackItem[] = [];
  for (const f of files) {
    const st = await lstat(join(dir, f)).catch(() => undefined);
    if (!st?.isFile()) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": ${f}, which its checksums name, is not a file in ${dir}`);
    items.push({ name: f, abs: join(dir, f), type: 'file', stat: st });
  }
  for (const t of trees) {
    const abs = join(dir, t);
    const st = await lstat(abs).catch(() => undefined);
    if (!st?.isDirectory()) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": ${t}/, which its checksums name, is not a directory in ${dir}`);
    items.push({ name: t, abs, type: 'dir', stat: st });
    for (const e of await walkTree(abs)) items.push({ ...e, name: `${t}/${e.path}` });
  }
  const bytes = items.reduce((s, i) => s + (i.type === 'file' ? i.stat.size : 0), 0);
  const pack = tarPack();
  // Its failures reach the reader through the stream below; the event itself needs no listener of its own.
  pack.on('error', () => undefined);
  void (async () => {
    for (const item of items) {
      if (pack.destroyed) return;
      await addEntry(pack, item);
    }
    pack.finalize();
  })().catch((e: unknown) => pack.destroy(e as Error));
  return { stream: Readable.from(pack, { objectMode: false }), bytes };
}

function addEntry(pack: Pack, i: PackItem): Promise<void> {
  const st = i.stat;
  const header: Headers = { name: i.name, type: TAR_TYPES[i.type], mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtime: st.mtime };
  if (i.type === 'symlink') header.linkname = i.target ?? '';
  if (i.type === 'char' || i.type === 'block') {
    const d = deviceNumbers(st.rdev);
    header.devmajor = d.major;
    header.devminor = d.minor;
  }
  return new Promise((resolve, reject) => {
    if (i.type !== 'file') {
      pack.entry(header, (err) => (err ? reject(err) : resolve()));
      return;
    }
    const sink = pack.entry({ ...header, size: st.size }, (err) => (err ? reject(err) : resolve()));
    sink.on('error', reject);
    const src = createReadStream(i.abs);
    src.on('error', (e) => {
      sink.destroy(e);
      reject(e);
    });
    src.pipe(sink);
  });
}

export interface ReceiveOptions {
  /** Aborting stops the transfer; the call then rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Bytes of file data received so far grew by `n`. */
  onBytes?: (n: number) => void;
  /** The sending host, for messages. */
  from: string;
}

function mismatch(rec: ImageSums, key: string, from: string, got: string): HfError {
  return new HfError('HF_ERR_CHECKSUM_MISMATCH', `image "${rec.name}": ${key} from host ${from} does not match the checksum its record carries (expected ${rec.sha256[key]!.slice(0, 16)}…, got ${got.slice(0, 16)}…): nothing was kept`, {
    details: { image: rec.name, file: key, host: from, expected: rec.sha256[key], actual: got },
  });
}

/**
 * Unpacks an image's tar stream into `dest` (an empty directory) and checks every file and tree
 * against `rec.sha256`: HF_ERR_CHECKSUM_MISMATCH names the first that differs or did not arrive,
 * HF_ERR_BAD_IMAGE a member the image does not have. On failure `dest` holds leftovers the
 * caller removes; the staging archive of trees (beside `dest`) is removed here.
 */
export async function receiveImageFiles(input: Readable, dest: string, rec: ImageSums, opts: ReceiveOptions): Promise<void> {
  const { files, trees } = imageEntries(rec);
  const wanted = new Set(files);
  const got = new Set<string>();
  const staging = `${dest}.trees.tar`;
  let treeTar: { pack: Pack; written: Promise<void> } | undefined;
  const ex = extract();
  const stop = (e: unknown): void => {
    input.destroy(e as Error);
    ex.destroy(e as Error);
  };
  input.on('error', (e) => ex.destroy(e));
  const onAbort = (): void => stop(opts.signal!.reason);
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  input.pipe(ex);
  try {
    opts.signal?.throwIfAborted();
    for await (const entry of ex) {
      const h = entry.header;
      const name = normalizeMember(h.name);
      if (name === undefined) {
        entry.resume();
        continue;
      }
      if (wanted.has(name)) {
        if (h.type !== 'file' || got.has(name)) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": host ${opts.from} sent ${name} ${got.has(name) ? 'twice' : `as a ${h.type}, not a file`}`);
        got.add(name);
        const digest = await writeHashed(entry as AsyncIterable<Buffer>, join(dest, name), (h.mode ?? 0o644) & 0o777, opts.onBytes);
        if (digest !== rec.sha256[name]) throw mismatch(rec, name, opts.from, digest);
        continue;
      }
      const tree = trees.find((t) => name === t || name.startsWith(`${t}/`));
      if (!tree) throw new HfError('HF_ERR_BAD_IMAGE', `image "${rec.name}": host ${opts.from} sent ${name}, which is not one of the image's files`);
      treeTar ??= stagingArchive(staging);
      await copyEntry(treeTar.pack, { ...h, name }, entry);
      if (h.type === 'file') opts.onBytes?.(h.size ?? 0);
    }
    opts.signal?.throwIfAborted();
    const missing = files.find((f) => !got.has(f));
    if (missing) throw new HfError('HF_ERR_CHECKSUM_MISMATCH', `image "${rec.name}": ${missing} did not arrive from host ${opts.from}: nothing was kept`, { details: { image: rec.name, file: missing, host: opts.from } });
    if (treeTar) {
      treeTar.pack.finalize();
      await treeTar.written;
      await extractRootfsArchive(staging, dest);
    }
    for (const t of trees) {
      const key = `${t}/`;
      const digest = await treeDigest(join(dest, t)).catch(() => 'missing');
      if (digest !== rec.sha256[key]) throw mismatch(rec, key, opts.from, digest);
    }
  } catch (e) {
    if (opts.signal?.aborted) throw opts.signal.reason;
    if (e instanceof HfError) throw e;
    throw new HfError('HF_ERR_INTERNAL', `image "${rec.name}": the transfer from host ${opts.from} broke off: ${(e as Error).message}`, { cause: toHfError(e) });
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
    if (!input.readableEnded) input.destroy();
    treeTar?.pack.destroy();
    await rm(staging, { force: true });
  }
}

/** Writes an entry's data to a new file at `path`, hashing it on the way; answers its SHA-256. */
async function writeHashed(entry: AsyncIterable<Buffer>, path: string, mode: number, onBytes?: (n: number) => void): Promise<string> {
  const hash = createHash('sha256');
  await mkdir(dirname(path), { recursive: true });
  const fh = await open(path, 'wx', mode || 0o644);
  try {
    for await (const chunk of entry) {
      hash.update(chunk);
      await fh.write(chunk);
      onBytes?.(chunk.length);
    }
  } finally {
    await fh.close();
  }
  return hash.digest('hex');
}

/** A tar archive being written to `file`. */
function stagingArchive(file: string): { pack: Pack; written: Promise<void> } {
  const pack = tarPack();
  pack.on('error', () => undefined);
  const out = createWriteStream(file, { mode: 0o600 });
  pack.pipe(out);
  return { pack, written: finished(out) };
}

/** Copies one member (header and data) into another archive. */
function copyEntry(pack: Pack, header: Headers, data: TarMember): Promise<void> {
  return new Promise((resolve, reject) => {
    const sink = pack.entry(header, (err) => (err ? reject(err) : resolve()));
    sink.on('error', reject);
    data.on('error', reject);
    data.pipe(sink);
  });
}
