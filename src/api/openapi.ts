// The OpenAPI document, generated from the same zod schemas that validate requests.
import { zodToJsonSchema } from 'zod-to-json-schema';
import type { ZodTypeAny } from 'zod';
import { ERROR_CODES } from '../core/errors.js';
import { startsOperations, type RouteTable } from './routes.js';

function schema(z: ZodTypeAny): Record<string, unknown> {
  const s = zodToJsonSchema(z, { target: 'openApi3', $refStrategy: 'none' }) as Record<string, unknown>;
  delete s.$schema;
  return s;
}

export function buildOpenApi(table: RouteTable, version: string): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of table.routes) {
    const path = r.url.replace(/:([A-Za-z_]+)/g, '{$1}');
    const op: Record<string, unknown> = {
      summary: r.summary,
      tags: [r.tag],
      operationId: `${r.method.toLowerCase()}${path.replace(/[^A-Za-z0-9]+(.)?/g, (_m, c: string | undefined) => (c ? c.toUpperCase() : ''))}`,
      responses: Object.fromEntries([
        ...Object.entries(r.responses).map(([code, description]) => [code, { description }]),
        ['default', { description: 'error', content: { 'application/json': { schema: { $ref: '#/components/schemas/Error' } } } }],
      ]),
    };
    const parameters: unknown[] = [];
    for (const m of r.url.matchAll(/:([A-Za-z_]+)/g)) parameters.push({ name: m[1], in: 'path', required: true, schema: { type: 'string' } });
    if (r.query) {
      const q = schema(r.query) as { properties?: Record<string, unknown>; required?: string[] };
      for (const [name, s] of Object.entries(q.properties ?? {})) parameters.push({ name, in: 'query', required: q.required?.includes(name) ?? false, schema: s });
    }
    if (startsOperations(r)) parameters.push({ name: 'wait', in: 'query', required: false, description: 'answer once the operation finished (200), waiting up to this many seconds; still running then: 202', schema: { type: 'number', minimum: 0, maximum: 3600 } });
    if (parameters.length) op.parameters = parameters;
    if (r.body) op.requestBody = { required: true, content: { 'application/json': { schema: schema(r.body) } } };
    (paths[path] ??= {})[r.method.toLowerCase()] = op;
  }
  return {
    openapi: '3.0.3',
    info: { title: 'Hyperfold API', version, description: 'Virtual machines and system containers on one host or a cluster.' },
    servers: [{ url: '/' }],
    components: {
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
      schemas: {
        Error: {
          type: 'object',
          required: ['error'],
          properties: {
            error: {
              type: 'object',
              required: ['code', 'message'],
              properties: { code: { type: 'string', enum: Object.keys(ERROR_CODES) }, message: { type: 'string' }, details: { type: 'object' } },
            },
          },
        },
      },
    },
    security: [{ bearer: [] }],
    paths,
  };
}
