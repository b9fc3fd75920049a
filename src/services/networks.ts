// The network service: networks (a Linux bridge each; managed ones with a subnet, dnsmasq for
// DHCP and DNS, NAT or no uplink; bridged ones joined to a host interface), the NICs of
// instances (taps for VMs, veth pairs in a network namespace for containers), address
// reservations, per-instance firewalls and port forwards, all enforced by one nftables ruleset
// that is rebuilt from the state store on every change (see network/nft.ts).
//
// It plugs into the instance lifecycle as an InstanceExtension: NICs are reserved at create,
// host interfaces are created before start and removed after stop, and everything an instance
// held goes at delete. Every multi-step change registers undo steps, so a failure leaves no
// stray bridge, tap, veth, dnsmasq, rule or row. After a daemon restart `start()` and
// `reconcileInstances()` bring the host back to what the store says, removing leftovers that
// carry this daemon's prefix.
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError, isHfError } from '../core/errors.js';
import { isActive } from '../core/lifecycle.js';
import type { CreateInstance, Instance, NicConfig } from '../core/model/instance.js';
import type { Operation } from '../core/model/operation.js';
import { parseInput } from '../core/validate.js';
import { parseFirewallRule } from '../network/firewall.js';
import { checkRequestedIp, nextFreeIp, normalizeMac, randomMac } from '../network/alloc.js';
import { formatCidr, formatIpv4, hostRange, overlaps, parseCidr, type Cidr } from '../network/cidr.js';
import { activeLeases, buildDnsmasqArgv, buildHostsFile, dnsmasqFiles, dropLeases, readLeases, writeAtomic, type DnsmasqFiles } from '../network/dnsmasq.js';
import type { LinkInfo, NetHost } from '../network/host.js';
import {
  addFirewallRuleSchema,
  createForwardSchema,
  createNetworkSchema,
  firewallPolicySchema,
  firewallSchema,
  forwardSchema,
  ipReservationSchema,
  macReservationSchema,
  networkSchema,
  nicRequestSchema,
  type Firewall,
  type Forward,
  type IpReservation,
  type MacReservation,
  type Network,
  type NicAddress,
  type NicRequest,
} from '../network/model.js';
import { fnv1a, NetNames } from '../network/names.js';
import { buildRuleset, type RulesetSpec } from '../network/nft.js';
import { Collection } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import type { Logger } from '../util/log.js';
import { KeyedMutex } from '../util/mutex.js';
import { UndoStack } from '../util/undo.js';
import type { EventBus } from './events.js';
import type { InstanceExtension } from './extensions.js';
import type { InstanceService } from './instances.js';
import type { OperationManager } from './operations.js';

export interface NetworkServiceDeps {
  store: StateStore;
  host: NetHost;
  names: NetNames;
  /** Where per-network files live (dnsmasq pid, leases, hosts): <dataDir>/networks. */
  networksDir: string;
  /** The data directory (recorded as the owner of this daemon's objects). */
  dataDir: string;
  events: EventBus;
  operations: OperationManager;
  log: Logger;
  /** Directory shared by the daemons of this host: who owns which tag (leftover clean-up). */
  ownersDir?: string;
  /** Create the `default` NAT network at the first start (default true). */
  createDefault?: boolean;
}

export const DEFAULT_NETWORK = 'default';
export const DEFAULT_OWNERS_DIR = '/run/hyperfold/net';
const META_DEFAULT_CREATED = '/network-meta/default-created';
const LOCK = 'net';

/** Special-purpose IPv4 ranges a network subnet may not use. */
const RESERVED_RANGES = ['0.0.0.0/8', '127.0.0.0/8', '169.254.0.0/16', '224.0.0.0/4', '240.0.0.0/4'].map((c) => parseCidr(c));

export interface NetworkView extends Network {
  /** NICs attached: instance/nic. */
  usedBy: Array<{ instance: string; nic: string; ip?: string | undefined; mac: string }>;
  dnsmasqPid?: number | undefined;
}

export class NetworkService {
  private readonly networks: Collection<Network>;
  private readonly ips: Collection<IpReservation>;
  private readonly macs: Collection<MacReservation>;
  private readonly firewalls: Collection<Firewall>;
  private readonly forwards: Collection<Forward>;
  private readonly lock = new KeyedMutex();
  private instancesSvc: InstanceService | undefined;
  /** Host interfaces this process created for running instances (kept out of the stray sweep). */
  private readonly liveIfaces = new Set<string>();
  readonly extension: InstanceExtension;

  constructor(private readonly d: NetworkServiceDeps) {
    this.networks = new Collection<Network>(d.store, '/networks/', networkSchema);
    this.ips = new Collection<IpReservation>(d.store, '/network-ips/', ipReservationSchema);
    this.macs = new Collection<MacReservation>(d.store, '/network-macs/', macReservationSchema);
    this.firewalls = new Collection<Firewall>(d.store, '/network-firewalls/', firewallSchema);
    this.forwards = new Collection<Forward>(d.store, '/network-forwards/', forwardSchema);
    this.extension = {
      name: 'network',
      onCreate: (req, inst, undo) => this.onCreate(req, inst, undo),
      beforeStart: (inst, undo) => this.beforeStart(inst, undo),
      afterStop: (inst) => this.afterStop(inst),
      onDelete: (inst) => this.onDelete(inst),
    };
  }

  /** The instance service is built after this one (it takes our extension): bind it here. */
  bindInstances(instances: InstanceService): void {
    this.instancesSvc = instances;
  }

  private get instances(): InstanceService {
    if (!this.instancesSvc) throw new HfError('HF_ERR_INTERNAL', 'network service used before the instance service was bound');
    return this.instancesSvc;
  }

  // ---- queries -------------------------------------------------------------------------------

  async list(): Promise<NetworkView[]> {
    const insts = await this.instances.list();
    return (await this.networks.list()).map((v) => this.view(v.value, insts));
  }

  async get(name: string): Promise<NetworkView> {
    return this.view(await this.load(name), await this.instances.list());
  }

