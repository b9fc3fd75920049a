// Linked clones without spawning qemu-img: a fresh qcow2 v3 overlay is a fixed, tiny structure
// (header + backing file name, one refcount table, one refcount block, an all-zero L1 table),
// so it is written directly — the same layout `qemu-img create -f qcow2 -b` produces. This
// takes a clone from ~15 ms (a process spawn) to well under 1 ms. Anything unusual about the
// backing file (not qcow2/raw, huge, unreadable) goes through qemu-img instead.
import { open, rm, stat } from 'node:fs/promises';
import { QemuImg } from './qemu-img.js';

const CLUSTER_BITS = 16;
const CLUSTER = 1 << CLUSTER_BITS;
const QCOW2_MAGIC = 0x514649fb;
const EXT_BACKING_FORMAT = 0xe2792aca;
/** One refcount block (16-bit refcounts) covers 32768 clusters: more than this layout needs. */
const MAX_VIRTUAL = 64 * 1024 ** 4;

/** The bytes of an empty qcow2 overlay over `backing` (absolute path) of `virtualSize` bytes. */
export function qcow2OverlayBytes(backing: string, backingFormat: 'qcow2' | 'raw', virtualSize: number): Buffer {
  if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0 || virtualSize > MAX_VIRTUAL) throw new RangeError(`virtual size ${virtualSize} out of range`);
  const name = Buffer.from(backing, 'utf8');
  if (name.length === 0 || name.length > 1023) throw new RangeError('backing file name must be 1-1023 bytes');
  const l2Entries = CLUSTER / 8;
  const l1Size = Math.ceil(virtualSize / (CLUSTER * l2Entries));
  const refcountTable = CLUSTER;
  const refcountBlock = 2 * CLUSTER;
  const l1Table = 3 * CLUSTER;
  const clusters = 3 + Math.ceil((l1Size * 8) / CLUSTER);
  const buf = Buffer.alloc(l1Table + l1Size * 8);

  // Header extension area starts right after the 112-byte v3 header.
  const fmt = Buffer.from(backingFormat, 'ascii');
  let off = 112;
  buf.writeUInt32BE(EXT_BACKING_FORMAT, off);
  buf.writeUInt32BE(fmt.length, off + 4);
  fmt.copy(buf, off + 8);
  off += 8 + Math.ceil(fmt.length / 8) * 8;
  off += 8; // end-of-extensions marker: type 0, length 0 (already zero)
  const backingOffset = off;
  if (backingOffset + name.length > CLUSTER) throw new RangeError('backing file name does not fit in the header cluster');
  name.copy(buf, backingOffset);

  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(3, 4); // version
  buf.writeBigUInt64BE(BigInt(backingOffset), 8);
  buf.writeUInt32BE(name.length, 16);
  buf.writeUInt32BE(CLUSTER_BITS, 20);
  buf.writeBigUInt64BE(BigInt(virtualSize), 24);
  buf.writeUInt32BE(0, 32); // no encryption
  buf.writeUInt32BE(l1Size, 36);
  buf.writeBigUInt64BE(BigInt(l1Table), 40);
  buf.writeBigUInt64BE(BigInt(refcountTable), 48);
  buf.writeUInt32BE(1, 56); // refcount table clusters
  // nb_snapshots, snapshots_offset, incompatible/compatible/autoclear features: 0
  buf.writeUInt32BE(4, 96); // refcount_order: 16-bit refcounts
  buf.writeUInt32BE(112, 100); // header_length (byte 104: compression type zlib = 0)

  buf.writeBigUInt64BE(BigInt(refcountBlock), refcountTable);
  for (let c = 0; c < clusters; c++) buf.writeUInt16BE(1, refcountBlock + c * 2);
  return buf;
}

/** Virtual size of a qcow2 (from its header) or raw (its length) image; undefined if unsure. */
async function virtualSizeOf(path: string, format: 'qcow2' | 'raw'): Promise<number | undefined> {
  if (format === 'raw') return (await stat(path)).size;
  const fh = await open(path, 'r');
  try {
    const h = Buffer.alloc(40);
    const { bytesRead } = await fh.read(h, 0, 40, 0);
    if (bytesRead < 40 || h.readUInt32BE(0) !== QCOW2_MAGIC || h.readUInt32BE(4) < 2) return undefined;
    if (h.readUInt32BE(32) !== 0) return undefined; // encrypted: let qemu-img decide
    return Number(h.readBigUInt64BE(24));
  } finally {
    await fh.close();
  }
}

/**
 * Creates `path` as a linked clone of `backing` (an absolute path). Refuses to overwrite. Falls
 * back to qemu-img when the backing file is not a plain qcow2/raw it can size.
 */
export async function createLinkedClone(path: string, backing: string, backingFormat: 'qcow2' | 'raw', qemuImg: QemuImg = new QemuImg()): Promise<void> {
  let size: number | undefined;
  try {
    size = await virtualSizeOf(backing, backingFormat);
  } catch {
    size = undefined;
  }
  if (size === undefined || size <= 0 || size > MAX_VIRTUAL || size % 512 !== 0) {
    await qemuImg.createOverlay(path, backing, backingFormat);
    return;
  }
  const bytes = qcow2OverlayBytes(backing, backingFormat, size);
  const fh = await open(path, 'wx', 0o644);
  try {
    await fh.writeFile(bytes);
    await fh.close();
  } catch (e) {
    await fh.close().catch(() => undefined);
    await rm(path, { force: true });
    throw e;
  }
}
