import { HfError } from './errors.js';

const UNIT: Record<string, number> = {
  '': 1, b: 1,
  k: 1024, kb: 1024, kib: 1024,
  m: 1024 ** 2, mb: 1024 ** 2, mib: 1024 ** 2,
  g: 1024 ** 3, gb: 1024 ** 3, gib: 1024 ** 3,
  t: 1024 ** 4, tb: 1024 ** 4, tib: 1024 ** 4,
};

/**
 * Parses a size such as "256M", "1.5GiB", "512MB" or a plain number of bytes. Units are binary
 * (as in QEMU and Proxmox): "1G" is 1024 MiB. Throws HF_ERR_INVALID_SIZE on anything else.
 */
export function parseSize(input: string | number, field = 'size'): number {
  if (typeof input === 'number') {
    if (!Number.isFinite(input) || input < 0) throw new HfError('HF_ERR_INVALID_SIZE', `${field}: ${input} is not a valid size`);
    return Math.floor(input);
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(input);
  if (!m) throw new HfError('HF_ERR_INVALID_SIZE', `${field}: "${input}" is not a size (examples: 256M, 1G, 512MiB)`);
  const mult = UNIT[m[2]!.toLowerCase()];
  if (mult === undefined) throw new HfError('HF_ERR_INVALID_SIZE', `${field}: unknown unit "${m[2]}" in "${input}" (use K, M, G or T)`);
  return Math.floor(Number(m[1]) * mult);
}

/** Size in MiB; a bare number is taken as MiB (as `--memory 256` means 256 MiB). */
export function parseMiB(input: string | number, field = 'memory'): number {
  if (typeof input === 'number') {
    if (!Number.isInteger(input) || input < 0) throw new HfError('HF_ERR_INVALID_SIZE', `${field}: ${input} is not a whole number of MiB`);
    return input;
  }
  if (/^\s*\d+\s*$/.test(input)) return Number(input.trim());
  const bytes = parseSize(input, field);
  if (bytes % (1024 * 1024) !== 0) throw new HfError('HF_ERR_INVALID_SIZE', `${field}: "${input}" is not a whole number of MiB`);
  return bytes / (1024 * 1024);
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${Number.isInteger(v) ? v : v.toFixed(1)}${units[i]}`;
}

export function formatMiB(mib: number): string {
  return formatBytes(mib * 1024 * 1024);
}
