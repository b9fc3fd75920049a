// A route table: each route declares its request schemas once; the same declaration registers
// the Fastify handler and feeds the OpenAPI document. Handlers only translate HTTP to service
// calls; validation errors and service errors become responses in one error handler.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z, type ZodTypeAny } from 'zod';
import { isFinished, type Operation } from '../core/model/operation.js';
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
  /**
   * Only the other hosts of the cluster may call it: on the cluster listener, with a client
   * certificate signed by the cluster's CA (never with the admin token, never on the unix socket).
   */
  peerOnly?: boolean;
  handler: (req: { body: B; query: Q; params: P; raw: FastifyRequest; forward?: ForwardTo }, reply: FastifyReply) => Promise<unknown>;
}

/**
 * `?wait=SECONDS`, accepted by every route that starts an operation (it answers 202): the answer
 * then comes once the operation finished (200, the finished operation) or, still running after
 * that long, as usual (202). One round trip instead of a POST and a GET.
 */
export const waitQuery = z.object({ wait: z.coerce.number().min(0).max(3600).optional() }).passthrough();

/** In a cluster: sends this request, with `body` as its JSON body, to another host and streams its answer back. */
export type ForwardTo = (host: string, body: unknown, headers?: Record<string, string>) => Promise<void>;

/** What can send a request that a route has read to another host (the cluster's Forwarder). */
export interface RequestSender {
  send(host: string, req: FastifyRequest, reply: FastifyReply, body: unknown, headers?: Record<string, string>): Promise<void>;
}

export interface OperationWaiter {
  wait(id: string, timeoutMs: number): Promise<Operation>;
}

/** Whether a route starts operations (documented as answering 202). */
export const startsOperations = (r: RouteSpec): boolean => 202 in r.responses;

export class RouteTable {
  readonly routes: RouteSpec[] = [];

  add<B = unknown, Q = unknown, P = unknown>(spec: RouteSpec<B, Q, P>): void {
    this.routes.push(spec as unknown as RouteSpec);
  }

  register(app: FastifyInstance, operations: OperationWaiter, sender?: RequestSender): void {
    for (const r of this.routes) {
      if (r.docOnly) continue;
      const waits = startsOperations(r);
      app.route({
        method: r.method,
        url: r.url,
        handler: async (req, reply) => {
          const body = r.body ? parseInput(r.body, req.body ?? {}, 'body') : req.body;
          const query = r.query ? parseInput(r.query, req.query ?? {}, 'query') : req.query;
          const params = r.params ? parseInput(r.params, req.params ?? {}, 'path') : req.params;
          const wait = waits ? (parseInput(waitQuery, req.query ?? {}, 'query') as { wait?: number }).wait : undefined;
          const forward: ForwardTo | undefined = sender ? (host, b, h) => sender.send(host, req, reply, b, h) : undefined;
          const out = await r.handler({ body, query, params, raw: req, ...(forward ? { forward } : {}) }, reply);
          if (reply.sent) return reply;
          if (wait && reply.statusCode === 202 && isOperationAnswer(out)) {
            const done = await operations.wait(out.operation.id, wait * 1000);
            if (isFinished(done)) void reply.status(200);
            return { ...out, operation: done };
          }
          return out;
        },
      });
    }
  }
}

function isOperationAnswer(out: unknown): out is { operation: Operation } {
  return typeof out === 'object' && out !== null && typeof (out as { operation?: { id?: unknown } }).operation?.id === 'string';
}
