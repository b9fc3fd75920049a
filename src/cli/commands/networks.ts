// Network verbs: `network` (create, list, info, delete), `nic` (add, remove, list), `firewall`
// (add, remove, list, policy) and `forward` (add, remove, list). Thin calls to the REST API.
import type { Operation } from '../../core/model/operation.js';
import type { Firewall, Forward, NetworkView, NicAddress } from '../../network/model.js';
import { parseRuleSpec } from '../../network/firewall.js';
import type { NicConfig } from '../../core/model/instance.js';
import { ApiError } from '../client.js';
import type { CliContext } from '../context.js';
import { table } from '../format.js';

function modeText(n: NetworkView): string {
  if (n.mode !== 'bridged') return n.mode;
  return `bridged to ${n.uplink ?? '?'}${n.vlan !== undefined ? ` (VLAN ${n.vlan})` : ''}`;
}

function ruleText(r: Firewall['rules'][number]): string {
  const ports = r.ports ? (r.ports.from === r.ports.to ? `/${r.ports.from}` : `/${r.ports.from}-${r.ports.to}`) : '';
  return `${r.action.padEnd(5)} ${r.protocol}${ports}${r.from ? ` from ${r.from}` : ''}`;
}

function toInt(what: string): (v: string) => number {
  return (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n)) throw new ApiError(400, 'HF_ERR_VALIDATION', `${what}: "${v}" is not a whole number`);
    return n;
  };
}