  private view(net: Network, insts: Instance[]): NetworkView {
    const usedBy = insts.flatMap((i) => i.config.nics.filter((n) => n.network === net.name).map((n) => ({ instance: i.name, nic: n.name, ip: n.ip, mac: n.mac })));
    return { ...net, usedBy, dnsmasqPid: net.mode === 'bridged' ? undefined : this.d.host.dhcpPid(net.name) };
  }

  private async load(name: string): Promise<Network> {
    const v = await this.networks.get(name).catch((e: unknown) => {
      if (isHfError(e, 'HF_ERR_VALIDATION')) return undefined;
      throw e;
    });
    if (!v) throw new HfError('HF_ERR_NETWORK_NOT_FOUND', `network "${name}" not found`);
    return v.value;
  }

  /** Addresses of every NIC (or one instance's): reserved, and what DHCP leased / the namespace holds. */
  async addresses(instance?: string): Promise<NicAddress[]> {
    const insts = instance ? [await this.instances.get(instance)] : await this.instances.list();
    const nets = new Map((await this.networks.list()).map((v) => [v.value.name, v.value]));
    const leases = new Map<string, Awaited<ReturnType<typeof readLeases>>>();
    const now = Math.floor(Date.now() / 1000);
    const out: NicAddress[] = [];
    for (const inst of insts) {
      for (const nic of inst.config.nics) {
        const net = nets.get(nic.network);
        const a: NicAddress = { instance: inst.name, nic: nic.name, network: nic.network, mac: nic.mac };
        if (nic.ip) a.reserved = nic.ip;
        if (net && net.mode !== 'bridged') {
          if (!leases.has(net.name)) leases.set(net.name, activeLeases(await readLeases(this.files(net.name)), now));
          const lease = leases.get(net.name)!.find((l) => l.mac === nic.mac);
          if (lease && isActive(inst.state)) {
            a.ip = lease.ip;
            a.source = 'lease';
            if (lease.expires) a.expires = new Date(lease.expires * 1000).toISOString();
          } else if (inst.type === 'container' && isActive(inst.state) && inst.config.netns && nic.ip) {
            a.ip = nic.ip;
            a.source = 'static';
          }
        }
        out.push(a);
      }
    }
    return out;
  }

  // ---- networks ------------------------------------------------------------------------------

  async create(body: unknown): Promise<NetworkView> {
    const req = parseInput(createNetworkSchema, body);
    const mode = req.mode ?? (req.bridgeTo ? 'bridged' : 'nat');
    if (req.vlan !== undefined && (req.vlan < 1 || req.vlan > 4094)) {
      throw new HfError('HF_ERR_VALIDATION', `VLAN id ${req.vlan} is not usable: use 1 to 4094 (0 and 4095 are reserved by 802.1Q)`);
    }
    if (mode === 'bridged' && !req.bridgeTo) throw new HfError('HF_ERR_VALIDATION', 'a bridged network needs bridgeTo (the host interface to bridge to)');
    if (mode !== 'bridged' && req.bridgeTo) throw new HfError('HF_ERR_VALIDATION', `bridgeTo makes a bridged network: it cannot be combined with mode ${mode}`);
    if (req.vlan !== undefined && mode !== 'bridged') throw new HfError('HF_ERR_VALIDATION', 'a VLAN id needs a bridged network (bridgeTo): the tag goes on the uplink');
    if (mode === 'bridged' && req.subnet) throw new HfError('HF_ERR_VALIDATION', 'a bridged network takes its addresses from the network it is bridged to: give no subnet');

    const created = await this.lock.run(LOCK, 'network create', () =>
      UndoStack.run(async (undo) => {
        if (await this.networks.get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `network "${req.name}" already exists`);
        const all = (await this.networks.list()).map((v) => v.value);
        const links = await this.d.host.listLinks();
        const net: Network = {
          name: req.name,
          mode,
          bridge: this.d.names.bridge(req.name),
          external: false,
          description: req.description,
          createdAt: new Date().toISOString(),
        };
        if (mode === 'bridged') {
          await this.checkUplink(req.bridgeTo!, req.vlan, all, links);
          const up = links.find((l) => l.name === req.bridgeTo)!;
          net.uplink = up.name;
          if (up.kind === 'bridge') {
            if (req.vlan !== undefined) throw new HfError('HF_ERR_UNSUPPORTED', `${up.name} is a bridge: a VLAN needs a plain interface to tag (give the physical interface instead)`);
            net.external = true;
            net.bridge = up.name;
          }
          if (req.vlan !== undefined) net.vlan = req.vlan;
        } else {
          const subnet = req.subnet ? await this.checkSubnet(req.subnet, all) : await this.pickSubnet(req.name, all);
          net.subnet = formatCidr(subnet);
          net.gateway = formatIpv4(hostRange(subnet).first);
          net.domain = `${req.name}.hf.internal`;
        }
        const clash = all.find((n) => n.bridge === net.bridge);
        if (clash) throw new HfError('HF_ERR_CONFLICT', `network "${clash.name}" already uses bridge ${net.bridge}`);
        if (!net.external && links.some((l) => l.name === net.bridge) && !this.d.names.ownsLink(net.bridge)) {
          throw new HfError('HF_ERR_CONFLICT', `an interface named ${net.bridge} already exists on this host`);
        }

        await this.networks.create(net.name, net);
        undo.add('remove network record', async () => {
          await this.networks.delete(net.name);
          await this.applyLocked().catch(() => undefined);
        });
        await this.bringUp(net, undo, links);
        await this.applyLocked();
        return net;
      }, this.d.log),
    );
    this.d.events.publish('network.created', { name: created.name, mode: created.mode, subnet: created.subnet });
    this.d.log.info('network created', { name: created.name, mode: created.mode, subnet: created.subnet, bridge: created.bridge });
    return this.get(created.name);
  }

