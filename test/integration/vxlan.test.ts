// A network spanning two hosts over VXLAN, with real kernel objects: two "hosts" are two network
// namespaces joined by a veth pair (the underlay), each with its bridge (the gateway address on
// it, as the network service makes it) and the tunnel port from network/vxlan.ts; a "guest"
// namespace hangs off each bridge by a veth, as a container's NIC does. The library runs inside
// each host namespace (test/helpers/vxlan-host.ts), as a daemon on that host would.
//
// Everything lives in namespaces named after a random suffix; deleting them (after(), also
// when a test failed) removes every interface, table and address the test made.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { NetNames } from '../../src/network/names.js';
import { overlayMtu, vxlanTable, ZERO_MAC, type FdbEntry, type FdbWant } from '../../src/network/vxlan.js';
import type { HostStep } from '../helpers/vxlan-host.js';

const HELPER = fileURLToPath(new URL('../helpers/vxlan-host.js', import.meta.url));

function sh(cmd: string, args: string[], timeout = 30_000) {
  return spawnSync(cmd, args, { encoding: 'utf8', timeout });
}

function must(cmd: string, args: string[]): string {
  const r = sh(cmd, args);
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** Runs library steps inside a host namespace; their results. */
function onHost(ns: string, steps: HostStep[]): unknown[] {
  const r = sh('ip', ['netns', 'exec', ns, process.execPath, HELPER, JSON.stringify(steps)], 60_000);
  assert.equal(r.status, 0, `steps in ${ns} failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as unknown[];
}

function linkJson(ns: string, dev: string, detail = false): { mtu: number; address: string; linkinfo?: { info_slave_data?: { learning?: boolean; neigh_suppress?: boolean; isolated?: boolean } } } {
  return (JSON.parse(must('ip', ['-n', ns, '-j', ...(detail ? ['-d'] : []), 'link', 'show', 'dev', dev])) as never[])[0]!;
}

/** Packets counted by the rules whose comment is `comment` in one chain of a table. */
function counted(ns: string, family: string, table: string, chain: string, comment: string): number {
  const text = must('ip', ['netns', 'exec', ns, 'nft', 'list', 'chain', family, table, chain]);
  const line = text.split('\n').find((l) => l.includes(`comment "${comment}"`));
  assert.ok(line, `no rule "${comment}" in ${family} ${table} ${chain}:\n${text}`);
  return Number(/counter packets (\d+)/.exec(line)![1]);
}

/** Pings from a namespace until one answer comes back (the first may wait for neighbours). */
function pingOk(ns: string, ip: string, deadlineMs = 15_000): boolean {
  const end = Date.now() + deadlineMs;
  while (Date.now() < end) {
    const r = sh('ip', ['netns', 'exec', ns, 'busybox', 'ping', '-c', '1', '-W', '2', ip]);
    if (/1 packets received/.test(r.stdout)) return true;
  }
  return false;
}

const sortEntries = (e: FdbEntry[]) => [...e].sort((a, b) => `${a.mac}@${a.dst}`.localeCompare(`${b.mac}@${b.dst}`));

describe('a network spanning two hosts over VXLAN (namespaces as hosts)', () => {
  const sfx = randomBytes(3).toString('hex');
  const ns = { ha: `hfvxt-${sfx}-ha`, hb: `hfvxt-${sfx}-hb`, ga: `hfvxt-${sfx}-ga`, gb: `hfvxt-${sfx}-gb` };
  const names = new NetNames('');
  const net = `ovl${sfx}`;
  // Each host would have the same bridge name (and so the same MAC); host B's is renamed here
  // so that an ARP answer shows which host gave it.
  const brA = names.bridge(net);
  const brB = `${brA.slice(0, 13)}-b`;
  const vx = names.vxlan(net);
  const vni = 4242;
  const under = { a: '10.200.0.1', b: '10.200.0.2' };
  const gw = '10.201.0.1';
  const guest = { a: { ip: '10.201.0.10', mac: '52:54:00:0a:00:0a' }, b: { ip: '10.201.0.11', mac: '52:54:00:0b:00:0b' } };
  let mtu = 0;

  const fdbWant = (peer: string, remoteMac: string): FdbWant[] => [{ dst: peer }, { mac: remoteMac, dst: peer }];

  before(() => {
    for (const n of Object.values(ns)) must('ip', ['netns', 'add', n]);
    for (const n of Object.values(ns)) must('ip', ['-n', n, 'link', 'set', 'lo', 'up']);
    // The underlay: one veth pair between the hosts.
    must('ip', ['-n', ns.ha, 'link', 'add', 'u0', 'type', 'veth', 'peer', 'name', 'u0', 'netns', ns.hb]);
    must('ip', ['-n', ns.ha, 'addr', 'add', `${under.a}/24`, 'dev', 'u0']);
    must('ip', ['-n', ns.hb, 'addr', 'add', `${under.b}/24`, 'dev', 'u0']);
    must('ip', ['-n', ns.ha, 'link', 'set', 'u0', 'up']);
    must('ip', ['-n', ns.hb, 'link', 'set', 'u0', 'up']);
    const [u] = onHost(ns.ha, [{ op: 'underlay', address: under.a }]) as Array<{ dev: string; mtu: number }>;
    assert.deepEqual(u, { dev: 'u0', mtu: 1500 });
    mtu = overlayMtu(u!.mtu);

    const setUp = (hostNs: string, guestNs: string, bridge: string, local: string, peer: string, me: { ip: string; mac: string }, other: { ip: string; mac: string }) => {
      // The guest's NIC: a veth with the network's MTU on both ends, its port on the bridge.
      must('ip', ['-n', guestNs, 'link', 'add', 'eth0', 'mtu', String(mtu), 'address', me.mac, 'type', 'veth', 'peer', 'name', 'gp', 'mtu', String(mtu), 'netns', hostNs]);
      must('ip', ['-n', guestNs, 'addr', 'add', `${me.ip}/24`, 'dev', 'eth0']);
      must('ip', ['-n', guestNs, 'link', 'set', 'eth0', 'up']);
      must('ip', ['-n', guestNs, 'route', 'add', 'default', 'via', gw]);
      onHost(hostNs, [
        { op: 'bridge', bridge, address: `${gw}/24`, mtu },
        { op: 'port', iface: 'gp', bridge },
        { op: 'vxlan', spec: { name: vx, vni, local, dev: 'u0', bridge, mtu } },
        // Twice: ensureVxlan is idempotent.
        { op: 'vxlan', spec: { name: vx, vni, local, dev: 'u0', bridge, mtu } },
        { op: 'filter', spec: { dev: vx, gateway: gw } },
        { op: 'fdb', dev: vx, want: fdbWant(peer, other.mac) },
        { op: 'neigh', bridge, want: [{ ip: other.ip, mac: other.mac }] },
      ]);
    };
    setUp(ns.ha, ns.ga, brA, under.a, under.b, guest.a, guest.b);
    setUp(ns.hb, ns.gb, brB, under.b, under.a, guest.b, guest.a);
    // Host B counts what comes out of its tunnel, before its own filter or bridge sees it.
    const probe = [
      'table netdev probe {',
      '  chain tunnel_in {',
      `    type filter hook ingress device "${vx}" priority -500; policy accept;`,
      '    meta protocol ip ip protocol icmp counter comment "icmp"',
      '    meta protocol ip udp dport { 67, 68 } counter comment "dhcp"',
      `    meta protocol arp arp operation request arp daddr ip ${gw} counter comment "arp-for-gateway"`,
      '  }',
      '  chain underlay_in {',
      '    type filter hook ingress device "u0" priority -500; policy accept;',
      '    meta protocol ip ip frag-off & 0x3fff != 0 counter comment "fragments"',
      '  }',
      '}',
    ].join('\n');
    const r = spawnSync('ip', ['netns', 'exec', ns.hb, 'nft', '-f', '-'], { input: probe + '\n', encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
  });

  after(() => {
    for (const n of Object.values(ns)) sh('ip', ['netns', 'del', n]);
    const left = sh('ip', ['netns', 'list']).stdout;
    for (const n of Object.values(ns)) assert.ok(!left.includes(n), `namespace ${n} is left`);
  });

  it('guests on the two hosts reach each other through the tunnel', () => {
    assert.ok(pingOk(ns.ga, guest.b.ip), 'guest A cannot ping guest B');
    assert.ok(pingOk(ns.gb, guest.a.ip), 'guest B cannot ping guest A');
    // It went through the tunnel: host B's underlay received VXLAN packets.
    assert.ok(counted(ns.hb, 'netdev', 'probe', 'tunnel_in', 'icmp') > 0, 'no ICMP came out of host B\'s tunnel');
  });

  it('the tunnel port learns nothing and has exactly the synced entries', () => {
    const port = linkJson(ns.ha, vx, true).linkinfo?.info_slave_data;
    assert.equal(port?.learning, false);
    assert.equal(port?.neigh_suppress, true);
    assert.equal(port?.isolated, false);
    const [fdb] = onHost(ns.ha, [{ op: 'read-fdb', dev: vx }]) as Array<{ self: FdbEntry[]; master: string[] }>;
    assert.deepEqual(sortEntries(fdb!.self), sortEntries([{ mac: ZERO_MAC, dst: under.b }, { mac: guest.b.mac, dst: under.b }]));
    assert.deepEqual(fdb!.master, [guest.b.mac]);
    // A new peer, guest B "moved" to it, an extra NIC: stale entries go, new ones come.
    const moved = [{ dst: under.b }, { dst: '10.200.0.3' }, { mac: guest.b.mac, dst: '10.200.0.3' }, { mac: '52:54:00:0c:00:0c', dst: under.b }];
    const [, after2] = onHost(ns.ha, [{ op: 'fdb', dev: vx, want: moved }, { op: 'read-fdb', dev: vx }]) as Array<{ self: FdbEntry[]; master: string[] }>;
    assert.deepEqual(sortEntries(after2!.self), sortEntries(moved.map((w) => ({ mac: w.mac ?? ZERO_MAC, dst: w.dst }))));
    assert.deepEqual([...after2!.master].sort(), [guest.b.mac, '52:54:00:0c:00:0c'].sort());
    // And back.
    const [, back] = onHost(ns.ha, [{ op: 'fdb', dev: vx, want: fdbWant(under.b, guest.b.mac) }, { op: 'read-fdb', dev: vx }]) as Array<{ self: FdbEntry[]; master: string[] }>;
    assert.deepEqual(sortEntries(back!.self), sortEntries([{ mac: ZERO_MAC, dst: under.b }, { mac: guest.b.mac, dst: under.b }]));
    assert.deepEqual(back!.master, [guest.b.mac]);
    assert.ok(pingOk(ns.ga, guest.b.ip), 'guest A lost guest B after the fdb went back');
  });

  it('DHCP from a guest does not cross the tunnel', () => {
    const before = counted(ns.ha, 'bridge', vxlanTable(vx), 'to_tunnel', 'dhcp');
    // Two DISCOVERs, one second apart, nobody answers (no dnsmasq here): udhcpc gives up.
    sh('ip', ['netns', 'exec', ns.ga, 'busybox', 'udhcpc', '-i', 'eth0', '-n', '-q', '-t', '2', '-T', '1', '-s', '/bin/true'], 30_000);
    assert.ok(counted(ns.ha, 'bridge', vxlanTable(vx), 'to_tunnel', 'dhcp') >= before + 2, 'host A did not stop the DHCP discovers at its tunnel port');
    assert.equal(counted(ns.hb, 'netdev', 'probe', 'tunnel_in', 'dhcp'), 0, 'a DHCP packet came out of host B\'s tunnel');
  });

  it('ARP for the gateway is answered by the guest\'s own host only', () => {
    const macA = linkJson(ns.ha, brA).address;
    const macB = linkJson(ns.hb, brB).address;
    assert.notEqual(macA, macB);
    const arping = () => {
      // The first request is broadcast (the one that could cross the tunnel); busybox sends the
      // next one to the MAC that answered.
      const r = sh('ip', ['netns', 'exec', ns.ga, 'busybox', 'arping', '-c', '2', '-w', '3', '-I', 'eth0', gw]);
      const replies = [...r.stdout.matchAll(/reply from \S+ \[([0-9a-f:]+)\]/gi)].map((m) => m[1]!.toLowerCase());
      assert.deepEqual(replies, [macA, macA], `the gateway was answered by ${replies.join(', ') || 'nobody'} (host A is ${macA}, host B ${macB}): ${r.stderr}`);
    };
    // With neigh_suppress on the tunnel port the bridge itself keeps requests for its own
    // address off it.
    arping();
    assert.equal(counted(ns.hb, 'netdev', 'probe', 'tunnel_in', 'arp-for-gateway'), 0, 'an ARP request for the gateway came out of host B\'s tunnel');
    // Without it (older kernels), the filter does.
    must('bridge', ['-n', ns.ha, 'link', 'set', 'dev', vx, 'neigh_suppress', 'off']);
    const before = counted(ns.ha, 'bridge', vxlanTable(vx), 'to_tunnel', 'arp-for-gateway');
    arping();
    assert.ok(counted(ns.ha, 'bridge', vxlanTable(vx), 'to_tunnel', 'arp-for-gateway') >= before + 1, 'host A did not stop the broadcast request at its tunnel port');
    assert.equal(counted(ns.hb, 'netdev', 'probe', 'tunnel_in', 'arp-for-gateway'), 0, 'an ARP request for the gateway came out of host B\'s tunnel');
    // ensureVxlan puts the port's settings back.
    onHost(ns.ha, [{ op: 'vxlan', spec: { name: vx, vni, local: under.a, dev: 'u0', bridge: brA, mtu } }]);
    assert.equal(linkJson(ns.ha, vx, true).linkinfo?.info_slave_data?.neigh_suppress, true);
  });

  it('the bridge, the tunnel and the NICs use the underlay MTU − 50', () => {
    assert.equal(mtu, 1450);
    for (const [n, dev] of [[ns.ha, brA], [ns.ha, vx], [ns.ha, 'gp'], [ns.hb, brB], [ns.hb, vx], [ns.ga, 'eth0']] as const) {
      assert.equal(linkJson(n, dev).mtu, 1450, `${dev} in ${n}`);
    }
    // A full-size packet (1422 bytes of ICMP data + 28 = 1450) crosses, and its VXLAN packet
    // (1450 + 50 = 1500) fits the underlay whole: host B's underlay sees no fragment.
    const r = sh('ip', ['netns', 'exec', ns.ga, 'busybox', 'ping', '-c', '1', '-W', '3', '-s', '1422', guest.b.ip]);
    assert.match(r.stdout, /1 packets received/, `${r.stdout} ${r.stderr}`);
    assert.equal(counted(ns.hb, 'netdev', 'probe', 'underlay_in', 'fragments'), 0);
    // One byte more does not fit the guest's NIC: the guest fragments it, the tunnel never has to.
    const big = sh('ip', ['netns', 'exec', ns.ga, 'busybox', 'ping', '-c', '1', '-W', '3', '-s', '1423', guest.b.ip]);
    assert.match(big.stdout, /1 packets received/, `${big.stdout} ${big.stderr}`);
    assert.equal(counted(ns.hb, 'netdev', 'probe', 'underlay_in', 'fragments'), 0, 'the underlay carried fragments');
  });

  it('removeVxlan takes the device and its filter table, and is idempotent', () => {
    onHost(ns.hb, [{ op: 'remove', dev: vx }, { op: 'remove', dev: vx }]);
    assert.notEqual(sh('ip', ['-n', ns.hb, 'link', 'show', 'dev', vx]).status, 0);
    assert.notEqual(sh('ip', ['netns', 'exec', ns.hb, 'nft', 'list', 'table', 'bridge', vxlanTable(vx)]).status, 0);
    assert.ok(!pingOk(ns.ga, guest.b.ip, 3000), 'guest B is still reachable without host B\'s tunnel');
  });
});
