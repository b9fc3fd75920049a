// Networks spanning the hosts of a cluster. Every managed network with a VXLAN id (`vni`) gets,
// on each host where its bridge exists, a VXLAN port whose forwarding entries and the bridge's
// neighbour entries are written from the store (network/vxlan.ts tells the whole picture):
// an all-zero entry for every online peer host (broadcast), and for every NIC of an instance on
// another host its MAC (to that host) and its address (a permanent neighbour on the bridge).
//
// The store is the only source: the overlay watches the networks, the MAC and address
// reservations and the instance records (their `host`), and hears when peers come and go; any
// change makes it compute the whole wanted state again and bring the host to it (a full resync
// is a few `bridge`/`ip` calls per network, and idempotent, so a missed or repeated event costs
// nothing). Resyncs never overlap: one running, at most one more queued.
import { z } from 'zod';
import type { Network } from '../../network/model.js';
import { ipReservationSchema, macReservationSchema, networkSchema } from '../../network/model.js';
import type { NetNames } from '../../network/names.js';
import {
  applyVxlanFilter,
  ensureVxlan,
  overlayMtu,
  removeVxlan,
  syncFdb,
  syncNeighbours,
  underlayOf,
  type FdbWant,
  type NeighbourWant,
  type VxlanFilterSpec,
  type VxlanSpec,
} from '../../network/vxlan.js';
import type { StateStore, Watch } from '../../state/store.js';
import type { Logger } from '../../util/log.js';
import { run } from '../../util/exec.js';

export interface OverlayPeer {
  host: string;
  /** The peer's underlay address (where its VXLAN packets go). */
  address: string;
}

/** What the daemon knows of the cluster: who this host is, and the other hosts. */
export interface OverlayOptions {
  localHost: string;
  /** This host's underlay address (the outer source of its VXLAN packets). */
  localAddress: string;
  /** The underlay device; default: the one that holds `localAddress`. */
  dev?: string | undefined;
  /** The hosts that are online now (this one may be among them: it is left out). */
  peers: () => Promise<OverlayPeer[]>;
  /** Registers a callback for any change in the peers (a host joined, left, went offline). */
  onPeersChanged: (cb: () => void) => void;
  /** The host operations (default: the real ones, network/vxlan.ts); unit tests give a fake. */
  plumbing?: OverlayPlumbing;
}

/** The host operations the overlay needs (network/vxlan.ts on the real host; a fake in unit tests). */
export interface OverlayPlumbing {
  underlayOf(address: string): Promise<{ dev: string; mtu: number }>;
  /** Names of the host's interfaces. */
  links(): Promise<string[]>;
  setMtu(ifname: string, mtu: number): Promise<void>;
  ensureVxlan(spec: VxlanSpec): Promise<void>;
  applyFilter(spec: VxlanFilterSpec): Promise<void>;
  syncFdb(dev: string, want: FdbWant[]): Promise<void>;
  syncNeighbours(bridge: string, want: NeighbourWant[]): Promise<void>;
  removeVxlan(dev: string): Promise<void>;
}

export const linuxOverlayPlumbing: OverlayPlumbing = {
  underlayOf,
  async links() {
    const r = await run('ip', ['-j', 'link', 'show'], { timeoutMs: 15_000 });
    return (JSON.parse(r.stdout || '[]') as Array<{ ifname: string }>).map((l) => l.ifname);
  },
  async setMtu(ifname, mtu) {
    await run('ip', ['link', 'set', 'dev', ifname, 'mtu', String(mtu)], { timeoutMs: 15_000 });
  },
  ensureVxlan,
  applyFilter: applyVxlanFilter,
  async syncFdb(dev, want) {
    await syncFdb(dev, want);
  },
  syncNeighbours,
  removeVxlan,
};

/** One network's wanted tunnel state on this host. */
export interface OverlayNetworkPlan {
  network: string;
  fdb: FdbWant[];
  neighbours: NeighbourWant[];
}

export interface OverlayInput {
  networks: Network[];
  macs: Array<{ mac: string; instance: string; network?: string | undefined }>;
  ips: Array<{ network: string; ip: string; mac: string; instance: string }>;
  /** Instance name → the host it lives on. */
  hostOf: ReadonlyMap<string, string>;
  peers: OverlayPeer[];
  localHost: string;
  localAddress: string;
}

