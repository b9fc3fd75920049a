// Storage routes: pools, volumes (and attaching them to instances), image import, instance
// export / publish, copies, snapshots. Handlers translate HTTP to the storage services
// (StorageService, ImageTransferService, CopyService) and SnapshotService.
import type { FastifyReply } from 'fastify';
import { z } from 'zod';
import type { Operation } from '../../core/model/operation.js';
import { attachSchema, copySchema, createPoolSchema, createSnapshotSchema, createVolumeSchema, exportSchema, importImageSchema, publishSchema } from '../../storage/model.js';
import type { RouteTable } from '../routes.js';
import type { ApiServices } from '../services.js';

const name = z.object({ name: z.string() });
const pool = z.object({ pool: z.string() });
const poolVolume = z.object({ pool: z.string(), volume: z.string() });

function accepted(reply: FastifyReply, operation: Operation): { operation: Operation } {
  void reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
  return { operation };
}

export function registerStorageRoutes(t: RouteTable, svc: ApiServices): void {
  const storage = svc.storage;
  const snapshots = svc.snapshots;
  const transfers = svc.transfers;
  const copies = svc.copies;
  if (!storage || !snapshots || !transfers || !copies) return;

  // ---- pools ----------------------------------------------------------------------------------
  t.add({
    method: 'GET',
    url: '/api/v1/storage/pools',
    summary: "List storage pools (this host's and the cluster's shared ones) with capacity, used and free bytes and, for shared pools, every host's availability",
    tag: 'storage',
    responses: { 200: '{ pools }' },
    handler: async () => ({ pools: await storage.listPools() }),
  });
  t.add({
    method: 'POST',
    url: '/api/v1/storage/pools',
    summary: 'Create a storage pool (type dir: a directory on the host; `shared`: storage every host of the cluster mounts at that path, one pool for all)',
    tag: 'storage',
    body: createPoolSchema,
    responses: { 201: '{ pool }' },
    handler: async ({ raw }, reply) => {
      const p = await storage.createPool(raw.body);
      void reply.status(201);
      return { pool: p };
    },
  });
  t.add<unknown, unknown, { pool: string }>({
    method: 'GET',
    url: '/api/v1/storage/pools/:pool',
    summary: 'Show a storage pool (a shared one with each host’s availability)',
    tag: 'storage',
    params: pool,
    responses: { 200: '{ pool }' },
    handler: async ({ params }) => ({ pool: await storage.getPool(params.pool) }),
  });
  t.add<unknown, unknown, { pool: string }>({
    method: 'DELETE',
    url: '/api/v1/storage/pools/:pool',
    summary: 'Delete an empty storage pool (its directory stays); refused while an instance on any host keeps disks in it',
    tag: 'storage',
    params: pool,
    responses: { 200: '{ deleted }' },
    handler: async ({ params }) => {
      await storage.deletePool(params.pool);
      return { deleted: params.pool };
    },
  });

  // ---- volumes --------------------------------------------------------------------------------
  t.add<unknown, { pool?: string }>({
    method: 'GET',
    url: '/api/v1/storage/volumes',
    summary: 'List volumes (of one pool with ?pool=), with what they are attached to',
    tag: 'storage',
    query: z.object({ pool: z.string().optional() }).passthrough(),
    responses: { 200: '{ volumes }' },
    handler: async ({ query }) => ({ volumes: await storage.listVolumes(query.pool) }),
  });
  t.add<unknown, unknown, { pool: string }>({
    method: 'POST',
    url: '/api/v1/storage/pools/:pool/volumes',
    summary: 'Create a volume (qcow2 by default, or raw)',
    tag: 'storage',
    params: pool,
    body: createVolumeSchema.extend({ name: z.string() }),
    responses: { 201: '{ volume }' },
    handler: async ({ params, raw }, reply) => {
      const volume = await storage.createVolume(params.pool, raw.body);
      void reply.status(201);
      return { volume };
    },
  });
  t.add<unknown, unknown, { pool: string; volume: string }>({
    method: 'GET',
    url: '/api/v1/storage/pools/:pool/volumes/:volume',
    summary: 'Show a volume',
    tag: 'storage',
    params: poolVolume,
    responses: { 200: '{ volume }' },
    handler: async ({ params }) => ({ volume: await storage.getVolume(`${params.pool}/${params.volume}`) }),
  });
  t.add<{ size: string | number }, unknown, { pool: string; volume: string }>({
    method: 'POST',
    url: '/api/v1/storage/pools/:pool/volumes/:volume/resize',
    summary: 'Grow a volume (live, with block_resize, when its VM runs)',
    tag: 'storage',
    params: poolVolume,
    body: z.object({ size: z.union([z.string(), z.number()]) }).strict(),
    responses: { 200: '{ volume }' },
    handler: async ({ params, body }) => ({ volume: await storage.resizeVolume(`${params.pool}/${params.volume}`, body.size) }),
  });
  t.add<unknown, unknown, { pool: string; volume: string }>({
    method: 'DELETE',
    url: '/api/v1/storage/pools/:pool/volumes/:volume',
    summary: 'Delete a volume (refused while attached)',
    tag: 'storage',
    params: poolVolume,
    responses: { 200: '{ deleted }' },
    handler: async ({ params }) => {
      await storage.deleteVolume(`${params.pool}/${params.volume}`);
      return { deleted: `${params.pool}/${params.volume}` };
    },
  });
  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/volumes',
    summary: 'Attach a volume to an instance: hot-plugged when it runs, recorded in its disks either way',
    tag: 'storage',
    params: name,
    body: attachSchema,
    responses: { 200: '{ instance, disk, live }' },
    handler: async ({ params, raw }) => storage.attach(params.name, raw.body),
  });
  t.add<unknown, unknown, { name: string; pool: string; volume: string }>({
    method: 'DELETE',
    url: '/api/v1/instances/:name/volumes/:pool/:volume',
    summary: 'Detach a volume from an instance (hot-unplugged when it runs)',
    tag: 'storage',
    params: z.object({ name: z.string(), pool: z.string(), volume: z.string() }),
    responses: { 200: '{ instance, live }' },
    handler: async ({ params }) => storage.detach(params.name, `${params.pool}/${params.volume}`),
  });

  // ---- images, export, publish, copy ------------------------------------------------------------
  t.add({
    method: 'POST',
    url: '/api/v1/images/import',
    summary: 'Import a disk image (qcow2, raw, vmdk, vhd, vhdx, vdi) or an OVA from a host path or URL, as an operation',
    tag: 'images',
    body: importImageSchema,
    responses: { 202: '{ operation }' },
    handler: async ({ raw }, reply) => accepted(reply, await transfers.importImage(raw.body)),
  });
  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/export',
    summary: "Write a stopped VM's disk to a file on the host (qcow2, raw or vmdk), as an operation",
    tag: 'storage',
    params: name,
    body: exportSchema,
    responses: { 202: '{ operation }' },
    handler: async ({ params, raw }, reply) => accepted(reply, await transfers.exportInstance(params.name, raw.body)),
  });
  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/publish',
    summary: "Turn a stopped VM's disk into a read-only image (a template), as an operation",
    tag: 'images',
    params: name,
    body: publishSchema,
    responses: { 202: '{ operation }' },
    handler: async ({ params, raw }, reply) => accepted(reply, await transfers.publish(params.name, raw.body)),
  });
  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/copy',
    summary: 'Copy an instance, as an operation: a stopped VM in full or linked (qcow2 delta on the same image); a container (frozen while copied when it runs)',
    tag: 'instances',
    params: name,
    body: copySchema,
    responses: { 202: '{ operation }' },
    handler: async ({ params, raw }, reply) => accepted(reply, await copies.copy(params.name, raw.body)),
  });

  // ---- snapshots --------------------------------------------------------------------------------
  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/instances/:name/snapshots',
    summary: "An instance's snapshots, as a list and as a tree, with the current one",
    tag: 'snapshots',
    params: name,
    responses: { 200: '{ instance, current?, snapshots, tree, text }' },
    handler: async ({ params }) => snapshots.list(params.name),
  });
  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/snapshots',
    summary: 'Take a snapshot (disk-only, or with memory for a running VM), as an operation',
    tag: 'snapshots',
    params: name,
    body: createSnapshotSchema,
    responses: { 202: '{ operation }' },
    handler: async ({ params, raw }, reply) => accepted(reply, await snapshots.create(params.name, raw.body)),
  });
  t.add<unknown, unknown, { name: string; snapshot: string }>({
    method: 'GET',
    url: '/api/v1/instances/:name/snapshots/:snapshot',
    summary: 'Show a snapshot',
    tag: 'snapshots',
    params: z.object({ name: z.string(), snapshot: z.string() }),
    responses: { 200: '{ snapshot }' },
    handler: async ({ params }) => ({ snapshot: await snapshots.get(params.name, params.snapshot) }),
  });
  t.add<unknown, unknown, { name: string; snapshot: string }>({
    method: 'POST',
    url: '/api/v1/instances/:name/snapshots/:snapshot/revert',
    summary: 'Revert to a snapshot, as an operation',
    tag: 'snapshots',
    params: z.object({ name: z.string(), snapshot: z.string() }),
    responses: { 202: '{ operation }' },
    handler: async ({ params }, reply) => accepted(reply, await snapshots.revert(params.name, params.snapshot)),
  });
  t.add<unknown, unknown, { name: string; snapshot: string }>({
    method: 'DELETE',
    url: '/api/v1/instances/:name/snapshots/:snapshot',
    summary: 'Delete a snapshot (its children move up to its parent), as an operation',
    tag: 'snapshots',
    params: z.object({ name: z.string(), snapshot: z.string() }),
    responses: { 202: '{ operation }' },
    handler: async ({ params }, reply) => accepted(reply, await snapshots.delete(params.name, params.snapshot)),
  });
}
