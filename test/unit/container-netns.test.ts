import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { planNetnsTransplant, planNicPlug } from '../../src/drivers/container/netns.js';

describe('container network namespace handoff plan', () => {
  it('moves every non-loopback link with its IPv4 addresses and the gateway routes', () => {
    const addrs = [
      { ifname: 'lo', link_type: 'loopback', addr_info: [{ family: 'inet', local: '127.0.0.1', prefixlen: 8, scope: 'host' }] },
      {
        ifname: 'eth0',
        link_type: 'ether',
        addr_info: [
          { family: 'inet', local: '10.227.227.2', prefixlen: 24, scope: 'global' },
          { family: 'inet6', local: 'fe80::1', prefixlen: 64, scope: 'link' },
        ],
      },
      { ifname: 'eth1', link_type: 'ether', addr_info: [] },
    ];
    const routes = [
      { dst: 'default', gateway: '10.227.227.1', dev: 'eth0' },
      { dst: '10.227.227.0/24', dev: 'eth0', prefsrc: '10.227.227.2' },
      { dst: '192.168.5.0/24', gateway: '10.9.9.1', dev: 'wg0' },
    ];
    const plan = planNetnsTransplant(addrs, routes);
    assert.deepEqual(plan.links, [
      { name: 'eth0', addresses: ['10.227.227.2/24'] },
      { name: 'eth1', addresses: [] },
    ]);
    // the connected route comes back with the address; a route via a device we do not move is dropped
    assert.deepEqual(plan.routes, [{ dst: 'default', gateway: '10.227.227.1', dev: 'eth0' }]);
  });

  it('an empty namespace gives an empty plan', () => {
    assert.deepEqual(planNetnsTransplant([{ ifname: 'lo', link_type: 'loopback' }], []), { links: [], routes: [] });
  });

  it('hot-plug: moves the peer into the container by pid, names, addresses and routes it there', () => {
    const steps = planNicPlug(4242, 'hfp1234abcd', { name: 'eth1', mac: '52:54:00:aa:bb:cc', address: '10.1.2.3/24', gateway: '10.1.2.1' });
    const ns = ['nsenter', '-t', '4242', '-n'];
    assert.deepEqual(steps[0], { argv: ['ip', 'link', 'set', 'dev', 'hfp1234abcd', 'netns', '4242'] }, 'moved from the host first');
    assert.deepEqual(
      steps.slice(1).map((s) => s.argv.slice(0, 4)),
      steps.slice(1).map(() => ns),
      'everything else inside the container',
    );
    const inside = steps.slice(1).map((s) => s.argv.slice(4).join(' '));
    assert.deepEqual(inside, [
      'ip link set dev hfp1234abcd name eth1',
      'ip link set dev eth1 address 52:54:00:aa:bb:cc',
      'sysctl -q -w net.ipv6.conf.eth1.disable_ipv6=1',
      'ip addr add 10.1.2.3/24 dev eth1',
      'ip link set dev eth1 up',
      'ip route add default via 10.1.2.1 dev eth1',
    ]);
    // A second NIC finds the default route of the first: that is fine, anything else is not.
    const route = steps.at(-1)!;
    assert.ok(route.tolerate instanceof RegExp && route.tolerate.test('RTNETLINK answers: File exists'));
    assert.equal(steps.find((s) => s.argv.includes('addr'))!.tolerate, undefined);
  });

  it('hot-plug on a bridged network: no address, no route', () => {
    const inside = planNicPlug(7, 'p', { name: 'eth0', mac: '52:54:00:00:00:01' }).map((s) => s.argv.join(' '));
    assert.ok(!inside.some((a) => / addr add | route /.test(a)), inside.join('\n'));
    assert.ok(inside.some((a) => a.endsWith('ip link set dev eth0 up')));
  });
});