/** Whether a network is carried between hosts. */
export function spans(net: Pick<Network, 'mode' | 'vni'>): boolean {
  return net.vni !== undefined && net.mode !== 'bridged';
}

/**
 * The wanted fdb and neighbour entries of every spanning network, from the store's records.
 * A NIC is remote when its instance's host is another, online peer; a NIC whose instance has no
 * record yet (a create in flight) or whose host is offline gets no entry (nothing could reach it).
 */
export function planOverlay(input: OverlayInput): OverlayNetworkPlan[] {
  const peers = new Map<string, string>();
  for (const p of input.peers) if (p.host !== input.localHost && p.address !== input.localAddress) peers.set(p.host, p.address);
  const bum = [...new Set(peers.values())].sort().map((dst): FdbWant => ({ dst }));
  const remote = (instance: string): string | undefined => {
    const host = input.hostOf.get(instance);
    return host === undefined || host === input.localHost ? undefined : peers.get(host);
  };
  return input.networks.filter(spans).map((net) => {
    const fdb: FdbWant[] = [...bum];
    for (const m of input.macs) {
      const dst = m.network === net.name ? remote(m.instance) : undefined;
      if (dst) fdb.push({ mac: m.mac, dst });
    }
    const neighbours: NeighbourWant[] = [];
    for (const r of input.ips) {
      if (r.network === net.name && remote(r.instance)) neighbours.push({ ip: r.ip, mac: r.mac });
    }
    fdb.sort((a, b) => (a.mac ?? '').localeCompare(b.mac ?? '') || a.dst.localeCompare(b.dst));
    neighbours.sort((a, b) => a.ip.localeCompare(b.ip));
    return { network: net.name, fdb, neighbours };
  });
}

/** Only the fields the overlay reads from an instance record. */
const instanceHostSchema = z.object({ name: z.string(), host: z.string() });

const WATCHED = ['/networks/', '/network-macs/', '/network-ips/', '/instances/'];
/** A watch that ended (store disconnected, history compacted) is made again after this. */
const REWATCH_MS = 1000;

export interface NetworkOverlayDeps extends OverlayOptions {
  store: StateStore;
  names: NetNames;
  log: Logger;
}

export class NetworkOverlay {
  readonly localHost: string;
  private readonly plumbing: OverlayPlumbing;
  private underlay: { dev: string; mtu: number } | undefined;
  private readonly watches = new Map<string, Watch>();
  private stopped = true;
  /** The resync running now, and whether another one was asked for meanwhile. */
  private running: Promise<void> | undefined;
  private queued: Promise<void> | undefined;
  private rewatchTimer: NodeJS.Timeout | undefined;
  /** Each instance's host as the last resync read it. */
  private hostOf = new Map<string, string>();

  constructor(private readonly d: NetworkOverlayDeps) {
    this.localHost = d.localHost;
    this.plumbing = d.plumbing ?? linuxOverlayPlumbing;
  }

  /** Finds the underlay (device, MTU); before anything asks for `mtu`. */
  async prepare(): Promise<void> {
    const u = await this.plumbing.underlayOf(this.d.localAddress);
    this.underlay = { dev: this.d.dev ?? u.dev, mtu: u.mtu };
  }

  /** The MTU of networks spanning hosts as seen from here: the underlay's − 50. */
  get mtu(): number {
    if (!this.underlay) throw new Error('NetworkOverlay.prepare() was not called');
    return overlayMtu(this.underlay.mtu);
  }

  /** Watches the store and the peers, and brings the host to the wanted state once. */
  async start(): Promise<void> {
    if (!this.underlay) await this.prepare();
    this.stopped = false;
    for (const prefix of WATCHED) this.watch(prefix);
    this.d.onPeersChanged(() => void this.kick());
    await this.kick();
  }

