// What an import source is, before anything is written: a disk image file in one of the accepted
// formats (qcow2, raw, VMDK, VHD, VHDX, VDI) or an OVA (tar: an OVF descriptor plus disks). Each
// disk becomes a "source spec" qemu-img can open: a path with an explicit format, or for a disk
// inside an OVA a json: spec reading the archive slice in place (no unpacking, no extra space).
// Refuses early and clearly: unknown data, unsupported formats, backing files pointing outside,
// multi-file VMDKs, corrupt images (qemu-img check), OVAs without an OVF or with missing disks.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { basename, extname } from 'node:path';
import { HfError } from '../core/errors.js';
import { IMPORT_FORMATS, type ImportFormat } from './model.js';
import { parseOvf, type OvfDescriptor } from './ovf.js';
import type { QemuImg } from './qemu-img.js';
import { sniffFile, type SniffedFormat } from './sniff.js';
import { listTarFile, readTarEntry, TarError, type TarEntry } from '../util/tar.js';

/** Formats a user may name (`vhd` is QEMU's `vpc`). */
export { IMPORT_FORMATS, type ImportFormat } from './model.js';

const QEMU_FORMAT: Record<Exclude<ImportFormat, 'ova'>, string> = { qcow2: 'qcow2', raw: 'raw', vmdk: 'vmdk', vhd: 'vpc', vhdx: 'vhdx', vdi: 'vdi' };
const FROM_SNIFF: Partial<Record<SniffedFormat, Exclude<ImportFormat, 'ova' | 'raw'>>> = { qcow2: 'qcow2', vmdk: 'vmdk', vpc: 'vhd', vhdx: 'vhdx', vdi: 'vdi' };
const RAW_EXTENSIONS = new Set(['.raw', '.img', '.bin']);

export interface DiskSource {
  /** What qemu-img opens: a path, or a json: spec for an OVA slice. */
  spec: string;
  /** -f for qemu-img (undefined when the json: spec names the driver). */
  qemuFormat: string | undefined;
  /** The user-facing format name. */
  format: Exclude<ImportFormat, 'ova'>;
  /** For messages: the file or the OVA entry. */
  label: string;
  virtualSize: number;
}

export type InspectedSource =
  | { kind: 'disk'; disks: [DiskSource] }
  | { kind: 'ova'; disks: DiskSource[]; ovf: OvfDescriptor; manifestChecked: number };

function unsupported(what: string, sniffed: string): HfError {
  return new HfError('HF_ERR_UNSUPPORTED', `${what} is a ${sniffed} image: not an accepted format (accepted: ${IMPORT_FORMATS.join(', ')}); convert it with qemu-img first`, {
    details: { detected: sniffed, accepted: [...IMPORT_FORMATS] },
  });
}

/** The format of a file or archive slice, from its magic numbers and the user's hint. */
export function decideFormat(sniffed: SniffedFormat, size: number, hint: ImportFormat | undefined, name: string): ImportFormat {
  if (sniffed === 'ova') {
    if (hint && hint !== 'ova') throw new HfError('HF_ERR_VALIDATION', `${name} is an OVA (tar archive), not ${hint}`);
    return 'ova';
  }
  const known = FROM_SNIFF[sniffed];
  if (known) {
    if (hint && hint !== known) throw new HfError('HF_ERR_VALIDATION', `${name} is a ${known} image, not ${hint}`);
    return known;
  }
  if (sniffed === 'vmdk-descriptor') {
    throw new HfError('HF_ERR_UNSUPPORTED', `${name} is a VMDK descriptor whose data lives in other files: import a single-file VMDK (monolithicSparse or streamOptimized), e.g. \`qemu-img convert -O vmdk -o subformat=streamOptimized\``);
  }
  if (sniffed !== 'unknown' && sniffed !== 'iso') throw unsupported(name, sniffed);
  // Unrecognised data: raw, but only when asked for or named like a raw disk, and whole sectors.
  if (hint === 'ova') throw new HfError('HF_ERR_BAD_IMAGE', `${name} is not an OVA (no tar archive header)`);
  if (hint && hint !== 'raw') throw new HfError('HF_ERR_BAD_IMAGE', `${name} is not a ${hint} image (its header does not match)`);
  if (hint !== 'raw' && !RAW_EXTENSIONS.has(extname(name).toLowerCase()) && sniffed !== 'iso') {
    throw new HfError('HF_ERR_BAD_IMAGE', `${name} is not a disk image in any accepted format (${IMPORT_FORMATS.join(', ')}); if it is a raw disk, say so with --format raw`);
  }
  if (size === 0 || size % 512 !== 0) throw new HfError('HF_ERR_BAD_IMAGE', `${name} is not a raw disk: ${size} bytes is not a whole number of 512-byte sectors`);
  return 'raw';
}

