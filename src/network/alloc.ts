// Address allocation: MAC addresses for NICs and IPv4 addresses inside a network's subnet. Pure
// functions over "what is taken"; the service makes the choice durable with a compare-and-swap
// reservation in the state store, so two concurrent creates can never get the same address.
import { randomBytes } from 'node:crypto';
import { HfError } from '../core/errors.js';
import { contains, formatCidr, formatIpv4, hostRange, parseIpv4, type Cidr } from './cidr.js';

/** Locally administered prefix QEMU and libvirt use; Hyperfold's MACs all start with it. */
export const MAC_PREFIX = '52:54:00';
const MAC_RE = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/;

/** Lower-cases and checks a user-given MAC; refuses multicast and all-zero addresses. */
export function normalizeMac(mac: string): string {
  const m = mac.trim().toLowerCase().replaceAll('-', ':');
  if (!MAC_RE.test(m)) throw new HfError('HF_ERR_VALIDATION', `"${mac}" is not a valid MAC address (expected six hex pairs, e.g. 52:54:00:12:34:56)`);
  if ((parseInt(m.slice(0, 2), 16) & 1) === 1) throw new HfError('HF_ERR_VALIDATION', `MAC ${m} is a multicast address: a NIC needs a unicast one`);
  if (m === '00:00:00:00:00:00') throw new HfError('HF_ERR_VALIDATION', 'MAC 00:00:00:00:00:00 is not usable');
  return m;
}

/** A random 52:54:00:xx:xx:xx not in `taken` (random bytes come from `rand`, for tests). */
export function randomMac(taken: ReadonlySet<string>, rand: (n: number) => Buffer = randomBytes): string {
  for (let i = 0; i < 1000; i++) {
    const b = rand(3);
    const mac = `${MAC_PREFIX}:${[...b.subarray(0, 3)].map((x) => x.toString(16).padStart(2, '0')).join(':')}`;
    if (!taken.has(mac)) return mac;
  }
  throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', 'could not find a free MAC address after 1000 tries');
}

export interface AddressPlan {
  subnet: Cidr;
  gateway: number;
}

/**
 * Checks a requested address against a subnet: inside it, not its network or broadcast address,
 * not the gateway. Returns the address as a number.
 */
export function checkRequestedIp(plan: AddressPlan, ip: string): number {
  const n = parseIpv4(ip, 'IP address');
  if (!contains(plan.subnet, n)) throw new HfError('HF_ERR_VALIDATION', `${ip} is outside the network's subnet ${formatCidr(plan.subnet)}`);
  const { first, last } = hostRange(plan.subnet);
  if (n < first || n > last) throw new HfError('HF_ERR_VALIDATION', `${ip} is the network or broadcast address of ${formatCidr(plan.subnet)}`);
  if (n === plan.gateway) throw new HfError('HF_ERR_ADDRESS_IN_USE', `${ip} is the network's gateway (the host's address on it)`);
  return n;
}

/** The lowest free host address after the gateway (and before it, if the top is full). */
export function nextFreeIp(plan: AddressPlan, taken: ReadonlySet<string>): string {
  const { first, last } = hostRange(plan.subnet);
  for (let n = first; n <= last; n++) {
    if (n === plan.gateway) continue;
    const s = formatIpv4(n);
    if (!taken.has(s)) return s;
  }
  throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `no free address left in ${formatCidr(plan.subnet)}`);
}
