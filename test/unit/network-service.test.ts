// The network service and its API in-process (Fastify inject) over the instance service with a
// fake driver and an in-memory host (FakeNetHost records bridges, taps, namespaces, the last
// nftables script and dnsmasq "processes"): validation and its error codes, reservations,
// hook behaviour and undo on failure. The real kernel objects are covered by the integration
// tests (network-*.test.ts under test/integration).
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { HfError } from '../../src/core/errors.js';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import type { DnsmasqFiles } from '../../src/network/dnsmasq.js';
import type { HostRoute, LinkInfo, NetHost, NicInNetns, PortOptions } from '../../src/network/host.js';
import { NetNames } from '../../src/network/names.js';
import { InstanceService } from '../../src/services/instances.js';
import type { NetworkView } from '../../src/network/model.js';
import { NetworkService } from '../../src/services/network/service.js';
import { OperationManager } from '../../src/services/operations.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { silentLogger } from '../../src/util/log.js';
import type { NicPlug } from '../../src/drivers/driver.js';
import type { NicConfig } from '../../src/core/model/instance.js';
import type { StateStore } from '../../src/state/store.js';
import { FakeDriver, FakeHandle } from '../helpers/fake-driver.js';
import { QEMU_CAPABILITIES } from '../../src/drivers/qemu/capabilities.js';
import { daemonLockFile, tryLock } from '../../src/util/flock.js';
import { existsSync } from 'node:fs';
import { buildWorld } from '../helpers/world.js';

class FakeNetHost implements NetHost {
  links = new Map<string, LinkInfo & { isolated?: boolean }>();
  netns = new Map<string, Map<string, NicInNetns>>();
  routeTable: HostRoute[] = [{ dst: '192.0.2.0/24', dev: 'eth0' }, { dst: '127.0.0.0/8', dev: 'lo', table: 'local' }];
  nft = '';
  nftApplies = 0;
  dhcp = new Map<string, { argv: string[]; pid: number }>();
  reloads: string[] = [];
  listening = new Set<number>();
  failDhcp = false;
  failNft = false;
  vlanSupported = false;
  forwarding = false;
  private nextPid = 5000;

  constructor() {
    this.links.set('lo', { name: 'lo', up: true, addresses: ['127.0.0.1/8'] });
    this.links.set('eth0', { name: 'eth0', up: true, addresses: ['192.0.2.2/24'] });
    this.links.set('spare0', { name: 'spare0', up: false, addresses: [] });
    this.links.set('br0', { name: 'br0', kind: 'bridge', up: true, addresses: [] });
  }