/** Checks what qemu-img says about one disk source: no backing file, single-file VMDK, not corrupt. */
async function validateDisk(qemuImg: QemuImg, d: Omit<DiskSource, 'virtualSize'>, inOva: boolean): Promise<DiskSource> {
  let info;
  try {
    info = await qemuImg.info(d.spec, d.qemuFormat);
  } catch (e) {
    throw new HfError('HF_ERR_BAD_IMAGE', `${d.label} cannot be read as ${d.format}: ${firstLine((e as Error).message)}`, { cause: e });
  }
  if (info.backingFile) {
    throw new HfError('HF_ERR_BAD_IMAGE', `${d.label} is an overlay on "${info.backingFile}": import a standalone image (qemu-img convert flattens it)`);
  }
  if (d.format === 'vmdk') {
    const extents = (info.formatSpecific?.data.extents ?? []) as Array<{ filename?: string }>;
    if (!inOva && extents.some((x) => x.filename && x.filename !== d.spec)) {
      throw new HfError('HF_ERR_UNSUPPORTED', `${d.label} is a multi-file VMDK: import a single-file one`);
    }
  }
  const check = await qemuImg.check(d.spec, d.qemuFormat);
  if (!check.ok) throw new HfError('HF_ERR_BAD_IMAGE', `${d.label} is corrupt or truncated (qemu-img check: ${check.message})`);
  if (!(info.virtualSize > 0)) throw new HfError('HF_ERR_BAD_IMAGE', `${d.label} has no data (virtual size ${info.virtualSize})`);
  return { ...d, virtualSize: info.virtualSize };
}

function firstLine(s: string): string {
  return s.split('\n')[0]!.slice(0, 400);
}

/** A qemu-img json: spec reading `size` bytes at `offset` of `file` as `driver`. */
export function sliceSpec(file: string, driver: string, offset: number, size: number): string {
  return `json:${JSON.stringify({ driver, file: { driver: 'raw', offset, size, file: { driver: 'file', filename: file } } })}`;
}

export async function inspectSource(qemuImg: QemuImg, path: string, opts: { format?: ImportFormat; name?: string } = {}): Promise<InspectedSource> {
  const name = opts.name ?? basename(path);
  const { format: sniffed, size } = await sniffFile(path);
  const fmt = decideFormat(sniffed, size, opts.format, name);
  if (fmt !== 'ova') {
    const q = QEMU_FORMAT[fmt];
    return { kind: 'disk', disks: [await validateDisk(qemuImg, { spec: path, qemuFormat: q, format: fmt, label: name }, false)] };
  }
  return inspectOva(qemuImg, path, name);
}

async function inspectOva(qemuImg: QemuImg, path: string, name: string): Promise<InspectedSource> {
  let entries: TarEntry[];
  try {
    entries = await listTarFile(path);
  } catch (e) {
    throw new HfError('HF_ERR_BAD_IMAGE', `${name} is not a readable OVA: ${(e as TarError).message}`, { cause: e });
  }
  const files = entries.filter((e) => e.type === 'file');
  const ovfs = files.filter((e) => e.name.toLowerCase().endsWith('.ovf'));
  if (!ovfs.length) {
    throw new HfError('HF_ERR_BAD_IMAGE', `${name} contains no OVF descriptor (.ovf): not an OVA (entries: ${files.map((e) => e.name).slice(0, 10).join(', ') || 'none'})`);
  }
  // The spec puts the descriptor first; take the top-level one.
  const ovfEntry = ovfs.sort((a, b) => a.name.split('/').length - b.name.split('/').length)[0]!;
  const ovf = parseOvf((await readTarEntry(path, ovfEntry)).toString('utf8'));
  if (!ovf.disks.length) throw new HfError('HF_ERR_BAD_IMAGE', `${name}: the OVF lists no disks`);

  // Manifest (.mf): "SHA256(file)= hex" lines; verify what it covers.
  let manifestChecked = 0;
  const mf = files.find((e) => e.name.toLowerCase().endsWith('.mf'));
  const digests = new Map<string, { algo: string; hex: string }>();
  if (mf) {
    for (const line of (await readTarEntry(path, mf)).toString('utf8').split(/\r?\n/)) {
      const m = /^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$/.exec(line.trim());
      if (m) digests.set(m[2]!, { algo: m[1]!.toLowerCase(), hex: m[3]!.toLowerCase() });
    }
  }

  const disks: DiskSource[] = [];
  for (const d of ovf.disks) {
    const entry = files.find((e) => e.name === d.href);
    if (!entry) throw new HfError('HF_ERR_BAD_IMAGE', `${name}: the OVF references ${d.href}, which is not in the archive`);
    const want = digests.get(entry.name);
    if (want) {
      const got = await hashSlice(path, entry, want.algo);
      if (got !== want.hex) throw new HfError('HF_ERR_BAD_IMAGE', `${name}: ${entry.name} does not match its ${want.algo.toUpperCase()} in the manifest (corrupt download?)`);
      manifestChecked++;
    }
    const { format: sniffed } = await sniffFile(path, { offset: entry.offset, size: entry.size });
    const fmt = decideFormat(sniffed, entry.size, undefined, `${name}:${entry.name}`);
    if (fmt === 'ova') throw new HfError('HF_ERR_BAD_IMAGE', `${name}: ${entry.name} is itself an archive`);
    const q = QEMU_FORMAT[fmt];
    disks.push(await validateDisk(qemuImg, { spec: sliceSpec(path, q, entry.offset, entry.size), qemuFormat: undefined, format: fmt, label: `${name}:${entry.name}` }, true));
  }
  return { kind: 'ova', disks, ovf, manifestChecked };
}

function hashSlice(path: string, e: TarEntry, algo: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash(algo);
    if (e.size === 0) return resolve(h.digest('hex'));
    createReadStream(path, { start: e.offset, end: e.offset + e.size - 1 })
      .on('data', (d) => h.update(d))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}
