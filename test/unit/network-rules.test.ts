// The nftables ruleset builder (checked by nft itself in check mode: parsed and validated by
// the kernel, nothing applied) and the dnsmasq argv, hosts file and lease file handling.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { activeLeases, buildDnsmasqArgv, buildHostsFile, dnsmasqFiles, dropLeases, parseLeases } from '../../src/network/dnsmasq.js';
import { localPortsOf } from '../../src/network/host.js';
import { antiSpoofChain, buildRuleset, firewallChain, firewallRuleText, type RulesetSpec } from '../../src/network/nft.js';

const spec: RulesetSpec = {
  table: 'hyperfold_unit',
  networks: [
    { name: 'default', mode: 'nat', bridge: 'hfunitb-default', subnet: '10.200.1.0/24' },
    { name: 'lab', mode: 'isolated', bridge: 'hfunitb-lab', subnet: '10.200.2.0/24' },
    { name: 'lan', mode: 'bridged', bridge: 'hfunitb-lan' },
  ],
  nics: [
    { instance: 'web1', nic: 'eth0', hostIface: 'hfunitt00000001', mac: '52:54:00:00:00:01', ip: '10.200.1.2', managed: true },
    { instance: 'web1', nic: 'eth1', hostIface: 'hfunitt00000002', mac: '52:54:00:00:00:02', ip: '10.200.2.2', managed: true },
    { instance: 'ext', nic: 'eth0', hostIface: 'hfunitt00000003', mac: '52:54:00:00:00:03', managed: false },
  ],
  firewalls: [
    {
      instance: 'web1',
      inbound: 'deny',
      ips: ['10.200.1.2', '10.200.2.2'],
      rules: [
        { action: 'allow', protocol: 'tcp', ports: { from: 80, to: 80 }, from: '10.0.0.0/8' },
        { action: 'deny', protocol: 'udp', ports: { from: 5000, to: 5100 } },
        { action: 'allow', protocol: 'icmp' },
      ],
    },
  ],
  forwards: [{ protocol: 'tcp', hostPort: 18080, ip: '10.200.1.2', port: 80 }],
};

/** The lines of one chain (up to its closing brace at chain level). */
function chainBody(script: string, chain: string): string {
  const start = script.indexOf(`chain ${chain} {`);
  assert.ok(start >= 0, `no chain ${chain}`);
  const rest = script.slice(start);
  return rest.slice(0, rest.indexOf('\n  }'));
}

function nftCheck(script: string): { status: number | null; stderr: string } {
  const r = spawnSync('nft', ['-c', '-f', '-'], { input: script, encoding: 'utf8' });
  return { status: r.status, stderr: r.stderr };
}

