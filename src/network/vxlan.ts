// VXLAN: one managed network spanning the hosts of a cluster. Each host keeps its own bridge
// (same name, same gateway address and, since bridgeMac() derives from the bridge name, the same
// MAC: an anycast gateway, answered locally on every host) and puts one VXLAN device into it.
// Nothing is learned from traffic: the cluster store says where every NIC lives, so the
// forwarding table (fdb) and the bridge's neighbour table are written from it:
//
//   vxlan fdb (self)      00:00:00:00:00:00 dst <peer>   one per peer host: broadcast / unknown
//                         <mac> dst <host>               one per NIC on another host
//   bridge fdb (master)   <mac> on the vxlan port        the bridge sends remote MACs nowhere else
//   bridge neighbours     <ip> lladdr <mac> permanent    remote NICs: the host routes to them (its
//                                                        instance ports are isolated and it answers
//                                                        ARP for the subnet, see host.ts) and the
//                                                        port's neigh_suppress answers guests' ARP
//                                                        for them without crossing the tunnel
//
// A bridge-family nftables table of the network's own keeps out of the tunnel what each host
// serves itself: DHCP (each host's dnsmasq serves its own instances) and ARP for the gateway.
// Networks are IPv4 only (docs/network.md), so there is no RA/ND to filter.
//
// MTU: VXLAN over IPv4 adds 50 bytes (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8), so the
// bridge, the tunnel device and every NIC of a spanning network use the underlay MTU − 50; the
// network record's `mtu` carries it and dnsmasq hands it to DHCP guests (option 26).
import { readFile, writeFile } from 'node:fs/promises';
import { HfError } from '../core/errors.js';
import { run } from '../util/exec.js';
import { fnv1a } from './names.js';

/** The UDP port of VXLAN (IANA). */
export const VXLAN_PORT = 4789;
/** Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8) headers. */
export const VXLAN_OVERHEAD = 50;
/** VNIs are 24 bits; 0 is left unused and the top one too (some switches reserve it). */
export const VNI_MIN = 1;
export const VNI_MAX = 0xfffffe;
export const ZERO_MAC = '00:00:00:00:00:00';

// ---- pure parts --------------------------------------------------------------------------------

/** The MTU inside the overlay for an underlay MTU. */
export function overlayMtu(underlayMtu: number): number {
  const mtu = underlayMtu - VXLAN_OVERHEAD;
  if (!Number.isInteger(mtu) || mtu < 576) {
    throw new HfError('HF_ERR_VALIDATION', `an underlay MTU of ${underlayMtu} leaves ${mtu} bytes inside VXLAN: IPv4 needs at least 576`);
  }
  return mtu;
}

/**
 * The VNI of a new network: derived from its name (so that the same name gets the same VNI,
 * which makes captures readable), the next candidate when that one is taken. The store keeps it
 * unique: the network create that stores it compares the networks' version key.
 */
export function pickVni(network: string, taken: ReadonlySet<number>): number {
  const span = VNI_MAX - VNI_MIN + 1;
  for (let i = 0; i < 1000; i++) {
    const vni = VNI_MIN + (parseInt(fnv1a(`vni/${network}/${i}`), 16) % span);
    if (!taken.has(vni)) return vni;
  }
  throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `could not find a free VXLAN id for network ${network}`);
}

/** One wanted forwarding entry: `mac` undefined is the all-zero entry (broadcast, unknown unicast, multicast). */
export interface FdbWant {
  mac?: string | undefined;
  /** The peer host's underlay address. */
  dst: string;
}

/** A forwarding entry as it is on the device (normalized: lower case, all-zero MAC spelled out). */
export interface FdbEntry {
  mac: string;
  dst: string;
}

export interface FdbPlan {
  /** Per-MAC and all-zero entries of the vxlan device to delete, then to add. */
  del: FdbEntry[];
  add: FdbEntry[];
  /** The bridge's static entries for remote MACs (pointing at the vxlan port). */
  delMaster: string[];
  addMaster: string[];
}

const key = (e: FdbEntry) => `${e.mac}@${e.dst}`;

/**
 * What turns the device's entries into exactly `want`: the vxlan device's own table (`self`,
 * each entry with its destination host) and the bridge's static entries that send each remote
 * MAC to the vxlan port. Stale entries go before new ones are added, so a MAC that moved to
 * another host is never sent to two.
 */
