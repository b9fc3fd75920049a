// An in-process daemon for unit tests of the services and the API: an in-memory SQLite store,
// the real services over fake drivers, and the Fastify app driven with inject().
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/api/server.js';
import type { ApiServices } from '../../src/api/services.js';
import { HfError } from '../../src/core/errors.js';
import type { InstanceType } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import type { HostCapacity, OvercommitPolicy } from '../../src/core/resources.js';
import { DataPaths } from '../../src/daemon/config.js';
import type { InstanceDriver } from '../../src/drivers/driver.js';
import { EventBus } from '../../src/services/events.js';
import type { InstanceExtension } from '../../src/services/extensions.js';
import { ImageService } from '../../src/services/images.js';
import { InstanceService } from '../../src/services/instances.js';
import { OperationManager } from '../../src/services/operations.js';
import { PlacementService, singleHostDirectory } from '../../src/services/placement.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { silentLogger } from '../../src/util/log.js';

export const TEST_TOKEN = 'test-token-0123456789abcdef0123456789';

export interface TestWorld {
  dir: string;
  store: SqliteStateStore;
  events: EventBus;
  ops: OperationManager;
  images: ImageService;
  svc: InstanceService;
  app: FastifyInstance;
  /** An authenticated request through Fastify's inject(). */
  call(method: string, url: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }>;
  /** Waits for the operation in a 202 answer. */
  finish(res: { json: Record<string, unknown> }): Promise<Operation>;
}

export interface WorldOptions {
  store?: SqliteStateStore;
  drivers: Array<[InstanceType, InstanceDriver]>;
  capacity?: HostCapacity;
  overcommit?: OvercommitPolicy;
  /** How long a PATCH waits for a busy instance (InstanceServiceDeps.busyWaitMs). */
  busyWaitMs?: number;
  /**
   * Other areas (networks, storage…): built from the world's store, events and operations; they
   * may contribute instance extensions and API services, and are bound to the instance service.
   */
  plugins?: (p: { store: SqliteStateStore; events: EventBus; ops: OperationManager }) => Promise<{
    extensions?: InstanceExtension[];
    services?: Partial<ApiServices>;
    bind?: (svc: InstanceService) => Promise<void>;
  }>;
}

export async function buildWorld(dir: string, opts: WorldOptions): Promise<TestWorld> {
  const store = opts.store ?? SqliteStateStore.open(':memory:');
  const events = new EventBus('h1');
  const ops = new OperationManager(store, events, 'h1', silentLogger);
  await ops.recover();
  const paths = new DataPaths(dir);
  const images = new ImageService(store, paths, ops);
  const capacity = opts.capacity ?? { cpus: 4, memoryMiB: 4096 };
  const overcommit = opts.overcommit ?? { cpu: 1, memory: 1 };
  const plugins = opts.plugins ? await opts.plugins({ store, events, ops }) : {};
  const svc = new InstanceService({
    store,
    drivers: new Map(opts.drivers),
    images,
    operations: ops,
    events,
    log: silentLogger,
    hostName: 'h1',
    instancesDir: paths.instancesDir,
    capacity: () => capacity,
    overcommit,
    stopTimeoutMs: 200,
    consoleLogMaxBytes: 1024,
    extensions: plugins.extensions,
    busyWaitMs: opts.busyWaitMs,
  });
  await plugins.bind?.(svc);
  const services: ApiServices = {
    instances: svc,
    placement: new PlacementService({ hosts: singleHostDirectory({ hostName: 'h1', capacity: () => capacity, overcommit, instances: () => svc.list() }) }),
    operations: ops,
    images,
    events,
    version: 'test',
    host: async () => {
      throw new HfError('HF_ERR_UNSUPPORTED', 'not in unit tests');
    },
    ...plugins.services,
  };
  const app = await buildApp(services, { token: TEST_TOKEN, log: silentLogger, version: 'test' });
  const call = async (method: string, url: string, body?: unknown) => {
    const res = await app.inject({ method: method as 'GET', url, payload: body as Record<string, unknown> | undefined, headers: { authorization: `Bearer ${TEST_TOKEN}` } });
    return { status: res.statusCode, json: res.body ? (JSON.parse(res.body) as Record<string, unknown>) : {} };
  };
  const finish = (res: { json: Record<string, unknown> }) => ops.wait((res.json.operation as Operation).id, 10_000);
  return { dir, store, events, ops, images, svc, app, call, finish };
}
