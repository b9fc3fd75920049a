// The host side of networking: the kernel objects (bridges, taps, veths, VLAN sub-interfaces,
// network namespaces), routes, sysctls, nftables and dnsmasq, behind one interface so that the
// network service can be unit-tested over a fake. `LinuxNetHost` is the real thing (iproute2,
// nft, dnsmasq).
import { createHash } from 'node:crypto';
import { access, mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { HfError, isHfError } from '../core/errors.js';
import { run, which } from '../util/exec.js';
import type { Logger } from '../util/log.js';
import { DnsmasqSupervisor, type DnsmasqFiles } from './dnsmasq.js';
import { applyRuleset } from './nft.js';

export interface LinkInfo {
  name: string;
  /** rtnetlink kind: bridge, tun, veth, vlan…; undefined for physical devices. */
  kind?: string | undefined;
  master?: string | undefined;
  up: boolean;
  /** IPv4 addresses in CIDR form (a.b.c.d/n). */
  addresses: string[];
  mac?: string | undefined;
}

export interface HostRoute {
  dst: string;
  dev?: string | undefined;
  table?: string | undefined;
}

export interface PortOptions {
  /** Isolated bridge port: no direct L2 path to other isolated ports (traffic goes through the host). */
  isolated: boolean;
}

export interface NicInNetns {
  name: string;
  mac: string;
  /** a.b.c.d/n configured on the interface (containers get their reserved address statically). */
  address?: string | undefined;
  gateway?: string | undefined;
}

export interface NetHost {
  listLinks(): Promise<LinkInfo[]>;
  routes(): Promise<HostRoute[]>;
  /**
   * Creates the bridge if missing, brings it up; with `address` (gw/prefix), routes for it (proxy
   * ARP, forwarding). `current`: the caller's fresh listing of it (null: absent), saving the lookups.
   * `mtu`: set on the bridge (a network spanning hosts: the underlay's MTU − 50).
   */
  ensureBridge(name: string, opts: { address?: string | undefined; current?: LinkInfo | null; mtu?: number | undefined }): Promise<void>;
  setMaster(ifname: string, bridge: string | null, port: PortOptions): Promise<void>;
  deleteLink(name: string): Promise<void>;
  /** `mtu`: the network's, when it has one. */
  createTap(name: string, opts?: { mtu?: number | undefined }): Promise<void>;
  /** Both ends get `mtu` when given (the peer keeps it when it moves into a namespace). */
  createVeth(hostSide: string, peer: string, opts?: { mtu?: number | undefined }): Promise<void>;
  /** 802.1Q sub-interface of `parent`; HF_ERR_UNSUPPORTED when the kernel has no 802.1Q. */
  createVlan(name: string, parent: string, id: number): Promise<void>;
  listNetns(): Promise<string[]>;
  /** Creates the namespace (lo up) and returns its path. */
  addNetns(name: string): Promise<string>;
  deleteNetns(name: string): Promise<void>;
  /**
   * Forgets what the host knows of `ip`'s link-layer address on `dev`: an address given to a new
   * NIC may still point at the MAC of the NIC that had it before, for seconds.
   */
  forgetNeighbour(dev: string, ip: string): Promise<void>;
  /** Names the network namespace of process `pid` (`ip netns attach`) and returns the name's path. */
  attachNetns(name: string, pid: number): Promise<string>;
  netnsPath(name: string): string;
  /** Moves `ifname` into the namespace, renames, sets the MAC and address, brings it up. */
  moveIntoNetns(ifname: string, netns: string, nic: NicInNetns): Promise<void>;
  /** Deletes an interface inside a namespace (its veth peer on the host goes with it). */
  deleteInNetns(netns: string, ifname: string): Promise<void>;
  enableForwarding(): Promise<void>;
  /** Whether a local socket listens on (tcp) or is bound to (udp) this port. */
  localPortInUse(protocol: 'tcp' | 'udp', port: number): Promise<boolean>;
  applyNft(script: string): Promise<void>;
  startDhcp(network: string, argv: string[], files: DnsmasqFiles): Promise<void>;
  stopDhcp(network: string): Promise<void>;
  reloadDhcp(network: string): void;
  dhcpPid(network: string): number | undefined;
}

interface IpLinkJson {
  ifname: string;
  flags?: string[];
  master?: string;
  address?: string;
  linkinfo?: { info_kind?: string };
}
interface IpAddrJson {
  ifname: string;
  addr_info?: Array<{ family: string; local: string; prefixlen: number }>;
}
interface IpRouteJson {
  dst: string;
  dev?: string;
  table?: string;
  type?: string;
}

const NETNS_DIR = '/run/netns';

export class LinuxNetHost implements NetHost {
  private readonly dhcp = new Map<string, DnsmasqSupervisor>();
  private setpriv: string | undefined | null = null;

  constructor(private readonly log: Logger, private readonly hooks: { onDhcpRestart?: (network: string, pid: number) => void } = {}) {}

  private ip(args: string[], opts: { allowFailure?: boolean } = {}) {
    return run('ip', args, { timeoutMs: 15_000, allowFailure: opts.allowFailure });
  }

  async listLinks(): Promise<LinkInfo[]> {
    const [links, addrs] = await Promise.all([this.ip(['-j', '-d', 'link', 'show']), this.ip(['-j', '-4', 'addr', 'show'])]);
    const byName = new Map<string, string[]>();
    for (const a of JSON.parse(addrs.stdout || '[]') as IpAddrJson[]) {
      byName.set(a.ifname, (a.addr_info ?? []).filter((i) => i.family === 'inet').map((i) => `${i.local}/${i.prefixlen}`));
    }
    return (JSON.parse(links.stdout || '[]') as IpLinkJson[]).map((l) => ({
      name: l.ifname,
      kind: l.linkinfo?.info_kind,
      master: l.master,
      up: (l.flags ?? []).includes('UP'),
      addresses: byName.get(l.ifname) ?? [],
      mac: l.address,
    }));
  }

  private async addressesOf(name: string): Promise<string[]> {
    const cur = await this.ip(['-j', '-4', 'addr', 'show', 'dev', name]);
    return (JSON.parse(cur.stdout || '[]') as IpAddrJson[]).flatMap((a) => (a.addr_info ?? []).map((i) => `${i.local}/${i.prefixlen}`));
  }

  async routes(): Promise<HostRoute[]> {
    const r = await this.ip(['-j', '-4', 'route', 'show', 'table', 'all']);
    return (JSON.parse(r.stdout || '[]') as IpRouteJson[])
      .filter((x) => x.dst !== 'default' && x.type !== 'broadcast')
      .map((x) => ({ dst: x.dst.includes('/') ? x.dst : `${x.dst}/32`, dev: x.dev, table: x.table }));
  }

  async ensureBridge(name: string, opts: { address?: string | undefined; current?: LinkInfo | null; mtu?: number | undefined }): Promise<void> {
    const exists = opts.current !== undefined ? opts.current !== null : await this.linkExists(name);
    if (!exists) {
      // No STP (nothing to loop with) and no forwarding delay: ports forward at once. A MAC of its
      // own: a bridge left to itself takes the lowest MAC of its ports, so it would change as
      // instances come and go, and neighbours would keep sending to the old one for a minute.
      await this.ip(['link', 'add', 'name', name, 'address', bridgeMac(name), 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0']);
    } else if (opts.current && opts.current.mac !== bridgeMac(name)) {
      await this.ip(['link', 'set', 'dev', name, 'address', bridgeMac(name)]);
    }
    if (opts.address) {
      // Routed (managed) bridge: the host is the gateway; instance ports are isolated, so the
      // bridge answers ARP for the subnet and routes between instances (no ICMP redirects).
      await this.sysctl(name, 'proxy_arp', '1');
      await this.sysctl(name, 'proxy_arp_pvlan', '1');
      await this.sysctl(name, 'send_redirects', '0');
      await this.sysctl(name, 'route_localnet', '1');
      await this.sysctl(name, 'forwarding', '1');
      // Proxy ARP answers a broadcast request after a random delay of up to proxy_delay (0.8 s by
      // default): an instance's first packet to a neighbour would wait for it. Answer at once.
      await writeFile(`/proc/sys/net/ipv4/neigh/${name}/proxy_delay`, '0').catch((e: Error) => this.log.warn('cannot make proxy ARP answer at once', { bridge: name, error: e.message }));
      const have = !exists ? [] : opts.current ? opts.current.addresses : await this.addressesOf(name);
      for (const a of have) if (a !== opts.address) await this.ip(['addr', 'del', a, 'dev', name], { allowFailure: true });
      if (!have.includes(opts.address)) await this.ip(['addr', 'add', opts.address, 'dev', name]);
    }
    // IPv6 is not offered on Hyperfold networks: no link-local address on the host side either.
    await writeFile(`/proc/sys/net/ipv6/conf/${name}/disable_ipv6`, '1').catch(() => undefined);
    // Set, not left to the kernel: a bridge otherwise takes the smallest MTU of its ports.
    if (opts.mtu !== undefined) await this.ip(['link', 'set', 'dev', name, 'mtu', String(opts.mtu)]);
    await this.ip(['link', 'set', 'dev', name, 'up']);
  }

  async setMaster(ifname: string, bridge: string | null, port: PortOptions): Promise<void> {
    if (bridge === null) {
      await this.ip(['link', 'set', 'dev', ifname, 'nomaster'], { allowFailure: true });
      return;
    }
    await this.ip(['link', 'set', 'dev', ifname, 'master', bridge]);
    await run('bridge', ['link', 'set', 'dev', ifname, 'isolated', port.isolated ? 'on' : 'off', 'learning', 'on'], { timeoutMs: 10_000 });
    await writeFile(`/proc/sys/net/ipv6/conf/${ifname}/disable_ipv6`, '1').catch(() => undefined);
    await this.ip(['link', 'set', 'dev', ifname, 'up']);
  }

  async deleteLink(name: string): Promise<void> {
    const r = await this.ip(['link', 'del', 'dev', name], { allowFailure: true });
    if (r.code !== 0 && !/Cannot find device|does not exist/i.test(r.stderr)) {
      throw new HfError('HF_ERR_INTERNAL', `cannot delete interface ${name}: ${r.stderr.trim()}`);
    }
  }

  async createTap(name: string, opts: { mtu?: number | undefined } = {}): Promise<void> {
    await this.ip(['tuntap', 'add', 'dev', name, 'mode', 'tap']);
    if (opts.mtu !== undefined) await this.ip(['link', 'set', 'dev', name, 'mtu', String(opts.mtu)]);
  }

  async createVeth(hostSide: string, peer: string, opts: { mtu?: number | undefined } = {}): Promise<void> {
    const mtu = opts.mtu !== undefined ? ['mtu', String(opts.mtu)] : [];
    await this.ip(['link', 'add', 'name', hostSide, ...mtu, 'type', 'veth', 'peer', 'name', peer, ...mtu]);
  }

  async createVlan(name: string, parent: string, id: number): Promise<void> {
    const r = await this.ip(['link', 'add', 'link', parent, 'name', name, 'type', 'vlan', 'id', String(id)], { allowFailure: true });
    if (r.code === 0) return;
    if (/not supported|Unknown device type|No such file/i.test(r.stderr)) {
      throw new HfError('HF_ERR_UNSUPPORTED', `this host's kernel cannot create 802.1Q VLAN interfaces (no 8021q support): ${r.stderr.trim()}`);
    }
    throw new HfError('HF_ERR_INTERNAL', `cannot create VLAN ${id} on ${parent}: ${r.stderr.trim()}`);
  }

  async listNetns(): Promise<string[]> {
    try {
      return await readdir(NETNS_DIR);
    } catch {
      return [];
    }
  }

  netnsPath(name: string): string {
    return `${NETNS_DIR}/${name}`;
  }

  async addNetns(name: string): Promise<string> {
    const path = this.netnsPath(name);
    const exists = await access(path).then(
      () => true,
      () => false,
    );
    if (!exists) await this.ip(['netns', 'add', name]);
    await this.ip(['-n', name, 'link', 'set', 'dev', 'lo', 'up']);
    return path;
  }

  async deleteNetns(name: string): Promise<void> {
    const r = await this.ip(['netns', 'del', name], { allowFailure: true });
    if (r.code !== 0 && !/No such file|Cannot remove namespace file.*No such/i.test(r.stderr)) {
      throw new HfError('HF_ERR_INTERNAL', `cannot delete network namespace ${name}: ${r.stderr.trim()}`);
    }
  }

  async forgetNeighbour(dev: string, ip: string): Promise<void> {
    await this.ip(['neigh', 'del', ip, 'dev', dev], { allowFailure: true });
  }

  async attachNetns(name: string, pid: number): Promise<string> {
    await this.ip(['netns', 'attach', name, String(pid)]);
    return this.netnsPath(name);
  }

  async moveIntoNetns(ifname: string, netns: string, nic: NicInNetns): Promise<void> {
    await this.ip(['link', 'set', 'dev', ifname, 'netns', netns]);
    const inNs = (args: string[]) => this.ip(['-n', netns, ...args]);
    await inNs(['link', 'set', 'dev', ifname, 'name', nic.name]);
    await inNs(['link', 'set', 'dev', nic.name, 'address', nic.mac]);
    await run('ip', ['netns', 'exec', netns, 'sysctl', '-q', '-w', `net.ipv6.conf.${nic.name}.disable_ipv6=1`], { allowFailure: true, timeoutMs: 10_000 });
    if (nic.address) await inNs(['addr', 'add', nic.address, 'dev', nic.name]);
    await inNs(['link', 'set', 'dev', nic.name, 'up']);
    if (nic.gateway) {
      const r = await inNs(['route', 'add', 'default', 'via', nic.gateway, 'dev', nic.name]).catch((e: unknown) => e);
      // A second NIC: the namespace already has a default route through the first one.
      if (isHfError(r) && !/File exists/.test(r.message)) throw r;
    }
  }

  async deleteInNetns(netns: string, ifname: string): Promise<void> {
    await this.ip(['-n', netns, 'link', 'del', 'dev', ifname], { allowFailure: true });
  }

  async enableForwarding(): Promise<void> {
    await writeFile('/proc/sys/net/ipv4/ip_forward', '1');
  }

  async localPortInUse(protocol: 'tcp' | 'udp', port: number): Promise<boolean> {
    for (const f of protocol === 'tcp' ? ['/proc/net/tcp', '/proc/net/tcp6'] : ['/proc/net/udp', '/proc/net/udp6']) {
      const text = await readFile(f, 'utf8').catch(() => '');
      if (localPortsOf(text, protocol === 'tcp').has(port)) return true;
    }
    return false;
  }

  async applyNft(script: string): Promise<void> {
    await applyRuleset(script);
  }

  async startDhcp(network: string, argv: string[], files: DnsmasqFiles): Promise<void> {
    await mkdir(files.dir, { recursive: true, mode: 0o700 });
    if (this.setpriv === null) this.setpriv = await which('setpriv');
    let sup = this.dhcp.get(network);
    if (sup) await sup.stop();
    sup = new DnsmasqSupervisor(network, argv, files, { log: this.log, setpriv: this.setpriv, onRestart: this.hooks.onDhcpRestart });
    this.dhcp.set(network, sup);
    try {
      await sup.start();
    } catch (e) {
      this.dhcp.delete(network);
      await sup.stop();
      throw e;
    }
  }

  async stopDhcp(network: string): Promise<void> {
    const sup = this.dhcp.get(network);
    this.dhcp.delete(network);
    await sup?.stop();
  }

  reloadDhcp(network: string): void {
    this.dhcp.get(network)?.reload();
  }

  dhcpPid(network: string): number | undefined {
    return this.dhcp.get(network)?.pid;
  }

  async stopAllDhcp(): Promise<void> {
    for (const n of [...this.dhcp.keys()]) await this.stopDhcp(n);
  }

  private async linkExists(name: string): Promise<boolean> {
    const r = await this.ip(['link', 'show', 'dev', name], { allowFailure: true });
    return r.code === 0;
  }

  private async sysctl(ifname: string, key: string, value: string): Promise<void> {
    await writeFile(`/proc/sys/net/ipv4/conf/${ifname}/${key}`, value);
  }
}

/** Local ports in a /proc/net/{tcp,udp}[6] table; for tcp only listening sockets (state 0A). */
export function localPortsOf(table: string, listenOnly: boolean): Set<number> {
  const out = new Set<number>();
  for (const line of table.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 4) continue;
    const port = parseInt(f[1]!.split(':')[1] ?? '', 16);
    if (!Number.isFinite(port)) continue;
    if (listenOnly && f[3] !== '0A') continue;
    out.add(port);
  }
  return out;
}

/** A fixed, locally administered unicast MAC for bridge `name` (02:…, from a hash of the name). */
export function bridgeMac(name: string): string {
  const h = createHash('sha256').update(`hyperfold-bridge/${name}`).digest();
  return ['02', ...[...h.subarray(0, 5)].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}