export function planFdb(current: { self: FdbEntry[]; master: string[] }, want: FdbWant[]): FdbPlan {
  const wantSelf = new Map<string, FdbEntry>();
  for (const w of want) {
    const e = { mac: (w.mac ?? ZERO_MAC).toLowerCase(), dst: w.dst };
    wantSelf.set(key(e), e);
  }
  const perMac = new Map<string, string>();
  for (const e of wantSelf.values()) {
    if (e.mac === ZERO_MAC) continue;
    const other = perMac.get(e.mac);
    if (other !== undefined && other !== e.dst) throw new HfError('HF_ERR_INTERNAL', `MAC ${e.mac} is wanted on two hosts (${other} and ${e.dst})`);
    perMac.set(e.mac, e.dst);
  }
  const have = new Set(current.self.map((e) => key({ mac: e.mac.toLowerCase(), dst: e.dst })));
  const haveMaster = new Set(current.master.map((m) => m.toLowerCase()));
  return {
    del: current.self.filter((e) => !wantSelf.has(key({ mac: e.mac.toLowerCase(), dst: e.dst }))),
    add: [...wantSelf.values()].filter((e) => !have.has(key(e))),
    delMaster: [...haveMaster].filter((m) => !perMac.has(m)),
    addMaster: [...perMac.keys()].filter((m) => !haveMaster.has(m)),
  };
}

interface BridgeFdbJson {
  mac: string;
  dst?: string;
  master?: string;
  flags?: string[];
  state?: string;
}

/**
 * The entries `bridge -j fdb show dev VXLAN` lists that this module manages: the device's own
 * entries with a destination, and the bridge's static ones (the port's own address is
 * "permanent", not "static", and stays).
 */
export function parseFdb(json: string): { self: FdbEntry[]; master: string[] } {
  const rows = JSON.parse(json || '[]') as BridgeFdbJson[];
  return {
    self: rows.filter((r) => r.dst !== undefined && (r.flags ?? []).includes('self')).map((r) => ({ mac: r.mac.toLowerCase(), dst: r.dst! })),
    master: rows.filter((r) => r.master !== undefined && r.state === 'static').map((r) => r.mac.toLowerCase()),
  };
}

export interface NeighbourWant {
  ip: string;
  mac: string;
}

/** What turns the bridge's permanent neighbours into exactly `want` (a changed MAC is replaced). */
export function planNeighbours(current: NeighbourWant[], want: NeighbourWant[]): { del: string[]; put: NeighbourWant[] } {
  const w = new Map(want.map((n) => [n.ip, n.mac.toLowerCase()]));
  const c = new Map(current.map((n) => [n.ip, n.mac.toLowerCase()]));
  return {
    del: [...c.keys()].filter((ip) => !w.has(ip)),
    put: [...w].filter(([ip, mac]) => c.get(ip) !== mac).map(([ip, mac]) => ({ ip, mac })),
  };
}

/** The nftables table of one vxlan device (bridge family): named after the device, which is unique per network. */
export function vxlanTable(vxlanDev: string): string {
  return vxlanDev.replace(/[^A-Za-z0-9_]/g, '_');
}

export interface VxlanFilterSpec {
  /** The vxlan device (a bridge port). */
  dev: string;
  /** The network's gateway: every host answers ARP for it on its own bridge. */
  gateway: string;
}

/**
 * The tunnel port's filter, replacing the table atomically. Chains, each also counting what it
 * drops: `from_tunnel` (frames that arrive through the tunnel, before the bridge decides where
 * they go), `to_tunnel` (frames the bridge forwards from a local port into it) and
 * `host_to_tunnel` (frames the host itself sends through the bridge: dnsmasq's replies, its
 * ARP answers).
 */
