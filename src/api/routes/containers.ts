// Container-only routes: exec, live cgroup figures and image imports. The lifecycle (create,
// start, stop, pause, delete, console), snapshots and copies are the instances' routes, shared
// with VMs.
import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import { execRequestSchema, importRequestSchema, type ContainerService } from '../../services/containers.js';
import type { RouteTable } from '../routes.js';
import type { ApiServices } from '../services.js';

const nameParams = z.object({ name: z.string() });

export function registerContainerRoutes(t: RouteTable, svc: ApiServices): void {
  const containers = (): ContainerService => {
    if (!svc.containers) throw new HfError('HF_ERR_UNSUPPORTED', 'containers are not available on this host');
    return svc.containers;
  };
  const accepted = (reply: { status(n: number): { header(k: string, v: string): unknown } }, operation: { id: string }) => {
    reply.status(202).header('location', `/api/v1/operations/${operation.id}`);
    return { operation };
  };

  t.add<unknown, unknown, { name: string }>({
    method: 'GET',
    url: '/api/v1/containers/:name',
    summary: 'A container with its id map, privilege and live cgroup usage (memory, CPU, pids, OOM kills)',
    tag: 'containers',
    params: nameParams,
    responses: { 200: '{ instance, container }' },
    handler: async ({ params }) => containers().info(params.name),
  });

  t.add<unknown, unknown, { name: string }>({
    method: 'POST',
    url: '/api/v1/containers/:name/exec',
    summary: 'Run a command in a running container and return its exit code and output',
    tag: 'containers',
    params: nameParams,
    body: execRequestSchema,
    responses: { 200: '{ exitCode, stdout, stderr, timedOut, truncated }' },
    handler: async ({ params, raw }) => containers().exec(params.name, raw.body),
  });

  t.add({
    method: 'POST',
    url: '/api/v1/containers/images',
    summary: 'Import a container image from a path on the host: OCI layout directory, docker-archive or rootfs tarball',
    tag: 'containers',
    body: importRequestSchema,
    responses: { 202: '{ operation }' },
    handler: async ({ raw }, reply) => accepted(reply, await containers().importImage(raw.body)),
  });
}
