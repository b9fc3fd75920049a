// IPv4 addresses and CIDR blocks as plain numbers: parsing, formatting, containment, overlap and
// the host range of a subnet. Pure; every network decision (overlap, route collision, address
// allocation) is built on these.
import { HfError } from '../core/errors.js';

export interface Cidr {
  /** Network address (host bits zero), as an unsigned 32-bit number. */
  network: number;
  prefix: number;
}

const OCTET_RE = /^(0|[1-9][0-9]{0,2})$/;

function invalid(message: string): HfError {
  return new HfError('HF_ERR_VALIDATION', message);
}

/** Parses a dotted-quad IPv4 address; undefined when it is not one (no leading zeros, no shorthand). */
export function tryParseIpv4(s: string): number | undefined {
  const parts = s.split('.');
  if (parts.length !== 4) return undefined;
  let n = 0;
  for (const p of parts) {
    if (!OCTET_RE.test(p)) return undefined;
    const v = Number(p);
    if (v > 255) return undefined;
    n = n * 256 + v;
  }
  return n >>> 0;
}

export function parseIpv4(s: string, what = 'IPv4 address'): number {
  const n = tryParseIpv4(s);
  if (n === undefined) throw invalid(`"${s}" is not a valid ${what} (expected a.b.c.d)`);
  return n;
}

export function formatIpv4(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/** The netmask of a prefix length as a number (prefix 0 → 0). */
export function maskOf(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

export function formatMask(prefix: number): string {
  return formatIpv4(maskOf(prefix));
}

/**
 * Parses "a.b.c.d/n". With `strict` (the default) host bits must be zero, so a typo such as
 * 10.1.2.3/24 is refused rather than silently read as 10.1.2.0/24.
 */
export function parseCidr(s: string, opts: { strict?: boolean; what?: string } = {}): Cidr {
  const what = opts.what ?? 'subnet';
  const m = /^([0-9.]+)\/([0-9]{1,2})$/.exec(s.trim());
  if (!m) throw invalid(`"${s}" is not a valid ${what}: use CIDR notation such as 10.20.30.0/24`);
  const addr = tryParseIpv4(m[1]!);
  if (addr === undefined) throw invalid(`"${s}" is not a valid ${what}: "${m[1]}" is not an IPv4 address`);
  const prefix = Number(m[2]);
  if (prefix > 32) throw invalid(`"${s}" is not a valid ${what}: the prefix length must be 0 to 32`);
  const network = (addr & maskOf(prefix)) >>> 0;
  if ((opts.strict ?? true) && network !== addr) {
    throw invalid(`"${s}" is not a valid ${what}: host bits are set (did you mean ${formatIpv4(network)}/${prefix}?)`);
  }
  return { network, prefix };
}

export function formatCidr(c: Cidr): string {
  return `${formatIpv4(c.network)}/${c.prefix}`;
}

export function size(c: Cidr): number {
  return 2 ** (32 - c.prefix);
}

export function lastAddress(c: Cidr): number {
  return (c.network + size(c) - 1) >>> 0;
}

export function contains(c: Cidr, ip: number): boolean {
  return ((ip & maskOf(c.prefix)) >>> 0) === c.network;
}

export function overlaps(a: Cidr, b: Cidr): boolean {
  const p = Math.min(a.prefix, b.prefix);
  const m = maskOf(p);
  return ((a.network & m) >>> 0) === ((b.network & m) >>> 0);
}

/** The usable host addresses of a subnet (network and broadcast excluded for prefixes up to /30). */
export function hostRange(c: Cidr): { first: number; last: number } {
  if (c.prefix >= 31) return { first: c.network, last: lastAddress(c) };
  return { first: c.network + 1, last: lastAddress(c) - 1 };
}

/** True for the RFC 1918 private ranges (10/8, 172.16/12, 192.168/16). */
export function isPrivate(c: Cidr): boolean {
  const blocks = ['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16'].map((b) => parseCidr(b));
  return blocks.some((b) => b.prefix <= c.prefix && contains(b, c.network));
}
