// Names of the kernel objects Hyperfold creates, and the rule that tells ours from anyone
// else's. Linux limits interface names to 15 characters, so long parts are replaced by a hash.
//
// Every object carries the prefix "hf" + tag. The tag is empty for the daemon on the default
// data directory (production: hfb-default, hft1a2b3c4d, …) and 4 hex digits derived from the
// data directory otherwise, so that several daemons on one host (test suites) never touch each
// other's objects. The kinds that follow the prefix ("b-", "t", "v", "p", "l", "x", "n-") are chosen
// so that an untagged name can never be mistaken for a tagged one: the tag is hex, the kind
// letters t/v/p/l/x/n are not, and "b-" has a "-" where a tag has a hex digit.
import { createHash } from 'node:crypto';
import { resolve } from 'node:path';

export const IFNAME_MAX = 15;

/** FNV-1a, 32 bits, as 8 hex digits. */
export function fnv1a(s: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, '0');
}

/** The tag of a daemon's objects: '' on the default data directory, else 4 hex digits of its path. */
export function tagFor(dataDir: string, defaultDataDir = '/var/lib/hyperfold'): string {
  const abs = resolve(dataDir);
  if (abs === resolve(defaultDataDir)) return '';
  return createHash('sha256').update(abs).digest('hex').slice(0, 4);
}

export class NetNames {
  readonly prefix: string;

  constructor(readonly tag: string) {
    if (!/^([0-9a-f]{4})?$/.test(tag)) throw new Error(`invalid network tag "${tag}"`);
    this.prefix = `hf${tag}`;
  }

  /** nftables table name (same in the inet and bridge families). */
  get table(): string {
    return this.tag ? `hyperfold_${this.tag}` : 'hyperfold';
  }

  /** The bridge of a network: the network name when it fits, else a hash of it. */
  bridge(network: string): string {
    const head = `${this.prefix}b-`;
    const room = IFNAME_MAX - head.length;
    return head + (network.length <= room ? network : fnv1a(network).slice(0, Math.min(8, room)));
  }

  /** A VM's tap for one NIC: stable for the instance id and NIC name. */
  tap(instanceId: string, nic: string): string {
    return `${this.prefix}t${fnv1a(`${instanceId}/${nic}`)}`;
  }

  /** A container NIC's veth, host side. */
  veth(instanceId: string, nic: string): string {
    return `${this.prefix}v${fnv1a(`${instanceId}/${nic}`)}`;
  }

  /** A container NIC's veth, peer side, before it moves into the container's namespace. */
  vethPeer(instanceId: string, nic: string): string {
    return `${this.prefix}p${fnv1a(`${instanceId}/${nic}`)}`;
  }

  /** The 802.1Q sub-interface a VLAN network puts into its bridge. */
  vlan(network: string): string {
    return `${this.prefix}l${fnv1a(`vlan/${network}`)}`;
  }

  /** The VXLAN device that carries a network between the hosts of a cluster (a port of its bridge). */
  vxlan(network: string): string {
    return `${this.prefix}x${fnv1a(`vxlan/${network}`)}`;
  }

  /** A container's network namespace (a name under /run/netns). */
  netns(instanceName: string): string {
    return `${this.prefix}n-${instanceName}`;
  }

  /** Whether an interface name is one this daemon creates (bridge, tap, veth, vlan, vxlan). */
  ownsLink(ifname: string): boolean {
    if (!ifname.startsWith(this.prefix)) return false;
    const rest = ifname.slice(this.prefix.length);
    return rest.startsWith('b-') || /^[tvplx][0-9a-f]{8}$/.test(rest);
  }

  ownsNetns(name: string): boolean {
    return name.startsWith(`${this.prefix}n-`);
  }

  /** Chain name for one NIC (nft identifiers: letters, digits, _). */
  static chainId(ifname: string): string {
    return ifname.replace(/[^A-Za-z0-9_]/g, '_');
  }
}
