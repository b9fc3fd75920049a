// The host side of one network: its bridge (with the gateway address for managed networks), the
// uplink or VLAN sub-interface of a bridged one, and dnsmasq. Idempotent: the same call creates a
// network and repairs one whose objects a crash or a reboot took away.
import { mkdir } from 'node:fs/promises';
import { parseCidr } from '../../network/cidr.js';
import { buildDnsmasqArgv } from '../../network/dnsmasq.js';
import type { LinkInfo } from '../../network/host.js';
import type { Network } from '../../network/model.js';
import type { UndoStack } from '../../util/undo.js';
import type { NetContext } from './context.js';
import { spans } from './overlay.js';

/**
 * Creates (or repairs) a network's bridge, uplink and dnsmasq; registers the undo of what it
 * created. `links`: a listing of the host's links taken just before, when the caller has one.
 */
export async function bringUp(c: NetContext, net: Network, undo?: UndoStack, links?: LinkInfo[]): Promise<void> {
  const host = c.d.host;
  links ??= await host.listLinks();
  const has = (n: string) => links.some((l) => l.name === n);
  if (!net.external) {
    const current = links.find((l) => l.name === net.bridge) ?? null;
    const address = net.subnet && net.gateway ? `${net.gateway}/${parseCidr(net.subnet).prefix}` : undefined;
    if (!current) undo?.add(`delete bridge ${net.bridge}`, () => host.deleteLink(net.bridge));
    await host.ensureBridge(net.bridge, { address, current, mtu: net.mtu });
  }
  if (net.mode === 'bridged' && !net.external && net.uplink) {
    let port = net.uplink;
    if (net.vlan !== undefined) {
      port = c.d.names.vlan(net.name);
      if (!has(port)) {
        await host.createVlan(port, net.uplink, net.vlan);
        undo?.add(`delete VLAN interface ${port}`, () => host.deleteLink(port));
      }
    }
    const cur = links.find((l) => l.name === port);
    if (cur?.master !== net.bridge) {
      await host.setMaster(port, net.bridge, { isolated: false });
      const p = port;
      undo?.add(`release ${p}`, () => host.setMaster(p, null, { isolated: false }));
    }
  }
  if (net.mode !== 'bridged') {
    if (net.mode === 'nat') await host.enableForwarding();
    const files = c.files(net.name);
    await mkdir(files.dir, { recursive: true, mode: 0o700 });
    if ((await c.syncHostsFile(net.name)) && host.dhcpPid(net.name) !== undefined) host.reloadDhcp(net.name);
    if (host.dhcpPid(net.name) === undefined) {
      await host.startDhcp(net.name, buildDnsmasqArgv(net, files), files);
      undo?.add(`stop dnsmasq of ${net.name}`, () => host.stopDhcp(net.name));
    }
  }
  // In a cluster, the bridge joins the network's tunnel now rather than at the next store change.
  if (c.overlay && spans(net)) await c.overlay.kick();
}

/** Removes what bringUp made (an external bridge stays: it is the host's). */
export async function tearDown(c: NetContext, net: Network): Promise<void> {
  const host = c.d.host;
  if (net.vlan !== undefined) await host.deleteLink(c.d.names.vlan(net.name));
  else if (net.mode === 'bridged' && net.uplink && !net.external) await host.setMaster(net.uplink, null, { isolated: false });
  if (!net.external) await host.deleteLink(net.bridge);
  // The tunnel port (a port outlives its bridge); its filter table goes with it.
  if (net.vni !== undefined) await (c.overlay ? c.overlay.removeTunnel(net.name) : host.deleteLink(c.d.names.vxlan(net.name)));
}
