// Pure network logic: CIDR math, address and MAC allocation, object names and ownership,
// firewall rule specs.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { HfError } from '../../src/core/errors.js';
import { contains, formatCidr, formatIpv4, hostRange, isPrivate, overlaps, parseCidr, parseIpv4, tryParseIpv4 } from '../../src/network/cidr.js';
import { checkRequestedIp, nextFreeIp, normalizeMac, randomMac } from '../../src/network/alloc.js';
import { NetNames, tagFor } from '../../src/network/names.js';
import { bridgeMac } from '../../src/network/host.js';
import { parseFirewallRule, parseRuleSpec } from '../../src/network/firewall.js';

const code = (c: string) => (e: unknown) => e instanceof HfError && e.code === c;

describe('IPv4 and CIDR', () => {
  it('parses and formats addresses, refusing malformed ones', () => {
    assert.equal(parseIpv4('10.1.2.3'), 0x0a010203);
    assert.equal(formatIpv4(0xc0a80001), '192.168.0.1');
    assert.equal(formatIpv4(parseIpv4('255.255.255.255')), '255.255.255.255');
    for (const bad of ['10.1.2', '10.1.2.256', '010.1.2.3', '1.2.3.4.5', 'a.b.c.d', '', '1..2.3']) assert.equal(tryParseIpv4(bad), undefined, bad);
  });

  it('parses CIDRs strictly: host bits set is an error naming the fix', () => {
    assert.deepEqual(parseCidr('10.20.30.0/24'), { network: parseIpv4('10.20.30.0'), prefix: 24 });
    assert.throws(() => parseCidr('10.1.2.3/24'), (e: unknown) => e instanceof HfError && e.code === 'HF_ERR_VALIDATION' && /did you mean 10\.1\.2\.0\/24/.test(e.message));
    assert.deepEqual(parseCidr('10.1.2.3/24', { strict: false }), parseCidr('10.1.2.0/24'));
    for (const bad of ['10.0.0.0', '10.0.0.0/33', '10.0.0/8', '10.0.0.0/x', 'fe80::/64', '300.0.0.0/8']) assert.throws(() => parseCidr(bad), code('HF_ERR_VALIDATION'), bad);
  });

  it('knows containment, overlap, host ranges and private blocks', () => {
    const a = parseCidr('10.0.0.0/16');
    const b = parseCidr('10.0.5.0/24');
    const c = parseCidr('10.1.0.0/24');
    assert.ok(overlaps(a, b) && overlaps(b, a));
    assert.ok(!overlaps(a, c));
    assert.ok(contains(b, parseIpv4('10.0.5.255')));
    assert.ok(!contains(b, parseIpv4('10.0.6.0')));
    const r = hostRange(parseCidr('192.168.7.0/29'));
    assert.equal(formatIpv4(r.first), '192.168.7.1');
    assert.equal(formatIpv4(r.last), '192.168.7.6');
    assert.equal(formatCidr(parseCidr('172.16.0.0/12')), '172.16.0.0/12');
    assert.ok(isPrivate(parseCidr('172.20.1.0/24')));
    assert.ok(!isPrivate(parseCidr('8.8.8.0/24')));
  });
});

describe('allocation', () => {
  const plan = { subnet: parseCidr('10.9.8.0/24'), gateway: parseIpv4('10.9.8.1') };

  it('hands out the lowest free address, never the gateway, and fails when full', () => {
    assert.equal(nextFreeIp(plan, new Set()), '10.9.8.2');
    assert.equal(nextFreeIp(plan, new Set(['10.9.8.2', '10.9.8.3'])), '10.9.8.4');
    const small = { subnet: parseCidr('10.9.9.0/30'), gateway: parseIpv4('10.9.9.1') };
    assert.equal(nextFreeIp(small, new Set()), '10.9.9.2');
    assert.throws(() => nextFreeIp(small, new Set(['10.9.9.2'])), code('HF_ERR_INSUFFICIENT_RESOURCES'));
  });

  it('checks a requested address: outside, network/broadcast, gateway', () => {
    assert.equal(checkRequestedIp(plan, '10.9.8.77'), parseIpv4('10.9.8.77'));
    assert.throws(() => checkRequestedIp(plan, '10.9.9.5'), (e: unknown) => e instanceof HfError && e.code === 'HF_ERR_VALIDATION' && /outside/.test(e.message));
    assert.throws(() => checkRequestedIp(plan, '10.9.8.0'), code('HF_ERR_VALIDATION'));
    assert.throws(() => checkRequestedIp(plan, '10.9.8.255'), code('HF_ERR_VALIDATION'));
    assert.throws(() => checkRequestedIp(plan, '10.9.8.1'), code('HF_ERR_ADDRESS_IN_USE'));
    assert.throws(() => checkRequestedIp(plan, 'ten'), code('HF_ERR_VALIDATION'));
  });

  it('normalizes MACs and refuses multicast / malformed ones', () => {
    assert.equal(normalizeMac('52-54-00-AA-bb-0C'), '52:54:00:aa:bb:0c');
    assert.throws(() => normalizeMac('01:00:5e:00:00:01'), code('HF_ERR_VALIDATION'));
    assert.throws(() => normalizeMac('52:54:00:aa:bb'), code('HF_ERR_VALIDATION'));
    assert.throws(() => normalizeMac('00:00:00:00:00:00'), code('HF_ERR_VALIDATION'));
  });

  it('random MACs carry the 52:54:00 prefix and skip taken ones', () => {
    const seq = [Buffer.from([1, 2, 3]), Buffer.from([1, 2, 3]), Buffer.from([4, 5, 6])];
    let i = 0;
    const rand = () => seq[Math.min(i++, seq.length - 1)]!;
    const taken = new Set(['52:54:00:01:02:03']);
    assert.equal(randomMac(taken, rand), '52:54:00:04:05:06');
    const m = randomMac(new Set());
    assert.match(m, /^52:54:00(:[0-9a-f]{2}){3}$/);
  });
});

