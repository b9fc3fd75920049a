import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { planNetnsTransplant } from '../../src/drivers/container/netns.js';

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
});
