import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import { createInstanceSchema, nameSchema, updateInstanceSchema, INSTANCE_TYPES, type Instance } from '../../core/model/instance.js';
import type { RouteTable } from '../routes.js';
import { FORWARDED_BY } from '../forward.js';

/** A create forwarded by the host whose scheduler chose this one carries the reason it was chosen. */
const PLACEMENT_REASON = 'x-hyperfold-placement-reason';
import type { ApiServices } from '../services.js';

const LIST_HEAD = Buffer.from('{"instances":[');
const COMMA = Buffer.from(',');
const nameParams = z.object({ name: z.string() });
const boolish = z.union([z.boolean(), z.enum(['true', 'false', '1', '0', ''])]).transform((v) => v === true || v === 'true' || v === '1' || v === '');
const LIFECYCLE = ['start', 'stop', 'restart', 'pause', 'resume'] as const;

export function registerInstanceRoutes(t: RouteTable, svc: ApiServices): void {
  t.add<unknown, { type?: (typeof INSTANCE_TYPES)[number]; limit?: number; after?: string }>({
    method: 'GET',
    url: '/api/v1/instances',
    summary: 'List instances, in name order. `limit` and `after` page through them: an answer with `next` has more after that name',
    tag: 'instances',
    query: z
      .object({
        type: z.enum(INSTANCE_TYPES).optional(),
        limit: z.coerce.number().int().min(1).max(100_000).optional(),
        after: z.string().min(1).optional(),
      })
      .passthrough(),
    responses: { 200: '{ instances: Instance[], next?: string }' },
    handler: async ({ query }, reply) => {
      const type = query.type;
      const page = await svc.instances.page({
        ...(query.limit !== undefined ? { limit: query.limit } : {}),
        ...(query.after !== undefined ? { after: query.after } : {}),
        ...(type ? { filter: (i: Readonly<Instance>) => i.type === type } : {}),
      });
      // In a cluster, instances of an offline host show state `unknown`.
      const cluster = svc.clusterControl?.service();
      const offline = cluster ? await cluster.offline(page.entries.map((e) => e.value.host)) : new Set<string>();
      // The records' own JSON texts, joined as bytes: no copy, serialization or encoding of the
      // whole list (at 10,000 instances those were most of the time).
      const parts: Buffer[] = [LIST_HEAD];
      page.entries.forEach((e, i) => {
        if (i > 0) parts.push(COMMA);
        parts.push(offline.has(e.value.host) ? Buffer.from(JSON.stringify({ ...e.value, state: 'unknown' })) : e.json);
      });
      parts.push(Buffer.from(page.next !== undefined ? `],"next":${JSON.stringify(page.next)}}` : ']}'));
      void reply.type('application/json; charset=utf-8');
      return Buffer.concat(parts);
    },
  });

  t.add({
    method: 'POST',
    url: '/api/v1/instances',
    summary:
      'Create an instance (and start it when `start` is true: then 202 with the start operation). Placement picks the host (or `target` names it); the answer says why',
    tag: 'instances',
    body: createInstanceSchema,
    responses: { 201: '{ instance, placement }', 202: '{ instance, operation, placement }' },
    handler: async ({ raw, forward }, reply) => {
      // The service validates the raw body itself (same schema) so that it stays callable alone.
      const placement = await svc.placement.choose(await svc.instances.placementRequest(raw.body));
      if (placement.host !== svc.instances.hostName) {
        // In a cluster the create goes to the chosen host (which checks the fit again as its target),
        // with the reason it was chosen; a single host's directory lists only itself.
        if (!forward) {
          throw new HfError('HF_ERR_NOT_CLUSTERED', `placement chose host "${placement.host}", but this daemon is not clustered: it cannot create instances on other hosts`, {
            details: { placement },
          });
        }
        await forward(placement.host, { ...(raw.body as object), target: placement.host }, { [PLACEMENT_REASON]: encodeURIComponent(placement.reason) });
        return undefined;
      }
      const given = raw.headers[PLACEMENT_REASON];
      const reason = typeof given === 'string' && raw.headers[FORWARDED_BY] !== undefined ? decodeURIComponent(given) : placement.reason;
      const { instance, operation } = await svc.instances.createOperation(raw.body, { placementReason: reason });
      if (operation) {
        void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
        return { instance, operation, placement };
      }
      void reply.status(201);
      return { instance, placement };
    },
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/instances/:name',
    summary: 'Show an instance',
    tag: 'instances',
    params: nameParams,
    responses: { 200: '{ instance }' },
    handler: async ({ params }) => {
      const cluster = svc.clusterControl?.service();
      const instance = cluster ? (await cluster.present([await svc.instances.get(params.name)]))[0]! : await svc.instances.get(params.name);
      const live = await svc.instances.liveInfo(params.name);
      return live ? { instance, live } : { instance };
    },
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'PATCH',
    url: '/api/v1/instances/:name',
    summary: 'Change an instance; changes that cannot apply now are kept as pending until the next start',
    tag: 'instances',
    params: nameParams,
    body: updateInstanceSchema,
    responses: { 200: '{ instance, applied: string[], pending: string[], notes: string[] }' },
    handler: async ({ params, raw }) => svc.instances.update(params.name, raw.body),
  });

  t.add<unknown, { force: boolean }, { name: string }>({
    method: 'DELETE',
    url: '/api/v1/instances/:name',
    summary: 'Delete an instance (refused while it runs unless force=true)',
    tag: 'instances',
    params: nameParams,
    query: z.object({ force: boolish.default(false) }).passthrough(),
    responses: { 202: '{ operation }' },
    handler: async ({ params, query }, reply) => {
      const operation = await svc.instances.delete(params.name, { force: query.force });
      void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
      return { operation };
    },
  });

  for (const action of LIFECYCLE) {
    t.add<{ force: boolean; timeout?: number }, unknown, { name: string }>({
      method: 'POST',
      url: `/api/v1/instances/:name/${action}`,
      summary:
        action === 'stop'
          ? 'Stop: graceful (ACPI power-down) up to `timeout` seconds, then forced; `force` kills at once'
          : `${action[0]!.toUpperCase()}${action.slice(1)} an instance`,
      tag: 'instances',
      params: nameParams,
      body: z.object({ force: z.boolean().default(false), timeout: z.number().int().min(0).max(3600).optional() }).strict(),
      responses: { 202: '{ operation }' },
      handler: async ({ params, body }, reply) => {
        const operation = await svc.instances.action(params.name, action, {
          force: body.force,
          timeoutMs: body.timeout === undefined ? undefined : body.timeout * 1000,
        });
        void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
        return { operation };
      },
    });
  }

  t.add<unknown, { bytes: number }, { name: string }>({
    method: 'GET',
    url: '/api/v1/instances/:name/console/log',
    summary: 'The tail of the bounded console log',
    tag: 'instances',
    params: z.object({ name: nameSchema }),
    query: z.object({ bytes: z.coerce.number().int().min(1).max(1024 * 1024).default(256 * 1024) }).passthrough(),
    responses: { 200: 'text/plain console output' },
    handler: async ({ params, query }, reply) => {
      const text = await svc.instances.consoleLog(params.name, query.bytes);
      void reply.type('text/plain; charset=utf-8');
      return text;
    },
  });
}