  async listLinks(): Promise<LinkInfo[]> {
    return [...this.links.values()].map((l) => ({ ...l }));
  }
  /** Awaited at the start of routes() (a create's checks): lets a test line up concurrent creates. */
  gate: (() => Promise<void>) | undefined;
  async routes(): Promise<HostRoute[]> {
    await this.gate?.();
    const own = [...this.links.values()].flatMap((l) => l.addresses.filter(() => l.kind === 'bridge' && l.name.startsWith('hf')).map((a) => ({ dst: a.replace(/\.\d+\//, '.0/'), dev: l.name })));
    return [...this.routeTable, ...own];
  }
  async ensureBridge(name: string, opts: { address?: string | undefined }): Promise<void> {
    const l = this.links.get(name) ?? { name, kind: 'bridge', up: false, addresses: [] };
    l.up = true;
    if (opts.address) l.addresses = [opts.address];
    this.links.set(name, l);
  }
  async setMaster(ifname: string, bridge: string | null, port: PortOptions): Promise<void> {
    const l = this.links.get(ifname);
    if (!l) throw new HfError('HF_ERR_INTERNAL', `no ${ifname}`);
    if (bridge && !this.links.has(bridge)) throw new HfError('HF_ERR_INTERNAL', `no bridge ${bridge}`);
    l.master = bridge ?? undefined;
    l.isolated = port.isolated;
    l.up = true;
  }
  async deleteLink(name: string): Promise<void> {
    this.links.delete(name);
    for (const l of this.links.values()) if (l.master === name) l.master = undefined;
  }
  async createTap(name: string): Promise<void> {
    if (this.links.has(name)) throw new HfError('HF_ERR_INTERNAL', `${name} exists`);
    this.links.set(name, { name, kind: 'tun', up: false, addresses: [] });
  }
  async createVeth(a: string, b: string): Promise<void> {
    this.links.set(a, { name: a, kind: 'veth', up: false, addresses: [] });
    this.links.set(b, { name: b, kind: 'veth', up: false, addresses: [] });
  }
  async createVlan(name: string, parent: string): Promise<void> {
    if (!this.vlanSupported) throw new HfError('HF_ERR_UNSUPPORTED', 'no 8021q');
    this.links.set(name, { name, kind: 'vlan', up: false, addresses: [], master: undefined, mac: parent });
  }
  async listNetns(): Promise<string[]> {
    return [...this.netns.keys()];
  }
  async addNetns(name: string): Promise<string> {
    if (!this.netns.has(name)) this.netns.set(name, new Map());
    return this.netnsPath(name);
  }
  async deleteNetns(name: string): Promise<void> {
    const ns = this.netns.get(name);
    // Deleting a namespace deletes its veth ends, and with them their host-side peers.
    if (ns) for (const nic of ns.values()) this.links.delete(nic.mac);
    this.netns.delete(name);
  }
  async forgetNeighbour(_dev: string, _ip: string): Promise<void> {}
  async attachNetns(name: string, _pid: number): Promise<string> {
    if (!this.netns.has(name)) this.netns.set(name, new Map());
    return this.netnsPath(name);
  }
  netnsPath(name: string): string {
    return `/run/netns/${name}`;
  }
  async moveIntoNetns(ifname: string, netns: string, nic: NicInNetns): Promise<void> {
    if (!this.links.delete(ifname)) throw new HfError('HF_ERR_INTERNAL', `no ${ifname}`);
    this.netns.get(netns)!.set(nic.name, nic);
  }
  async deleteInNetns(netns: string, ifname: string): Promise<void> {
    this.netns.get(netns)?.delete(ifname);
  }
  async enableForwarding(): Promise<void> {
    this.forwarding = true;
  }
  async localPortInUse(_p: 'tcp' | 'udp', port: number): Promise<boolean> {
    return this.listening.has(port);
  }
  async applyNft(script: string): Promise<void> {
    if (this.failNft) throw new HfError('HF_ERR_INTERNAL', 'nft failed');
    this.nft = script;
    this.nftApplies++;
  }
  async startDhcp(network: string, argv: string[], files: DnsmasqFiles): Promise<void> {
    if (this.failDhcp) throw new HfError('HF_ERR_INTERNAL', 'dnsmasq exited at start');
    await mkdir(files.dir, { recursive: true });
    this.dhcp.set(network, { argv, pid: this.nextPid++ });
  }
  async stopDhcp(network: string): Promise<void> {
    this.dhcp.delete(network);
  }
  reloadDhcp(network: string): void {
    this.reloads.push(network);
  }
  dhcpPid(network: string): number | undefined {
    return this.dhcp.get(network)?.pid;
  }
  ours(): string[] {
    return [...this.links.keys()].filter((n) => n.startsWith('hftest'));
  }
}

const TOKEN = 'test-token-0123456789abcdef0123456789';

interface World {
  dir: string;
  store: SqliteStateStore;
  host: FakeNetHost;
  ops: OperationManager;
  svc: InstanceService;
  net: NetworkService;
  app: FastifyInstance;
}

async function world(dir: string, store = SqliteStateStore.open(':memory:'), host = new FakeNetHost(), driver = new FakeDriver()): Promise<World> {
  let net!: NetworkService;
  const w = await buildWorld(dir, {
    store,
    drivers: [
      ['vm', driver],
      ['container', driver],
    ],
    capacity: { cpus: 8, memoryMiB: 8192 },
    overcommit: { cpu: 4, memory: 1 },
    plugins: async ({ events, ops }) => {
      net = new NetworkService({ store, host, names: new NetNames('e5e5'), networksDir: join(dir, 'networks'), dataDir: dir, events, operations: ops, log: silentLogger, ownersDir: join(dir, 'owners') });
      return {
        extensions: [net.extension],
        services: { networks: net },
        bind: async (svc) => {
          net.bindInstances(svc);
          await net.start();
        },
      };
    },
  });
  return { dir, store, host, ops: w.ops, svc: w.svc, net, app: w.app };
}

async function call(w: World, method: string, url: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await w.app.inject({ method: method as 'GET', url, payload: body as Record<string, unknown> | undefined, headers: { authorization: `Bearer ${TOKEN}` } });
  return { status: res.statusCode, json: res.body ? (JSON.parse(res.body) as Record<string, unknown>) : {} };
}

function errCode(r: { json: Record<string, unknown> }): string | undefined {
  return (r.json.error as { code?: string } | undefined)?.code;
}

async function finish(w: World, r: { json: Record<string, unknown> }): Promise<Operation> {
  return w.ops.wait((r.json.operation as Operation).id, 10_000);
}

describe('network service (fake host)', () => {
  let dir: string;
  let kernel: string;
  let w: World;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-net-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not a kernel');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    w = await world(await mkdtemp(join(dir, 'w-')));
  });

  const vm = (name: string, nics: unknown[], extra: Record<string, unknown> = {}) => ({ name, boot: { kind: 'kernel', kernel }, nics, ...extra });
  const netOf = async (name: string) => (await call(w, 'GET', `/api/v1/networks/${name}`)).json.network as NetworkView;

  it('creates the default NAT network at the first start only, clear of host routes', async () => {
    const def = await netOf('default');
    assert.equal(def.mode, 'nat');
    assert.match(def.subnet!, /^10\.\d+\.\d+\.0\/24$/);
    assert.equal(def.bridge, 'hfe5e5b-default');
    assert.ok(w.host.links.get('hfe5e5b-default')?.addresses.includes(`${def.gateway}/24`));
    assert.ok(w.host.dhcpPid('default'));
    assert.ok(w.host.forwarding, 'NAT needs IPv4 forwarding');
    assert.match(w.host.nft, /masquerade/);
    // Deleted by the user: not created again at the next start.
    assert.equal((await call(w, 'DELETE', '/api/v1/networks/default')).status, 200);
    await w.net.start();
    assert.equal(errCode(await call(w, 'GET', '/api/v1/networks/default')), 'HF_ERR_NETWORK_NOT_FOUND');
  });

  it('refuses bad subnets with named errors, and creates a good one', async () => {
    const def = await netOf('default');
    const bad: Array<[unknown, number, string]> = [
      [{ name: 'n1', subnet: '10.0.0.0' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'n1', subnet: '10.0.0.300/24' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'n1', subnet: '10.0.0.1/24' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'n1', subnet: '10.0.0.0/8' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'n1', subnet: '127.1.0.0/24' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'n1', subnet: def.subnet }, 409, 'HF_ERR_SUBNET_CONFLICT'],
      [{ name: 'n1', subnet: def.subnet!.replace(/\.0\/24$/, '.128/25') }, 409, 'HF_ERR_SUBNET_CONFLICT'],
      [{ name: 'n1', subnet: '192.0.2.0/25' }, 409, 'HF_ERR_SUBNET_CONFLICT'],
      [{ name: 'Bad_Name', subnet: '10.250.0.0/24' }, 400, 'HF_ERR_INVALID_NAME'],
      [{ name: 'default', subnet: '10.250.0.0/24' }, 409, 'HF_ERR_ALREADY_EXISTS'],
    ];
    for (const [body, status, code] of bad) {
      const r = await call(w, 'POST', '/api/v1/networks', body);
      assert.equal(r.status, status, JSON.stringify([body, r.json]));
      assert.equal(errCode(r), code, JSON.stringify(body));
    }
    const route = await call(w, 'POST', '/api/v1/networks', { name: 'n1', subnet: '192.0.2.0/25' });
    assert.match((route.json.error as { message: string }).message, /host route 192\.0\.2\.0\/24 on eth0/);
    const ok = await call(w, 'POST', '/api/v1/networks', { name: 'lab', subnet: '10.250.0.0/24', mode: 'isolated' });
    assert.equal(ok.status, 201, JSON.stringify(ok.json));
    const lab = ok.json.network as NetworkView;
    assert.equal(lab.gateway, '10.250.0.1');
    assert.ok(w.host.dhcp.get('lab')!.argv.includes('--no-resolv'));
    assert.match(w.host.nft, /iifname "hfe5e5b-lab" oifname != "hfe5e5b-lab" counter drop/);
    assert.equal((await call(w, 'GET', '/api/v1/networks')).json.networks instanceof Array, true);
  });

  it('validates VLANs and bridged uplinks', async () => {
    const cases: Array<[unknown, number, string]> = [
      [{ name: 'v', bridgeTo: 'spare0', vlan: 0 }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', bridgeTo: 'spare0', vlan: 4095 }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', vlan: 10 }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', bridgeTo: 'nope0' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', bridgeTo: 'eth0' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', bridgeTo: 'spare0', subnet: '10.251.0.0/24' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', bridgeTo: 'spare0', mode: 'isolated' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', bridgeTo: 'hfe5e5b-default' }, 400, 'HF_ERR_VALIDATION'],
      [{ name: 'v', bridgeTo: 'br0', vlan: 5 }, 422, 'HF_ERR_UNSUPPORTED'],
    ];
    for (const [body, status, code] of cases) {
      const r = await call(w, 'POST', '/api/v1/networks', body);
      assert.equal(r.status, status, JSON.stringify([body, r.json]));
      assert.equal(errCode(r), code, JSON.stringify(body));
    }
    const vlan0 = await call(w, 'POST', '/api/v1/networks', { name: 'v', bridgeTo: 'spare0', vlan: 0 });
    assert.match((vlan0.json.error as { message: string }).message, /1 to 4094/);
    // A kernel without 802.1Q: a named error and nothing left behind.
    const before = w.host.ours().sort();
    const nov = await call(w, 'POST', '/api/v1/networks', { name: 'v', bridgeTo: 'spare0', vlan: 10 });
    assert.equal(errCode(nov), 'HF_ERR_UNSUPPORTED');
    assert.deepEqual(w.host.ours().sort(), before);
    assert.equal(errCode(await call(w, 'GET', '/api/v1/networks/v')), 'HF_ERR_NETWORK_NOT_FOUND');
    // With 802.1Q: a VLAN interface on the uplink goes into the network's bridge.
    w.host.vlanSupported = true;
    const ok = await call(w, 'POST', '/api/v1/networks', { name: 'v', bridgeTo: 'spare0', vlan: 10 });
    assert.equal(ok.status, 201, JSON.stringify(ok.json));
    const vl = [...w.host.links.values()].find((l) => l.kind === 'vlan')!;
    assert.equal(vl.master, 'hfe5e5b-v');
    // An existing host bridge is used as it is (not created, not deleted).
    const ext = await call(w, 'POST', '/api/v1/networks', { name: 'lan', bridgeTo: 'br0' });
    assert.equal(ext.status, 201);
    assert.equal((ext.json.network as NetworkView).bridge, 'br0');
    assert.equal((ext.json.network as NetworkView).external, true);
    assert.equal((await call(w, 'DELETE', '/api/v1/networks/lan')).status, 200);
    assert.ok(w.host.links.has('br0'), 'the host bridge stays');
    assert.equal((await call(w, 'DELETE', '/api/v1/networks/v')).status, 200);
    assert.ok(!w.host.links.has(vl.name) && !w.host.links.has('hfe5e5b-v'));
    assert.equal(w.host.links.get('spare0')?.master, undefined);
  });

  it('unwinds a half-made network when dnsmasq cannot start', async () => {
    w.host.failDhcp = true;
    const r = await call(w, 'POST', '/api/v1/networks', { name: 'broken', subnet: '10.252.0.0/24' });
    assert.equal(r.status, 500);
    assert.ok(!w.host.links.has('hfe5e5b-broken'), 'bridge removed');
    assert.doesNotMatch(w.host.nft, /hfe5e5b-broken/, 'rules re-applied without it');
    assert.equal(errCode(await call(w, 'GET', '/api/v1/networks/broken')), 'HF_ERR_NETWORK_NOT_FOUND');
    assert.equal(await w.store.get('/networks/broken'), undefined, 'no record');
    assert.equal(w.host.dhcpPid('broken'), undefined);
  });

  it('reserves MAC and address at create; refuses taken, foreign and outside addresses', async () => {
    const def = await netOf('default');
    const base = def.subnet!.replace(/\.0\/24$/, '');
    const a = await call(w, 'POST', '/api/v1/instances', vm('a1', [{ network: 'default' }, { network: 'default', ip: `${base}.50`, name: 'lan' }]));
    assert.equal(a.status, 201, JSON.stringify(a.json));
    const nics = (a.json.instance as Instance).config.nics;
    assert.deepEqual(nics.map((n) => [n.name, n.ip]), [
      ['eth0', `${base}.2`],
      ['lan', `${base}.50`],
    ]);
    assert.match(nics[0]!.mac, /^52:54:00:/);
    assert.notEqual(nics[0]!.mac, nics[1]!.mac);
    assert.match(nics[0]!.hostIface!, /^hfe5e5t[0-9a-f]{8}$/);
    const hosts = await import('node:fs/promises').then((f) => f.readFile(join(w.dir, 'networks', 'default', 'dnsmasq.hosts'), 'utf8'));
    assert.match(hosts, new RegExp(`${nics[1]!.mac},${base}\\.50,a1-lan`));

    const cases: Array<[unknown[], number, string]> = [
      [[{ network: 'default', ip: `${base}.50` }], 409, 'HF_ERR_ADDRESS_IN_USE'],
      [[{ network: 'default', ip: def.gateway }], 409, 'HF_ERR_ADDRESS_IN_USE'],
      [[{ network: 'default', ip: '10.1.1.1' }], 400, 'HF_ERR_VALIDATION'],
      [[{ network: 'default', ip: `${base}.255` }], 400, 'HF_ERR_VALIDATION'],
      [[{ network: 'default', mac: nics[0]!.mac.toUpperCase() }], 409, 'HF_ERR_ADDRESS_IN_USE'],
      [[{ network: 'default', mac: '01:00:5e:00:00:01' }], 400, 'HF_ERR_VALIDATION'],
      [[{ network: 'nowhere' }], 404, 'HF_ERR_NETWORK_NOT_FOUND'],
      // the first NIC is fine, the second collides: the first's reservation is undone too
      [[{ network: 'default', ip: `${base}.60` }, { network: 'default', ip: `${base}.50` }], 409, 'HF_ERR_ADDRESS_IN_USE'],
      [[{ network: 'default', name: 'x0' }, { network: 'default', name: 'x0' }], 409, 'HF_ERR_ALREADY_EXISTS'],
    ];
    for (const [n, status, code] of cases) {
      const r = await call(w, 'POST', '/api/v1/instances', vm('b1', n));
      assert.equal(r.status, status, JSON.stringify([n, r.json]));
      assert.equal(errCode(r), code, JSON.stringify(n));
      assert.equal(errCode(await call(w, 'GET', '/api/v1/instances/b1')), 'HF_ERR_INSTANCE_NOT_FOUND');
    }
    // .60 was released by the undo: the next NIC asking for it gets it.
    const c = await call(w, 'POST', '/api/v1/instances', vm('c1', [{ network: 'default', ip: `${base}.60` }]));
    assert.equal(c.status, 201, JSON.stringify(c.json));
    const addrs = (await call(w, 'GET', '/api/v1/addresses')).json.addresses as Array<{ instance: string; reserved?: string; ip?: string }>;
    assert.deepEqual(addrs.map((x) => [x.instance, x.reserved, x.ip]), [
      ['a1', `${base}.2`, undefined],
      ['a1', `${base}.50`, undefined],
      ['c1', `${base}.60`, undefined],
    ]);
  });

  it('VM: tap created on the bridge before start, removed after stop; rules name it', async () => {
    await call(w, 'POST', '/api/v1/instances', vm('v1', [{ network: 'default' }]));
    const op = await finish(w, await call(w, 'POST', '/api/v1/instances/v1/start', {}));
    assert.equal(op.status, 'success', JSON.stringify(op.error));
    const inst = await w.svc.get('v1');
    const tap = inst.config.nics[0]!.hostIface!;
    assert.equal(w.host.links.get(tap)?.master, 'hfe5e5b-default');
    assert.equal(w.host.links.get(tap)?.isolated, true);
    assert.match(w.host.nft, new RegExp(`iifname "${tap}" jump as_${tap}`));
    assert.match(w.host.nft, new RegExp(`ether saddr != ${inst.config.nics[0]!.mac} counter drop`));
    assert.equal((await finish(w, await call(w, 'POST', '/api/v1/instances/v1/stop', { force: true }))).status, 'success');
    assert.ok(!w.host.links.has(tap), 'tap removed after stop');
    // The network is in use while v1 has a NIC on it, even stopped.
    const del = await call(w, 'DELETE', '/api/v1/networks/default');
    assert.equal(del.status, 409);
    assert.equal(errCode(del), 'HF_ERR_NETWORK_IN_USE');
    assert.deepEqual((del.json.error as { details: { instances: string[] } }).details.instances, ['v1']);
    // Deleting the instance releases everything it held.
    assert.equal((await finish(w, await call(w, 'DELETE', '/api/v1/instances/v1'))).status, 'success');
    assert.doesNotMatch(w.host.nft, new RegExp(tap));
    assert.equal((await call(w, 'DELETE', '/api/v1/networks/default')).status, 200);
    assert.ok(!w.host.links.has('hfe5e5b-default'));
    assert.equal(w.host.dhcpPid('default'), undefined);
  });

  it('container: a namespace with the NIC and its address, joined through config.netns; gone after stop', async () => {
    const def = await netOf('default');
    const c = await call(w, 'POST', '/api/v1/instances', { name: 'c1', type: 'container', nics: [{ network: 'default' }] });
    assert.equal(c.status, 201, JSON.stringify(c.json));
    assert.equal((c.json.instance as Instance).config.nics[0]!.hostIface, undefined);
    const op = await finish(w, await call(w, 'POST', '/api/v1/instances/c1/start', {}));
    assert.equal(op.status, 'success', JSON.stringify(op.error));
    const inst = await w.svc.get('c1');
    assert.equal(inst.config.netns, '/run/netns/hfe5e5n-c1');
    const inNs = w.host.netns.get('hfe5e5n-c1')!.get('eth0')!;
    assert.equal(inNs.address, `${inst.config.nics[0]!.ip}/24`);
    assert.equal(inNs.gateway, def.gateway);
    const veth = [...w.host.links.values()].find((l) => l.kind === 'veth')!;
    assert.match(veth.name, /^hfe5e5v[0-9a-f]{8}$/);
    assert.equal(veth.master, 'hfe5e5b-default');
    const addrs = (await call(w, 'GET', '/api/v1/instances/c1/nics')).json.addresses as Array<{ ip?: string; source?: string }>;
    assert.deepEqual([addrs[0]!.ip, addrs[0]!.source], [inst.config.nics[0]!.ip, 'static']);
    await finish(w, await call(w, 'POST', '/api/v1/instances/c1/stop', { force: true }));
    assert.ok(!w.host.netns.has('hfe5e5n-c1'));
    assert.ok(![...w.host.links.values()].some((l) => l.kind === 'veth'));
  });

  it('NICs added and removed on a stopped instance; a running one whose driver cannot hot-plug is refused', async () => {
    await call(w, 'POST', '/api/v1/instances', vm('n1', []));
    await call(w, 'POST', '/api/v1/networks', { name: 'lab', subnet: '10.253.0.0/24', mode: 'isolated' });
    const add = await finish(w, await call(w, 'POST', '/api/v1/instances/n1/nics', { network: 'lab', ip: '10.253.0.9' }));
    assert.equal(add.status, 'success', JSON.stringify(add.error));
    assert.deepEqual(add.result, { nic: (await w.svc.get('n1')).config.nics[0], live: false });
    const dup = await finish(w, await call(w, 'POST', '/api/v1/instances/n1/nics', { network: 'lab', ip: '10.253.0.9' }));
    assert.equal(dup.error?.code, 'HF_ERR_ADDRESS_IN_USE');
    assert.equal((await w.svc.get('n1')).config.nics.length, 1, 'the failed add left no NIC');
    assert.equal(errCode(await call(w, 'POST', '/api/v1/instances/n1/nics', { network: 'nope' })), 'HF_ERR_NETWORK_NOT_FOUND');
    assert.equal(errCode(await call(w, 'DELETE', '/api/v1/instances/n1/nics/eth7')), 'HF_ERR_NOT_FOUND');
    const rm1 = await finish(w, await call(w, 'DELETE', '/api/v1/instances/n1/nics/eth0'));
    assert.equal(rm1.status, 'success');
    assert.equal((await w.svc.get('n1')).config.nics.length, 0);
    // The address is free again.
    const again = await finish(w, await call(w, 'POST', '/api/v1/instances/n1/nics', { network: 'lab', ip: '10.253.0.9' }));
    assert.equal(again.status, 'success');
    await finish(w, await call(w, 'POST', '/api/v1/instances/n1/start', {}));
    // This running instance cannot hot-plug: its handle narrows the driver's capabilities.
    const handle = w.svc.handle('n1') as FakeHandle;
    handle.capabilities = new Set([...QEMU_CAPABILITIES].filter((c) => c !== 'hotplug-nic'));
    const live = await call(w, 'POST', '/api/v1/instances/n1/nics', { network: 'lab' });
    assert.equal(errCode(live), 'HF_ERR_UNSUPPORTED');
    assert.match((live.json.error as { message: string }).message, /hotplug-nic/);
    assert.equal(errCode(await call(w, 'DELETE', '/api/v1/instances/n1/nics/eth0')), 'HF_ERR_UNSUPPORTED');
    assert.equal((await w.svc.get('n1')).config.nics.length, 1, 'nothing changed');
  });

  it('firewall rules and policy, port forwards, all in the ruleset', async () => {
    await call(w, 'POST', '/api/v1/instances', vm('web', [{ network: 'default' }]));
    const ip = (await w.svc.get('web')).config.nics[0]!.ip!;
    const fw0 = await call(w, 'GET', '/api/v1/instances/web/firewall');
    assert.deepEqual(fw0.json.firewall, { instance: 'web', inbound: 'allow', rules: [] });
    assert.equal((await call(w, 'POST', '/api/v1/instances/web/firewall/rules', { action: 'deny', protocol: 'tcp', port: 80 })).status, 201);
    await call(w, 'POST', '/api/v1/instances/web/firewall/rules', { action: 'allow', protocol: 'tcp', port: '80', from: '10.0.0.0/8', position: 0 });
    assert.match(w.host.nft, /chain fw_web \{\n\s+ip saddr 10\.0\.0\.0\/8 tcp dport 80 counter return\n\s+tcp dport 80 counter reject with tcp reset\n\s+\}/);
    assert.match(w.host.nft, new RegExp(`ip daddr ${ip.replaceAll('.', '\\.')} jump fw_web`));
    const pol = await call(w, 'PUT', '/api/v1/instances/web/firewall/policy', { inbound: 'deny' });
    assert.equal((pol.json.firewall as { inbound: string }).inbound, 'deny');
    assert.match(w.host.nft, /counter reject with tcp reset\n\s+counter drop\n/);
    assert.equal(errCode(await call(w, 'DELETE', '/api/v1/instances/web/firewall/rules/5')), 'HF_ERR_NOT_FOUND');
    assert.equal(errCode(await call(w, 'POST', '/api/v1/instances/web/firewall/rules', { action: 'deny', protocol: 'icmp', port: 1 })), 'HF_ERR_VALIDATION');
    assert.equal(errCode(await call(w, 'POST', '/api/v1/instances/nobody/firewall/rules', { action: 'deny' })), 'HF_ERR_INSTANCE_NOT_FOUND');
    const rm0 = await call(w, 'DELETE', '/api/v1/instances/web/firewall/rules/0');
    assert.equal(((rm0.json.firewall as { rules: unknown[] }).rules).length, 1);

    w.host.listening.add(8006);
    assert.equal(errCode(await call(w, 'POST', '/api/v1/forwards', { instance: 'web', hostPort: 8006, port: 80 })), 'HF_ERR_ADDRESS_IN_USE');
    const f = await call(w, 'POST', '/api/v1/forwards', { instance: 'web', hostPort: 18080, port: 80 });
    assert.equal(f.status, 201, JSON.stringify(f.json));
    assert.match(w.host.nft, new RegExp(`tcp dport 18080 counter dnat ip to ${ip.replaceAll('.', '\\.')}:80`));
    assert.equal(errCode(await call(w, 'POST', '/api/v1/forwards', { instance: 'web', hostPort: 18080, port: 81 })), 'HF_ERR_ADDRESS_IN_USE');
    assert.equal(errCode(await call(w, 'POST', '/api/v1/forwards', { instance: 'web', hostPort: 0, port: 81 })), 'HF_ERR_VALIDATION');
    await call(w, 'POST', '/api/v1/instances', vm('bare', []));
    assert.equal(errCode(await call(w, 'POST', '/api/v1/forwards', { instance: 'bare', hostPort: 18081, port: 80 })), 'HF_ERR_VALIDATION');
    assert.equal(((await call(w, 'GET', '/api/v1/forwards?instance=web')).json.forwards as unknown[]).length, 1);
    // A failing nft leaves the stored rules as they were.
    w.host.failNft = true;
    assert.equal((await call(w, 'POST', '/api/v1/forwards', { instance: 'web', hostPort: 18082, port: 80 })).status, 500);
    w.host.failNft = false;
    assert.equal(((await call(w, 'GET', '/api/v1/forwards')).json.forwards as unknown[]).length, 1);
    assert.equal(await w.store.get('/network-forwards/tcp-18082'), undefined, 'no forward record');
    assert.doesNotMatch(w.host.nft, /18082/);
    // And a firewall change the kernel refuses leaves the firewall as it was.
    const fwBefore = (await call(w, 'GET', '/api/v1/instances/web/firewall')).json.firewall;
    w.host.failNft = true;
    assert.equal((await call(w, 'PUT', '/api/v1/instances/web/firewall/policy', { inbound: 'allow' })).status, 500);
    w.host.failNft = false;
    assert.deepEqual((await call(w, 'GET', '/api/v1/instances/web/firewall')).json.firewall, fwBefore);
    // Deleting the instance takes its firewall and forwards with it.
    await finish(w, await call(w, 'DELETE', '/api/v1/instances/web'));
    assert.doesNotMatch(w.host.nft, /fw_web|18080/);
    assert.deepEqual((await call(w, 'GET', '/api/v1/forwards')).json.forwards, []);
    assert.equal(errCode(await call(w, 'DELETE', '/api/v1/forwards/tcp/18080')), 'HF_ERR_NOT_FOUND');
  });

  it('addresses come from the lease file; deleting the instance drops its lease', async () => {
    await call(w, 'POST', '/api/v1/instances', vm('l1', [{ network: 'default' }]));
    await finish(w, await call(w, 'POST', '/api/v1/instances/l1/start', {}));
    const nic = (await w.svc.get('l1')).config.nics[0]!;
    const leaseFile = join(w.dir, 'networks', 'default', 'dnsmasq.leases');
    const later = Math.floor(Date.now() / 1000) + 3600;
    await writeFile(leaseFile, `${later} ${nic.mac} ${nic.ip} l1 *\n${later} 52:54:00:99:99:99 10.9.9.9 other *\n`);
    const a = (await call(w, 'GET', '/api/v1/addresses?instance=l1')).json.addresses as Array<{ ip?: string; source?: string }>;
    assert.deepEqual([a[0]!.ip, a[0]!.source], [nic.ip, 'lease']);
    await finish(w, await call(w, 'DELETE', '/api/v1/instances/l1?force=true'));
    const text = await import('node:fs/promises').then((f) => f.readFile(leaseFile, 'utf8'));
    assert.doesNotMatch(text, new RegExp(nic.mac));
    assert.match(text, /52:54:00:99:99:99/);
    assert.ok(w.host.dhcpPid('default'), 'dnsmasq runs again after the lease file was edited');
  });

  it("removes another daemon's objects only when it is not running and its store is gone", async () => {
    const owners = join(w.dir, 'owners');
    const other = async (tag: string, opts: { lock: boolean; store: boolean }) => {
      const dataDir = await mkdtemp(join(w.dir, `d${tag}-`));
      if (opts.store) await writeFile(join(dataDir, 'state.db'), '');
      const held = opts.lock ? await tryLock(daemonLockFile(dataDir)) : undefined;
      if (!opts.lock) await writeFile(daemonLockFile(dataDir), ''); // a daemon that ran and ended
      await writeFile(join(owners, tag), dataDir + '\n');
      w.host.links.set(`hf${tag}b-default`, { name: `hf${tag}b-default`, kind: 'bridge', up: true, addresses: [] });
      await w.host.addNetns(`hf${tag}n-c1`);
      return held;
    };
    const alive = await other('aaaa', { lock: true, store: false });
    await other('bbbb', { lock: false, store: true });
    await other('dddd', { lock: false, store: false });
    try {
      await w.net.start();
      assert.ok(w.host.links.has('hfaaaab-default') && w.host.netns.has('hfaaaan-c1'), 'a running daemon keeps its objects, even with its store gone');
      assert.ok(w.host.links.has('hfbbbbb-default') && w.host.netns.has('hfbbbbn-c1'), 'a daemon that is down (restarting) keeps them: its guests may still use them');
      assert.ok(existsSync(join(owners, 'bbbb')), 'and its owner entry');
      assert.ok(!w.host.links.has('hfddddb-default') && !w.host.netns.has('hfddddn-c1'), 'a daemon not running whose store is gone loses them');
      assert.ok(!existsSync(join(owners, 'dddd')), 'and its owner entry');
    } finally {
      alive?.release();
    }
    await w.net.start();
    assert.ok(!w.host.links.has('hfaaaab-default'), 'gone once its lock is released');
    assert.ok(w.host.links.has('hfbbbbb-default'), 'the stopped daemon with its store still keeps them');
  });

  it('reconcile removes our stray interfaces and namespaces and orphaned reservations, nothing else', async () => {
    await call(w, 'POST', '/api/v1/instances', vm('r1', [{ network: 'default' }]));
    w.host.links.set('hfe5e5t12345678', { name: 'hfe5e5t12345678', kind: 'tun', up: true, addresses: [] });
    w.host.links.set('hfe5e5vdeadbeef', { name: 'hfe5e5vdeadbeef', kind: 'veth', up: true, addresses: [] });
    w.host.links.set('hfb-default', { name: 'hfb-default', kind: 'bridge', up: true, addresses: [] }); // another daemon's
    w.host.links.set('hf1234t12345678', { name: 'hf1234t12345678', kind: 'tun', up: true, addresses: [] }); // another daemon's
    await w.host.addNetns('hfe5e5n-gone');
    await w.host.addNetns('hf1234n-other');
    // A reservation left by a create that died half-way.
    await w.store.put('/network-ips/default@10.99.0.9', { network: 'default', ip: '10.99.0.9', mac: '52:54:00:12:12:12', instance: 'ghost', nic: 'eth0' });
    const r = await w.net.reconcileInstances();
    assert.deepEqual(r.removedLinks.sort(), ['hfe5e5t12345678', 'hfe5e5vdeadbeef']);
    assert.deepEqual(r.removedNetns, ['hfe5e5n-gone']);
    assert.equal(r.removedReservations, 1);
    for (const keep of ['hfb-default', 'hf1234t12345678', 'hfe5e5b-default', 'eth0']) assert.ok(w.host.links.has(keep), keep);
    assert.ok(w.host.netns.has('hf1234n-other'));
    assert.equal((await w.svc.get('r1')).config.nics.length, 1);
  });
});

/** A fake driver whose handles hot-plug NICs (recording what the network layer handed them), or fail to. */
class NicFakeDriver extends FakeDriver {
  failAttach: HfError | undefined;
  readonly plugs: Array<{ instance: string; nic: NicConfig; plug: NicPlug | undefined }> = [];
  readonly unplugs: string[] = [];
  override async start(instance: Instance, ctx: Parameters<FakeDriver['start']>[1]): Promise<FakeHandle> {
    const h = (await super.start(instance, ctx)) as FakeHandle;
    return Object.assign(h, {
      attachNic: async (nic: NicConfig, plug?: NicPlug) => {
        if (this.failAttach) throw this.failAttach;
        this.plugs.push({ instance: instance.name, nic, plug });
      },
      detachNic: async (name: string) => void this.unplugs.push(`${instance.name}/${name}`),
    });
  }
}

/** Reservations (MAC and IP) held under an instance's name. */
async function reservationsOf(store: StateStore, instance: string): Promise<string[]> {
  const all = [...(await store.list<{ instance: string }>('/network-macs/')).entries, ...(await store.list<{ instance: string }>('/network-ips/')).entries];
  return all.filter((e) => e.value.instance === instance).map((e) => e.key);
}

/** Resolves for everyone once `n` callers have arrived: lines concurrent work up at one point. */
function barrier(n: number): () => Promise<void> {
  let arrived = 0;
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return async () => {
    if (++arrived === n) open();
    await opened;
  };
}

describe('NIC hot-plug through the instance handle (fake host)', () => {
  let dir: string;
  let kernel: string;
  let w: World;
  let driver: NicFakeDriver;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-nic-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not a kernel');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    driver = new NicFakeDriver();
    w = await world(await mkdtemp(join(dir, 'w-')), undefined, undefined, driver);
  });

  it('container: the host side is made here, the peer handed to the handle; a failing handle leaves nothing', async () => {
    assert.equal((await call(w, 'POST', '/api/v1/instances', { name: 'c9', type: 'container', nics: [] })).status, 201);
    assert.equal((await finish(w, await call(w, 'POST', '/api/v1/instances/c9/start', {}))).status, 'success');
    const linksBefore = w.host.ours().sort();
    const nftBefore = w.host.nft;
    driver.failAttach = new HfError('HF_ERR_HYPERVISOR', 'cannot move the interface');
    const failed = await finish(w, await call(w, 'POST', '/api/v1/instances/c9/nics', { network: 'default' }));
    assert.equal(failed.status, 'failure');
    assert.equal(failed.error?.code, 'HF_ERR_HYPERVISOR');
    assert.deepEqual(w.host.ours().sort(), linksBefore, 'no veth left');
    assert.ok(!w.host.netns.has('hfe5e5n-c9'), 'no namespace name left');
    assert.equal(w.host.nft, nftBefore, 'the ruleset as before');
    const rec = await w.svc.get('c9');
    assert.deepEqual(rec.config.nics, []);
    assert.equal(rec.config.netns, undefined);
    assert.deepEqual(await reservationsOf(w.store, 'c9'), [], 'no reservation left');

    driver.failAttach = undefined;
    const ok = await finish(w, await call(w, 'POST', '/api/v1/instances/c9/nics', { network: 'default' }));
    assert.equal(ok.status, 'success', JSON.stringify(ok.error));
    const def = (await call(w, 'GET', '/api/v1/networks/default')).json.network as NetworkView;
    const nic = (await w.svc.get('c9')).config.nics[0]!;
    assert.equal(driver.plugs.length, 1);
    const { plug } = driver.plugs[0]!;
    assert.match(plug?.peer ?? '', /^hfe5e5p[0-9a-f]{8}$/);
    assert.deepEqual([plug?.address, plug?.gateway], [`${nic.ip}/24`, def.gateway]);
    const veth = [...w.host.links.values()].find((l) => l.kind === 'veth' && l.name.startsWith('hfe5e5v'))!;
    assert.equal(veth.master, 'hfe5e5b-default');
    assert.equal((await w.svc.get('c9')).config.netns, '/run/netns/hfe5e5n-c9');
    assert.match(w.host.nft, new RegExp(veth.name));
    const rmOp = await finish(w, await call(w, 'DELETE', '/api/v1/instances/c9/nics/eth0'));
    assert.equal(rmOp.status, 'success', JSON.stringify(rmOp.error));
    assert.deepEqual(driver.unplugs, ['c9/eth0']);
    assert.ok(!w.host.links.has(veth.name));
    assert.deepEqual(await reservationsOf(w.store, 'c9'), []);
  });

  it('VM: a failing handle takes the tap, the NIC and its reservation back', async () => {
    assert.equal((await call(w, 'POST', '/api/v1/instances', { name: 'v9', boot: { kind: 'kernel', kernel }, nics: [] })).status, 201);
    assert.equal((await finish(w, await call(w, 'POST', '/api/v1/instances/v9/start', {}))).status, 'success');
    const linksBefore = w.host.ours().sort();
    driver.failAttach = new HfError('HF_ERR_QMP_COMMAND', 'device_add failed');
    const failed = await finish(w, await call(w, 'POST', '/api/v1/instances/v9/nics', { network: 'default', ip: undefined }));
    assert.equal(failed.error?.code, 'HF_ERR_QMP_COMMAND');
    assert.deepEqual(w.host.ours().sort(), linksBefore, 'no tap left');
    assert.deepEqual((await w.svc.get('v9')).config.nics, []);
    assert.deepEqual(await reservationsOf(w.store, 'v9'), []);
    assert.doesNotMatch(w.host.nft, /hfe5e5t/);
  });

  it('a stopped instance: when the ruleset cannot be applied, the NIC and its reservation go', async () => {
    assert.equal((await call(w, 'POST', '/api/v1/instances', { name: 's9', boot: { kind: 'kernel', kernel }, nics: [] })).status, 201);
    w.host.failNft = true;
    const failed = await finish(w, await call(w, 'POST', '/api/v1/instances/s9/nics', { network: 'default' }));
    w.host.failNft = false;
    assert.equal(failed.status, 'failure');
    assert.deepEqual((await w.svc.get('s9')).config.nics, []);
    assert.deepEqual(await reservationsOf(w.store, 's9'), []);
  });
});

describe('two network services on one store (two daemons of a cluster)', () => {
  let dir: string;
  let kernel: string;
  let w1: World;
  let w2: World;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-net2-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not a kernel');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    const db = join(await mkdtemp(join(dir, 'db-')), 'state.db');
    w1 = await world(await mkdtemp(join(dir, 'w1-')), SqliteStateStore.open(db));
    w2 = await world(await mkdtemp(join(dir, 'w2-')), SqliteStateStore.open(db));
  });