describe('nftables ruleset', () => {
  const script = buildRuleset(spec);

  it('is accepted by nft (check mode)', () => {
    const r = nftCheck(script);
    assert.equal(r.status, 0, `${r.stderr}\n${script}`);
  });

  it('replaces both tables atomically and touches no other table', () => {
    const lines = script.split('\n');
    assert.deepEqual(lines.slice(0, 4), ['add table inet hyperfold_unit', 'delete table inet hyperfold_unit', 'add table bridge hyperfold_unit', 'delete table bridge hyperfold_unit']);
    const tables = new Set([...script.matchAll(/table (inet|bridge|ip|ip6|arp|netdev) (\S+)/g)].map((m) => `${m[1]} ${m[2]}`));
    assert.deepEqual([...tables].sort(), ['bridge hyperfold_unit', 'inet hyperfold_unit']);
  });

  it('masquerades NAT networks only, and isolates networks from each other', () => {
    assert.match(script, /ip saddr 10\.200\.1\.0\/24 ip daddr != 10\.200\.1\.0\/24 oifname != "hfunitb-default" counter masquerade/);
    assert.doesNotMatch(script, /ip saddr 10\.200\.2\.0\/24 .*masquerade/);
    assert.match(script, /iifname "hfunitb-default" oifname \{ "hfunitb-lab" \} counter drop/);
    assert.match(script, /iifname "hfunitb-lab" oifname != "hfunitb-lab" counter drop/);
    assert.match(script, /oifname "hfunitb-default" iifname != "hfunitb-default" counter drop/);
    // Bridged networks get no routing rules (the host has no address on them).
    assert.doesNotMatch(script, /hfunitb-lan/);
  });

  it('never lets an instance reach the host loopback (route_localnet is on for forwards)', () => {
    const guard = chainBody(script, 'guard_in');
    assert.match(guard, /type filter hook prerouting priority raw/);
    assert.match(guard, /iifname \{ "hfunitb-default", "hfunitb-lab" \} ip daddr 127\.0\.0\.0\/8 counter drop/);
    assert.match(guard, /iifname \{ "hfunitb-default", "hfunitb-lab" \} ip saddr 127\.0\.0\.0\/8 counter drop/);
  });

  it('forwards ports from outside and from the host itself', () => {
    assert.equal(script.match(/fib daddr type local tcp dport 18080 counter dnat ip to 10\.200\.1\.2:80/g)?.length, 2);
    assert.match(script, /type nat hook output priority -100/);
    assert.match(script, /oifname "hfunitb-default" ip saddr 127\.0\.0\.0\/8 counter masquerade/);
  });

  it('runs inbound traffic to an instance through its chain, rules in order, then the policy', () => {
    const body = chainBody(script, firewallChain('web1'));
    const rules = body.split('\n').slice(1).map((l) => l.trim()).filter(Boolean);
    assert.deepEqual(rules, [
      'ip saddr 10.0.0.0/8 tcp dport 80 counter return',
      'udp dport 5000-5100 counter reject',
      'meta l4proto icmp counter return',
      'counter drop',
    ]);
    assert.equal(script.match(/ip daddr \{ 10\.200\.1\.2, 10\.200\.2\.2 \} jump fw_web1/g)?.length, 2, 'forward and output chains');
    assert.equal(firewallRuleText({ action: 'deny', protocol: 'tcp', ports: { from: 22, to: 22 } }), 'tcp dport 22 counter reject with tcp reset');
  });

  it('anti-spoofing: managed ports may only send their MAC and address; bridged ports their MAC', () => {
    const m = chainBody(script, antiSpoofChain('hfunitt00000001'));
    assert.match(m, /ether saddr != 52:54:00:00:00:01 counter drop/);
    assert.match(m, /arp saddr ip != \{ 10\.200\.1\.2, 0\.0\.0\.0 \} counter drop/);
    assert.match(m, /ip saddr 10\.200\.1\.2 accept/);
    assert.equal(m.trim().split('\n').at(-1)!.trim(), 'counter drop', 'everything else from the port is dropped');
    const b = chainBody(script, antiSpoofChain('hfunitt00000003'));
    assert.match(b, /ether saddr != 52:54:00:00:00:03 counter drop/);
    assert.doesNotMatch(b, /ip saddr/);
    assert.match(script, /iifname "hfunitt00000003" jump as_hfunitt00000003/);
  });

  it('with no networks, only removes the tables', () => {
    const empty = buildRuleset({ table: 'hyperfold_unit', networks: [], nics: [], firewalls: [], forwards: [] });
    assert.equal(empty.trim().split('\n').length, 4);
    assert.equal(nftCheck(empty).status, 0);
  });
});

