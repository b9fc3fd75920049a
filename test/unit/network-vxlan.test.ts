// Networks spanning hosts: the pure parts of network/vxlan.ts (MTU, VNI choice, fdb and
// neighbour diffs, the tunnel filter), the names, the overlay's plan from store records, and
// NetworkOverlay itself over a real SQLite store with the host plumbing faked.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { buildDnsmasqArgv, dnsmasqFiles } from '../../src/network/dnsmasq.js';
import { IFNAME_MAX, NetNames } from '../../src/network/names.js';
import type { Network } from '../../src/network/model.js';
import {
  buildVxlanFilter,
  overlayMtu,
  parseFdb,
  pickVni,
  planFdb,
  planNeighbours,
  VNI_MAX,
  VNI_MIN,
  ZERO_MAC,
  type FdbWant,
  type NeighbourWant,
  type VxlanFilterSpec,
  type VxlanSpec,
} from '../../src/network/vxlan.js';
import { NetworkOverlay, planOverlay, type OverlayPeer, type OverlayPlumbing } from '../../src/services/network/overlay.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { silentLogger } from '../../src/util/log.js';

const M = { a: '52:54:00:00:00:0a', b: '52:54:00:00:00:0b', c: '52:54:00:00:00:0c', d: '52:54:00:00:00:0d' };

