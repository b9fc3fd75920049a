// A route table: each route declares its request schemas once; the same declaration registers
// the Fastify handler and feeds the OpenAPI document. Handlers only translate HTTP to service
// calls; validation errors and service errors become responses in one error handler.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ZodTypeAny } from 'zod';
import { parseInput } from '../core/validate.js';

export type Method = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

export interface RouteSpec<B = unknown, Q = unknown, P = unknown> {
  method: Method;
  url: string;
  summary: string;
  tag: string;
  body?: ZodTypeAny;
  query?: ZodTypeAny;
  params?: ZodTypeAny;
  /** Status codes this route answers with on success, and what they carry. */
  responses: Record<number, string>;
  /** Documented here but served by a streaming handler registered elsewhere (SSE, websocket). */
  docOnly?: boolean;
  handler: (req: { body: B; query: Q; params: P; raw: FastifyRequest }, reply: FastifyReply) => Promise<unknown>;
}

export class RouteTable {
  readonly routes: RouteSpec[] = [];

  add<B = unknown, Q = unknown, P = unknown>(spec: RouteSpec<B, Q, P>): void {
    this.routes.push(spec as unknown as RouteSpec);
  }

  register(app: FastifyInstance): void {
    for (const r of this.routes) {
      if (r.docOnly) continue;
      app.route({
        method: r.method,
        url: r.url,
        handler: async (req, reply) => {
          const body = r.body ? parseInput(r.body, req.body ?? {}, 'body') : req.body;
          const query = r.query ? parseInput(r.query, req.query ?? {}, 'query') : req.query;
          const params = r.params ? parseInput(r.params, req.params ?? {}, 'path') : req.params;
          const out = await r.handler({ body, query, params, raw: req }, reply);
          if (reply.sent) return reply;
          return out;
        },
      });
    }
  }
}
