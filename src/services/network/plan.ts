// Planning a new network: the request checked against the other networks and the host (uplink
// free, subnet clear of networks and host routes, bridge name unused) and turned into the record
// to store. Reads only; create() stores the result in a transaction that fails when another
// network was created since these checks read the list.
import { HfError } from '../../core/errors.js';
import { formatCidr, formatIpv4, hostRange, overlaps, parseCidr, type Cidr } from '../../network/cidr.js';
import type { LinkInfo } from '../../network/host.js';
import type { z } from 'zod';
import type { createNetworkSchema, Network, NetworkMode } from '../../network/model.js';
import { fnv1a } from '../../network/names.js';
import { pickVni } from '../../network/vxlan.js';
import type { NetContext } from './context.js';

/** Special-purpose IPv4 ranges a network subnet may not use. */
const RESERVED_RANGES = ['0.0.0.0/8', '127.0.0.0/8', '169.254.0.0/16', '224.0.0.0/4', '240.0.0.0/4'].map((c) => parseCidr(c));

type CreateNetwork = z.infer<typeof createNetworkSchema>;
export type NetworkRequest = CreateNetwork & { mode: NetworkMode };

/** Checks that depend on the request alone. */
export function checkRequest(req: CreateNetwork): NetworkRequest {
  const mode = req.mode ?? (req.bridgeTo ? 'bridged' : 'nat');
  if (req.vlan !== undefined && (req.vlan < 1 || req.vlan > 4094)) {
    throw new HfError('HF_ERR_VALIDATION', `VLAN id ${req.vlan} is not usable: use 1 to 4094 (0 and 4095 are reserved by 802.1Q)`);
  }
  if (mode === 'bridged' && !req.bridgeTo) throw new HfError('HF_ERR_VALIDATION', 'a bridged network needs bridgeTo (the host interface to bridge to)');
  if (mode !== 'bridged' && req.bridgeTo) throw new HfError('HF_ERR_VALIDATION', `bridgeTo makes a bridged network: it cannot be combined with mode ${mode}`);
  if (req.vlan !== undefined && mode !== 'bridged') throw new HfError('HF_ERR_VALIDATION', 'a VLAN id needs a bridged network (bridgeTo): the tag goes on the uplink');
  if (mode === 'bridged' && req.subnet) throw new HfError('HF_ERR_VALIDATION', 'a bridged network takes its addresses from the network it is bridged to: give no subnet');
  return { ...req, mode };
}

/** The record of a new network, checked against `all` (the stored networks) and the host's `links`. */
export async function planNetwork(c: NetContext, req: NetworkRequest, all: Network[], links: LinkInfo[]): Promise<Network> {
  const net: Network = {
    name: req.name,
    mode: req.mode,
    bridge: c.d.names.bridge(req.name),
    external: false,
    description: req.description,
    createdAt: new Date().toISOString(),
  };
  if (req.mode === 'bridged') {
    checkUplink(c, req.bridgeTo!, req.vlan, all, links);
    const up = links.find((l) => l.name === req.bridgeTo)!;
    net.uplink = up.name;
    if (up.kind === 'bridge') {
      if (req.vlan !== undefined) throw new HfError('HF_ERR_UNSUPPORTED', `${up.name} is a bridge: a VLAN needs a plain interface to tag (give the physical interface instead)`);
      net.external = true;
      net.bridge = up.name;
    }
    if (req.vlan !== undefined) net.vlan = req.vlan;
  } else {
    const subnet = req.subnet ? await checkSubnet(c, req.subnet, all) : await pickSubnet(c, req.name, all);
    net.subnet = formatCidr(subnet);
    net.gateway = formatIpv4(hostRange(subnet).first);
    net.domain = `${req.name}.hf.internal`;
    // Every managed network gets its VXLAN id at create (unique: the create's transaction
    // compares the networks' version), so it can span hosts as soon as there is a cluster.
    net.vni = pickVni(req.name, new Set(all.flatMap((n) => (n.vni !== undefined ? [n.vni] : []))));
    if (c.overlay) net.mtu = c.overlay.mtu;
  }
  const clash = all.find((n) => n.bridge === net.bridge);
  if (clash) throw new HfError('HF_ERR_CONFLICT', `network "${clash.name}" already uses bridge ${net.bridge}`);
  if (!net.external && links.some((l) => l.name === net.bridge) && !c.d.names.ownsLink(net.bridge)) {
    throw new HfError('HF_ERR_CONFLICT', `an interface named ${net.bridge} already exists on this host`);
  }
  return net;
}