export function buildVxlanFilter(spec: VxlanFilterSpec): string {
  const t = vxlanTable(spec.dev);
  const dev = `"${spec.dev}"`;
  const drops = (dir: 'iifname' | 'oifname') => [
    // DHCP, both directions of it (client 68 ↔ server 67): each host serves its own instances.
    `${dir} ${dev} udp sport { 67, 68 } udp dport { 67, 68 } counter drop comment "dhcp"`,
    // The gateway is on every host: a guest asks and is answered on its own host only.
    `${dir} ${dev} arp operation request arp daddr ip ${spec.gateway} counter drop comment "arp-for-gateway"`,
    `${dir} ${dev} arp operation reply arp saddr ip ${spec.gateway} counter drop comment "arp-from-gateway"`,
  ];
  const chain = (name: string, hook: string, rules: string[]) => [
    `  chain ${name} {`,
    `    type filter hook ${hook} priority -200; policy accept;`,
    ...rules.map((r) => `    ${r}`),
    '  }',
  ];
  return [
    `add table bridge ${t}`,
    `delete table bridge ${t}`,
    `table bridge ${t} {`,
    ...chain('from_tunnel', 'prerouting', drops('iifname')),
    ...chain('to_tunnel', 'forward', drops('oifname')),
    ...chain('host_to_tunnel', 'output', drops('oifname')),
    '}',
    '',
  ].join('\n');
}

// ---- the host side -------------------------------------------------------------------------------

export interface VxlanSpec {
  /** Interface name (NetNames.vxlan). */
  name: string;
  vni: number;
  /** This host's underlay address (the outer source address). */
  local: string;
  /** The underlay device, when the outer packets must leave through one. */
  dev?: string | undefined;
  /** The bridge it joins as a port. */
  bridge: string;
  /** The MTU of the tunnel device (the underlay's − 50). */
  mtu: number;
}

interface IpLinkDetail {
  ifname: string;
  mtu?: number;
  master?: string;
  flags?: string[];
  link?: string;
  linkinfo?: {
    info_kind?: string;
    info_data?: { id?: number; local?: string; port?: number; learning?: boolean; link?: string };
    info_slave_data?: { learning?: boolean; neigh_suppress?: boolean; isolated?: boolean };
  };
}

const ip = (args: string[], allowFailure = false) => run('ip', args, { timeoutMs: 15_000, allowFailure });
const bridgeCmd = (args: string[], allowFailure = false) => run('bridge', args, { timeoutMs: 15_000, allowFailure });

async function linkDetail(name: string): Promise<IpLinkDetail | undefined> {
  const r = await ip(['-j', '-d', 'link', 'show', 'dev', name], true);
  if (r.code !== 0) return undefined;
  return (JSON.parse(r.stdout || '[]') as IpLinkDetail[])[0];
}

/**
 * Creates the vxlan device if missing (or remakes it when its id, local address or port
 * differ), makes it a port of `bridge` with learning off (and ARP/ND suppression where the
 * kernel has it), sets its MTU and brings it up. Idempotent.
 */
export async function ensureVxlan(spec: VxlanSpec): Promise<void> {
  let cur = await linkDetail(spec.name);
  const info = cur?.linkinfo?.info_data;
  if (cur && (cur.linkinfo?.info_kind !== 'vxlan' || info?.id !== spec.vni || info.local !== spec.local || info.port !== VXLAN_PORT || info.learning !== false)) {
    await removeVxlan(spec.name);
    cur = undefined;
  }
  if (!cur) {
    const args = ['link', 'add', spec.name, 'mtu', String(spec.mtu), 'type', 'vxlan', 'id', String(spec.vni), 'local', spec.local, 'dstport', String(VXLAN_PORT), 'nolearning'];
    if (spec.dev) args.push('dev', spec.dev);
    await ip(args);
  } else if (cur.mtu !== spec.mtu) {
    await ip(['link', 'set', 'dev', spec.name, 'mtu', String(spec.mtu)]);
  }
  // No IPv6 on Hyperfold networks: no link-local address on the port either.
  await writeFile(`/proc/sys/net/ipv6/conf/${spec.name}/disable_ipv6`, '1').catch(() => undefined);
  if (cur?.master !== spec.bridge) await ip(['link', 'set', 'dev', spec.name, 'master', spec.bridge]);
  const port = cur?.master === spec.bridge ? cur.linkinfo?.info_slave_data : undefined;
  if (port?.learning !== false || port.neigh_suppress !== true || port.isolated !== false) {
    // The tunnel port is not isolated (the instances' ports are): frames between a local
    // instance and a remote one cross it. neigh_suppress needs a 4.15+ kernel: without it the
    // bridge floods ARP over the tunnel, which still works (the peers' hosts answer nothing but
    // the gateway, which the filter keeps local).
    const r = await bridgeCmd(['link', 'set', 'dev', spec.name, 'learning', 'off', 'isolated', 'off', 'neigh_suppress', 'on'], true);
    if (r.code !== 0) await bridgeCmd(['link', 'set', 'dev', spec.name, 'learning', 'off', 'isolated', 'off']);
  }
  if (!(cur?.flags ?? []).includes('UP')) await ip(['link', 'set', 'dev', spec.name, 'up']);
}

