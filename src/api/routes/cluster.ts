// The cluster verbs: status, init, join (this host's side), tokens, members (list, admit a joining
// host, remove) and backup. Init and join answer 202: the daemon then restarts into cluster mode.
import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import type { RouteTable } from '../routes.js';
import type { ApiServices, ClusterControl } from '../services.js';
import type { ClusterService } from '../../services/cluster/service.js';

/** Routes a joining host calls before it has a certificate: no bearer token, no client certificate. */
export const PUBLIC_CLUSTER_ROUTES = new Set(['GET /api/v1/cluster/ca', 'POST /api/v1/cluster/members']);

const ipOrName = z.string().min(1).max(253);

function control(svc: ApiServices): ClusterControl {
  if (!svc.clusterControl) throw new HfError('HF_ERR_UNSUPPORTED', 'this daemon has no cluster support');
  return svc.clusterControl;
}

function member(svc: ApiServices): ClusterService {
  const s = control(svc).service();
  if (!s) throw new HfError('HF_ERR_NOT_CLUSTERED', 'this host is not part of a cluster: `hyperfold cluster init` makes one, `hyperfold cluster join` joins one');
  return s;
}

export function registerClusterRoutes(t: RouteTable, svc: ApiServices): void {
  t.add({
    method: 'GET',
    url: '/api/v1/cluster',
    summary: 'Whether this host is in a cluster, which one, and how it reaches etcd',
    tag: 'cluster',
    responses: { 200: '{ cluster: ClusterStatus }' },
    handler: async () => ({ cluster: await control(svc).status() }),
  });

  t.add({
    method: 'POST',
    url: '/api/v1/cluster/init',
    summary: 'Make this host a one-member cluster (CA, etcd, state moved from SQLite); the daemon restarts into cluster mode, guests keep running',
    tag: 'cluster',
    body: z
      .object({
        name: z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/).optional(),
        address: ipOrName.optional(),
        leaseTtl: z.number().int().min(1).max(300).optional(),
        etcd: z.object({ endpoints: z.array(z.string().url()).min(1), ca: z.string(), cert: z.string(), key: z.string() }).strict().optional(),
      })
      .strict(),
    responses: { 202: '{ cluster } (the daemon restarts)' },
    handler: async ({ body }, reply) => {
      const cluster = await control(svc).init(body as Parameters<ClusterControl['init']>[0]);
      void reply.status(202);
      return { cluster };
    },
  });

  t.add({
    method: 'POST',
    url: '/api/v1/cluster/join',
    summary: 'Join this host to the cluster of the member at `url` with a join token; the daemon restarts into cluster mode',
    tag: 'cluster',
    body: z.object({ url: z.string(), token: z.string(), address: ipOrName.optional() }).strict(),
    responses: { 202: '{ cluster } (the daemon restarts)' },
    handler: async ({ body }, reply) => {
      const cluster = await control(svc).join(body as Parameters<ClusterControl['join']>[0]);
      void reply.status(202);
      return { cluster };
    },
  });

  t.add<unknown, unknown, unknown>({
    method: 'GET',
    url: '/api/v1/cluster/ca',
    summary: "The cluster CA's certificate (public: a joining host checks it against the token's fingerprint)",
    tag: 'cluster',
    responses: { 200: '{ caPem }' },
    handler: async () => ({ caPem: await control(svc).caPem() }),
  });

  t.add({
    method: 'POST',
    url: '/api/v1/cluster/tokens',
    summary: 'A single-use join token (expires after ttl seconds, default 3600)',
    tag: 'cluster',
    body: z.object({ ttl: z.number().int().optional() }).strict(),
    responses: { 201: '{ token, expiresAt }' },
    handler: async ({ body }, reply) => {
      const out = await member(svc).createToken((body as { ttl?: number }).ttl ?? 3600);
      void reply.status(201);
      return out;
    },
  });

  t.add({
    method: 'GET',
    url: '/api/v1/cluster/members',
    summary: 'Every host: state (online, offline, maintenance), address, CPUs and memory (total, allocated, used), instances, versions, last heartbeat',
    tag: 'cluster',
    responses: { 200: '{ members }' },
    handler: async () => ({ members: await member(svc).hosts() }),
  });

  t.add({
    method: 'POST',
    url: '/api/v1/cluster/members',
    summary: 'Admit a joining host (called by `cluster join` on that host; authenticated by the join token in the body)',
    tag: 'cluster',
    responses: { 201: 'JoinAnswer: certificate, etcd endpoints' },
    handler: async ({ raw }, reply) => {
      const out = await member(svc).admit(raw.body);
      void reply.status(201);
      return out;
    },
  });

  t.add<unknown, { force?: string }, { name: string }>({
    method: 'DELETE',
    url: '/api/v1/cluster/members/:name',
    summary: 'Remove a host from the cluster (refused while it holds instances, unless ?force=true)',
    tag: 'cluster',
    params: z.object({ name: z.string().min(1) }),
    query: z.object({ force: z.string().optional() }).passthrough(),
    responses: { 204: 'removed' },
    handler: async ({ params, query }, reply) => {
      await member(svc).remove(params.name, { force: query.force === 'true' || query.force === '1' || query.force === '' });
      void reply.status(204);
      return undefined;
    },
  });

  t.add({
    method: 'POST',
    url: '/api/v1/cluster/backup',
    summary: "An etcd snapshot of the cluster's whole state, written to `file` on this host",
    tag: 'cluster',
    body: z.object({ file: z.string().min(1) }).strict(),
    responses: { 200: '{ file, bytes }' },
    handler: async ({ body }) => control(svc).backup((body as { file: string }).file),
  });
}