describe('bridge MACs', () => {
  it('are fixed per bridge name, unicast and locally administered, and differ between bridges', () => {
    const a = bridgeMac('hf3a7cb-default');
    assert.match(a, /^02(:[0-9a-f]{2}){5}$/);
    assert.equal(bridgeMac('hf3a7cb-default'), a);
    assert.notEqual(bridgeMac('hf3a7cb-lab'), a);
  });
});

describe('names of kernel objects', () => {
  it('tags: none on the default data directory, 4 hex digits elsewhere, stable', () => {
    assert.equal(tagFor('/var/lib/hyperfold'), '');
    assert.equal(tagFor('/var/lib/hyperfold/'), '');
    const t = tagFor('/tmp/hf-test-abc');
    assert.match(t, /^[0-9a-f]{4}$/);
    assert.equal(tagFor('/tmp/hf-test-abc'), t);
    assert.notEqual(tagFor('/tmp/hf-test-abd'), t);
  });

  it('keeps every interface name within 15 characters', () => {
    for (const tag of ['', 'beef']) {
      const n = new NetNames(tag);
      for (const net of ['default', 'a', 'a-very-long-network-name-indeed']) {
        assert.ok(n.bridge(net).length <= 15, n.bridge(net));
        assert.ok(n.vlan(net).length <= 15);
      }
      assert.ok(n.tap('4f6c2a1e-0000-4000-8000-000000000000', 'eth0').length <= 15);
      assert.ok(n.veth('x', 'eth12').length <= 15);
    }
    assert.equal(new NetNames('').bridge('default'), 'hfb-default');
    assert.equal(new NetNames('beef').bridge('default'), 'hfbeefb-default');
    assert.notEqual(new NetNames('').bridge('long-name-number-one'), new NetNames('').bridge('long-name-number-two'));
  });

  it('tells its own objects from those of another daemon (tagged or not)', () => {
    const prod = new NetNames('');
    const b = new NetNames('b123');
    const c = new NetNames('c456');
    for (const name of [b.bridge('default'), b.tap('id', 'eth0'), b.veth('id', 'eth0'), b.vethPeer('id', 'eth0'), b.vlan('x')]) {
      assert.ok(b.ownsLink(name), name);
      assert.ok(!prod.ownsLink(name), `production must not own ${name}`);
      assert.ok(!c.ownsLink(name), `another tag must not own ${name}`);
    }
    for (const name of [prod.bridge('default'), prod.tap('id', 'eth0'), prod.veth('id', 'eth0')]) {
      assert.ok(prod.ownsLink(name), name);
      assert.ok(!b.ownsLink(name), name);
    }
    for (const foreign of ['eth0', 'lo', 'hfzzz', 'docker0', 'hf', 'hft123']) assert.ok(!prod.ownsLink(foreign) && !b.ownsLink(foreign), foreign);
    assert.ok(b.ownsNetns(b.netns('web1')) && !prod.ownsNetns(b.netns('web1')));
    assert.equal(prod.table, 'hyperfold');
    assert.equal(b.table, 'hyperfold_b123');
  });
});

describe('firewall rule specs', () => {
  it('parses tcp/80, ranges, icmp and all', () => {
    assert.deepEqual(parseRuleSpec('tcp/80'), { protocol: 'tcp', port: '80' });
    assert.deepEqual(parseRuleSpec('UDP/5000-5100'), { protocol: 'udp', port: '5000-5100' });
    assert.deepEqual(parseRuleSpec('icmp'), { protocol: 'icmp' });
    assert.deepEqual(parseRuleSpec('any'), { protocol: 'all' });
    for (const bad of ['icmp/8', 'http', 'tcp/', 'tcp/80/90']) assert.throws(() => parseRuleSpec(bad), code('HF_ERR_VALIDATION'), bad);
  });

  it('turns API bodies into rules, checking ports and sources', () => {
    assert.deepEqual(parseFirewallRule({ action: 'deny', protocol: 'tcp', port: '80' }), { action: 'deny', protocol: 'tcp', ports: { from: 80, to: 80 } });
    assert.deepEqual(parseFirewallRule({ action: 'allow', protocol: 'udp', port: 53, from: '10.0.0.0/8' }), { action: 'allow', protocol: 'udp', ports: { from: 53, to: 53 }, from: '10.0.0.0/8' });
    assert.equal(parseFirewallRule({ action: 'allow', from: '192.0.2.7' }).from, '192.0.2.7/32');
    assert.throws(() => parseFirewallRule({ action: 'allow', protocol: 'tcp', port: '90-80' }), code('HF_ERR_VALIDATION'));
    assert.throws(() => parseFirewallRule({ action: 'allow', protocol: 'tcp', port: 70000 }), code('HF_ERR_VALIDATION'));
    assert.throws(() => parseFirewallRule({ action: 'allow', protocol: 'icmp', port: 1 }), code('HF_ERR_VALIDATION'));
    assert.throws(() => parseFirewallRule({ action: 'allow', from: '10.0.0.1/8' }), code('HF_ERR_VALIDATION'));
  });
});