  async delete(name: string): Promise<void> {
    await this.lock.run(LOCK, 'network delete', async () => {
      const net = await this.load(name);
      // Instances with a NIC on it, and reservations of creates still in flight (made under this lock).
      const users = new Set((await this.instances.list()).filter((i) => i.config.nics.some((n) => n.network === name)).map((i) => i.name));
      for (const { value: r } of await this.macs.list()) if (r.network === name) users.add(r.instance);
      if (users.size) {
        const list = [...users].sort();
        throw new HfError('HF_ERR_NETWORK_IN_USE', `network "${name}" is used by ${list.join(', ')}: remove their NICs or delete them first`, { details: { instances: list } });
      }
      await this.d.host.stopDhcp(name);
      await this.tearDown(net);
      await this.networks.delete(name);
      for (const r of await this.ips.list()) if (r.value.network === name) await this.ips.delete(this.ipKey(r.value.network, r.value.ip));
      await rm(join(this.d.networksDir, name), { recursive: true, force: true });
      await this.applyLocked();
    });
    this.d.events.publish('network.deleted', { name });
    this.d.log.info('network deleted', { name });
  }

  private async checkUplink(iface: string, vlan: number | undefined, all: Network[], links: LinkInfo[]): Promise<void> {
    const up = links.find((l) => l.name === iface);
    if (!up) throw new HfError('HF_ERR_VALIDATION', `there is no interface named "${iface}" on this host`);
    if (this.d.names.ownsLink(iface) || all.some((n) => n.bridge === iface && !n.external)) {
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
  private async checkSubnet(s: string, all: Network[]): Promise<Cidr> {
    const c = parseCidr(s);
    if (c.prefix < 16 || c.prefix > 29) throw new HfError('HF_ERR_VALIDATION', `subnet ${s}: use a prefix length from /16 to /29`);
    const special = RESERVED_RANGES.find((r) => overlaps(r, c));
    if (special) throw new HfError('HF_ERR_VALIDATION', `subnet ${s} lies in the special-purpose range ${formatCidr(special)}`);
    const other = all.find((n) => n.subnet && overlaps(parseCidr(n.subnet), c));
    if (other) throw new HfError('HF_ERR_SUBNET_CONFLICT', `subnet ${s} overlaps network "${other.name}" (${other.subnet})`, { details: { network: other.name, subnet: other.subnet } });
    const route = await this.collidingRoute(c);
    if (route) {
      throw new HfError('HF_ERR_SUBNET_CONFLICT', `subnet ${s} collides with the host route ${route.dst}${route.dev ? ` on ${route.dev}` : ''}`, { details: { route: route.dst, dev: route.dev } });
    }
    return c;
  }

  private async collidingRoute(c: Cidr): Promise<{ dst: string; dev?: string | undefined } | undefined> {
    for (const r of await this.d.host.routes()) {
      if (r.dev && this.d.names.ownsLink(r.dev)) continue; // our own bridges: checked against the records
      let rc: Cidr;
      try {
        rc = parseCidr(r.dst, { strict: false });
      } catch {
        continue;
      }
      if (rc.prefix === 0) continue;
      if (overlaps(rc, c)) return r;
    }
    return undefined;
  }

  /** A free 10.x.y.0/24: pseudo-random per daemon and network name, clear of networks and routes. */
  private async pickSubnet(name: string, all: Network[]): Promise<Cidr> {
    const routes = (await this.d.host.routes()).filter((r) => !(r.dev && this.d.names.ownsLink(r.dev)));
    const taken = [
      ...all.flatMap((n) => (n.subnet ? [parseCidr(n.subnet)] : [])),
      ...routes.flatMap((r) => {
        try {
          const c = parseCidr(r.dst, { strict: false });
          return c.prefix === 0 ? [] : [c];
        } catch {
          return [];
        }
      }),
    ];
    for (let i = 0; i < 512; i++) {
      const h = fnv1a(`${this.d.names.tag}/${name}/${i}`);
      const c: Cidr = { network: parseCidr(`10.${parseInt(h.slice(0, 2), 16)}.${parseInt(h.slice(2, 4), 16)}.0/24`).network, prefix: 24 };
      if (!taken.some((t) => overlaps(t, c))) return c;
    }
    throw new HfError('HF_ERR_SUBNET_CONFLICT', 'could not find a free 10.x.y.0/24 subnet: give one with --subnet');
  }

  /** Creates (or repairs) a network's bridge, uplink and dnsmasq. Idempotent. */
  /** `links`: a listing of the host's links taken under the lock just before, when the caller has one. */
  private async bringUp(net: Network, undo?: UndoStack, links?: LinkInfo[]): Promise<void> {
    links ??= await this.d.host.listLinks();
    const has = (n: string) => links.some((l) => l.name === n);
    if (!net.external) {
      const current = links.find((l) => l.name === net.bridge) ?? null;
      const address = net.subnet && net.gateway ? `${net.gateway}/${parseCidr(net.subnet).prefix}` : undefined;
      if (!current) undo?.add(`delete bridge ${net.bridge}`, () => this.d.host.deleteLink(net.bridge));
      await this.d.host.ensureBridge(net.bridge, { address, current });
    }
    if (net.mode === 'bridged' && !net.external && net.uplink) {
      let port = net.uplink;
      if (net.vlan !== undefined) {
        port = this.d.names.vlan(net.name);
        if (!has(port)) {
          await this.d.host.createVlan(port, net.uplink, net.vlan);
          undo?.add(`delete VLAN interface ${port}`, () => this.d.host.deleteLink(port));
        }
      }
      const cur = links.find((l) => l.name === port);
      if (cur?.master !== net.bridge) {
        await this.d.host.setMaster(port, net.bridge, { isolated: false });
        const p = port;
        undo?.add(`release ${p}`, () => this.d.host.setMaster(p, null, { isolated: false }));
      }
    }
    if (net.mode !== 'bridged') {
      if (net.mode === 'nat') await this.d.host.enableForwarding();
      const files = this.files(net.name);
      await mkdir(files.dir, { recursive: true, mode: 0o700 });
      if ((await this.syncHostsFile(net.name)) && this.d.host.dhcpPid(net.name) !== undefined) this.d.host.reloadDhcp(net.name);
      if (this.d.host.dhcpPid(net.name) === undefined) {
        await this.d.host.startDhcp(net.name, buildDnsmasqArgv(net, files), files);
        undo?.add(`stop dnsmasq of ${net.name}`, () => this.d.host.stopDhcp(net.name));
      }
    }
  }

  private async tearDown(net: Network): Promise<void> {
    if (net.vlan !== undefined) await this.d.host.deleteLink(this.d.names.vlan(net.name));
    else if (net.mode === 'bridged' && net.uplink && !net.external) await this.d.host.setMaster(net.uplink, null, { isolated: false });
    if (!net.external) await this.d.host.deleteLink(net.bridge);
  }

  /** The bridge port of a NIC: a VM's tap (recorded), a container's veth (derived). */
  private hostIfaceOf(inst: Pick<Instance, 'id' | 'type'>, nic: NicConfig): string {
    return nic.hostIface ?? (inst.type === 'vm' ? this.d.names.tap(inst.id, nic.name) : this.d.names.veth(inst.id, nic.name));
  }

  private files(network: string): DnsmasqFiles {
    return dnsmasqFiles(join(this.d.networksDir, network));
  }

  private ipKey(network: string, ip: string): string {
    return `${network}@${ip}`;
  }

  private async reservationsOf(network: string): Promise<IpReservation[]> {
    return (await this.ips.list()).map((v) => v.value).filter((r) => r.network === network);
  }

  // ---- the ruleset ---------------------------------------------------------------------------

  /** Rebuilds the nftables ruleset and the DHCP host files from the store (call under the lock). */
  private async applyLocked(opts: { exclude?: string } = {}): Promise<void> {
    const nets = (await this.networks.list()).map((v) => v.value);
    const insts = (await this.instances.list()).filter((i) => i.name !== opts.exclude);
    const fws = new Map((await this.firewalls.list()).map((v) => [v.value.instance, v.value]));
    const netByName = new Map(nets.map((n) => [n.name, n]));
    const spec: RulesetSpec = { table: this.d.names.table, networks: nets.map((n) => ({ name: n.name, mode: n.mode, bridge: n.bridge, subnet: n.subnet })), nics: [], firewalls: [], forwards: [] };
    const ipOf = new Map<string, string>();
    for (const inst of insts) {
      const ips: string[] = [];
      for (const nic of inst.config.nics) {
        const net = netByName.get(nic.network);
        if (!net) continue;
        const managed = net.mode !== 'bridged';
        spec.nics.push({ instance: inst.name, nic: nic.name, hostIface: this.hostIfaceOf(inst, nic), mac: nic.mac, ip: nic.ip, managed });
        if (managed && nic.ip) {
          ips.push(nic.ip);
          ipOf.set(`${inst.name}/${nic.name}`, nic.ip);
        }
      }
      const fw = fws.get(inst.name);
      if (fw && ips.length) spec.firewalls.push({ instance: inst.name, inbound: fw.inbound, rules: fw.rules, ips });
    }
    for (const { value: f } of await this.forwards.list()) {
      const ip = ipOf.get(`${f.instance}/${f.nic}`);
      if (ip) spec.forwards.push({ protocol: f.protocol, hostPort: f.hostPort, ip, port: f.port });
    }
    await this.d.host.applyNft(buildRuleset(spec));
    for (const net of nets) {
      if (net.mode !== 'bridged' && (await this.syncHostsFile(net.name))) this.d.host.reloadDhcp(net.name);
    }
  }

  /** Writes a network's DHCP host file from the reservations; true when it changed. */
  private async syncHostsFile(network: string): Promise<boolean> {
    const files = this.files(network);
    if (!existsSync(files.dir)) return false;
    const content = buildHostsFile(await this.reservationsOf(network));
    const cur = await readFile(files.hostsFile, 'utf8').catch(() => undefined);
    if (cur === content) return false;
    await writeAtomic(files.hostsFile, content);
    return true;
  }

  /** The ruleset as it would be applied now (for `network info --rules` and tests). */
  async apply(): Promise<void> {
    await this.lock.run(LOCK, 'apply rules', () => this.applyLocked());
  }

  // ---- NIC reservation -----------------------------------------------------------------------

  /** Reserves name, MAC and address for one NIC; registers undo steps. Call under the lock. */
  private async reserveNic(inst: Pick<Instance, 'id' | 'name' | 'type'>, existing: NicConfig[], req: NicRequest, undo: UndoStack): Promise<NicConfig> {
    const net = await this.load(req.network);
    const taken = new Set(existing.map((n) => n.name));
    let name = req.name;
    if (name && taken.has(name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance ${inst.name} already has a NIC named ${name}`);
    if (!name) {
      let i = 0;
      while (taken.has(`eth${i}`)) i++;
      name = `eth${i}`;
    }
    const macsTaken = new Set((await this.macs.list()).map((v) => v.value.mac));
    const mac = req.mac ? normalizeMac(req.mac) : randomMac(macsTaken);
    try {
      await this.macs.create(mac, { mac, instance: inst.name, nic: name, network: net.name });
    } catch (e) {
      if (!isHfError(e, 'HF_ERR_ALREADY_EXISTS')) throw e;
      const owner = (await this.macs.get(mac))?.value;
      throw new HfError('HF_ERR_ADDRESS_IN_USE', `MAC ${mac} is already used${owner ? ` by ${owner.instance} (${owner.nic})` : ''}`, { details: { mac, instance: owner?.instance } });
    }
    undo.add(`release MAC ${mac}`, async () => void (await this.macs.delete(mac)));

    let ip: string | undefined;
    if (net.mode === 'bridged') {
      if (req.ip) throw new HfError('HF_ERR_VALIDATION', `network ${net.name} is bridged to ${net.uplink}: its addresses come from that network, so --ip cannot reserve one`);
    } else {
      const plan = { subnet: parseCidr(net.subnet!), gateway: parseCidr(`${net.gateway}/32`).network };
      if (req.ip) {
        checkRequestedIp(plan, req.ip);
        ip = formatIpv4(parseCidr(`${req.ip}/32`).network);
      } else {
        ip = nextFreeIp(plan, new Set((await this.reservationsOf(net.name)).map((r) => r.ip)));
      }
      try {
        await this.ips.create(this.ipKey(net.name, ip), { network: net.name, ip, mac, instance: inst.name, nic: name });
      } catch (e) {
        if (!isHfError(e, 'HF_ERR_ALREADY_EXISTS')) throw e;
        const owner = (await this.ips.get(this.ipKey(net.name, ip)))?.value;
        throw new HfError('HF_ERR_ADDRESS_IN_USE', `${ip} is already reserved on network ${net.name}${owner ? ` by ${owner.instance} (${owner.nic})` : ''}`, { details: { ip, instance: owner?.instance } });
      }
      const key = this.ipKey(net.name, ip);
      undo.add(`release ${ip}`, async () => void (await this.ips.delete(key)));
    }
    const nic: NicConfig = { name, network: net.name, mac };
    // A VM's tap name goes on QEMU's command line. A container's veth is found by name: the
    // container joins the namespace in config.netns and needs no host interface of its own.
    if (inst.type === 'vm') nic.hostIface = this.d.names.tap(inst.id, name);
    if (ip) nic.ip = ip;
    return nic;
  }

  private async releaseNic(inst: string, nic: NicConfig): Promise<void> {
    const m = await this.macs.get(nic.mac);
    if (m && m.value.instance === inst) await this.macs.delete(nic.mac);
    if (nic.ip) {
      const key = this.ipKey(nic.network, nic.ip);
      const r = await this.ips.get(key);
      if (r && r.value.instance === inst) await this.ips.delete(key);
    }
    for (const { value: f } of await this.forwards.list()) {
      if (f.instance === inst && f.nic === nic.name) await this.forwards.delete(`${f.protocol}-${f.hostPort}`);
    }
  }

  /** Removes the DHCP leases of these MACs (dnsmasq is stopped while its lease file is edited). */
  private async dropLeasesOf(nics: NicConfig[]): Promise<void> {
    const byNet = new Map<string, Set<string>>();
    for (const n of nics) byNet.set(n.network, (byNet.get(n.network) ?? new Set()).add(n.mac));
    for (const [network, macs] of byNet) {
      const net = await this.networks.get(network);
      if (!net || net.value.mode === 'bridged') continue;
      const files = this.files(network);
      const leases = await readLeases(files);
      if (!leases.some((l) => macs.has(l.mac))) continue;
      const running = this.d.host.dhcpPid(network) !== undefined;
      if (running) await this.d.host.stopDhcp(network);
      try {
        const text = await readFile(files.leaseFile, 'utf8').catch(() => '');
        await writeAtomic(files.leaseFile, dropLeases(text, macs));
      } finally {
        if (running) await this.d.host.startDhcp(network, buildDnsmasqArgv(net.value, files), files);
      }
    }
  }

  // ---- the instance extension ----------------------------------------------------------------

  private async onCreate(req: CreateInstance, inst: Instance, undo: UndoStack): Promise<Instance> {
    if (req.nics.length === 0) return inst;
    const nics = await this.lock.run(LOCK, 'reserve NICs', async () => {
      const out: NicConfig[] = [...inst.config.nics];
      for (const r of req.nics) out.push(await this.reserveNic(inst, out, parseInput(nicRequestSchema, r, 'nic'), undo));
      // dnsmasq learns the reservations before the instance first asks for an address.
      undo.add('rewrite DHCP host files', () => this.applyHostsOnly());
      await this.applyHostsOnly();
      return out;
    });
    return { ...inst, config: { ...inst.config, nics } };
  }

  private async applyHostsOnly(): Promise<void> {
    for (const { value: net } of await this.networks.list()) {
      if (net.mode !== 'bridged' && (await this.syncHostsFile(net.name))) this.d.host.reloadDhcp(net.name);
    }
  }

  private async beforeStart(inst: Instance, undo: UndoStack): Promise<Instance> {
    const nics = inst.config.nics;
    if (nics.length === 0) {
      if (inst.config.netns && inst.type === 'container') {
        const { netns: _drop, ...config } = inst.config;
        return { ...inst, config };
      }
      return inst;
    }
    const nets = new Map<string, Network>();
    await this.lock.run(LOCK, 'prepare networks', async () => {
      for (const nic of nics) {
        if (!nets.has(nic.network)) {
          const net = await this.load(nic.network);
          await this.bringUp(net);
          nets.set(net.name, net);
        }
      }
      await this.applyLocked();
    });
    const fixed = inst.type === 'vm' ? nics.map((n) => ({ ...n, hostIface: this.hostIfaceOf(inst, n) })) : nics;
    let netnsPath: string | undefined;
    if (inst.type === 'container') {
      const ns = this.d.names.netns(inst.name);
      await this.d.host.deleteNetns(ns);
      netnsPath = await this.d.host.addNetns(ns);
      undo.add(`delete netns ${ns}`, () => this.d.host.deleteNetns(ns));
    }
    for (const nic of fixed) await this.plugHostSide(inst, nic, nets.get(nic.network)!, undo);
    const config = { ...inst.config, nics: fixed };
    if (netnsPath) config.netns = netnsPath;
    return { ...inst, config };
  }

  /** Creates a NIC's host side (tap, or veth moved into the namespace) and puts it on the bridge. */
  private async plugHostSide(inst: Pick<Instance, 'id' | 'name' | 'type'>, nic: NicConfig, net: Network, undo: UndoStack): Promise<void> {
    const iface = this.hostIfaceOf(inst, nic);
    const managed = net.mode !== 'bridged';
    await this.d.host.deleteLink(iface);
    if (inst.type === 'vm') {
      await this.d.host.createTap(iface);
    } else {
      const peer = this.d.names.vethPeer(inst.id, nic.name);
      await this.d.host.deleteLink(peer);
      await this.d.host.createVeth(iface, peer);
    }
    this.liveIfaces.add(iface);
    undo.add(`delete ${iface}`, async () => {
      this.liveIfaces.delete(iface);
      await this.d.host.deleteLink(iface);
    });
    await this.d.host.setMaster(iface, net.bridge, { isolated: managed });
    if (managed && nic.ip) await this.d.host.forgetNeighbour(net.bridge, nic.ip);
    if (inst.type === 'container') {
      const ns = this.d.names.netns(inst.name);
      const prefix = net.subnet ? parseCidr(net.subnet).prefix : undefined;
      await this.d.host.moveIntoNetns(this.d.names.vethPeer(inst.id, nic.name), ns, {
        name: nic.name,
        mac: nic.mac,
        address: nic.ip && prefix !== undefined ? `${nic.ip}/${prefix}` : undefined,
        gateway: net.mode === 'nat' ? net.gateway : undefined,
      });
    }
  }

  private async afterStop(inst: Instance): Promise<void> {
    for (const nic of inst.config.nics) {
      const iface = this.hostIfaceOf(inst, nic);
      await this.d.host.deleteLink(iface);
      this.liveIfaces.delete(iface);
    }
    if (inst.type === 'container') await this.d.host.deleteNetns(this.d.names.netns(inst.name));
  }

  private async onDelete(inst: Instance): Promise<void> {
    await this.afterStop(inst);
    await this.lock.run(LOCK, 'release NICs', async () => {
      for (const nic of inst.config.nics) await this.releaseNic(inst.name, nic);
      // Leftovers of a NIC whose record was lost half-way (crash): anything reserved for this name.
      for (const r of await this.ips.list()) if (r.value.instance === inst.name) await this.ips.delete(this.ipKey(r.value.network, r.value.ip));
      for (const r of await this.macs.list()) if (r.value.instance === inst.name) await this.macs.delete(r.value.mac);
      for (const r of await this.forwards.list()) if (r.value.instance === inst.name) await this.forwards.delete(`${r.value.protocol}-${r.value.hostPort}`);
      await this.firewalls.delete(inst.name);
      await this.dropLeasesOf(inst.config.nics);
      // The record still exists while hooks run: leave it out of the ruleset explicitly.
      await this.applyLocked({ exclude: inst.name });
    });
  }

  // ---- NIC hot-plug --------------------------------------------------------------------------

  /** Adds a NIC: at once into a running instance (hot-plug), or for the next start. An operation. */
  async addNic(instance: string, body: unknown): Promise<Operation> {
    const req = parseInput(nicRequestSchema, body);
    const cur = await this.instances.get(instance);
    await this.load(req.network);
    const h = this.instances.handle(instance);
    if (h && cur.type === 'vm' && !h.attachNic) throw new HfError('HF_ERR_UNSUPPORTED', `the ${cur.type} driver cannot hot-plug NICs: stop ${instance} first`);
    return this.d.operations.start('instance.nic-add', { kind: 'instance', name: instance }, (ctx) =>
      this.instances.withInstance(instance, 'nic add', (inst, handle) =>
        UndoStack.run(async (undo) => {
          const nic = await this.lock.run(LOCK, 'reserve NIC', () => this.reserveNic(inst, inst.config.nics, req, undo));
          await this.instances.patch(instance, (r) => ({ ...r, config: { ...r.config, nics: [...r.config.nics, nic] } }));
          undo.add('remove NIC from the record', async () => {
            await this.instances.patch(instance, (r) => ({ ...r, config: { ...r.config, nics: r.config.nics.filter((n) => n.name !== nic.name) } }));
            await this.apply().catch(() => undefined);
          });
          const running = handle !== undefined && isActive(inst.state);
          let net: Network | undefined;
          await this.lock.run(LOCK, 'apply rules', async () => {
            net = await this.load(nic.network);
            if (running) await this.bringUp(net);
            await this.applyLocked();
          });
          if (running) {
            ctx.progress(30, `plugging ${nic.name} into ${instance}`);
            if (inst.type === 'container' && (!inst.config.netns || !existsSync(inst.config.netns))) {
              // Started without NICs: its init has a network namespace of its own (runc made one).
              // Name it as the network layer names the ones it prepares; the NIC is moved in there.
              const ns = this.d.names.netns(inst.name);
              await this.d.host.deleteNetns(ns);
              const netns = await this.d.host.attachNetns(ns, handle.runtime.pid);
              undo.add(`forget the name ${ns}`, () => this.d.host.deleteNetns(ns));
              await this.instances.patch(instance, (r) => ({ ...r, config: { ...r.config, netns } }));
            }
            await this.plugHostSide(inst, nic, net!, undo);
            if (inst.type === 'vm') {
              if (!handle.attachNic) throw new HfError('HF_ERR_UNSUPPORTED', `the driver of ${instance} cannot hot-plug NICs`);
              await handle.attachNic(nic);
            }
          }
          ctx.progress(100, running ? 'NIC plugged in' : 'NIC added (created at the next start)');
          return { nic, live: running };
        }, this.d.log),
      ),
    );
  }

  async removeNic(instance: string, nicName: string): Promise<Operation> {
    const cur = await this.instances.get(instance);
    if (!cur.config.nics.some((n) => n.name === nicName)) throw new HfError('HF_ERR_NOT_FOUND', `instance ${instance} has no NIC named ${nicName}`);
    const h = this.instances.handle(instance);
    if (h && cur.type === 'vm' && !h.detachNic) throw new HfError('HF_ERR_UNSUPPORTED', `the ${cur.type} driver cannot hot-unplug NICs: stop ${instance} first`);
    return this.d.operations.start('instance.nic-remove', { kind: 'instance', name: instance }, (ctx) =>
      this.instances.withInstance(instance, 'nic remove', async (inst, handle) => {
        const nic = inst.config.nics.find((n) => n.name === nicName);
        if (!nic) throw new HfError('HF_ERR_NOT_FOUND', `instance ${instance} has no NIC named ${nicName}`);
        const running = handle !== undefined && isActive(inst.state);
        if (running) {
          ctx.progress(20, `unplugging ${nic.name} (the guest must let go)`);
          if (inst.type === 'vm') {
            if (!handle.detachNic) throw new HfError('HF_ERR_UNSUPPORTED', `the driver of ${instance} cannot hot-unplug NICs`);
            await handle.detachNic(nic.name);
          } else {
            await this.d.host.deleteInNetns(this.d.names.netns(inst.name), nic.name);
          }
        }
        const iface = this.hostIfaceOf(inst, nic);
        await this.d.host.deleteLink(iface);
        this.liveIfaces.delete(iface);
        await this.instances.patch(instance, (r) => {
          const nics = r.config.nics.filter((n) => n.name !== nicName);
          const config = { ...r.config, nics };
          if (nics.length === 0 && !isActive(r.state)) delete config.netns;
          return { ...r, config };
        });
        await this.lock.run(LOCK, 'release NIC', async () => {
          await this.releaseNic(instance, nic);
          await this.dropLeasesOf([nic]);
          await this.applyLocked();
        });
        ctx.progress(100, 'NIC removed');
        return { nic: nic.name, live: running };
      }),
    );
  }

  // ---- firewall ------------------------------------------------------------------------------

  async firewall(instance: string): Promise<Firewall> {
    await this.instances.get(instance);
    return (await this.firewalls.get(instance))?.value ?? { instance, inbound: 'allow', rules: [] };
  }

  async addFirewallRule(instance: string, body: unknown): Promise<Firewall> {
    const req = parseInput(addFirewallRuleSchema, body);
    const rule = parseFirewallRule(req);
    return this.changeFirewall(instance, (fw) => {
      const rules = [...fw.rules];
      const pos = req.position === undefined ? rules.length : Math.min(req.position, rules.length);
      rules.splice(pos, 0, rule);
      return { ...fw, rules };
    });
  }

  async removeFirewallRule(instance: string, index: number): Promise<Firewall> {
    return this.changeFirewall(instance, (fw) => {
      if (!Number.isInteger(index) || index < 0 || index >= fw.rules.length) {
        throw new HfError('HF_ERR_NOT_FOUND', `instance ${instance} has no firewall rule ${index} (it has ${fw.rules.length}; they are numbered from 0)`);
      }
      return { ...fw, rules: fw.rules.filter((_, i) => i !== index) };
    });
  }

  async setFirewallPolicy(instance: string, body: unknown): Promise<Firewall> {
    const { inbound } = parseInput(firewallPolicySchema, body);
    return this.changeFirewall(instance, (fw) => ({ ...fw, inbound }));
  }

  private async changeFirewall(instance: string, fn: (fw: Firewall) => Firewall): Promise<Firewall> {
    await this.instances.get(instance);
    return this.lock.run(LOCK, 'firewall', async () => {
      const prev = await this.firewalls.get(instance);
      const next = fn(prev?.value ?? { instance, inbound: 'allow', rules: [] });
      if (prev) await this.firewalls.replace(instance, next, prev.revision);
      else await this.firewalls.create(instance, next);
      try {
        await this.applyLocked();
      } catch (e) {
        if (prev) await this.firewalls.update(instance, () => prev.value);
        else await this.firewalls.delete(instance);
        await this.applyLocked().catch(() => undefined);
        throw e;
      }
      this.d.events.publish('instance.firewall', { name: instance, inbound: next.inbound, rules: next.rules.length });
      return next;
    });
  }

  // ---- port forwards -------------------------------------------------------------------------

  async listForwards(instance?: string): Promise<Forward[]> {
    return (await this.forwards.list()).map((v) => v.value).filter((f) => !instance || f.instance === instance);
  }

  async addForward(body: unknown): Promise<Forward> {
    const req = parseInput(createForwardSchema, body);
    const inst = await this.instances.get(req.instance);
    const nets = new Map((await this.networks.list()).map((v) => [v.value.name, v.value]));
    const nic = req.nic
      ? inst.config.nics.find((n) => n.name === req.nic)
      : inst.config.nics.find((n) => nets.get(n.network)?.mode !== 'bridged' && n.ip);
    if (!nic) throw new HfError('HF_ERR_VALIDATION', req.nic ? `instance ${inst.name} has no NIC named ${req.nic}` : `instance ${inst.name} has no NIC on a Hyperfold-managed (nat or isolated) network to forward to`);
    if (!nic.ip || nets.get(nic.network)?.mode === 'bridged') throw new HfError('HF_ERR_VALIDATION', `NIC ${nic.name} of ${inst.name} is on a bridged network: its address is not managed here`);
    if (await this.d.host.localPortInUse(req.protocol, req.hostPort)) {
      throw new HfError('HF_ERR_ADDRESS_IN_USE', `${req.protocol} port ${req.hostPort} is in use by a service on this host`);
    }
    const f: Forward = { protocol: req.protocol, hostPort: req.hostPort, instance: inst.name, nic: nic.name, port: req.port, createdAt: new Date().toISOString() };
    return this.lock.run(LOCK, 'forward add', async () => {
      const key = `${f.protocol}-${f.hostPort}`;
      try {
        await this.forwards.create(key, f);
      } catch (e) {
        if (!isHfError(e, 'HF_ERR_ALREADY_EXISTS')) throw e;
        const cur = (await this.forwards.get(key))?.value;
        throw new HfError('HF_ERR_ADDRESS_IN_USE', `${f.protocol} port ${f.hostPort} is already forwarded${cur ? ` to ${cur.instance}:${cur.port}` : ''}`);
      }
      try {
        await this.applyLocked();
      } catch (e) {
        await this.forwards.delete(key);
        await this.applyLocked().catch(() => undefined);
        throw e;
      }
      this.d.events.publish('network.forward', { action: 'add', ...f });
      return f;
    });
  }

  async removeForward(protocol: string, hostPort: number): Promise<void> {
    await this.lock.run(LOCK, 'forward remove', async () => {
      const key = `${protocol}-${hostPort}`;
      if (!(await this.forwards.get(key).catch(() => undefined))) throw new HfError('HF_ERR_NOT_FOUND', `no ${protocol} forward on host port ${hostPort}`);
      await this.forwards.delete(key);
      await this.applyLocked();
    });
    this.d.events.publish('network.forward', { action: 'remove', protocol, hostPort });
  }

  // ---- start, reconcile, close ---------------------------------------------------------------

  /**
   * At daemon start, before instances are re-attached: clean up after dead daemons, create the
   * default network on the first start, bring every network up and apply the ruleset.
   */
  async start(): Promise<void> {
    await this.registerOwner();
    await this.collectDeadOwners();
    await this.lock.run(LOCK, 'network start', async () => {
      const created = await this.d.store.get(META_DEFAULT_CREATED);
      if (!created && (this.d.createDefault ?? true)) {
        if (!(await this.networks.get(DEFAULT_NETWORK))) {
          const all = (await this.networks.list()).map((v) => v.value);
          const subnet = await this.pickSubnet(DEFAULT_NETWORK, all);
          const net: Network = {
            name: DEFAULT_NETWORK,
            mode: 'nat',
            subnet: formatCidr(subnet),
            gateway: formatIpv4(hostRange(subnet).first),
            bridge: this.d.names.bridge(DEFAULT_NETWORK),
            external: false,
            domain: `${DEFAULT_NETWORK}.hf.internal`,
            description: 'NAT network created at the first start',
            createdAt: new Date().toISOString(),
          };
          await this.networks.create(net.name, net);
          this.d.log.info('default network created', { subnet: net.subnet, bridge: net.bridge });
        }
        await this.d.store.put(META_DEFAULT_CREATED, { at: new Date().toISOString() });
      }
      for (const { value: net } of await this.networks.list()) {
        try {
          await this.bringUp(net);
        } catch (e) {
          this.d.log.error('cannot bring network up', { network: net.name, error: (e as Error).message });
        }
      }
      await this.applyLocked();
    });
  }

  /**
   * After instances were re-attached: host interfaces and namespaces that no active instance
   * needs (left by a crash) are removed; reservations of instances that no longer exist too;
   * NICs of running instances are put back on their bridge if it was recreated.
   */
  async reconcileInstances(): Promise<{ removedLinks: string[]; removedNetns: string[]; removedReservations: number }> {
    return this.lock.run(LOCK, 'network reconcile', async () => {
      const insts = await this.instances.list();
      const nets = (await this.networks.list()).map((v) => v.value);
      const netByName = new Map(nets.map((n) => [n.name, n]));
      const wanted = new Set<string>(this.liveIfaces);
      for (const n of nets) {
        if (!n.external) wanted.add(n.bridge);
        if (n.vlan !== undefined) wanted.add(this.d.names.vlan(n.name));
      }
      const activeInsts = insts.filter((i) => isActive(i.state));
      for (const i of activeInsts) for (const nic of i.config.nics) wanted.add(this.hostIfaceOf(i, nic));
      const links = await this.d.host.listLinks();
      const removedLinks: string[] = [];
      for (const l of links) {
        if (!this.d.names.ownsLink(l.name) || wanted.has(l.name)) continue;
        await this.d.host.deleteLink(l.name);
        removedLinks.push(l.name);
      }
      for (const i of activeInsts) {
        for (const nic of i.config.nics) {
          const net = netByName.get(nic.network);
          const l = links.find((x) => x.name === this.hostIfaceOf(i, nic));
          if (net && l && l.master !== net.bridge) await this.d.host.setMaster(l.name, net.bridge, { isolated: net.mode !== 'bridged' });
        }
      }
      const wantedNs = new Set(activeInsts.filter((i) => i.type === 'container' && i.config.nics.length).map((i) => this.d.names.netns(i.name)));
      const removedNetns: string[] = [];
      for (const ns of await this.d.host.listNetns()) {
        if (this.d.names.ownsNetns(ns) && !wantedNs.has(ns)) {
          await this.d.host.deleteNetns(ns);
          removedNetns.push(ns);
        }
      }
      const names = new Set(insts.map((i) => i.name));
      let removedReservations = 0;
      for (const r of await this.ips.list()) {
        if (!names.has(r.value.instance)) {
          await this.ips.delete(this.ipKey(r.value.network, r.value.ip));
          removedReservations++;
        }
      }
      for (const r of await this.macs.list()) {
        if (!names.has(r.value.instance)) {
          await this.macs.delete(r.value.mac);
          removedReservations++;
        }
      }
      await this.applyLocked();
      if (removedLinks.length || removedNetns.length || removedReservations) {
        this.d.log.info('network leftovers removed', { removedLinks, removedNetns, removedReservations });
      }
      return { removedLinks, removedNetns, removedReservations };
    });
  }

  /** Daemon shutdown: dnsmasq stops with us; bridges, taps and rules stay for the running guests. */
  async close(): Promise<void> {
    for (const { value: n } of await this.networks.list().catch(() => [])) await this.d.host.stopDhcp(n.name).catch(() => undefined);
  }

  private get ownersDir(): string {
    return this.d.ownersDir ?? DEFAULT_OWNERS_DIR;
  }

  private async registerOwner(): Promise<void> {
    await mkdir(this.ownersDir, { recursive: true, mode: 0o755 });
    await writeFile(join(this.ownersDir, this.d.names.tag || '_'), this.d.dataDir + '\n');
  }

  /**
   * Daemons on other data directories of this host (test suites) each have their own tag.
   * When such a data directory is gone, nothing can ever clean its objects up but us: remove
   * its interfaces, namespaces and tables (only names with that tag).
   */
  private async collectDeadOwners(): Promise<void> {
    let entries: string[];
    try {
      entries = await readdir(this.ownersDir);
    } catch {
      return;
    }
    for (const tag of entries) {
      if (!/^[0-9a-f]{4}$/.test(tag) || tag === this.d.names.tag) continue;
      const dir = (await readFile(join(this.ownersDir, tag), 'utf8').catch(() => '')).trim();
      if (!dir || existsSync(join(dir, 'state.db'))) continue;
      const other = new NetNames(tag);
      try {
        for (const l of await this.d.host.listLinks()) if (other.ownsLink(l.name)) await this.d.host.deleteLink(l.name);
        for (const ns of await this.d.host.listNetns()) if (other.ownsNetns(ns)) await this.d.host.deleteNetns(ns);
        await this.d.host.applyNft(buildRuleset({ table: other.table, networks: [], nics: [], firewalls: [], forwards: [] }));
        await rm(join(this.ownersDir, tag), { force: true });
        this.d.log.info('removed the network objects of a daemon whose data directory is gone', { tag, dataDir: dir });
      } catch (e) {
        this.d.log.warn('cannot clean up after a dead daemon', { tag, error: (e as Error).message });
      }
    }
  }
}
