// The nftables ruleset: one pure builder that turns the desired state (networks, NICs, firewall
// rules, port forwards) into one nft script, applied atomically (`nft -f`): the script creates
// both of Hyperfold's tables, deletes them and declares them again in a single transaction, so
// the kernel goes from the old ruleset to the new one with no moment in between, and anything a
// crash or a hand edit left in those tables is gone. Nothing outside them is ever touched.
//
//  table inet <T>     L3: NAT (masquerade), port forwards (DNAT in prerouting and output),
//                     isolation between networks, per-instance inbound firewall (stateful,
//                     keyed by the instance's reserved address).
//  table bridge <T>   L2: anti-spoofing on every instance port (source MAC, ARP sender, source
//                     IPv4; everything else from the port is dropped on managed networks).
//
// Within a managed network instance ports are isolated bridge ports and the bridge answers ARP
// for the subnet (proxy ARP), so traffic between two instances is routed through the host and
// meets the same firewall chains as traffic from anywhere else.
import { run } from '../util/exec.js';
import type { FirewallRule, NetworkMode } from './model.js';
import { NetNames } from './names.js';

export interface RulesetNetwork {
  name: string;
  mode: NetworkMode;
  bridge: string;
  subnet?: string | undefined;
}

export interface RulesetNic {
  instance: string;
  nic: string;
  /** Host-side interface (tap or veth): the bridge port the instance's frames come in on. */
  hostIface: string;
  mac: string;
  /** Reserved address (managed networks); absent on bridged networks (MAC checks only). */
  ip?: string | undefined;
  managed: boolean;
}

export interface RulesetFirewall {
  instance: string;
  inbound: 'allow' | 'deny';
  rules: FirewallRule[];
  /** The instance's reserved addresses: inbound traffic to them goes through its chain. */
  ips: string[];
}

export interface RulesetForward {
  protocol: 'tcp' | 'udp';
  hostPort: number;
  ip: string;
  port: number;
}

export interface RulesetSpec {
  table: string;
  networks: RulesetNetwork[];
  nics: RulesetNic[];
  firewalls: RulesetFirewall[];
  forwards: RulesetForward[];
}

const q = (s: string): string => `"${s.replace(/["\\]/g, '')}"`;

export function antiSpoofChain(hostIface: string): string {
  return `as_${NetNames.chainId(hostIface)}`;
}

export function firewallChain(instance: string): string {
  return `fw_${NetNames.chainId(instance)}`;
}

/** nft matches for one firewall rule, then its verdict. */
export function firewallRuleText(r: FirewallRule): string {
  const m: string[] = [];
  if (r.from) m.push(`ip saddr ${r.from}`);
  const ports = r.ports ? (r.ports.from === r.ports.to ? String(r.ports.from) : `${r.ports.from}-${r.ports.to}`) : undefined;
  switch (r.protocol) {
    case 'tcp':
    case 'udp':
      m.push(ports ? `${r.protocol} dport ${ports}` : `meta l4proto ${r.protocol}`);
      break;
    case 'icmp':
      m.push('meta l4proto icmp');
      break;
    case 'all':
      break;
  }
  let verdict: string;
  if (r.action === 'allow') verdict = 'return';
  else if (r.protocol === 'tcp') verdict = 'reject with tcp reset';
  else if (r.protocol === 'icmp') verdict = 'drop';
  else verdict = 'reject';
  return [...m, 'counter', verdict].join(' ');
}

