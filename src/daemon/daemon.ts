// The daemon: wires the layers together (state store → services → drivers → API) and owns the
// process-level concerns: the data directory, the admin token, listeners, signals, and the
// reconcile pass that re-attaches to guests after a restart.
import { randomBytes } from 'node:crypto';
import { access, chmod, constants, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../api/server.js';
import type { ApiServices } from '../api/services.js';
import { HfError } from '../core/errors.js';
import type { InstanceDriver } from '../drivers/driver.js';
import type { AccelVerdict } from '../core/model/host.js';
import { loadOrProbe } from '../drivers/qemu/accel.js';
import { QemuDriver } from '../drivers/qemu/driver.js';
import { ContainerDriver } from '../drivers/container/driver.js';
import { ContainerService, containerImageBuilders } from '../services/containers.js';
import type { InstanceType } from '../core/model/instance.js';
import { EventBus } from '../services/events.js';
import { bootId, describeHost, hostCapacity } from '../services/host.js';
import { ImageService, tinyImageBuilder } from '../services/images.js';
import { InstanceService } from '../services/instances.js';
import { NetworkService } from '../services/network/service.js';
import { LinuxNetHost } from '../network/host.js';
import { NetNames, tagFor } from '../network/names.js';
import { OperationManager } from '../services/operations.js';
import { PlacementService, singleHostDirectory } from '../services/placement.js';
import type { PlacementHost } from '../core/placement.js';
import type { InstanceExtension } from '../services/extensions.js';
import { SnapshotService } from '../services/snapshots.js';
import { CopyService, ImageTransferService, StorageService } from '../services/storage/index.js';
import { SqliteStateStore } from '../state/sqlite-store.js';
import type { StateStore } from '../state/store.js';
import { useCommandRunner } from '../util/exec.js';
import { createLogger, type Logger } from '../util/log.js';
import { Spawner } from '../util/spawner.js';
import { daemonLockFile, tryLock } from '../util/flock.js';
import { isActive } from '../core/lifecycle.js';
import { freemem, loadavg, totalmem } from 'node:os';
import { EtcdHealth } from '../services/cluster/etcd-health.js';
import { ClusterMembers } from '../services/cluster/members.js';
import { ClusterService, type JoinManifest } from '../services/cluster/service.js';
import { networkSchema, ipReservationSchema } from '../network/model.js';
import { poolRecordSchema } from '../storage/model.js';
import { SHARED_POOLS_PREFIX } from '../services/storage/shared-pools.js';
import { etcdUrls } from '../cluster/config.js';
import { backupCluster, initCluster, joinCluster, localKey, openCluster, type ClusterRuntime } from './cluster.js';
import { DataPaths, type DaemonConfig } from './config.js';
import { VERSION } from './version.js';

export interface Daemon {
  config: DaemonConfig;
  paths: DataPaths;
  token: string;
  url: string;
  services: ApiServices;
  store: StateStore;
  /** Stops listening and detaches from guests; guests keep running. */
  close(): Promise<void>;
}

interface HostRecord {
  name: string;
  bootId: string;
  version: string;
  lastStart: string;
}

export interface StartOptions {
  log?: Logger;
  /** Called when init or join wants the daemon to start again in cluster mode (serve.ts does it in this process). */
  requestRestart?: () => void;
}

export async function startDaemon(config: DaemonConfig, opts: StartOptions = {}): Promise<Daemon> {
  const log = opts.log ?? createLogger({ level: (process.env.HYPERFOLD_LOG_LEVEL as 'info' | undefined) ?? 'info' });
  const paths = new DataPaths(config.dataDir);
  const startedAt = new Date().toISOString();

  await prepareDataDir(paths);
  // Held until this process ends (the kernel drops it on SIGKILL too): other daemons of this host
  // judge whether we are alive by it, and a second daemon on this data directory is refused.
  const lock = await tryLock(daemonLockFile(paths.root));
  if (!lock) throw new HfError('HF_ERR_DAEMON_RUNNING', `another hyperfold daemon is running on the data directory ${paths.root}`);
  // Helper commands (ip, nft, qemu-img, runc…) start from a small shell, not by forking the daemon.
  await rm(paths.commandsDir, { recursive: true, force: true });
  useCommandRunner(new Spawner(), paths.commandsDir);
  const token = await loadOrCreateToken(paths.tokenFile);
  // A cluster member keeps its state in etcd (cluster/cluster.json says how to reach it); a single host in SQLite.
  let cluster: ClusterRuntime | undefined;
  try {
    cluster = await openCluster(paths.root, config.hostName, log.child({ component: 'cluster' }));
  } catch (e) {
    lock.release();
    throw e;
  }
  const store: StateStore = cluster?.store ?? SqliteStateStore.open(paths.stateDb);

  const events = new EventBus(config.hostName);
  const operations = new OperationManager(store, events, config.hostName, log.child({ component: 'operations' }));
  await operations.recover();

  let verdict: Promise<AccelVerdict> | undefined;
  const accelVerdict = (): Promise<AccelVerdict> =>
    (verdict ??= loadOrProbe(paths.accelCache, { qemuBinary: config.qemuBinary, deadlineMs: config.kvmProbeDeadlineMs }).catch((e) => {
      verdict = undefined;
      throw e;
    }));

  const drivers = new Map<InstanceType, InstanceDriver>();
  drivers.set('vm', new QemuDriver({ binary: config.qemuBinary, accelVerdict, log: log.child({ component: 'qemu' }) }));
  const env = process.env;
  const containerDriver = new ContainerDriver({ runcBinary: env.HYPERFOLD_RUNC, runcRoot: env.HYPERFOLD_RUNC_ROOT, idmapBase: env.HYPERFOLD_IDMAP_BASE ? Number(env.HYPERFOLD_IDMAP_BASE) : undefined, dataDir: paths.root, instancesDir: paths.instancesDir, log: log.child({ component: 'container' }) });
  drivers.set('container', containerDriver);

  /** Told when members join, leave, go offline or come back (the network overlay's peers). */
  const clusterChangeListeners: (() => void)[] = [];
  const closers: (() => Promise<void>)[] = [];
  const images = new ImageService(store, { imagesDir: paths.imagesDir, cacheDir: paths.cacheDir }, operations, log.child({ component: 'images' }));
  await images.init();
  images.registerBuilder(await tinyImageBuilder());
  for (const b of containerImageBuilders()) images.registerBuilder(b);
  // Areas that hook into the instance lifecycle (snapshot records…) add themselves here.
  const extensions: InstanceExtension[] = [];
  const instances = new InstanceService({
    extensions,
    store,
    drivers,
    images,
    operations,
    events,
    log: log.child({ component: 'instances' }),
    hostName: config.hostName,
    instancesDir: paths.instancesDir,
    capacity: hostCapacity,
    overcommit: config.overcommit,
    stopTimeoutMs: config.stopTimeoutMs,
    consoleLogMaxBytes: config.consoleLogMaxBytes,
  });

  const oneHost = singleHostDirectory({ hostName: config.hostName, capacity: hostCapacity, overcommit: config.overcommit, instances: () => instances.list() });
  // In a cluster every member is a candidate (the cluster service knows them); alone, this host.
  let clusterHosts: (() => Promise<PlacementHost[]>) | undefined;
  // An instance kept in a shared pool goes only to a host that reaches the pool.
  const placement = new PlacementService({ hosts: () => (clusterHosts ?? oneHost)(), poolHosts: (pool) => storage.poolHosts(pool) });

  const storageLog = log.child({ component: 'storage' });
  const storage = new StorageService({
    store,
    defaultPoolPath: paths.root,
    instances,
    images,
    events,
    log: storageLog,
    // A shared pool's name must be free on every host: each other member's own pool of that name.
    ...(cluster
      ? { poolKeysElsewhere: async (name: string) => (members ? (await members.list()).filter((m) => m.name !== config.hostName).map((m) => ({ host: m.name, key: localKey(m.name, `/storage-pools/${name}`) })) : []) }
      : {}),
  });
  await storage.init();
  extensions.push(storage.extension());
  closers.push(() => storage.close());
  const transfers = new ImageTransferService({ storage, instances, images, operations, events, log: storageLog });
  const copies = new CopyService({ storage, instances, operations, drivers, events, log: storageLog });
  const snapshots = new SnapshotService({ store, instances, operations, drivers, events, log: log.child({ component: 'snapshots' }) });
  extensions.push(snapshots.extension());
  const netHost = new LinuxNetHost(log.child({ component: 'network' }), { onDhcpRestart: (network, pid) => events.publish('network.dhcp-restarted', { network, pid }) });
  const networks = new NetworkService({
    store,
    host: netHost,
    names: new NetNames(tagFor(paths.root)),
    networksDir: `${paths.root}/networks`,
    dataDir: paths.root,
    events,
    operations,
    log: log.child({ component: 'network' }),
    // In a cluster every managed network spans the hosts over VXLAN, its peers the online members.
    ...(cluster
      ? {
          overlay: {
            localHost: config.hostName,
            localAddress: cluster.config.address,
            peers: async () => (members ? members.onlinePeers() : []),
            onPeersChanged: (cb: () => void) => void clusterChangeListeners.push(cb),
          },
        }
      : {}),
  });
  networks.bindInstances(instances);
  extensions.push(networks.extension);
  const containers = new ContainerService({ instances, images, operations, events, driver: containerDriver, cacheDir: paths.cacheDir, log: log.child({ component: 'containers' }) });

  const members = cluster
    ? new ClusterMembers({
        store,
        hostName: config.hostName,
        leaseTtl: cluster.config.leaseTtl,
        log: log.child({ component: 'cluster' }),
        self: async () => {
          const cap = hostCapacity();
          const verdict = await accelVerdict().catch(() => undefined);
          return {
            name: config.hostName,
            address: cluster.config.address,
            clusterPort: cluster.config.clusterPort,
            ...(cluster.config.etcd.managed && cluster.config.etcd.member ? { etcd: etcdUrls(cluster.config.address) } : {}),
            cpus: cap.cpus,
            memoryMiB: cap.memoryMiB,
            overcommit: config.overcommit,
            version: VERSION,
            ...(verdict?.qemuVersion ? { qemuVersion: verdict.qemuVersion } : {}),
          };
        },
        usage: () => ({ host: config.hostName, at: new Date().toISOString(), memoryUsedMiB: Math.round((totalmem() - freemem()) / 1048576), loadavg: loadavg()[0] ?? 0 }),
      })
    : undefined;
  const clusterService =
    cluster && members
      ? new ClusterService({ store, hostName: config.hostName, members, instances, etcd: cluster.membership, leaseTtl: cluster.config.leaseTtl, pkiDir: cluster.paths.pkiDir, pools: storage, log: log.child({ component: 'cluster' }) })
      : undefined;
  if (members) {
    await members.start();
    // Members come and go: the network overlays follow, and so does the list of etcd members reached
    // (on a change, and now and then: a change can arrive before the heartbeat cache shows it).
    let refreshing = Promise.resolve();
    const refreshEndpoints = (): void => {
      refreshing = refreshing
        .then(async () => cluster?.refreshEndpoints(await Promise.all((await members.list()).map(async (m) => ({ ...m, online: await members.isOnline(m.name) })))))
        .catch((e: unknown) => log.warn('cannot update the etcd endpoints', { error: (e as Error).message }));
    };
    const stopWatching = members.onChange(() => {
      for (const cb of clusterChangeListeners) cb();
      refreshEndpoints();
    });
    const endpointTimer = setInterval(refreshEndpoints, 5_000);
    endpointTimer.unref();
    closers.push(async () => {
      stopWatching();
      clearInterval(endpointTimer);
    });
  }
  if (clusterService) {
    clusterHosts = () => clusterService.placementHosts();
    // An image another host holds is fetched from it when this host needs it.
    images.setPeers(clusterService.imagePeers());
  }
  // The etcd space alert (cluster.etcd-space events, a log line) where this host watches a database.
  const etcdHealth = cluster?.etcdSpace
    ? new EtcdHealth({ host: config.hostName, events, log: log.child({ component: 'etcd' }), space: cluster.etcdSpace, intervalMs: Number(env.HYPERFOLD_ETCD_HEALTH_MS ?? 60_000) })
    : undefined;
  if (etcdHealth) {
    etcdHealth.start();
    closers.push(async () => etcdHealth.stop());
  }

  // Did the host boot since we last ran? Then autostart instances start.
  const hostKey = `/hosts/${config.hostName}`;
  const prev = (await store.get<HostRecord>(hostKey))?.value;
  const currentBoot = bootId();
  const hostBooted = !prev || prev.bootId !== currentBoot;
  await store.put(hostKey, { name: config.hostName, bootId: currentBoot, version: VERSION, lastStart: startedAt } satisfies HostRecord);

  await networks.start().catch((e) => log.error('networking unavailable', { error: (e as Error).message }));
  const reconciled = await instances.reconcile({ hostBooted });
  await networks.reconcileInstances().catch((e) => log.error('network reconcile failed', { error: (e as Error).message }));
  if (reconciled.attached.length || reconciled.lost.length || reconciled.resumed.length || reconciled.orphans.length) log.info('reconciled instances', { ...reconciled });

  const services: ApiServices = {
    instances,
    placement,
    operations,
    images,
    events,
    storage,
    transfers,
    copies,
    snapshots,
    containers,
    networks,
    version: VERSION,
    ...(cluster ? { stale: () => !cluster.etcdStore.isAvailable() } : {}),
    ...(clusterService ? { cluster: clusterService } : {}),
    clusterControl: {
      status: async () => {
        if (!cluster || !clusterService) return { clustered: false, host: config.hostName };
        const info = await clusterService.info();
        return {
          clustered: true,
          host: config.hostName,
          cluster: info,
          address: cluster.config.address,
          etcd: {
            endpoints: cluster.etcdStore.urls,
            managed: cluster.config.etcd.managed,
            member: cluster.config.etcd.member,
            // The database against its quota, as of the last check (level ok / warning / critical).
            ...(etcdHealth ? { space: etcdHealth.status } : {}),
          },
          leaseTtl: cluster.config.leaseTtl,
        };
      },
      service: () => clusterService,
      init: async (body) => {
        const c = await initCluster(paths.root, config, body, log.child({ component: 'cluster' }));
        restartSoon();
        return { clustered: false, host: config.hostName, address: c.address, cluster: { clusterId: c.clusterId, name: c.clusterName, createdAt: c.joinedAt } };
      },
      join: async (body) => {
        if (cluster) throw new HfError('HF_ERR_ALREADY_CLUSTERED', `this host is already host ${cluster.config.hostName} of cluster ${cluster.config.clusterName}: remove it from that cluster first`);
        const cap = hostCapacity();
        const v = await accelVerdict().catch(() => undefined);
        const c = await joinCluster(paths.root, config, body, { manifest: await joinManifest(store), cpus: cap.cpus, memoryMiB: cap.memoryMiB, version: VERSION, ...(v?.qemuVersion ? { qemuVersion: v.qemuVersion } : {}) }, log.child({ component: 'cluster' }));
        restartSoon();
        return { clustered: false, host: config.hostName, address: c.address, cluster: { clusterId: c.clusterId, name: c.clusterName, createdAt: c.joinedAt } };
      },
      caPem: async () => {
        if (!clusterService) throw new HfError('HF_ERR_NOT_CLUSTERED', 'this host is not part of a cluster');
        return (await clusterService.tls()).ca;
      },
      backup: async (file) => {
        if (!cluster) throw new HfError('HF_ERR_NOT_CLUSTERED', 'this host is not part of a cluster: its state is the SQLite file state.db');
        return backupCluster(cluster, file);
      },
    },
    host: async () => {
      const all = await instances.list();
      const active = all.filter((i) => i.host === config.hostName && isActive(i.state));
      return describeHost({
        name: config.hostName,
        overcommit: config.overcommit,
        verdict: await accelVerdict(),
        version: VERSION,
        startedAt,
        instances: {
          total: all.length,
          running: active.length,
          committedVcpus: active.reduce((s, i) => s + i.config.vcpus, 0),
          committedMemoryMiB: active.reduce((s, i) => s + i.config.memoryMiB, 0),
        },
      });
    },
  };

  const tcpApp = await buildApp(services, { token, log, version: VERSION });
  const unixApp = await buildApp(services, { log, version: VERSION });
  let listening: FastifyInstance[] = [];
  try {
    await tcpApp.listen({ host: config.listenHost, port: config.listenPort });
    listening.push(tcpApp);
    if (cluster && clusterService) {
      // The other hosts' way in: forwarded requests (mutual TLS with the cluster's certificates) and joins.
      const clusterApp = await buildApp(services, { token, log, version: VERSION, clusterTls: await clusterService.tls() });
      await clusterApp.listen({ host: cluster.config.address, port: cluster.config.clusterPort });
      listening.push(clusterApp);
    }
    await rm(paths.socket, { force: true });
    await unixApp.listen({ path: paths.socket });
    listening.push(unixApp);
    await chmod(paths.socket, 0o600);
  } catch (e) {
    for (const a of listening) await a.close();
    await members?.close();
    if (cluster) await cluster.close();
    else await store.close();
    lock.release();
    const err = e as NodeJS.ErrnoException;
    throw new HfError('HF_ERR_INTERNAL', `cannot listen (API ${config.listenHost}:${config.listenPort}${cluster ? `, cluster ${cluster.config.address}:${cluster.config.clusterPort}` : ''}): ${err.message}`, { cause: e });
  }
  const addr = tcpApp.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : config.listenPort;
  const url = `http://${config.listenHost.includes(':') ? `[${config.listenHost}]` : config.listenHost}:${port}`;

  // Warm the accelerator verdict in the background so the first start does not wait for it.
  void accelVerdict().then(
    (v) => log.info('accelerator verdict', { kvm: v.kvm.usable, reason: v.kvm.reason }),
    (e) => log.warn('accelerator probe failed', { error: (e as Error).message }),
  );

  if (config.buildTinyImage && !(await images.find('tiny'))) {
    const op = await images.build('tiny').catch((e) => {
      log.warn('cannot build the tiny image', { error: (e as Error).message });
      return undefined;
    });
    if (op) log.info('building the tiny image', { operation: op.id });
  }

  const trimTimer = setInterval(() => void instances.trimConsoleLogs(), 30_000);
  trimTimer.unref();

  /** Init and join: once the answer is on its way, the daemon starts again in cluster mode. */
  function restartSoon(): void {
    if (!opts.requestRestart) {
      log.warn('cluster membership changed: restart the daemon to switch over');
      return;
    }
    setTimeout(() => opts.requestRestart!(), 100).unref();
  }

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> =>
    (closing ??= (async () => {
      clearInterval(trimTimer);
      for (const a of listening) await a.close().catch(() => undefined);
      listening = [];
      await instances.close();
      await networks.close();
      for (const c of closers) await c();
      await members?.close();
      if (cluster) await cluster.close();
      else await store.close();
      await rm(paths.socket, { force: true });
      lock.release();
    })());

  log.info('hyperfold daemon ready', { url, socket: paths.socket, dataDir: paths.root, host: config.hostName, version: VERSION });
  return { config, paths, token, url, services, store, close };
}

async function prepareDataDir(paths: DataPaths): Promise<void> {
  try {
    await mkdir(paths.root, { recursive: true, mode: 0o700 });
    for (const d of [paths.instancesDir, paths.imagesDir, paths.cacheDir]) await mkdir(d, { recursive: true, mode: 0o700 });
    await access(paths.root, constants.W_OK);
    const probe = `${paths.root}/.write-test-${process.pid}`;
    await writeFile(probe, 'ok');
    await rm(probe);
  } catch (e) {
    throw new HfError('HF_ERR_DATA_DIR', `data directory ${paths.root} is not writable: ${(e as Error).message} (use --data-dir or HYPERFOLD_DATA to choose another)`, { cause: e });
  }
}

async function loadOrCreateToken(file: string): Promise<string> {
  try {
    const t = (await readFile(file, 'utf8')).trim();
    if (t.length >= 32) return t;
  } catch {
    // create below
  }
  const token = randomBytes(24).toString('base64url');
  await writeFile(file, token + '\n', { mode: 0o600 });
  return token;
}

/** What a joining host brings into the cluster (checked for clashes by the member it joins through). */
async function joinManifest(store: StateStore): Promise<JoinManifest> {
  const [inst, nets, ips, pools, shared] = await Promise.all([store.list('/instances/'), store.list('/networks/'), store.list('/network-ips/'), store.list('/storage-pools/'), store.list(SHARED_POOLS_PREFIX)]);
  return {
    instances: inst.entries.map((e) => e.key.slice('/instances/'.length)),
    networks: nets.entries.map((e) => networkSchema.parse(e.value)),
    ips: ips.entries.map((e) => ipReservationSchema.parse(e.value)),
    pools: [...pools.entries, ...shared.entries].map((e) => poolRecordSchema.parse(e.value)).map((p) => ({ name: p.name, shared: p.shared, ...(p.id ? { id: p.id } : {}) })),
  };
}
