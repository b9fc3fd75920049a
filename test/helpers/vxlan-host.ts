// Runs the host-side network code inside a network namespace, as a daemon on that "host" would:
// `ip netns exec NS node vxlan-host.js '<json array of steps>'`. The iproute2, nft and /proc/sys
// calls of the library then act on that namespace only. Prints the results as one JSON array.
import { LinuxNetHost } from '../../src/network/host.js';
import { applyVxlanFilter, ensureVxlan, readFdb, removeVxlan, syncFdb, syncNeighbours, underlayOf, type FdbWant, type NeighbourWant, type VxlanFilterSpec, type VxlanSpec } from '../../src/network/vxlan.js';
import { silentLogger } from '../../src/util/log.js';

export type HostStep =
  | { op: 'bridge'; bridge: string; address: string; mtu: number }
  | { op: 'port'; iface: string; bridge: string }
  | { op: 'underlay'; address: string }
  | { op: 'vxlan'; spec: VxlanSpec }
  | { op: 'filter'; spec: VxlanFilterSpec }
  | { op: 'fdb'; dev: string; want: FdbWant[] }
  | { op: 'read-fdb'; dev: string }
  | { op: 'neigh'; bridge: string; want: NeighbourWant[] }
  | { op: 'remove'; dev: string };

const host = new LinuxNetHost(silentLogger);

async function step(s: HostStep): Promise<unknown> {
  switch (s.op) {
    case 'bridge':
      await host.enableForwarding();
      return host.ensureBridge(s.bridge, { address: s.address, mtu: s.mtu });
    case 'port':
      // As an instance's port: isolated (see host.ts).
      return host.setMaster(s.iface, s.bridge, { isolated: true });
    case 'underlay':
      return underlayOf(s.address);
    case 'vxlan':
      return ensureVxlan(s.spec);
    case 'filter':
      return applyVxlanFilter(s.spec);
    case 'fdb':
      return syncFdb(s.dev, s.want);
    case 'read-fdb':
      return readFdb(s.dev);
    case 'neigh':
      return syncNeighbours(s.bridge, s.want);
    case 'remove':
      return removeVxlan(s.dev);
  }
}

const out: unknown[] = [];
for (const s of JSON.parse(process.argv[2] ?? '[]') as HostStep[]) out.push((await step(s)) ?? null);
process.stdout.write(JSON.stringify(out));