describe('vxlan: pure parts', () => {
  it('the overlay MTU is the underlay MTU − 50, and refuses underlays too small for IPv4', () => {
    assert.equal(overlayMtu(1500), 1450);
    assert.equal(overlayMtu(9000), 8950);
    assert.throws(() => overlayMtu(600), /576/);
  });

  it('picks a VNI from the name, in range, and another one when it is taken', () => {
    const v = pickVni('lab', new Set());
    assert.equal(pickVni('lab', new Set()), v, 'the same name gives the same VNI');
    assert.ok(v >= VNI_MIN && v <= VNI_MAX);
    const w = pickVni('lab', new Set([v]));
    assert.notEqual(w, v);
    assert.ok(w >= VNI_MIN && w <= VNI_MAX);
    assert.notEqual(pickVni('other', new Set()), v);
  });

  it('plans the fdb: stale entries out, missing ones in, moved MACs follow their host', () => {
    const current = {
      self: [
        { mac: ZERO_MAC, dst: '10.0.0.2' },
        { mac: ZERO_MAC, dst: '10.0.0.9' }, // a peer that left
        { mac: M.a, dst: '10.0.0.2' },
        { mac: M.b.toUpperCase(), dst: '10.0.0.3' }, // moved to 10.0.0.2
      ],
      master: [M.a, M.c],
    };
    const want: FdbWant[] = [{ dst: '10.0.0.2' }, { dst: '10.0.0.3' }, { mac: M.a, dst: '10.0.0.2' }, { mac: M.b, dst: '10.0.0.2' }];
    const plan = planFdb(current, want);
    assert.deepEqual(plan.del, [
      { mac: ZERO_MAC, dst: '10.0.0.9' },
      { mac: M.b.toUpperCase(), dst: '10.0.0.3' },
    ]);
    assert.deepEqual(plan.add, [
      { mac: ZERO_MAC, dst: '10.0.0.3' },
      { mac: M.b, dst: '10.0.0.2' },
    ]);
    assert.deepEqual(plan.delMaster, [M.c]);
    assert.deepEqual(plan.addMaster, [M.b]);
    const same = planFdb({ self: want.map((w) => ({ mac: w.mac ?? ZERO_MAC, dst: w.dst })), master: [M.a, M.b] }, want);
    assert.deepEqual(same, { del: [], add: [], delMaster: [], addMaster: [] }, 'nothing to do when it matches');
    assert.throws(() => planFdb({ self: [], master: [] }, [{ mac: M.a, dst: '10.0.0.2' }, { mac: M.a, dst: '10.0.0.3' }]), /two hosts/);
  });

  it('reads the entries it manages from `bridge -j fdb show` (not the port\'s own address)', () => {
    const json = JSON.stringify([
      { mac: M.a, flags: [], master: 'br0', state: 'static' },
      { mac: 'ca:31:23:ed:d8:8e', flags: [], master: 'br0', state: 'permanent' },
      { mac: '33:33:00:00:00:01', flags: ['self'], state: 'permanent' },
      { mac: M.a, dst: '10.9.9.2', flags: ['self'], state: 'permanent' },
      { mac: ZERO_MAC, dst: '10.9.9.3', flags: ['self'], state: 'permanent' },
    ]);
    assert.deepEqual(parseFdb(json), {
      self: [
        { mac: M.a, dst: '10.9.9.2' },
        { mac: ZERO_MAC, dst: '10.9.9.3' },
      ],
      master: [M.a],
    });
    assert.deepEqual(parseFdb(''), { self: [], master: [] });
  });

  it('plans the neighbours: gone addresses out, new or changed ones replaced', () => {
    const plan = planNeighbours(
      [
        { ip: '10.1.0.5', mac: M.a },
        { ip: '10.1.0.6', mac: M.b },
        { ip: '10.1.0.7', mac: M.c },
      ],
      [
        { ip: '10.1.0.5', mac: M.a.toUpperCase() },
        { ip: '10.1.0.6', mac: M.d },
        { ip: '10.1.0.8', mac: M.c },
      ],
    );
    assert.deepEqual(plan, { del: ['10.1.0.7'], put: [{ ip: '10.1.0.6', mac: M.d }, { ip: '10.1.0.8', mac: M.c }] });
  });

  it('the tunnel filter drops DHCP and gateway ARP both ways, in a table of its own', () => {
    const s = buildVxlanFilter({ dev: 'hfx12345678', gateway: '10.5.0.1' });
    assert.match(s, /^add table bridge hfx12345678\ndelete table bridge hfx12345678\n/);
    for (const chain of ['from_tunnel', 'to_tunnel', 'host_to_tunnel']) assert.match(s, new RegExp(`chain ${chain} \\{`));
    assert.match(s, /iifname "hfx12345678" udp sport \{ 67, 68 \} udp dport \{ 67, 68 \} counter drop/);
    assert.match(s, /oifname "hfx12345678" arp operation request arp daddr ip 10\.5\.0\.1 counter drop/);
    assert.match(s, /oifname "hfx12345678" arp operation reply arp saddr ip 10\.5\.0\.1 counter drop/);
  });

  it('names: a VXLAN device per network, within IFNAMSIZ, owned by its daemon only', () => {
    const plain = new NetNames('');
    const tagged = new NetNames('3a7c');
    const long = 'a-rather-long-network-name-that-goes-on';
    for (const n of [plain, tagged]) {
      const dev = n.vxlan(long);
      assert.ok(dev.length <= IFNAME_MAX, dev);
      assert.ok(n.ownsLink(dev));
      assert.notEqual(n.vxlan('a'), n.vxlan('b'));
    }
    assert.equal(tagged.vxlan('lab').length, IFNAME_MAX);
    assert.ok(!tagged.ownsLink(plain.vxlan('lab')));
    assert.ok(!plain.ownsLink(tagged.vxlan('lab')));
  });
});

function network(name: string, extra: Partial<Network> = {}): Network {
  return {
    name,
    mode: 'nat',
    subnet: '10.40.0.0/24',
    gateway: '10.40.0.1',
    bridge: `hfb-${name}`,
    external: false,
    description: '',
    createdAt: '2026-01-01T00:00:00.000Z',
    ...extra,
  };
}

describe('MTU of a spanning network', () => {
  it('dnsmasq hands the network\'s MTU to DHCP guests (option 26), and nothing when it has none', () => {
    const files = dnsmasqFiles('/nonexistent');
    assert.ok(buildDnsmasqArgv(network('span', { mtu: 1450 }), files).includes('--dhcp-option=option:mtu,1450'));
    assert.ok(!buildDnsmasqArgv(network('old'), files).some((a) => a.includes('option:mtu')));
  });
});

