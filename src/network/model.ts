// The network model: what the state store keeps about networks, address reservations, firewall
// rules and port forwards, and the bodies the API accepts. Zod schemas, like the instance model.
import { z } from 'zod';
import { nameSchema } from '../core/model/instance.js';

export const NETWORK_MODES = ['nat', 'isolated', 'bridged'] as const;
export type NetworkMode = (typeof NETWORK_MODES)[number];

const ifnameSchema = z.string().regex(/^[A-Za-z0-9_.:-]{1,15}$/, { message: 'an interface name is 1 to 15 letters, digits, "_", ".", ":" or "-"' });

export const networkSchema = z.object({
  name: nameSchema,
  mode: z.enum(NETWORK_MODES),
  /** Managed networks (nat, isolated): the IPv4 subnet in CIDR notation. */
  subnet: z.string().optional(),
  /** Managed networks: the host's address on the bridge (router, DHCP and DNS server). */
  gateway: z.string().optional(),
  /** The Linux bridge instances' NICs join. */
  bridge: ifnameSchema,
  /** Bridged networks: the host interface put into the bridge (or the existing bridge used). */
  uplink: ifnameSchema.optional(),
  /** Bridged networks on an existing host bridge: Hyperfold neither creates nor deletes it. */
  external: z.boolean().default(false),
  /** Bridged networks: 802.1Q VLAN id on the uplink. */
  vlan: z.number().int().min(1).max(4094).optional(),
  /**
   * Managed networks: the VXLAN id that carries the network between the hosts of a cluster,
   * unique in the store (records made before clusters have none and stay on their host).
   */
  vni: z.number().int().min(1).max(0xffffff).optional(),
  /**
   * The MTU of the bridge and of every NIC (DHCP guests learn it, option 26); absent: the
   * kernel's default. A network spanning hosts gets the underlay's MTU − 50 (VXLAN's headers).
   */
  mtu: z.number().int().min(576).max(65535).optional(),
  /** DNS domain dnsmasq answers for (instance names resolve in it). */
  domain: z.string().optional(),
  description: z.string().default(''),
  createdAt: z.string(),
});
export type Network = z.infer<typeof networkSchema>;

export const createNetworkSchema = z
  .object({
    name: nameSchema.describe('network name'),
    mode: z.enum(NETWORK_MODES).optional().describe('nat (default), isolated (no uplink) or bridged (needs bridgeTo)'),
    subnet: z.string().optional().describe('IPv4 subnet, e.g. 10.20.30.0/24; chosen automatically when absent (nat, isolated)'),
    bridgeTo: ifnameSchema.optional().describe('bridged: host interface (or existing bridge) to bridge the network to'),
    vlan: z.number({ invalid_type_error: 'vlan must be a number' }).int().describe('bridged: 802.1Q VLAN id (1-4094) on the uplink').optional(),
    description: z.string().max(1024).default(''),
  })
  .strict();
export type CreateNetworkRequest = z.input<typeof createNetworkSchema>;

/** One address reserved for one NIC (key: network@ip). */
export const ipReservationSchema = z.object({
  network: z.string(),
  ip: z.string(),
  mac: z.string(),
  instance: z.string(),
  nic: z.string(),
});
export type IpReservation = z.infer<typeof ipReservationSchema>;

/** One MAC address in use on this host (key: the MAC). */
export const macReservationSchema = z.object({
  mac: z.string(),
  instance: z.string(),
  nic: z.string(),
  network: z.string().optional(),
});
export type MacReservation = z.infer<typeof macReservationSchema>;

export const FW_PROTOCOLS = ['tcp', 'udp', 'icmp', 'all'] as const;
export type FwProtocol = (typeof FW_PROTOCOLS)[number];

export const firewallRuleSchema = z.object({
  action: z.enum(['allow', 'deny']),
  protocol: z.enum(FW_PROTOCOLS),
  /** Destination port or range (tcp, udp). */
  ports: z.object({ from: z.number().int().min(1).max(65535), to: z.number().int().min(1).max(65535) }).optional(),
  /** Source subnet (CIDR) the rule applies to; absent: any source. */
  from: z.string().optional(),
});
export type FirewallRule = z.infer<typeof firewallRuleSchema>;

export const firewallSchema = z.object({
  instance: nameSchema,
  /** What happens to inbound traffic no rule matches. */
  inbound: z.enum(['allow', 'deny']).default('allow'),
  rules: z.array(firewallRuleSchema).default([]),
});
export type Firewall = z.infer<typeof firewallSchema>;

/** A firewall rule as the API takes it: the port may be "80", 80 or "8000-8080". */
export const addFirewallRuleSchema = z
  .object({
    action: z.enum(['allow', 'deny']),
    protocol: z.enum(FW_PROTOCOLS).default('tcp'),
    port: z.union([z.number().int(), z.string()]).optional(),
    from: z.string().optional(),
    /** Position in the rule list (0 = first); default: last. */
    position: z.number().int().min(0).optional(),
  })
  .strict();
export type AddFirewallRuleRequest = z.input<typeof addFirewallRuleSchema>;

export const firewallPolicySchema = z.object({ inbound: z.enum(['allow', 'deny']) }).strict();

export const forwardSchema = z.object({
  protocol: z.enum(['tcp', 'udp']),
  hostPort: z.number().int().min(1).max(65535),
  instance: nameSchema,
  nic: z.string(),
  port: z.number().int().min(1).max(65535),
  createdAt: z.string(),
});
export type Forward = z.infer<typeof forwardSchema>;

export const createForwardSchema = z
  .object({
    instance: nameSchema,
    hostPort: z.number().int().min(1, { message: 'hostPort must be 1-65535' }).max(65535, { message: 'hostPort must be 1-65535' }),
    port: z.number().int().min(1, { message: 'port must be 1-65535' }).max(65535, { message: 'port must be 1-65535' }),
    protocol: z.enum(['tcp', 'udp']).default('tcp'),
    /** Which NIC (its address) receives the traffic; default: the first on a managed network. */
    nic: nameSchema.optional(),
  })
  .strict();

export const nicRequestSchema = z
  .object({
    network: z.string().min(1),
    name: nameSchema.optional(),
    mac: z.string().optional(),
    ip: z.string().optional(),
  })
  .strict();
export type NicRequest = z.infer<typeof nicRequestSchema>;

/** One DHCP lease as dnsmasq records it. */
export interface Lease {
  expires: number; // unix seconds, 0 = infinite
  mac: string;
  ip: string;
  hostname?: string;
}

/** An instance NIC's address as the API shows it. */
export interface NicAddress {
  instance: string;
  nic: string;
  network: string;
  mac: string;
  /** The address reserved for the NIC (managed networks). */
  reserved?: string;
  /** The address the instance holds: a current DHCP lease, or the static one set in a container's namespace. */
  ip?: string;
  source?: 'lease' | 'static';
  expires?: string;
}

/** A network as the API shows it: the record, the NICs on it and its DHCP server. */
export interface NetworkView extends Network {
  /** NICs attached: instance/nic. */
  usedBy: Array<{ instance: string; nic: string; ip?: string | undefined; mac: string }>;
  dnsmasqPid?: number | undefined;
}