function checkUplink(c: NetContext, iface: string, vlan: number | undefined, all: Network[], links: LinkInfo[]): void {
  const up = links.find((l) => l.name === iface);
  if (!up) throw new HfError('HF_ERR_VALIDATION', `there is no interface named "${iface}" on this host`);
  if (c.d.names.ownsLink(iface) || all.some((n) => n.bridge === iface && !n.external)) {
    throw new HfError('HF_ERR_VALIDATION', `${iface} is one of Hyperfold's own interfaces: bridge to a host interface`);
  }
  const user = all.find((n) => n.uplink === iface && (n.vlan ?? 0) === (vlan ?? 0));
  if (user) throw new HfError('HF_ERR_CONFLICT', `network "${user.name}" is already bridged to ${iface}${vlan ? ` on VLAN ${vlan}` : ''}`);
  if (up.kind !== 'bridge') {
    if (up.master) throw new HfError('HF_ERR_CONFLICT', `${iface} is already a port of ${up.master}`);
    if (up.addresses.length && vlan === undefined) {
      throw new HfError('HF_ERR_VALIDATION', `${iface} has addresses (${up.addresses.join(', ')}): putting it into a bridge would cut the host off; bridge to a bridge that holds the address, or to a spare interface`);
    }
    if (all.some((n) => n.uplink === iface && n.vlan === undefined) || (vlan === undefined && all.some((n) => n.uplink === iface))) {
      throw new HfError('HF_ERR_CONFLICT', `${iface} is already used by another bridged network`);
    }
  }
}

/** A user-given subnet: valid CIDR, sensible size, no overlap with networks or host routes. */
async function checkSubnet(c: NetContext, s: string, all: Network[]): Promise<Cidr> {
  const cidr = parseCidr(s);
  if (cidr.prefix < 16 || cidr.prefix > 29) throw new HfError('HF_ERR_VALIDATION', `subnet ${s}: use a prefix length from /16 to /29`);
  const special = RESERVED_RANGES.find((r) => overlaps(r, cidr));
  if (special) throw new HfError('HF_ERR_VALIDATION', `subnet ${s} lies in the special-purpose range ${formatCidr(special)}`);
  const other = all.find((n) => n.subnet && overlaps(parseCidr(n.subnet), cidr));
  if (other) throw new HfError('HF_ERR_SUBNET_CONFLICT', `subnet ${s} overlaps network "${other.name}" (${other.subnet})`, { details: { network: other.name, subnet: other.subnet } });
  const route = await collidingRoute(c, cidr);
  if (route) {
    throw new HfError('HF_ERR_SUBNET_CONFLICT', `subnet ${s} collides with the host route ${route.dst}${route.dev ? ` on ${route.dev}` : ''}`, { details: { route: route.dst, dev: route.dev } });
  }
  return cidr;
}

async function collidingRoute(c: NetContext, cidr: Cidr): Promise<{ dst: string; dev?: string | undefined } | undefined> {
  for (const r of await c.d.host.routes()) {
    if (r.dev && c.d.names.ownsLink(r.dev)) continue; // our own bridges: checked against the records
    let rc: Cidr;
    try {
      rc = parseCidr(r.dst, { strict: false });
    } catch {
      continue;
    }
    if (rc.prefix === 0) continue;
    if (overlaps(rc, cidr)) return r;
  }
  return undefined;
}

/** A free 10.x.y.0/24: pseudo-random per daemon and network name, clear of networks and routes. */
async function pickSubnet(c: NetContext, name: string, all: Network[]): Promise<Cidr> {
  const routes = (await c.d.host.routes()).filter((r) => !(r.dev && c.d.names.ownsLink(r.dev)));
  const taken = [
    ...all.flatMap((n) => (n.subnet ? [parseCidr(n.subnet)] : [])),
    ...routes.flatMap((r) => {
      try {
        const cidr = parseCidr(r.dst, { strict: false });
        return cidr.prefix === 0 ? [] : [cidr];
      } catch {
        return [];
      }
    }),
  ];
  for (let i = 0; i < 512; i++) {
    const h = fnv1a(`${c.d.names.tag}/${name}/${i}`);
    const cidr: Cidr = { network: parseCidr(`10.${parseInt(h.slice(0, 2), 16)}.${parseInt(h.slice(2, 4), 16)}.0/24`).network, prefix: 24 };
    if (!taken.some((t) => overlaps(t, cidr))) return cidr;
  }
  throw new HfError('HF_ERR_SUBNET_CONFLICT', 'could not find a free 10.x.y.0/24 subnet: give one with --subnet');
}
