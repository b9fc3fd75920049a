// What the parts of the network service share: their dependencies, the records they keep in
// the state store, the in-process lock, and the one place that turns those records into the
// host's nftables ruleset and dnsmasq host files (rebuilt from the store on every change).
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError, isHfError } from '../../core/errors.js';
import type { Instance, NicConfig } from '../../core/model/instance.js';
import { buildHostsFile, dnsmasqFiles, writeAtomic, type DnsmasqFiles } from '../../network/dnsmasq.js';
import type { NetHost } from '../../network/host.js';
import {
  firewallSchema,
  forwardSchema,
  ipReservationSchema,
  macReservationSchema,
  networkSchema,
  type Firewall,
  type Forward,
  type IpReservation,
  type MacReservation,
  type Network,
} from '../../network/model.js';
import type { NetNames } from '../../network/names.js';
import { buildRuleset, type RulesetSpec } from '../../network/nft.js';
import { Collection, type Versioned } from '../../state/collection.js';
import type { StateStore } from '../../state/store.js';
import type { Logger } from '../../util/log.js';
import { KeyedMutex } from '../../util/mutex.js';
import type { EventBus } from '../events.js';
import type { InstanceService } from '../instances.js';
import type { OperationManager } from '../operations.js';
import { NetworkOverlay, spans, type OverlayOptions } from './overlay.js';

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
  /**
   * A cluster: managed networks span its hosts over VXLAN (overlay.ts), and each host's dnsmasq
   * serves only its own instances. Absent: a single host, no tunnels.
   */
  overlay?: OverlayOptions;
}

export const DEFAULT_NETWORK = 'default';
/**
 * The in-process lock. Rules across records (no overlapping subnets, one owner per address)
 * hold through store transactions, so that daemons sharing one store keep them too; the lock only
 * saves this process from racing itself into transaction retries and orders ruleset rebuilds.
 */
export const LOCK = 'net';

export class NetContext {
  readonly networks: Collection<Network>;
  readonly ips: Collection<IpReservation>;
  readonly macs: Collection<MacReservation>;
  readonly firewalls: Collection<Firewall>;
  readonly forwards: Collection<Forward>;
  readonly lock = new KeyedMutex();
  /** Host interfaces this process created for running instances (kept out of the stray sweep). */
  readonly liveIfaces = new Set<string>();
  /** Present in a cluster (deps.overlay). */
  readonly overlay: NetworkOverlay | undefined;
  private instancesSvc: InstanceService | undefined;

  constructor(readonly d: NetworkServiceDeps) {
    if (d.overlay) this.overlay = new NetworkOverlay({ ...d.overlay, store: d.store, names: d.names, log: d.log });
    this.networks = new Collection<Network>(d.store, '/networks/', networkSchema);
    this.ips = new Collection<IpReservation>(d.store, '/network-ips/', ipReservationSchema);
    this.macs = new Collection<MacReservation>(d.store, '/network-macs/', macReservationSchema);
    this.firewalls = new Collection<Firewall>(d.store, '/network-firewalls/', firewallSchema);
    this.forwards = new Collection<Forward>(d.store, '/network-forwards/', forwardSchema);
  }

  bindInstances(instances: InstanceService): void {
    this.instancesSvc = instances;
  }

  get instances(): InstanceService {
    if (!this.instancesSvc) throw new HfError('HF_ERR_INTERNAL', 'network service used before the instance service was bound');
    return this.instancesSvc;
  }

  async loadVersioned(name: string): Promise<Versioned<Network>> {
    const v = await this.networks.get(name).catch((e: unknown) => {
      if (isHfError(e, 'HF_ERR_VALIDATION')) return undefined;
      throw e;
    });
    if (!v) throw new HfError('HF_ERR_NETWORK_NOT_FOUND', `network "${name}" not found`);
    return v;
  }

  async load(name: string): Promise<Network> {
    return (await this.loadVersioned(name)).value;
  }

  /** The bridge port of a NIC: a VM's tap (recorded), a container's veth (derived). */
  hostIfaceOf(inst: Pick<Instance, 'id' | 'type'>, nic: NicConfig): string {
    return nic.hostIface ?? (inst.type === 'vm' ? this.d.names.tap(inst.id, nic.name) : this.d.names.veth(inst.id, nic.name));
  }

  files(network: string): DnsmasqFiles {
    return dnsmasqFiles(join(this.d.networksDir, network));
  }

  ipKey(network: string, ip: string): string {
    return `${network}@${ip}`;
  }

  forwardKey(f: Pick<Forward, 'protocol' | 'hostPort'>): string {
    return `${f.protocol}-${f.hostPort}`;
  }

  async reservationsOf(network: string): Promise<IpReservation[]> {
    return (await this.ips.list()).map((v) => v.value).filter((r) => r.network === network);
  }

  /** Rebuilds the nftables ruleset and the DHCP host files from the store (call under the lock). */
  async applyLocked(opts: { exclude?: string } = {}): Promise<void> {
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

  /** The ruleset rebuilt under the lock (for callers outside it, e.g. undo steps). */
  async apply(): Promise<void> {
    await this.lock.run(LOCK, 'apply rules', () => this.applyLocked());
  }

  /**
   * Writes a network's DHCP host file from the reservations; true when it changed. On a network
   * spanning hosts, only this host's instances are in it (DHCP does not cross the tunnel: each
   * host's dnsmasq serves its own); a reservation whose instance has no record yet is a create
   * in flight, here or elsewhere, and is kept (an entry no local guest asks for is harmless).
   */
  async syncHostsFile(network: string): Promise<boolean> {
    const files = this.files(network);
    if (!existsSync(files.dir)) return false;
    let reservations = await this.reservationsOf(network);
    const net = this.overlay ? (await this.networks.get(network))?.value : undefined;
    if (this.overlay && net && spans(net)) {
      const local = this.overlay.localHost;
      const hostOf = new Map((await this.instances.list()).map((i) => [i.name, i.host]));
      reservations = reservations.filter((r) => (hostOf.get(r.instance) ?? local) === local);
    }
    const content = buildHostsFile(reservations);
    const cur = await readFile(files.hostsFile, 'utf8').catch(() => undefined);
    if (cur === content) return false;
    await writeAtomic(files.hostsFile, content);
    return true;
  }

  /** Only the DHCP host files (dnsmasq learns reservations before an instance asks). */
  async applyHostsOnly(): Promise<void> {
    for (const { value: net } of await this.networks.list()) {
      if (net.mode !== 'bridged' && (await this.syncHostsFile(net.name))) this.d.host.reloadDhcp(net.name);
    }
  }
}