  private watch(prefix: string): void {
    if (this.stopped) return;
    this.watches.get(prefix)?.cancel();
    this.watches.set(
      prefix,
      this.d.store.watch(prefix, (ev) => {
        // Of an instance the overlay uses only its host: a change of anything else (most changes:
        // state, description, resources) asks for no resync, which would read every record.
        if (prefix === '/instances/' && ev.type === 'put') {
          const known = this.hostOf.get(ev.key.slice(prefix.length));
          if (known !== undefined && known === instanceHostSchema.safeParse(ev.value).data?.host) return;
        }
        void this.kick();
      }, {
        onError: (f) => {
          this.d.log.warn('overlay: store watch ended, watching again', { prefix, reason: f.kind });
          this.watches.delete(prefix);
          // Watch again from "now" and resync: the resync reads everything, so nothing is missed.
          this.rewatchTimer = setTimeout(() => {
            this.watch(prefix);
            void this.kick();
          }, REWATCH_MS);
          this.rewatchTimer.unref();
        },
      }),
    );
  }

  /** Stops watching; the tunnels stay (running guests keep using them). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.rewatchTimer) clearTimeout(this.rewatchTimer);
    for (const w of this.watches.values()) w.cancel();
    this.watches.clear();
    await this.running?.catch(() => undefined);
    await this.queued?.catch(() => undefined);
  }

  /**
   * Asks for a resync; resolves when one that started after this call has finished (never
   * rejects: a failure is logged and the next change tries again). Calls during a resync share
   * the one queued after it.
   */
  kick(): Promise<void> {
    if (this.queued) return this.queued;
    const after = this.running ?? Promise.resolve();
    const next = after.then(async () => {
      this.queued = undefined;
      this.running = next;
      try {
        await this.resync();
      } catch (e) {
        this.d.log.error('overlay: cannot sync the tunnels with the store', { error: (e as Error).message });
      } finally {
        if (this.running === next) this.running = undefined;
      }
    });
    this.queued = next;
    return next;
  }

  /** Computes the wanted state from the store and the peers and applies it. */
  private async resync(): Promise<void> {
    const { store } = this.d;
    const [nets, macs, ips, insts, peers, links] = await Promise.all([
      store.list('/networks/'),
      store.list('/network-macs/'),
      store.list('/network-ips/'),
      store.list('/instances/'),
      this.d.peers(),
      this.plumbing.links(),
    ]);
    const parsed = <T>(entries: { value: unknown }[], schema: { safeParse(v: unknown): { success: true; data: T } | { success: false } }): T[] =>
      entries.flatMap((e) => {
        const r = schema.safeParse(e.value);
        return r.success ? [r.data] : [];
      });
    const networks = parsed(nets.entries, networkSchema);
    const hostOf = new Map(parsed(insts.entries, instanceHostSchema).map((i) => [i.name, i.host]));
    this.hostOf = hostOf;
    const plans = planOverlay({
      networks,
      macs: parsed(macs.entries, macReservationSchema),
      ips: parsed(ips.entries, ipReservationSchema),
      hostOf,
      peers,
      localHost: this.d.localHost,
      localAddress: this.d.localAddress,
    });
    const have = new Set(links);
    const wanted = new Set<string>();
    const byName = new Map(networks.map((n) => [n.name, n]));
    for (const plan of plans) {
      const net = byName.get(plan.network)!;
      // The bridge exists where the network is used (bringUp): elsewhere there is nothing to join.
      if (!have.has(net.bridge)) continue;
      const dev = this.d.names.vxlan(net.name);
      wanted.add(dev);
      const mtu = net.mtu ?? this.mtu;
      await this.plumbing.setMtu(net.bridge, mtu);
      await this.plumbing.ensureVxlan({ name: dev, vni: net.vni!, local: this.d.localAddress, dev: this.underlay!.dev, bridge: net.bridge, mtu });
      if (net.gateway) await this.plumbing.applyFilter({ dev, gateway: net.gateway });
      await this.plumbing.syncFdb(dev, plan.fdb);
      await this.plumbing.syncNeighbours(net.bridge, plan.neighbours);
    }
    // Tunnels of networks that are gone (or no longer span hosts).
    for (const l of links) {
      if (!wanted.has(l) && this.ownsVxlan(l)) await this.plumbing.removeVxlan(l);
    }
  }

  /** Removes a network's tunnel port and filter (its network is being deleted). */
  async removeTunnel(network: string): Promise<void> {
    await this.plumbing.removeVxlan(this.d.names.vxlan(network));
  }

  /** Whether an interface is one of this daemon's VXLAN devices. */
  ownsVxlan(ifname: string): boolean {
    return this.d.names.ownsLink(ifname) && ifname.startsWith(`${this.d.names.prefix}x`);
  }
}