  /** Holds every store transaction that writes under `prefix` until `n` of them are waiting. */
  const lineUpTxns = (stores: StateStore[], prefix: string, n: number) => {
    const gate = barrier(n);
    for (const st of stores) {
      const txn = st.txn.bind(st);
      st.txn = async (compares, ops) => {
        if (ops.some((o) => o.key.startsWith(prefix))) await gate();
        return txn(compares, ops);
      };
    }
  };

  it('overlapping networks created at once: exactly one is made, the other is refused with nothing half-made', async () => {
    const gate = barrier(2);
    w1.host.gate = gate;
    w2.host.gate = gate;
    const [a, b] = await Promise.allSettled([w1.net.create({ name: 'a', subnet: '10.250.0.0/24' }), w2.net.create({ name: 'b', subnet: '10.250.0.128/25' })]);
    w1.host.gate = w2.host.gate = undefined;
    const won = [a, b].filter((r) => r.status === 'fulfilled');
    const lost = [a, b].flatMap((r) => (r.status === 'rejected' ? [r.reason as unknown] : []));
    assert.equal(won.length, 1, 'one create wins');
    assert.equal(lost.length, 1);
    assert.ok(lost[0] instanceof HfError && lost[0].code === 'HF_ERR_SUBNET_CONFLICT', String(lost[0]));
    const loser = a.status === 'rejected' ? { w: w1, name: 'a' } : { w: w2, name: 'b' };
    assert.deepEqual((await w1.net.list()).map((n) => n.name).sort(), [a.status === 'fulfilled' ? 'a' : 'b', 'default'].sort());
    assert.ok(!loser.w.host.links.has(`hfe5e5b-${loser.name}`), 'no bridge for the loser');
    assert.equal(loser.w.host.dhcpPid(loser.name), undefined, 'no dnsmasq for the loser');
  });