export function registerNetworkCommands(ctx: CliContext): void {
  // ---- network -------------------------------------------------------------------------------
  const network = ctx.program.command('network').description('networks: NAT (default), isolated, or bridged to a host interface');

  network
    .command('create <name>')
    .description('create a network, e.g. `network create lab --subnet 10.20.30.0/24 --isolated`')
    .option('--subnet <cidr>', 'IPv4 subnet (nat, isolated); chosen automatically when absent')
    .option('--nat', 'NAT to the host uplink (the default)')
    .option('--isolated', 'no uplink: instances reach each other and the host only')
    .option('--bridge-to <iface>', 'bridge to this host interface (or existing bridge); addresses come from that network')
    .option('--vlan <id>', 'with --bridge-to: 802.1Q VLAN id (1-4094)', toInt('--vlan'))
    .option('--description <text>', 'free text')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (name: string, o: { subnet?: string; nat?: boolean; isolated?: boolean; bridgeTo?: string; vlan?: number; description?: string; format: string }) => {
      const modes = [o.nat && 'nat', o.isolated && 'isolated', o.bridgeTo && 'bridged'].filter(Boolean);
      if (modes.length > 1) throw new ApiError(400, 'HF_ERR_VALIDATION', 'choose one of --nat, --isolated and --bridge-to');
      const body: Record<string, unknown> = { name };
      if (o.subnet) body.subnet = o.subnet;
      if (o.isolated) body.mode = 'isolated';
      if (o.nat) body.mode = 'nat';
      if (o.bridgeTo) body.bridgeTo = o.bridgeTo;
      if (o.vlan !== undefined) body.vlan = o.vlan;
      if (o.description) body.description = o.description;
      const { network: n } = await ctx.client().request<{ network: NetworkView }>('POST', '/api/v1/networks', body);
      ctx.print(n, o.format, () => `created network ${n.name}: ${modeText(n)}${n.subnet ? ` ${n.subnet} (gateway ${n.gateway})` : ''}, bridge ${n.bridge}`);
    });

  network
    .command('list')
    .alias('ls')
    .description('list networks')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (o: { format: string }) => {
      const { networks } = await ctx.client().request<{ networks: NetworkView[] }>('GET', '/api/v1/networks');
      ctx.print(networks, o.format, () =>
        table(
          ['NAME', 'MODE', 'SUBNET', 'GATEWAY', 'BRIDGE', 'NICS'],
          networks.map((n) => [n.name, modeText(n), n.subnet ?? '-', n.gateway ?? '-', n.bridge, String(n.usedBy.length)]),
        ),
      );
    });

  network
    .command('info <name>')
    .description('show a network and the NICs on it')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (name: string, o: { format: string }) => {
      const { network: n } = await ctx.client().request<{ network: NetworkView }>('GET', `/api/v1/networks/${name}`);
      const { addresses } = await ctx.client().request<{ addresses: NicAddress[] }>('GET', '/api/v1/addresses');
      ctx.print({ ...n, addresses: addresses.filter((a) => a.network === name) }, o.format, () => {
        const lines = [
          `Name:        ${n.name}`,
          `Mode:        ${modeText(n)}`,
          `Subnet:      ${n.subnet ?? '-'}`,
          `Gateway:     ${n.gateway ?? '-'}`,
          `Bridge:      ${n.bridge}${n.external ? ' (existing host bridge)' : ''}`,
          `DNS domain:  ${n.domain ?? '-'}`,
          `dnsmasq:     ${n.mode === 'bridged' ? '- (addresses come from the bridged network)' : n.dnsmasqPid ? `running (pid ${n.dnsmasqPid})` : 'not running'}`,
          `Description: ${n.description || '-'}`,
          'NICs:',
        ];
        if (!n.usedBy.length) lines.push('  (none)');
        for (const u of n.usedBy) {
          const a = addresses.find((x) => x.instance === u.instance && x.nic === u.nic);
          lines.push(`  ${u.instance}/${u.nic}  ${u.mac}  ${a?.ip ?? u.ip ?? '-'}${a?.ip ? ` (${a.source})` : u.ip ? ' (reserved)' : ''}`);
        }
        return lines.join('\n');
      });
    });

  network
    .command('delete <name>')
    .alias('rm')
    .description('delete a network (refused while NICs use it)')
    .action(async (name: string) => {
      await ctx.client().request('DELETE', `/api/v1/networks/${name}`);
      console.log(`deleted network ${name}`);
    });

  // ---- nic -----------------------------------------------------------------------------------
  const nic = ctx.program.command('nic').description("an instance's network interfaces (hot-plugged while it runs)");

  nic
    .command('add <instance>')
    .description('add a NIC on a network; a running VM or container gets it at once')
    .requiredOption('--network <name>', 'network to attach to')
    .option('--name <nic>', 'NIC name (default: the first free ethN)')
    .option('--mac <mac>', 'MAC address (default: a unique 52:54:00:xx:xx:xx)')
    .option('--ip <ip>', 'reserve this address (managed networks)')
    .option('--no-wait', 'return once the operation is queued')
    .action(async (instance: string, o: { network: string; name?: string; mac?: string; ip?: string; wait?: boolean }) => {
      const body: Record<string, unknown> = { network: o.network };
      if (o.name) body.name = o.name;
      if (o.mac) body.mac = o.mac;
      if (o.ip) body.ip = o.ip;
      const { operation } = await ctx.client().request<{ operation: Operation }>('POST', `/api/v1/instances/${instance}/nics`, body);
      const done = await ctx.follow(operation, { wait: o.wait });
      if (o.wait !== false) {
        const r = done.result as { nic?: NicConfig; live?: boolean } | undefined;
        if (r?.nic) console.log(`added ${r.nic.name} on ${r.nic.network} (${r.nic.mac}${r.nic.ip ? `, ${r.nic.ip}` : ''})${r.live ? '' : ': created at the next start'}`);
      }
    });

  nic
    .command('remove <instance> <nic>')
    .alias('rm')
    .description('remove a NIC (a running guest must let go of it)')
    .option('--no-wait', 'return once the operation is queued')
    .action(async (instance: string, name: string, o: { wait?: boolean }) => {
      const { operation } = await ctx.client().request<{ operation: Operation }>('DELETE', `/api/v1/instances/${instance}/nics/${name}`);
      await ctx.follow(operation, { wait: o.wait });
      if (o.wait !== false) console.log(`removed ${name} from ${instance}`);
    });

  nic
    .command('list <instance>')
    .alias('ls')
    .description("an instance's NICs and addresses")
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (instance: string, o: { format: string }) => {
      const r = await ctx.client().request<{ nics: NicConfig[]; addresses: NicAddress[] }>('GET', `/api/v1/instances/${instance}/nics`);
      ctx.print(r, o.format, () =>
        table(
          ['NIC', 'NETWORK', 'MAC', 'RESERVED', 'ADDRESS', 'HOST IFACE'],
          r.nics.map((n) => {
            const a = r.addresses.find((x) => x.nic === n.name);
            return [n.name, n.network, n.mac, n.ip ?? '-', a?.ip ? `${a.ip} (${a.source})` : '-', n.hostIface ?? '-'];
          }),
        ),
      );
    });

  // ---- firewall ------------------------------------------------------------------------------
  const firewall = ctx.program.command('firewall').description("an instance's inbound firewall (first matching rule wins, then the policy)");

  const showFirewall = (fw: Firewall): string =>
    [`Inbound policy: ${fw.inbound}`, ...(fw.rules.length ? fw.rules.map((r, i) => `  ${i}  ${ruleText(r)}`) : ['  (no rules)'])].join('\n');

  firewall
    .command('add <instance>')
    .description('add a rule, e.g. `firewall add web1 --deny tcp/80 --from 10.0.0.0/8`')
    .option('--allow <rule>', 'allow: tcp/80, udp/53, tcp/8000-8080, icmp, all')
    .option('--deny <rule>', 'deny (rejects): same forms as --allow')
    .option('--from <cidr>', 'only traffic from this source address or subnet')
    .option('--position <n>', 'insert at this position (0 = first; default last)', toInt('--position'))
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (instance: string, o: { allow?: string; deny?: string; from?: string; position?: number; format: string }) => {
      if (Boolean(o.allow) === Boolean(o.deny)) throw new ApiError(400, 'HF_ERR_VALIDATION', 'give exactly one of --allow RULE and --deny RULE');
      const spec = parseRuleSpec((o.allow ?? o.deny)!);
      const body: Record<string, unknown> = { action: o.allow ? 'allow' : 'deny', protocol: spec.protocol };
      if (spec.port) body.port = spec.port;
      if (o.from) body.from = o.from;
      if (o.position !== undefined) body.position = o.position;
      const { firewall: fw } = await ctx.client().request<{ firewall: Firewall }>('POST', `/api/v1/instances/${instance}/firewall/rules`, body);
      ctx.print(fw, o.format, () => showFirewall(fw));
    });

  firewall
    .command('remove <instance> <index>')
    .alias('rm')
    .description('remove the rule at this position (see `firewall list`)')
    .action(async (instance: string, index: string) => {
      const { firewall: fw } = await ctx.client().request<{ firewall: Firewall }>('DELETE', `/api/v1/instances/${instance}/firewall/rules/${toInt('index')(index)}`);
      console.log(showFirewall(fw));
    });

  firewall
    .command('list <instance>')
    .alias('ls')
    .description('show the rules and the default inbound policy')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (instance: string, o: { format: string }) => {
      const { firewall: fw } = await ctx.client().request<{ firewall: Firewall }>('GET', `/api/v1/instances/${instance}/firewall`);
      ctx.print(fw, o.format, () => showFirewall(fw));
    });

  firewall
    .command('policy <instance> <policy>')
    .description('default inbound policy: allow or deny')
    .action(async (instance: string, policy: string) => {
      if (policy !== 'allow' && policy !== 'deny') throw new ApiError(400, 'HF_ERR_VALIDATION', 'the policy is allow or deny');
      const { firewall: fw } = await ctx.client().request<{ firewall: Firewall }>('PUT', `/api/v1/instances/${instance}/firewall/policy`, { inbound: policy });
      console.log(showFirewall(fw));
    });

  // ---- forward -------------------------------------------------------------------------------
  const forward = ctx.program.command('forward').description('port forwards: a host port to an instance port');

  forward
    .command('add <instance>')
    .description('forward a host port, e.g. `forward add web1 --host-port 8080 --port 80`')
    .requiredOption('--host-port <port>', 'port on the host', toInt('--host-port'))
    .requiredOption('--port <port>', 'port in the instance', toInt('--port'))
    .option('--protocol <proto>', 'tcp or udp', 'tcp')
    .option('--nic <name>', 'which NIC (default: the first on a managed network)')
    .action(async (instance: string, o: { hostPort: number; port: number; protocol: string; nic?: string }) => {
      const body: Record<string, unknown> = { instance, hostPort: o.hostPort, port: o.port, protocol: o.protocol };
      if (o.nic) body.nic = o.nic;
      const { forward: f } = await ctx.client().request<{ forward: Forward }>('POST', '/api/v1/forwards', body);
      console.log(`forwarding ${f.protocol} port ${f.hostPort} to ${f.instance}:${f.port} (${f.nic})`);
    });

  forward
    .command('remove <hostPort>')
    .alias('rm')
    .description('remove the forward of a host port')
    .option('--protocol <proto>', 'tcp or udp', 'tcp')
    .action(async (hostPort: string, o: { protocol: string }) => {
      await ctx.client().request('DELETE', `/api/v1/forwards/${o.protocol}/${toInt('host port')(hostPort)}`);
      console.log(`removed the ${o.protocol} forward of port ${hostPort}`);
    });

  forward
    .command('list [instance]')
    .alias('ls')
    .description('list port forwards')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (instance: string | undefined, o: { format: string }) => {
      const { forwards } = await ctx.client().request<{ forwards: Forward[] }>('GET', `/api/v1/forwards${instance ? `?instance=${encodeURIComponent(instance)}` : ''}`);
      ctx.print(forwards, o.format, () =>
        table(
          ['PROTO', 'HOST PORT', 'INSTANCE', 'NIC', 'PORT'],
          forwards.map((f) => [f.protocol, String(f.hostPort), f.instance, f.nic, String(f.port)]),
        ),
      );
    });
}