/** Makes the vxlan device's forwarding entries exactly `want` (see planFdb). */
export async function syncFdb(vxlanDev: string, want: FdbWant[]): Promise<FdbPlan> {
  const cur = parseFdb((await bridgeCmd(['-j', 'fdb', 'show', 'dev', vxlanDev])).stdout);
  const plan = planFdb(cur, want);
  for (const e of plan.del) await bridgeCmd(['fdb', 'del', e.mac, 'dev', vxlanDev, 'dst', e.dst, 'self'], true);
  for (const m of plan.delMaster) await bridgeCmd(['fdb', 'del', m, 'dev', vxlanDev, 'master'], true);
  // append: several entries for one MAC (the all-zero one, once per peer host).
  for (const e of plan.add) await bridgeCmd(['fdb', 'append', e.mac, 'dev', vxlanDev, 'dst', e.dst, 'self', 'permanent']);
  for (const m of plan.addMaster) await bridgeCmd(['fdb', 'replace', m, 'dev', vxlanDev, 'master', 'static']);
  return plan;
}

/** The forwarding entries of the vxlan device this module manages (for checks and tests). */
export async function readFdb(vxlanDev: string): Promise<{ self: FdbEntry[]; master: string[] }> {
  return parseFdb((await bridgeCmd(['-j', 'fdb', 'show', 'dev', vxlanDev])).stdout);
}

interface IpNeighJson {
  dst: string;
  lladdr?: string;
}

/** Makes the bridge's permanent neighbour entries exactly `want` (remote NICs' addresses). */
export async function syncNeighbours(bridge: string, want: NeighbourWant[]): Promise<void> {
  const r = await ip(['-4', '-j', 'neigh', 'show', 'dev', bridge, 'nud', 'permanent']);
  const cur = (JSON.parse(r.stdout || '[]') as IpNeighJson[]).filter((n) => n.lladdr).map((n) => ({ ip: n.dst, mac: n.lladdr! }));
  const plan = planNeighbours(cur, want);
  for (const a of plan.del) await ip(['neigh', 'del', a, 'dev', bridge], true);
  for (const n of plan.put) await ip(['neigh', 'replace', n.ip, 'lladdr', n.mac, 'dev', bridge, 'nud', 'permanent']);
}

/** Applies the tunnel port's filter (one nft transaction). */
export async function applyVxlanFilter(spec: VxlanFilterSpec): Promise<void> {
  await run('nft', ['-f', '-'], { input: buildVxlanFilter(spec), timeoutMs: 30_000 });
}

/** Deletes the vxlan device and its filter table; nothing when they are gone already. */
export async function removeVxlan(name: string): Promise<void> {
  const t = vxlanTable(name);
  await run('nft', ['-f', '-'], { input: `add table bridge ${t}\ndelete table bridge ${t}\n`, timeoutMs: 30_000 });
  const r = await ip(['link', 'del', 'dev', name], true);
  if (r.code !== 0 && !/Cannot find device|does not exist/i.test(r.stderr)) {
    throw new HfError('HF_ERR_INTERNAL', `cannot delete VXLAN interface ${name}: ${r.stderr.trim()}`);
  }
}

interface IpAddrJson {
  ifname: string;
  mtu?: number;
  addr_info?: Array<{ family: string; local: string }>;
}

/** The device that holds `address` and its MTU: the underlay a host's tunnels go over. */
export async function underlayOf(address: string): Promise<{ dev: string; mtu: number }> {
  const r = await ip(['-j', '-4', 'addr', 'show']);
  const hit = (JSON.parse(r.stdout || '[]') as IpAddrJson[]).find((a) => (a.addr_info ?? []).some((i) => i.local === address));
  if (!hit) throw new HfError('HF_ERR_VALIDATION', `no interface of this host has the underlay address ${address}`);
  const mtu = hit.mtu ?? Number((await readFile(`/sys/class/net/${hit.ifname}/mtu`, 'utf8')).trim());
  return { dev: hit.ifname, mtu };
}