describe('overlay plan', () => {
  it('BUM entries for online peers, MAC and address entries for NICs on other online hosts', () => {
    const plans = planOverlay({
      networks: [network('span', { vni: 100 }), network('old'), network('lan', { mode: 'bridged', subnet: undefined, gateway: undefined, vni: 7 })],
      macs: [
        { mac: M.a, instance: 'a', network: 'span' },
        { mac: M.b, instance: 'b', network: 'span' },
        { mac: M.c, instance: 'c', network: 'span' },
        { mac: M.d, instance: 'd', network: 'span' },
      ],
      ips: [
        { network: 'span', ip: '10.40.0.2', mac: M.a, instance: 'a' },
        { network: 'span', ip: '10.40.0.3', mac: M.b, instance: 'b' },
        { network: 'span', ip: '10.40.0.4', mac: M.c, instance: 'c' },
      ],
      // a here, b on h2 (online), c on h3 (offline), d has no record yet
      hostOf: new Map([
        ['a', 'h1'],
        ['b', 'h2'],
        ['c', 'h3'],
      ]),
      peers: [
        { host: 'h1', address: '192.0.2.1' },
        { host: 'h2', address: '192.0.2.2' },
        { host: 'h4', address: '192.0.2.4' },
      ],
      localHost: 'h1',
      localAddress: '192.0.2.1',
    });
    assert.deepEqual(plans, [
      {
        network: 'span',
        fdb: [{ dst: '192.0.2.2' }, { dst: '192.0.2.4' }, { mac: M.b, dst: '192.0.2.2' }],
        neighbours: [{ ip: '10.40.0.3', mac: M.b }],
      },
    ]);
  });
});

/** Host operations recorded; each sync call wakes whoever waits for a matching state. */
class FakePlumbing implements OverlayPlumbing {
  ifaces = new Set<string>(['eth0', 'hfb-span']);
  mtus = new Map<string, number>();
  vxlans = new Map<string, VxlanSpec>();
  filters = new Map<string, VxlanFilterSpec>();
  fdb = new Map<string, FdbWant[]>();
  neigh = new Map<string, NeighbourWant[]>();
  removed: string[] = [];
  private waiters: Array<{ check: () => boolean; resolve: () => void }> = [];

  async underlayOf(address: string) {
    assert.equal(address, '192.0.2.1');
    return { dev: 'eth0', mtu: 1500 };
  }
  async links() {
    return [...this.ifaces];
  }
  async setMtu(ifname: string, mtu: number) {
    this.mtus.set(ifname, mtu);
  }
  async ensureVxlan(spec: VxlanSpec) {
    this.vxlans.set(spec.name, spec);
    this.ifaces.add(spec.name);
  }
  async applyFilter(spec: VxlanFilterSpec) {
    this.filters.set(spec.dev, spec);
  }
  async syncFdb(dev: string, want: FdbWant[]) {
    this.fdb.set(dev, want);
    this.wake();
  }
  async syncNeighbours(bridge: string, want: NeighbourWant[]) {
    this.neigh.set(bridge, want);
    this.wake();
  }
  async removeVxlan(dev: string) {
    this.removed.push(dev);
    this.ifaces.delete(dev);
    this.vxlans.delete(dev);
    this.wake();
  }
  /** Resolves once `check` holds after a sync (or at once); rejects after a generous deadline. */
  until(check: () => boolean, what: string): Promise<void> {
    if (check()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), 10_000);
      this.waiters.push({ check, resolve: () => (clearTimeout(timer), resolve()) });
    });
  }
  private wake() {
    this.waiters = this.waiters.filter((w) => (w.check() ? (w.resolve(), false) : true));
  }
}