/** The whole script: replace both tables atomically. */
export function buildRuleset(spec: RulesetSpec): string {
  const T = spec.table;
  const out: string[] = [];
  const line = (indent: number, s: string): void => {
    out.push('  '.repeat(indent) + s);
  };
  // Create-then-delete makes the delete safe whether or not the tables exist.
  line(0, `add table inet ${T}`);
  line(0, `delete table inet ${T}`);
  line(0, `add table bridge ${T}`);
  line(0, `delete table bridge ${T}`);
  if (spec.networks.length === 0) return out.join('\n') + '\n';

  const managed = spec.networks.filter((n) => n.mode !== 'bridged');
  const bridges = managed.map((n) => n.bridge);

  // ---- inet ------------------------------------------------------------------------------
  line(0, `table inet ${T} {`);

  // Managed bridges have route_localnet (so that forwards work from the host through
  // 127.0.0.1): never let an instance address the host's loopback through it.
  line(1, 'chain guard_in {');
  line(2, 'type filter hook prerouting priority raw; policy accept;');
  if (bridges.length) {
    const set = `{ ${bridges.map(q).join(', ')} }`;
    line(2, `iifname ${set} ip daddr 127.0.0.0/8 counter drop`);
    line(2, `iifname ${set} ip saddr 127.0.0.0/8 counter drop`);
  }
  line(1, '}');

  // Port forwards: from anywhere to a local address (prerouting), and from the host itself (output).
  for (const [chain, hook, prio] of [
    ['forward_in', 'prerouting', 'dstnat'],
    ['forward_local', 'output', '-100'],
  ] as const) {
    line(1, `chain ${chain} {`);
    line(2, `type nat hook ${hook} priority ${prio}; policy accept;`);
    for (const f of spec.forwards) {
      line(2, `meta nfproto ipv4 fib daddr type local ${f.protocol} dport ${f.hostPort} counter dnat ip to ${f.ip}:${f.port}`);
    }
    line(1, '}');
  }

  line(1, 'chain nat_out {');
  line(2, 'type nat hook postrouting priority srcnat; policy accept;');
  for (const n of managed) {
    // Forwards used from the host through 127.0.0.1 leave with a loopback source: rewrite it.
    line(2, `oifname ${q(n.bridge)} ip saddr 127.0.0.0/8 counter masquerade`);
  }
  for (const n of managed) {
    if (n.mode !== 'nat' || !n.subnet) continue;
    line(2, `ip saddr ${n.subnet} ip daddr != ${n.subnet} oifname != ${q(n.bridge)} counter masquerade`);
  }
  line(1, '}');

  const fwByInstance = spec.firewalls.filter((f) => f.ips.length > 0);
  for (const fw of fwByInstance) {
    line(1, `chain ${firewallChain(fw.instance)} {`);
    for (const r of fw.rules) line(2, firewallRuleText(r));
    if (fw.inbound === 'deny') line(2, 'counter drop');
    line(1, '}');
  }

  line(1, 'chain filter_forward {');
  line(2, 'type filter hook forward priority filter; policy accept;');
  line(2, 'ct state established,related accept');
  for (const fw of fwByInstance) {
    line(2, `ip daddr ${ipSet(fw.ips)} jump ${firewallChain(fw.instance)}`);
  }
  for (const n of managed) {
    const others = bridges.filter((b) => b !== n.bridge);
    const br = q(n.bridge);
    if (others.length) line(2, `iifname ${br} oifname { ${others.map(q).join(', ')} } counter drop`);
    if (n.mode === 'isolated') {
      // No uplink: nothing is routed in or out, except what a port forward sends in on purpose.
      line(2, `iifname ${br} oifname != ${br} ct status dnat accept`);
      line(2, `iifname ${br} oifname != ${br} counter drop`);
      line(2, `oifname ${br} iifname != ${br} ct status dnat accept`);
      line(2, `oifname ${br} iifname != ${br} counter drop`);
    } else {
      // NAT: out freely; in only as replies (established, above) or through a port forward.
      line(2, `oifname ${br} iifname != ${br} ct status dnat accept`);
      line(2, `oifname ${br} iifname != ${br} counter drop`);
    }
  }
  line(1, '}');

  line(1, 'chain filter_output {');
  line(2, 'type filter hook output priority filter; policy accept;');
  line(2, 'ct state established,related accept');
  line(2, 'udp sport 67 udp dport 68 accept');
  for (const fw of fwByInstance) {
    line(2, `ip daddr ${ipSet(fw.ips)} jump ${firewallChain(fw.instance)}`);
  }
  line(1, '}');
  line(0, '}');

  // ---- bridge: anti-spoofing ---------------------------------------------------------------
  line(0, `table bridge ${T} {`);
  for (const nic of spec.nics) {
    line(1, `chain ${antiSpoofChain(nic.hostIface)} {`);
    line(2, `ether saddr != ${nic.mac} counter drop`);
    line(2, `arp saddr ether != ${nic.mac} counter drop`);
    if (nic.managed && nic.ip) {
      line(2, `arp saddr ip != { ${nic.ip}, 0.0.0.0 } counter drop`);
      line(2, 'ether type arp accept');
      line(2, `ip saddr ${nic.ip} accept`);
      line(2, 'ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept');
      line(2, 'counter drop');
    } else {
      line(2, 'ether type vlan counter drop');
    }
    line(1, '}');
  }
  line(1, 'chain prerouting {');
  line(2, 'type filter hook prerouting priority filter; policy accept;');
  for (const nic of spec.nics) line(2, `iifname ${q(nic.hostIface)} jump ${antiSpoofChain(nic.hostIface)}`);
  line(1, '}');
  line(0, '}');
  return out.join('\n') + '\n';
}

function ipSet(ips: string[]): string {
  return ips.length === 1 ? ips[0]! : `{ ${ips.join(', ')} }`;
}

/** Applies a script with `nft -f -` (one transaction: all or nothing). */
export async function applyRuleset(script: string, nftBinary = 'nft'): Promise<void> {
  await run(nftBinary, ['-f', '-'], { input: script, timeoutMs: 30_000 });
}

/** Deletes both tables (nothing Hyperfold-made remains in nftables). */
export async function deleteTables(table: string, nftBinary = 'nft'): Promise<void> {
  await applyRuleset(`add table inet ${table}\ndelete table inet ${table}\nadd table bridge ${table}\ndelete table bridge ${table}\n`, nftBinary);
}

/** The text of one of our tables, or '' when it does not exist. */
export async function listTable(family: 'inet' | 'bridge', table: string, nftBinary = 'nft'): Promise<string> {
  const r = await run(nftBinary, ['list', 'table', family, table], { allowFailure: true, timeoutMs: 10_000 });
  return r.code === 0 ? r.stdout : '';
}