describe('dnsmasq', () => {
  const files = dnsmasqFiles('/data/networks/default');

  it('argv: static DHCP on the bridge only, router and upstream DNS for NAT, none for isolated', () => {
    const nat = buildDnsmasqArgv({ name: 'default', mode: 'nat', subnet: '10.200.1.0/24', gateway: '10.200.1.1', bridge: 'hfb-default', domain: 'default.hf.internal' }, files);
    assert.ok(nat.includes('--interface=hfb-default'));
    assert.ok(nat.includes('--bind-interfaces'));
    assert.ok(nat.includes('--dhcp-range=10.200.1.0,static,255.255.255.0,1h'));
    assert.ok(nat.includes('--dhcp-option=option:router,10.200.1.1'));
    assert.ok(nat.includes(`--dhcp-hostsfile=${files.hostsFile}`));
    assert.ok(nat.includes(`--pid-file=${files.pidFile}`));
    assert.ok(nat.includes('--conf-file=/dev/null'), 'never reads /etc/dnsmasq.conf');
    assert.ok(!nat.includes('--no-resolv'));
    const iso = buildDnsmasqArgv({ name: 'lab', mode: 'isolated', subnet: '10.200.2.0/24', gateway: '10.200.2.1', bridge: 'hfb-lab' }, files);
    assert.ok(iso.includes('--no-resolv'));
    assert.ok(iso.includes('--dhcp-option=option:router'));
    assert.ok(!iso.some((a) => a.startsWith('--dhcp-option=option:router,')));
    assert.throws(() => buildDnsmasqArgv({ name: 'lan', mode: 'bridged', bridge: 'x' }, files));
  });

  it('hosts file: one line a reservation, the instance name for its first NIC', () => {
    const text = buildHostsFile([
      { network: 'n', ip: '10.0.0.3', mac: '52:54:00:00:00:03', instance: 'web1', nic: 'eth1' },
      { network: 'n', ip: '10.0.0.2', mac: '52:54:00:00:00:02', instance: 'web1', nic: 'eth0' },
      { network: 'n', ip: '10.0.0.4', mac: '52:54:00:00:00:04', instance: 'db', nic: 'eth0' },
    ]);
    assert.equal(text, '52:54:00:00:00:04,10.0.0.4,db\n52:54:00:00:00:02,10.0.0.2,web1\n52:54:00:00:00:03,10.0.0.3,web1-eth1\n');
    assert.equal(buildHostsFile([]), '');
  });

  it('lease file: parsed, expired leases left out, dropped by MAC', () => {
    const text = [
      '1700000100 52:54:00:aa:00:01 10.0.0.2 web1 01:52:54:00:aa:00:01',
      '1700000000 52:54:00:AA:00:02 10.0.0.3 * *',
      '0 52:54:00:aa:00:03 10.0.0.4 db *',
      'duid 00:01:00:01:2c:aa',
      'garbage',
    ].join('\n');
    const leases = parseLeases(text);
    assert.deepEqual(leases.map((l) => [l.mac, l.ip, l.hostname]), [
      ['52:54:00:aa:00:01', '10.0.0.2', 'web1'],
      ['52:54:00:aa:00:02', '10.0.0.3', undefined],
      ['52:54:00:aa:00:03', '10.0.0.4', 'db'],
    ]);
    assert.deepEqual(activeLeases(leases, 1700000050).map((l) => l.ip), ['10.0.0.2', '10.0.0.4']);
    const dropped = dropLeases(text, new Set(['52:54:00:aa:00:02']));
    assert.doesNotMatch(dropped, /10\.0\.0\.3/);
    assert.match(dropped, /10\.0\.0\.2/);
    assert.match(dropped, /duid/);
  });
});

describe('local ports', () => {
  it('reads listening TCP sockets and bound UDP sockets from /proc/net tables', () => {
    const tcp = [
      '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
      '   0: 0100007F:1F46 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1',
      '   1: 0100007F:A0B2 0100007F:1F46 01 00000000:00000000 00:00000000 00000000     0        0 2 1',
    ].join('\n');
    assert.deepEqual([...localPortsOf(tcp, true)], [8006]);
    assert.deepEqual([...localPortsOf(tcp, false)].sort((a, b) => a - b), [8006, 41138]);
  });
});