describe('NetworkOverlay (SQLite store, fake host plumbing)', () => {
  it('keeps the tunnel, its fdb and neighbours in step with the store and the peers', async () => {
    const store = SqliteStateStore.open(':memory:');
    const names = new NetNames('');
    const plumbing = new FakePlumbing();
    let peers: OverlayPeer[] = [
      { host: 'h1', address: '192.0.2.1' },
      { host: 'h2', address: '192.0.2.2' },
    ];
    const peerListeners: Array<() => void> = [];
    const overlay = new NetworkOverlay({
      store,
      names,
      log: silentLogger,
      localHost: 'h1',
      localAddress: '192.0.2.1',
      peers: async () => peers,
      onPeersChanged: (cb) => peerListeners.push(cb),
      plumbing,
    });
    const dev = names.vxlan('span');
    try {
      await store.put('/networks/span', network('span', { vni: 4242, mtu: 1450 }));
      await store.put('/networks/elsewhere', network('elsewhere', { vni: 4343, subnet: '10.41.0.0/24', gateway: '10.41.0.1' }));
      await overlay.start();
      assert.equal(overlay.mtu, 1450);
      assert.deepEqual(plumbing.vxlans.get(dev), { name: dev, vni: 4242, local: '192.0.2.1', dev: 'eth0', bridge: 'hfb-span', mtu: 1450 });
      assert.ok(!plumbing.vxlans.has(names.vxlan('elsewhere')), 'no tunnel where the network has no bridge');
      assert.deepEqual(plumbing.filters.get(dev), { dev, gateway: '10.40.0.1' });
      assert.equal(plumbing.mtus.get('hfb-span'), 1450);
      assert.deepEqual(plumbing.fdb.get(dev), [{ dst: '192.0.2.2' }]);

      // An instance on h2 gets a NIC: its MAC goes to h2, its address becomes a neighbour.
      await store.put('/instances/b', { name: 'b', host: 'h2' });
      await store.put(`/network-macs/${M.b}`, { mac: M.b, instance: 'b', nic: 'eth0', network: 'span' });
      await store.put('/network-ips/span@10.40.0.3', { network: 'span', ip: '10.40.0.3', mac: M.b, instance: 'b', nic: 'eth0' });
      // And one here: nothing for it (the bridge reaches it directly).
      await store.put('/instances/a', { name: 'a', host: 'h1' });
      await store.put(`/network-macs/${M.a}`, { mac: M.a, instance: 'a', nic: 'eth0', network: 'span' });
      await plumbing.until(() => (plumbing.neigh.get('hfb-span') ?? []).length === 1 && (plumbing.fdb.get(dev) ?? []).length === 2, 'the remote NIC');
      assert.deepEqual(plumbing.fdb.get(dev), [{ dst: '192.0.2.2' }, { mac: M.b, dst: '192.0.2.2' }]);
      assert.deepEqual(plumbing.neigh.get('hfb-span'), [{ ip: '10.40.0.3', mac: M.b }]);

      // A change of b that leaves its host alone asks for no resync (each reads every record); a
      // move to another host does.
      let resyncs = 0;
      const links = plumbing.links.bind(plumbing);
      plumbing.links = async () => {
        resyncs++;
        return links();
      };
      const seen = new Promise<void>((resolve) => {
        const w = store.watch('/instances/b', () => {
          w.cancel();
          resolve();
        });
      });
      await store.put('/instances/b', { name: 'b', host: 'h2', description: 'only this changed' });
      await seen; // delivered to every watcher of the store, the overlay's too
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(resyncs, 0, 'a description change makes no resync');
      await store.put('/instances/zz-marker', { name: 'zz-marker', host: 'h2' });
      await plumbing.until(() => resyncs >= 1, 'the resync a new instance asks for');
      await store.put('/instances/b', { name: 'b', host: 'h1' });
      await plumbing.until(() => (plumbing.fdb.get(dev) ?? []).length === 1, 'b moved here: its MAC no longer points at h2');
      await store.put('/instances/b', { name: 'b', host: 'h2' });
      await store.delete('/instances/zz-marker');
      await plumbing.until(() => (plumbing.fdb.get(dev) ?? []).length === 2, 'b back on h2');

      // h2 goes offline: no entry points at it any more.
      peers = [{ host: 'h1', address: '192.0.2.1' }];
      for (const cb of peerListeners) cb();
      await plumbing.until(() => (plumbing.fdb.get(dev) ?? []).length === 0 && (plumbing.neigh.get('hfb-span') ?? []).length === 0, 'h2 gone');
      assert.deepEqual(plumbing.neigh.get('hfb-span'), []);

      // The network is deleted: its tunnel goes.
      await store.delete('/networks/span');
      await plumbing.until(() => plumbing.removed.includes(dev), 'the tunnel removed');
      assert.ok(!plumbing.ifaces.has(dev));
    } finally {
      await overlay.stop();
      await store.close();
    }
  });
});
