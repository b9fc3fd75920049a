// System routes: the API root, this host, operations (show, wait, cancel) and images (list, show,
// build, fetch from another host, delete; and the files route the other hosts fetch from).
import { z } from 'zod';
import { IMAGE_BYTES_HEADER } from '../../core/model/image.js';
import { isFinished } from '../../core/model/operation.js';
import type { RouteTable } from '../routes.js';
import type { ApiServices } from '../services.js';

export function registerSystemRoutes(t: RouteTable, svc: ApiServices): void {
  t.add({
    method: 'GET',
    url: '/api/v1',
    summary: 'API root',
    tag: 'system',
    responses: { 200: 'API information' },
    handler: async () => ({ name: 'hyperfold', version: svc.version, api: 'v1' }),
  });

  t.add({
    method: 'GET',
    url: '/api/v1/host',
    summary: 'This host: CPUs, memory, accelerator verdict, versions',
    tag: 'host',
    responses: { 200: '{ host }' },
    handler: async () => ({ host: await svc.host() }),
  });

  t.add({
    method: 'GET',
    url: '/api/v1/operations',
    summary: 'List operations',
    tag: 'operations',
    responses: { 200: '{ operations }' },
    handler: async () => ({ operations: await svc.operations.list() }),
  });

  t.add<unknown, { wait?: number }, { id: string }>({
    method: 'GET',
    url: '/api/v1/operations/:id',
    summary: 'Show an operation; with ?wait=SECONDS, wait up to that long for it to finish',
    tag: 'operations',
    params: z.object({ id: z.string().min(1) }),
    query: z.object({ wait: z.coerce.number().min(0).max(3600).optional() }).passthrough(),
    responses: { 200: '{ operation }' },
    handler: async ({ params, query }) => ({
      operation: query.wait ? await svc.operations.wait(params.id, query.wait * 1000) : await svc.operations.get(params.id),
    }),
  });

  t.add<unknown, unknown, { id: string }>({
    method: 'DELETE',
    url: '/api/v1/operations/:id',
    summary: 'Cancel an operation: a queued one at once; a running one if its work can stop (it ends `cancelled`)',
    tag: 'operations',
    params: z.object({ id: z.string().min(1) }),
    responses: { 200: '{ operation } (cancelled)', 202: '{ operation } (asked to stop; ends cancelled)' },
    handler: async ({ params }, reply) => {
      const operation = await svc.operations.cancel(params.id);
      if (!isFinished(operation)) void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
      return { operation };
    },
  });

  t.add({
    method: 'GET',
    url: '/api/v1/images',
    summary: "List images; in a cluster every host's, each with the hosts that hold it (`hosts`)",
    tag: 'images',
    responses: { 200: '{ images }' },
    handler: async () => ({ images: await svc.images.overview() }),
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/images/:name',
    summary: "Show an image: this host's record, or in a cluster another host's, with the hosts that hold it (`hosts`)",
    tag: 'images',
    params: z.object({ name: z.string() }),
    responses: { 200: '{ image }' },
    handler: async ({ params }) => ({ image: await svc.images.show(params.name) }),
  });

  t.add<{ from?: string }, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/images/:name/fetch',
    summary: 'Fetch an image from another host of the cluster (`from`, or any online host that holds it), checked against its SHA-256 checksums, as an operation',
    tag: 'images',
    params: z.object({ name: z.string() }),
    body: z.object({ from: z.string().min(1).optional() }).strict(),
    responses: { 202: '{ operation }' },
    handler: async ({ params, body }, reply) => {
      const operation = await svc.images.fetch(params.name, { from: body.from });
      void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
      return { operation };
    },
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/images/:name/files',
    summary: "This host's files of an image as a tar stream (for another host that fetches it; cluster certificate only). Header x-hyperfold-image-bytes: bytes of file data",
    tag: 'images',
    params: z.object({ name: z.string() }),
    responses: { 200: 'application/x-tar' },
    peerOnly: true,
    handler: async ({ params }, reply) => {
      const { stream, bytes } = await svc.images.files(params.name);
      void reply.type('application/x-tar').header(IMAGE_BYTES_HEADER, String(bytes));
      return stream;
    },
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/images/:name/build',
    summary: 'Build (or rebuild) a built-in image, as an operation',
    tag: 'images',
    params: z.object({ name: z.string() }),
    responses: { 202: '{ operation }' },
    handler: async ({ params }, reply) => {
      const operation = await svc.images.build(params.name);
      void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
      return { operation };
    },
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'DELETE',
    url: '/api/v1/images/:name',
    summary: 'Delete an image',
    tag: 'images',
    params: z.object({ name: z.string() }),
    responses: { 200: '{ deleted }' },
    handler: async ({ params }) => {
      await svc.images.delete(params.name);
      return { deleted: params.name };
    },
  });
}
