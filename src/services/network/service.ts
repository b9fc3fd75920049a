// The network service: networks (a Linux bridge each; managed ones with a subnet, dnsmasq for
// DHCP and DNS, NAT or no uplink; bridged ones joined to a host interface), the NICs of
// instances (nics.ts), address reservations (reservations.ts), per-instance firewalls and port
// forwards (rules.ts), all enforced by one nftables ruleset rebuilt from the state store on
// every change (context.ts), and the clean-up of leftovers (janitor.ts).
//
// Rules that span records hold through store transactions, not a lock of this process: a new
// network is stored only if no other network was created since its checks read the list (the
// networks' version key below), so daemons sharing one store never create overlapping subnets
// or two networks on one bridge.
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError, isHfError } from '../../core/errors.js';
import { isActive } from '../../core/lifecycle.js';
import type { Instance } from '../../core/model/instance.js';
import type { Operation } from '../../core/model/operation.js';
import { parseInput } from '../../core/validate.js';
import { activeLeases, readLeases } from '../../network/dnsmasq.js';
import { createNetworkSchema, networkSchema, type Firewall, type Forward, type Network, type NetworkView, type NicAddress } from '../../network/model.js';
import { pickVni } from '../../network/vxlan.js';
import type { Compare, TxnOp } from '../../state/store.js';
import { UndoStack } from '../../util/undo.js';
import type { InstanceExtension } from '../extensions.js';
import type { InstanceService } from '../instances.js';
import { bringUp, tearDown } from './bridges.js';
import { DEFAULT_NETWORK, LOCK, NetContext, type NetworkServiceDeps } from './context.js';
import { Janitor, type ReconcileReport } from './janitor.js';
import { NicService } from './nics.js';
import { checkRequest, planNetwork, type NetworkRequest } from './plan.js';
import { RuleService } from './rules.js';

export { DEFAULT_NETWORK, type NetworkServiceDeps } from './context.js';
export { DEFAULT_OWNERS_DIR } from './janitor.js';

const META_DEFAULT_CREATED = '/network-meta/default-created';
/** Bumped by every network create: a create whose checks read an older version must check again. */
const NETWORKS_VERSION = '/network-meta/networks-version';
/** Creates that keep losing to concurrent ones give up after this many attempts. */
const CREATE_ATTEMPTS = 5;

export class NetworkService {
  private readonly c: NetContext;
  private readonly nics: NicService;
  private readonly rules: RuleService;
  private readonly janitor: Janitor;
  readonly extension: InstanceExtension;

  constructor(d: NetworkServiceDeps) {
    this.c = new NetContext(d);
    this.nics = new NicService(this.c);
    this.rules = new RuleService(this.c);
    this.janitor = new Janitor(this.c);
    this.extension = this.nics.extension;
  }

  /** The instance service is built after this one (it takes our extension): bind it here. */
  bindInstances(instances: InstanceService): void {
    this.c.bindInstances(instances);
  }

  // ---- queries -------------------------------------------------------------------------------

  async list(): Promise<NetworkView[]> {
    const insts = await this.c.instances.list();
    return (await this.c.networks.list()).map((v) => this.view(v.value, insts));
  }

  async get(name: string): Promise<NetworkView> {
    return this.view(await this.c.load(name), await this.c.instances.list());
  }

  private view(net: Network, insts: Instance[]): NetworkView {
    const usedBy = insts.flatMap((i) => i.config.nics.filter((n) => n.network === net.name).map((n) => ({ instance: i.name, nic: n.name, ip: n.ip, mac: n.mac })));
    return { ...net, usedBy, dnsmasqPid: net.mode === 'bridged' ? undefined : this.c.d.host.dhcpPid(net.name) };
  }

