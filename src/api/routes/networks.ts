// Network routes: networks, NICs of instances (hot-plug as operations), per-instance firewall,
// port forwards and the addresses instances hold. Handlers only translate HTTP to NetworkService.
import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import { addFirewallRuleSchema, createForwardSchema, createNetworkSchema, firewallPolicySchema, nicRequestSchema } from '../../network/model.js';
import type { NetworkService } from '../../services/network/service.js';
import type { RouteTable } from '../routes.js';
import type { ApiServices } from '../services.js';

const nameParams = z.object({ name: z.string() });
const TAG = 'networks';

export function registerNetworkRoutes(t: RouteTable, svc: ApiServices): void {
  const net = (): NetworkService => {
    if (!svc.networks) throw new HfError('HF_ERR_UNSUPPORTED', 'networking is not available on this host');
    return svc.networks;
  };

  t.add({
    method: 'GET',
    url: '/api/v1/networks',
    summary: 'List networks (with the NICs that use each)',
    tag: TAG,
    responses: { 200: '{ networks }' },
    handler: async () => ({ networks: await net().list() }),
  });

  t.add({
    method: 'POST',
    url: '/api/v1/networks',
    summary: 'Create a network: nat (default; subnet chosen when absent), isolated, or bridged to a host interface (optionally on a VLAN)',
    tag: TAG,
    body: createNetworkSchema,
    responses: { 201: '{ network }' },
    handler: async ({ raw }, reply) => {
      const network = await net().create(raw.body);
      void reply.status(201).header('location', `/api/v1/networks/${network.name}`);
      return { network };
    },
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/networks/:name',
    summary: 'Show a network',
    tag: TAG,
    params: nameParams,
    responses: { 200: '{ network }' },
    handler: async ({ params }) => ({ network: await net().get(params.name) }),
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'DELETE',
    url: '/api/v1/networks/:name',
    summary: 'Delete a network (refused with HF_ERR_NETWORK_IN_USE while NICs use it)',
    tag: TAG,
    params: nameParams,
    responses: { 200: '{ deleted }' },
    handler: async ({ params }) => {
      await net().delete(params.name);
      return { deleted: params.name };
    },
  });

  t.add<unknown, { instance?: string }>({
    method: 'GET',
    url: '/api/v1/addresses',
    summary: "Every NIC's addresses: reserved, and held now (DHCP lease or a container's static address)",
    tag: TAG,
    query: z.object({ instance: z.string().optional() }).passthrough(),
    responses: { 200: '{ addresses }' },
    handler: async ({ query }) => ({ addresses: await net().addresses(query.instance) }),
  });

  // ---- NICs ----------------------------------------------------------------------------------

  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/instances/:name/nics',
    summary: "An instance's NICs and their addresses",
    tag: TAG,
    params: nameParams,
    responses: { 200: '{ nics, addresses }' },
    handler: async ({ params }) => {
      const inst = await svc.instances.get(params.name);
      return { nics: inst.config.nics, addresses: await net().addresses(params.name) };
    },
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/nics',
    summary: 'Add a NIC: hot-plugged into a running instance, else created at the next start',
    tag: TAG,
    params: nameParams,
    body: nicRequestSchema,
    responses: { 202: '{ operation }' },
    handler: async ({ params, raw }, reply) => {
      const operation = await net().addNic(params.name, raw.body);
      void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
      return { operation };
    },
  });

  t.add<unknown, unknown, { name: string; nic: string }>({
    method: 'DELETE',
    url: '/api/v1/instances/:name/nics/:nic',
    summary: 'Remove a NIC (hot-unplugged from a running instance)',
    tag: TAG,
    params: z.object({ name: z.string(), nic: z.string() }),
    responses: { 202: '{ operation }' },
    handler: async ({ params }, reply) => {
      const operation = await net().removeNic(params.name, params.nic);
      void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
      return { operation };
    },
  });

  // ---- firewall ------------------------------------------------------------------------------

  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/instances/:name/firewall',
    summary: "An instance's inbound firewall: rules (first match wins) and the default policy",
    tag: TAG,
    params: nameParams,
    responses: { 200: '{ firewall }' },
    handler: async ({ params }) => ({ firewall: await net().firewall(params.name) }),
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/firewall/rules',
    summary: 'Add an inbound firewall rule (allow or deny; protocol, port or range, source CIDR)',
    tag: TAG,
    params: nameParams,
    body: addFirewallRuleSchema,
    responses: { 201: '{ firewall }' },
    handler: async ({ params, raw }, reply) => {
      const firewall = await net().addFirewallRule(params.name, raw.body);
      void reply.status(201);
      return { firewall };
    },
  });

  t.add<unknown, unknown, { name: string; index: number }>({
    method: 'DELETE',
    url: '/api/v1/instances/:name/firewall/rules/:index',
    summary: 'Remove the firewall rule at this position (from 0)',
    tag: TAG,
    params: z.object({ name: z.string(), index: z.coerce.number().int().min(0) }),
    responses: { 200: '{ firewall }' },
    handler: async ({ params }) => ({ firewall: await net().removeFirewallRule(params.name, params.index) }),
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'PUT',
    url: '/api/v1/instances/:name/firewall/policy',
    summary: 'Set the default inbound policy (allow or deny)',
    tag: TAG,
    params: nameParams,
    body: firewallPolicySchema,
    responses: { 200: '{ firewall }' },
    handler: async ({ params, raw }) => ({ firewall: await net().setFirewallPolicy(params.name, raw.body) }),
  });

  // ---- port forwards -------------------------------------------------------------------------

  t.add<unknown, { instance?: string }>({
    method: 'GET',
    url: '/api/v1/forwards',
    summary: 'List port forwards (host port → instance port)',
    tag: TAG,
    query: z.object({ instance: z.string().optional() }).passthrough(),
    responses: { 200: '{ forwards }' },
    handler: async ({ query }) => ({ forwards: await net().listForwards(query.instance) }),
  });

  t.add({
    method: 'POST',
    url: '/api/v1/forwards',
    summary: "Forward a host port to an instance's port (DNAT; also from the host itself)",
    tag: TAG,
    body: createForwardSchema,
    responses: { 201: '{ forward }' },
    handler: async ({ raw }, reply) => {
      const forward = await net().addForward(raw.body);
      void reply.status(201);
      return { forward };
    },
  });

  t.add<unknown, unknown, { protocol: 'tcp' | 'udp'; hostPort: number }>({
    method: 'DELETE',
    url: '/api/v1/forwards/:protocol/:hostPort',
    summary: 'Remove a port forward',
    tag: TAG,
    params: z.object({ protocol: z.enum(['tcp', 'udp']), hostPort: z.coerce.number().int().min(1).max(65535) }),
    responses: { 200: '{ deleted }' },
    handler: async ({ params }) => {
      await net().removeForward(params.protocol, params.hostPort);
      return { deleted: `${params.protocol}/${params.hostPort}` };
    },
  });
}