  it('the same bridge name from both at once: one wins, the other gets HF_ERR_ALREADY_EXISTS', async () => {
    const gate = barrier(2);
    w1.host.gate = gate;
    w2.host.gate = gate;
    const rs = await Promise.allSettled([w1.net.create({ name: 'lab', subnet: '10.251.0.0/24' }), w2.net.create({ name: 'lab', subnet: '10.252.0.0/24' })]);
    w1.host.gate = w2.host.gate = undefined;
    const codes = rs.map((r) => (r.status === 'fulfilled' ? 'ok' : (r.reason as HfError).code)).sort();
    assert.deepEqual(codes, ['HF_ERR_ALREADY_EXISTS', 'ok']);
  });

  it('the same address reserved at once: one wins, the other gets HF_ERR_ADDRESS_IN_USE with nothing half-made', async () => {
    const def = (await call(w1, 'GET', '/api/v1/networks/default')).json.network as NetworkView;
    const ip = def.subnet!.replace(/\.0\/24$/, '.77');
    lineUpTxns([w1.store, w2.store], '/network-macs/', 2);
    const vm = (name: string) => ({ name, boot: { kind: 'kernel', kernel }, nics: [{ network: 'default', ip }] });
    const [r1, r2] = await Promise.all([call(w1, 'POST', '/api/v1/instances', vm('x1')), call(w2, 'POST', '/api/v1/instances', vm('x2'))]);
    assert.deepEqual([r1.status, r2.status].sort(), [201, 409], JSON.stringify([r1.json, r2.json]));
    const [winner, loser] = r1.status === 201 ? ['x1', 'x2'] : ['x2', 'x1'];
    assert.equal(errCode(r1.status === 409 ? r1 : r2), 'HF_ERR_ADDRESS_IN_USE');
    assert.equal(errCode(await call(w1, 'GET', `/api/v1/instances/${loser}`)), 'HF_ERR_INSTANCE_NOT_FOUND');
    assert.deepEqual(await reservationsOf(w1.store, loser), [], 'the loser holds no MAC or address');
    assert.equal((await reservationsOf(w1.store, winner)).length, 2);
  });

  it('addresses chosen automatically at once: both get one, different', async () => {
    lineUpTxns([w1.store, w2.store], '/network-macs/', 2);
    const vm = (name: string) => ({ name, boot: { kind: 'kernel', kernel }, nics: [{ network: 'default' }] });
    const [r1, r2] = await Promise.all([call(w1, 'POST', '/api/v1/instances', vm('y1')), call(w2, 'POST', '/api/v1/instances', vm('y2'))]);
    assert.deepEqual([r1.status, r2.status], [201, 201], JSON.stringify([r1.json, r2.json]));
    const ips = [r1, r2].map((r) => (r.json.instance as Instance).config.nics[0]!.ip);
    assert.notEqual(ips[0], ips[1]);
  });
});