  /** Addresses of every NIC (or one instance's): reserved, and what DHCP leased / the container holds. */
  async addresses(instance?: string): Promise<NicAddress[]> {
    const c = this.c;
    const insts = instance ? [await c.instances.get(instance)] : await c.instances.list();
    const nets = new Map((await c.networks.list()).map((v) => [v.value.name, v.value]));
    const leases = new Map<string, Awaited<ReturnType<typeof readLeases>>>();
    const now = Math.floor(Date.now() / 1000);
    const out: NicAddress[] = [];
    for (const inst of insts) {
      for (const nic of inst.config.nics) {
        const net = nets.get(nic.network);
        const a: NicAddress = { instance: inst.name, nic: nic.name, network: nic.network, mac: nic.mac };
        if (nic.ip) a.reserved = nic.ip;
        if (net && net.mode !== 'bridged') {
          if (!leases.has(net.name)) leases.set(net.name, activeLeases(await readLeases(c.files(net.name)), now));
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
    const req = checkRequest(parseInput(createNetworkSchema, body));
    const created = await this.c.lock.run(LOCK, 'network create', () =>
      UndoStack.run(async (undo) => {
        const net = await this.planAndStore(req);
        undo.add('remove network record', async () => {
          await this.c.networks.delete(net.name);
          await this.c.applyLocked();
        });
        await bringUp(this.c, net, undo);
        await this.c.applyLocked();
        return net;
      }, this.c.d.log),
    );
    this.c.d.events.publish('network.created', { name: created.name, mode: created.mode, subnet: created.subnet });
    this.c.d.log.info('network created', { name: created.name, mode: created.mode, subnet: created.subnet, bridge: created.bridge });
    return this.get(created.name);
  }

  /**
   * Plans the network against the stored ones and stores it, in one transaction conditional on
   * the networks' version read before the list: when another create got in between, the checks
   * run again against what it made (and then usually fail with a named error).
   */
  private async planAndStore(req: NetworkRequest): Promise<Network> {
    const c = this.c;
    for (let attempt = 0; attempt < CREATE_ATTEMPTS; attempt++) {
      const version = (await c.d.store.get(NETWORKS_VERSION))?.modRevision ?? 0;
      if (await c.networks.get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `network "${req.name}" already exists`);
      const all = (await c.networks.list()).map((v) => v.value);
      const net = await planNetwork(c, req, all, await c.d.host.listLinks());
      const key = c.networks.key(net.name);
      const res = await c.d.store.txn(
        [
          { key: NETWORKS_VERSION, modRevision: version },
          { key, modRevision: 0 },
        ],
        [
          { type: 'put', key, value: networkSchema.parse(net) },
          { type: 'put', key: NETWORKS_VERSION, value: { network: net.name, at: new Date().toISOString() } },
        ],
      );
      if (res.succeeded) return net;
    }
    throw new HfError('HF_ERR_CONFLICT', `network "${req.name}": other networks kept being created at the same time; try again`);
  }

  async delete(name: string): Promise<void> {
    const c = this.c;
    await c.lock.run(LOCK, 'network delete', async () => {
      const net = await c.load(name);
      // Instances with a NIC on it, and reservations of creates still in flight.
      const users = new Set((await c.instances.list()).filter((i) => i.config.nics.some((n) => n.network === name)).map((i) => i.name));
      for (const { value: r } of await c.macs.list()) if (r.network === name) users.add(r.instance);
      if (users.size) {
        const list = [...users].sort();
        throw new HfError('HF_ERR_NETWORK_IN_USE', `network "${name}" is used by ${list.join(', ')}: remove their NICs or delete them first`, { details: { instances: list } });
      }
      await c.d.host.stopDhcp(name);
      await tearDown(c, net);
      await c.networks.delete(name);
      for (const r of await c.ips.list()) if (r.value.network === name) await c.ips.delete(c.ipKey(r.value.network, r.value.ip));
      await rm(join(c.d.networksDir, name), { recursive: true, force: true });
      await c.applyLocked();
    });
    this.c.d.events.publish('network.deleted', { name });
    this.c.d.log.info('network deleted', { name });
  }

  /** Rebuilds the ruleset from the store (for `network info --rules` and tests). */
  async apply(): Promise<void> {
    await this.c.apply();
  }

  // ---- NICs, firewall, forwards: see nics.ts and rules.ts ------------------------------------

  addNic(instance: string, body: unknown): Promise<Operation> {
    return this.nics.addNic(instance, body);
  }
  removeNic(instance: string, nic: string): Promise<Operation> {
    return this.nics.removeNic(instance, nic);
  }
  firewall(instance: string): Promise<Firewall> {
    return this.rules.firewall(instance);
  }
  addFirewallRule(instance: string, body: unknown): Promise<Firewall> {
    return this.rules.addFirewallRule(instance, body);
  }
  removeFirewallRule(instance: string, index: number): Promise<Firewall> {
    return this.rules.removeFirewallRule(instance, index);
  }
  setFirewallPolicy(instance: string, body: unknown): Promise<Firewall> {
    return this.rules.setFirewallPolicy(instance, body);
  }
  listForwards(instance?: string): Promise<Forward[]> {
    return this.rules.listForwards(instance);
  }
  addForward(body: unknown): Promise<Forward> {
    return this.rules.addForward(body);
  }
  removeForward(protocol: string, hostPort: number): Promise<void> {
    return this.rules.removeForward(protocol, hostPort);
  }

  // ---- start, reconcile, close ---------------------------------------------------------------

  /**
   * At daemon start, before instances are re-attached: clean up after dead daemons, create the
   * default network on the first start, bring every network up and apply the ruleset.
   */
  async start(): Promise<void> {
    const c = this.c;
    await this.janitor.registerOwner();
    await this.janitor.collectDeadOwners();
    await c.overlay?.prepare();
    await c.lock.run(LOCK, 'network start', async () => {
      if (!(await c.d.store.get(META_DEFAULT_CREATED)) && (c.d.createDefault ?? true)) {
        if (!(await c.networks.get(DEFAULT_NETWORK))) {
          // Another daemon on the same store may be making it right now: then theirs it is.
          const net = await this.planAndStore({ name: DEFAULT_NETWORK, mode: 'nat', description: 'NAT network created at the first start' }).catch((e: unknown) => {
            if (isHfError(e, 'HF_ERR_ALREADY_EXISTS')) return undefined;
            throw e;
          });
          if (net) c.d.log.info('default network created', { subnet: net.subnet, bridge: net.bridge });
        }
        await c.d.store.put(META_DEFAULT_CREATED, { at: new Date().toISOString() });
      }
      if (c.overlay) await this.spanExisting(c.overlay.mtu);
      for (const { value: net } of await c.networks.list()) {
        try {
          await bringUp(c, net);
        } catch (e) {
          c.d.log.error('cannot bring network up', { network: net.name, error: (e as Error).message });
        }
      }
      await c.applyLocked();
    });
    await c.overlay?.start();
  }

  /**
   * In a cluster: managed networks stored before it (no VXLAN id) get one, and every spanning
   * network an MTU no larger than this host's underlay allows (the smallest host's wins: one L2
   * segment has one MTU). One transaction on the networks' version, as a create, so VXLAN ids
   * stay unique.
   */
  private async spanExisting(mtu: number): Promise<void> {
    const c = this.c;
    for (let attempt = 0; attempt < CREATE_ATTEMPTS; attempt++) {
      const version = (await c.d.store.get(NETWORKS_VERSION))?.modRevision ?? 0;
      const all = await c.networks.list();
      const taken = new Set(all.flatMap((v) => (v.value.vni !== undefined ? [v.value.vni] : [])));
      const changed = all.filter((v) => v.value.mode !== 'bridged' && (v.value.vni === undefined || v.value.mtu === undefined || v.value.mtu > mtu));
      if (changed.length === 0) return;
      const compares: Compare[] = [{ key: NETWORKS_VERSION, modRevision: version }];
      const ops: TxnOp[] = [{ type: 'put', key: NETWORKS_VERSION, value: { spanned: changed.map((v) => v.value.name), at: new Date().toISOString() } }];
      for (const { value: net, revision } of changed) {
        const vni = net.vni ?? pickVni(net.name, taken);
        taken.add(vni);
        const key = c.networks.key(net.name);
        compares.push({ key, modRevision: revision });
        ops.push({ type: 'put', key, value: networkSchema.parse({ ...net, vni, mtu: Math.min(net.mtu ?? mtu, mtu) }) });
      }
      if ((await c.d.store.txn(compares, ops)).succeeded) {
        c.d.log.info('networks now span the cluster', { networks: changed.map((v) => v.value.name), mtu });
        return;
      }
    }
    throw new HfError('HF_ERR_CONFLICT', 'could not give the networks their VXLAN ids: other network changes kept getting in the way');
  }

  /** After instances were re-attached: this daemon's leftovers go (see janitor.ts). */
  reconcileInstances(): Promise<ReconcileReport> {
    return this.janitor.reconcileInstances();
  }

  /** Daemon shutdown: dnsmasq stops with us; bridges, taps and rules stay for the running guests. */
  async close(): Promise<void> {
    await this.c.overlay?.stop();
    for (const { value: n } of await this.c.networks.list().catch(() => [])) await this.c.d.host.stopDhcp(n.name).catch(() => undefined);
  }
}
