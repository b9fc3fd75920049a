// The instance service: every lifecycle action on instances, whatever their type. It validates,
// checks state and resources, runs the driver, records state in the store and publishes events.
// Route handlers only translate HTTP to calls here.
import { randomUUID } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { HfError, isHfError, toHfError } from '../core/errors.js';
import { checkAllowed, isActive, type Action, type Allowed, type Capability, type LifecycleAction } from '../core/lifecycle.js';
import {
  createInstanceSchema,
  updateInstanceSchema,
  type CreateInstance,
  type Instance,
  type InstanceConfig,
  type InstanceType,
} from '../core/model/instance.js';
import type { ImageRecord } from '../core/model/image.js';
import type { Operation } from '../core/model/operation.js';
import type { PlacementRequest } from '../core/placement.js';
import { checkCanCommit, checkFitsHost, type HostCapacity, type OvercommitPolicy } from '../core/resources.js';
import { parseInput } from '../core/validate.js';
import type { ConsoleAttachment, InstanceDriver, InstanceHandle, InstancePaths, LiveChangeResult } from '../drivers/driver.js';
import type { PageEntry, PageOptions } from '../state/cached-collection.js';
import type { Versioned } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import { failpoint } from '../util/failpoint.js';
import type { Logger } from '../util/log.js';
import { KeyedMutex } from '../util/mutex.js';
import { UndoStack } from '../util/undo.js';
import type { EventBus } from './events.js';
import type { ImageService } from './images.js';
import type { InstanceExtension } from './extensions.js';
import { readConsoleTail, trimConsoleLog } from './instances/console.js';
import { pickConfig, planUpdate } from './instances/update.js';
import { InstanceRecords } from './instances/records.js';
import { InstanceRunner } from './instances/runner.js';
import { Supervisor, type ReconcileResult } from './instances/supervisor.js';
import type { OperationContext, OperationManager } from './operations.js';

export interface InstanceServiceDeps {
  store: StateStore;
  drivers: Map<InstanceType, InstanceDriver>;
  images: ImageService;
  operations: OperationManager;
  events: EventBus;
  log: Logger;
  hostName: string;
  instancesDir: string;
  capacity: () => HostCapacity;
  overcommit: OvercommitPolicy;
  stopTimeoutMs: number;
  consoleLogMaxBytes: number;
  /** Areas that attach host resources to instances (networks, volumes). */
  extensions?: InstanceExtension[];
  /**
   * How long a synchronous change (PATCH) waits for a busy instance before answering HF_ERR_BUSY
   * naming what holds it (default 10 s). Operations queue without a bound instead.
   */
  busyWaitMs?: number;
}

const DEFAULT_BUSY_WAIT_MS = 10_000;

/**
 * Who calls `create`, when it is not a plain request: a caller that creates as one step of its own
 * work (a copy, an import) hands down its undo stack and operation; the create route hands down
 * the reason placement gave for choosing this host.
 */
export type CreateCaller = { placementReason?: string } & ({ undo: UndoStack; ctx: OperationContext } | { undo?: undefined; ctx?: undefined });

export class InstanceService {
  private readonly records: InstanceRecords;
  private readonly supervisor: Supervisor;
  private readonly runner: InstanceRunner;
  private readonly locks = new KeyedMutex();

  constructor(private readonly d: InstanceServiceDeps) {
    this.records = new InstanceRecords(d.store, d.events);
    this.supervisor = new Supervisor({
      records: this.records,
      driver: (type) => this.driver(type),
      paths: (name) => this.paths(name),
      extensions: () => this.extensions,
      events: d.events,
      log: d.log,
      hostName: d.hostName,
      instancesDir: d.instancesDir,
      start: (name) => this.action(name, 'start'),
    });
    this.runner = new InstanceRunner({ ...d, records: this.records, supervisor: this.supervisor, driver: (type) => this.driver(type), paths: (name) => this.paths(name), extensions: () => this.extensions, allowed: (inst, action) => this.allowed(inst, action) });
  }

  // ---- queries -------------------------------------------------------------------------------

  async list(): Promise<Instance[]> {
    return this.records.list();
  }

  /** A page of records in name order with their JSON text (the list route's path; read-only values). */
  page(opts: PageOptions<Instance>): Promise<{ entries: PageEntry<Instance>[]; next?: string }> {
    return this.records.page(opts);
  }

  async get(name: string): Promise<Instance> {
    return (await this.load(name)).value;
  }

  /** The record, or undefined when there is none (or the name is not valid). */
  async find(name: string): Promise<Instance | undefined> {
    try {
      return (await this.load(name)).value;
    } catch (e) {
      if (isHfError(e, 'HF_ERR_INSTANCE_NOT_FOUND') || isHfError(e, 'HF_ERR_INVALID_NAME')) return undefined;
      throw e;
    }
  }

  /** What the hypervisor reports about a running instance right now (balloon, cgroup usage…). */
  async liveInfo(name: string): Promise<Record<string, unknown> | undefined> {
    await this.load(name);
    const h = this.supervisor.handle(name);
    if (!h?.liveInfo) return undefined;
    try {
      return await h.liveInfo();
    } catch (e) {
      return { error: (e as Error).message };
    }
  }

  /** The host this service creates instances on. */
  get hostName(): string {
    return this.d.hostName;
  }

  paths(name: string): InstancePaths {
    const dir = join(this.d.instancesDir, name);
    return { dir, consoleLog: join(dir, 'console.log') };
  }

  // ---- create --------------------------------------------------------------------------------

  /**
   * Validates a create request and creates the instance (stopped). Synchronous-ish: disks are overlays.
   * A caller that creates as one step of its own work (a copy, an import) hands down its undo
   * stack: the new instance is then removed with the rest if a later step of that work fails
   * (directly, under the instance's lock: no nested delete operation).
   * The instance is created on this host: a `target` naming another host is HF_ERR_HOST_NOT_FOUND
   * (a clustered daemon forwards such a request before it gets here).
   */
  async create(body: unknown, caller?: CreateCaller): Promise<Instance> {
    return this.createParsed(parseInput(createInstanceSchema, body), body, caller);
  }

  /** create() of a request already parsed (`body` as the caller sent it: which sizes it gave). */
  private async createParsed(req: CreateInstance, body: unknown, caller?: CreateCaller): Promise<Instance> {
    const driver = await this.checkCreate(req);

    return this.locks.run(req.name, 'create', () =>
      UndoStack.run(async (undo) => {
        const paths = this.paths(req.name);
        // Synchronous: two quick syscalls on the create path, not two trips through the thread pool.
        try {
          mkdirSync(this.d.instancesDir, { recursive: true });
          mkdirSync(paths.dir, { recursive: false, mode: 0o700 });
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
            throw new HfError('HF_ERR_ALREADY_EXISTS', `instance "${req.name}" already exists (directory ${paths.dir} is present)`);
          }
          throw toHfError(e, 'HF_ERR_DATA_DIR');
        }
        undo.add('remove instance directory', () => rm(paths.dir, { recursive: true, force: true }));

        const image = req.image ? await this.d.images.get(req.image) : undefined;
        const config = this.buildConfig(req, image, explicitSize(body));
        const placement = placementRecord(req.group, req.spread, caller?.placementReason);
        // Disks kept in a storage pool (`storage`) go to the directory its extension makes for them.
        let disksDir: string | undefined;
        for (const ext of this.extensions) if (ext.disksDir) disksDir = (await ext.disksDir(req, undo)) ?? disksDir;
        if (req.storage !== undefined && !this.extensions.some((e) => e.disksDir)) throw new HfError('HF_ERR_UNSUPPORTED', 'storage pools are not available on this host');
        const now = new Date().toISOString();
        let inst: Instance = {
          id: randomUUID(),
          name: req.name,
          type: req.type,
          host: this.d.hostName,
          project: 'default',
          image: req.image,
          ...(req.storage !== undefined ? { storage: req.storage } : {}),
          description: req.description,
          config,
          pending: {},
          state: 'stopped',
          desired: 'stopped',
          restartCount: 0,
          ...(placement ? { placement } : {}),
          createdAt: now,
          updatedAt: now,
        };
        // The driver makes what the instance needs from its image and the request (a VM's disks, a container's root filesystem).
        if (req.disks.length > 0 && req.type !== 'vm') throw new HfError('HF_ERR_UNSUPPORTED', `${req.type}s take no disks at create: attach a storage volume instead`);
        if (driver.provision) inst = await driver.provision(inst, image, disksDir ? { ...paths, disksDir } : paths, undefined, req.disks);
        for (const ext of this.extensions) if (ext.onCreate) inst = await ext.onCreate(req, inst, undo);
        if (req.nics.length > 0 && inst.config.nics.length === 0) {
          throw new HfError('HF_ERR_UNSUPPORTED', 'networking is not available on this host: cannot attach NICs');
        }
        await driver.check(inst);
        failpoint('launch.before-record');
        const created = await this.records.collection.create(inst.name, inst);
        this.d.events.publish('instance.created', { name: inst.name, type: inst.type });
        this.d.log.info('instance created', { name: inst.name, id: inst.id });
        const name = inst.name;
        if (caller?.undo) {
          const { ctx } = caller;
          caller.undo.add(`remove the new instance ${name}`, () => this.locks.run(name, 'undo create', () => this.remove(name, ctx)));
        }
        return created.value;
      }, this.d.log),
    );
  }

  /** The checks of a create that need no image: this host, a driver for the type, a free name. */
  private async checkCreate(req: CreateInstance): Promise<InstanceDriver> {
    if (req.target !== undefined && req.target !== this.d.hostName) {
      throw new HfError('HF_ERR_HOST_NOT_FOUND', `no host named "${req.target}": this host is "${this.d.hostName}" and it creates instances on itself only`, {
        details: { target: req.target, hosts: [this.d.hostName] },
      });
    }
    const driver = this.driver(req.type);
    if (await this.records.collection.get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance "${req.name}" already exists`);
    return driver;
  }

  /**
   * What placement weighs for a create request: its name, type, size (with its image's defaults,
   * as the create will take them) and the placement fields. Validates the request as create does.
   */
  async placementRequest(body: unknown): Promise<PlacementRequest> {
    const req = parseInput(createInstanceSchema, body);
    // In a cluster the image may be another host's (a create here fetches it first).
    const image = req.image ? await this.d.images.describe(req.image) : undefined;
    const size = this.sizeOf(req, image, explicitSize(body));
    return {
      name: req.name,
      type: req.type,
      vcpus: size.vcpus,
      memoryMiB: size.memoryMiB,
      target: req.target,
      group: req.group,
      spread: req.spread,
      createStopped: !req.start,
      ...(req.storage !== undefined ? { storage: req.storage } : {}),
    };
  }

  /** The size of a new instance: the request's, or its image's defaults where the user gave none. */
  private sizeOf(req: CreateInstance, img: ImageRecord | undefined, explicit: { vcpus: boolean; memory: boolean }): { vcpus: number; memoryMiB: number } {
    let vcpus = req.vcpus;
    let memoryMiB = req.memory;
    if (img) {
      // An image may carry defaults (from an OVF, or the instance it was published from).
      // (only where they fit under ceilings the user gave)
      const dv = img.defaults.vcpus;
      const dm = img.defaults.memoryMiB;
      if (!explicit.vcpus && dv && (req.maxVcpus === undefined || dv <= req.maxVcpus)) vcpus = dv;
      if (!explicit.memory && dm && (req.maxMemory === undefined || dm <= req.maxMemory)) memoryMiB = dm;
      if (img.type !== req.type) throw new HfError('HF_ERR_VALIDATION', `image "${img.name}" is for ${img.type}s, not ${req.type}s`);
    }
    return { vcpus, memoryMiB };
  }

  /** The config of a new instance from the request and its image's defaults (pure; disks come from the driver's provision). */
  private buildConfig(req: CreateInstance, img: ImageRecord | undefined, explicit: { vcpus: boolean; memory: boolean }): InstanceConfig {
    const { vcpus, memoryMiB } = this.sizeOf(req, img, explicit);
    let boot = req.boot ?? img?.boot;
    if (!boot && req.type === 'vm') throw new HfError('HF_ERR_VALIDATION', 'give an image or a boot source');
    // Containers boot their image's init; the boot field is unused for them.
    boot ??= { kind: 'disk', firmware: 'bios' };
    checkFitsHost({ name: req.name, vcpus, memoryMiB }, this.d.capacity());
    return {
      vcpus,
      maxVcpus: req.maxVcpus,
      memoryMiB,
      maxMemoryMiB: req.maxMemory,
      disks: [],
      nics: [],
      boot,
      accel: req.accel,
      devices: req.devices,
      restartPolicy: req.restartPolicy,
      autostart: req.autostart,
      privileged: req.privileged,
      pidsLimit: req.pidsLimit,
    };
  }

  /**
   * Create then (optionally) start. The create itself is quick: it answers the instance, and the
   * start's operation when asked to start. An image that another host of the cluster holds and
   * this one does not must be fetched first: then the whole create is one operation
   * (`instance.create`) that shows the fetch's progress, creates and starts, and answers no
   * instance yet.
   */
  async createOperation(body: unknown, opts: { placementReason?: string } = {}): Promise<{ instance?: Instance; operation?: Operation }> {
    const start = typeof body === 'object' && body !== null && (body as { start?: unknown }).start === true;
    const req = parseInput(createInstanceSchema, body);
    if (!req.image || !(await this.d.images.needsFetch(req.image))) {
      const inst = await this.createParsed(req, body, { placementReason: opts.placementReason });
      if (!start) return { instance: inst };
      const operation = await this.action(inst.name, 'start');
      return { instance: inst, operation };
    }
    await this.checkCreate(req);
    const image = req.image;
    const operation = await this.d.operations.start(
      'instance.create',
      { kind: 'instance', name: req.name },
      async (ctx) => {
        await this.d.images.ensure(image, ctx);
        // A cancel while the image came stops here; once the create begins it goes to the end.
        ctx.signal.throwIfAborted();
        ctx.progress(90, `creating ${req.name}`);
        const inst = await this.createParsed(req, body, { placementReason: opts.placementReason });
        if (!start) return { instance: inst.name, state: inst.state };
        ctx.progress(95, `starting ${req.name}`);
        await this.locked(inst.name, 'start', ctx, () => this.runAction(inst.name, 'start', {}, ctx));
        return { instance: inst.name, state: 'running' };
      },
      { cancellable: true },
    );
    return { operation };
  }

  // ---- update --------------------------------------------------------------------------------

  async update(name: string, body: unknown): Promise<{ instance: Instance; applied: string[]; pending: string[]; notes: string[] }> {
    const patch = parseInput(updateInstanceSchema, body);
    await this.loadOwn(name);
    // A synchronous request: it waits its turn behind queued operations, but only so long.
    const wait = { timeoutMs: this.d.busyWaitMs ?? DEFAULT_BUSY_WAIT_MS, label: `instance "${name}"` };
    return this.locks.run(name, 'update', async () => {
      const cur = (await this.load(name)).value;
      const allowed = this.allowed(cur, 'update');
      const next: Partial<InstanceConfig> = {};
      if (patch.vcpus !== undefined) next.vcpus = patch.vcpus;
      if (patch.maxVcpus !== undefined) next.maxVcpus = patch.maxVcpus;
      if (patch.memory !== undefined) next.memoryMiB = patch.memory;
      if (patch.maxMemory !== undefined) next.maxMemoryMiB = patch.maxMemory;
      if (patch.pidsLimit !== undefined) next.pidsLimit = patch.pidsLimit;
      if (patch.accel !== undefined) next.accel = patch.accel;
      if (patch.devices !== undefined) next.devices = patch.devices;
      if (cur.type === 'vm' && next.vcpus !== undefined && !Number.isInteger(next.vcpus)) throw new HfError('HF_ERR_VALIDATION', 'vcpus of a VM must be a whole number');
      if (next.memoryMiB !== undefined && next.memoryMiB < 16) throw new HfError('HF_ERR_VALIDATION', `memory must be at least 16 MiB (got ${next.memoryMiB} MiB)`);
      const merged = { ...cur.config, ...cur.pending, ...next };
      if (merged.maxVcpus !== undefined && merged.maxVcpus < merged.vcpus) throw new HfError('HF_ERR_VALIDATION', `vcpus (${merged.vcpus}) above maxVcpus (${merged.maxVcpus})`);
      if (merged.maxMemoryMiB !== undefined && merged.maxMemoryMiB < merged.memoryMiB) throw new HfError('HF_ERR_VALIDATION', `memory (${merged.memoryMiB} MiB) above maxMemory (${merged.maxMemoryMiB} MiB)`);
      checkFitsHost({ name, vcpus: merged.vcpus, memoryMiB: merged.memoryMiB }, this.d.capacity());

      const running = isActive(cur.state);
      const undo = new UndoStack(this.d.log);
      let live: LiveChangeResult = { applied: [], pending: [], notes: [] };
      if (running && Object.keys(next).length > 0) {
        // Growing a running instance commits more of the host now.
        checkCanCommit({ name, vcpus: merged.vcpus, memoryMiB: merged.memoryMiB }, await this.records.committed(this.d.hostName, name), this.d.capacity(), this.d.overcommit);
        const handle = this.supervisor.handle(name);
        if (allowed.live && handle?.applyLive) {
          live = await handle.applyLive(next, cur.config);
          // The guest changed before the record: if the write fails, the guest goes back.
          const revert = pickConfig(cur.config, live.applied);
          if (Object.keys(revert).length > 0) {
            const changed = { ...cur.config, ...pickConfig(next, live.applied) };
            undo.add('revert the live change', async () => void (await handle.applyLive!(revert, changed)));
          }
        } else live = { applied: [], pending: Object.keys(next), notes: [`${cur.type} driver applies changes at the next start`] };
      }

      // What goes where is decided once, here: the write below may run its callback several times.
      const plan = planUpdate(patch, next, running, live.applied);
      let updated: Versioned<Instance>;
      try {
        updated = await this.records.collection.update(name, (r) => plan.apply(r));
      } catch (e) {
        await undo.unwind();
        throw e;
      }
      undo.commit();
      this.d.events.publish('instance.updated', { name, applied: plan.applied, pending: plan.pending });
      return { instance: updated.value, applied: plan.applied, pending: plan.pending, notes: live.notes };
    }, wait);
  }

  // ---- lifecycle actions -----------------------------------------------------------------------

  /**
   * Starts a lifecycle action as an operation. On an idle instance the state check runs first,
   * so a request that makes no sense now fails at once with a named error and no operation. On a
   * busy one the action queues (status `queued`) and is checked when its turn comes.
   */
  async action(name: string, action: LifecycleAction, opts: { force?: boolean; timeoutMs?: number } = {}): Promise<Operation> {
    const inst = (await this.loadOwn(name)).value;
    const queued = this.locks.busy(name);
    if (!queued) this.allowed(inst, checkedAs(action, opts.force));
    // Only a graceful stop's wait for the guest can stop half-way and leave things as they were.
    const cancellable = action === 'stop' && !opts.force;
    return this.d.operations.start(
      `instance.${action}`,
      { kind: 'instance', name },
      (ctx) => this.locked(name, action, ctx, () => this.runAction(name, action, opts, ctx)),
      { cancellable, queued },
    );
  }

  /** Runs a lifecycle action on an instance whose lock the caller holds, after checking it is allowed now. */
  private async runAction(name: string, action: LifecycleAction, opts: { force?: boolean; timeoutMs?: number }, ctx: OperationContext): Promise<unknown> {
    this.allowed((await this.load(name)).value, checkedAs(action, opts.force));
    switch (action) {
      case 'start':
        return this.runner.start(name, ctx);
      case 'stop':
        return opts.force ? this.runner.stop(name, ctx, { force: true }) : this.runner.stop(name, ctx, { timeoutMs: opts.timeoutMs });
      case 'kill':
        return this.runner.stop(name, ctx, { force: true });
      case 'restart':
        await this.runner.stop(name, ctx, { timeoutMs: opts.timeoutMs, force: opts.force });
        return this.runner.start(name, ctx);
      case 'pause':
        return this.runner.pause(name, true);
      case 'resume':
        return this.runner.pause(name, false);
    }
  }

  async delete(name: string, opts: { force?: boolean } = {}): Promise<Operation> {
    const inst = (await this.loadOwn(name)).value;
    const queued = this.locks.busy(name);
    if (!opts.force && !queued) this.allowed(inst, 'delete');
    return this.d.operations.start('instance.delete', { kind: 'instance', name }, (ctx) =>
      this.locked(name, 'delete', ctx, async () => {
        const cur = (await this.load(name)).value;
        if (!opts.force && (isActive(cur.state) || this.supervisor.handle(name))) this.allowed(cur, 'delete');
        await this.remove(name, ctx);
      }),
      { queued },
    );
  }

  /** Stops the instance if it runs and removes it with everything it held (caller holds its lock). */
  private async remove(name: string, ctx: OperationContext): Promise<void> {
    const cur = (await this.load(name)).value;
    if (isActive(cur.state) || this.supervisor.handle(name)) await this.runner.stop(name, ctx, { force: true });
    this.supervisor.cancelRestart(name);
    const after = (await this.load(name)).value;
    await this.driver(after.type).cleanup(after, this.paths(name));
    for (const ext of this.extensions) if (ext.onDelete) await ext.onDelete(after);
    await this.records.collection.delete(name);
    await rm(this.paths(name).dir, { recursive: true, force: true });
    this.d.events.publish('instance.deleted', { name });
    this.d.log.info('instance deleted', { name });
  }

  // ---- supervision (instances/supervisor.ts) -----------------------------------------------------

  /** See Supervisor.reconcile: re-attach, converge interrupted starts, mark lost guests. */
  reconcile(opts: { hostBooted: boolean }): Promise<ReconcileResult> {
    return this.supervisor.reconcile(opts);
  }

  // ---- console -----------------------------------------------------------------------------------

  async attachConsole(name: string): Promise<ConsoleAttachment> {
    this.allowed((await this.loadOwn(name)).value, 'console');
    return this.supervisor.requireHandle(name).attachConsole();
  }

  /** The tail of the bounded console log (at most `maxBytes`). */
  async consoleLog(name: string, maxBytes = 256 * 1024): Promise<string> {
    await this.loadOwn(name);
    return readConsoleTail(this.paths(name).consoleLog, maxBytes);
  }

  /** Trims every running instance's console log; called periodically by the daemon. */
  async trimConsoleLogs(): Promise<void> {
    for (const name of this.supervisor.names()) await trimConsoleLog(this.paths(name).consoleLog, this.d.consoleLogMaxBytes).catch(() => undefined);
  }

  // ---- for other services (network, storage, live changes) -------------------------------------

  /**
   * Runs `fn` under the instance's lock with its current record and live handle (if running).
   * Other services use this to change an instance's config and the running guest together.
   */
  async withInstance<T>(name: string, what: string, fn: (inst: Instance, handle: InstanceHandle | undefined) => Promise<T>, ctx?: OperationContext): Promise<T> {
    await this.loadOwn(name);
    return this.locked(name, what, ctx, async () => fn((await this.load(name)).value, this.supervisor.handle(name)));
  }

  /**
   * The lifecycle table's answer for `action` on `inst` as it is now, with the capabilities of
   * its running handle (or else its driver). Throws the named refusal. Every service asks this
   * before touching an instance, instead of keeping state lists or `if (!handle.x)` checks.
   */
  allowed(inst: Instance, action: Action): Allowed {
    return checkAllowed(inst, action, this.capabilities(inst));
  }

  /**
   * The fail-fast check before another service starts an operation on `inst`: the table's answer
   * when the instance is idle. When it is busy the operation queues (the busy policy of
   * `action`) and asks `allowed` under the lock, in the state the holder leaves.
   */
  precheck(inst: Instance, action: Action): void {
    if (!this.locks.busy(inst.name)) this.allowed(inst, action);
  }

  /** What `inst` can do: its running handle's capabilities, or else its driver's. */
  capabilities(inst: Instance): ReadonlySet<Capability> {
    return this.supervisor.handle(inst.name)?.capabilities ?? this.driver(inst.type).capabilities;
  }

  /** Compare-and-swap update of an instance record (call inside withInstance). */
  async patch(name: string, fn: (r: Instance) => Instance): Promise<Instance> {
    const v = await this.records.collection.update(name, (r) => ({ ...fn(r), updatedAt: new Date().toISOString() }));
    this.d.events.publish('instance.updated', { name });
    return v.value;
  }


  // ---- internals ---------------------------------------------------------------------------------

  /** Detaches from every live guest without stopping any (daemon shutdown). */
  async close(): Promise<void> {
    this.supervisor.close();
    this.records.close();
  }

  handle(name: string): InstanceHandle | undefined {
    return this.supervisor.handle(name);
  }

  private get extensions(): InstanceExtension[] {
    return this.d.extensions ?? [];
  }

  /**
   * Runs `fn` under the instance's lock. An operation waiting for it says `queued` (naming the
   * holder) until it has it, and a cancel while it waits means it never runs.
   */
  private locked<T>(name: string, what: string, ctx: OperationContext | undefined, fn: () => Promise<T>): Promise<T> {
    if (!ctx) return this.locks.run(name, what, fn);
    return this.locks.run(name, `${what} (operation ${ctx.id})`, fn, {
      signal: ctx.signal,
      onQueued: (holder) => ctx.queued(`waiting for ${holder}`),
      onAcquired: () => ctx.running(),
    });
  }

  private driver(type: InstanceType): InstanceDriver {
    const d = this.d.drivers.get(type);
    if (!d) throw new HfError('HF_ERR_UNSUPPORTED', `no driver for ${type} instances on this host`);
    return d;
  }

  private load(name: string): Promise<Versioned<Instance>> {
    return this.records.load(name);
  }

  /**
   * The record of an instance this host may act on. A host acts only on its own instances: in a
   * cluster the API forwards a request about another host's instance there before it gets here.
   */
  private async loadOwn(name: string): Promise<Versioned<Instance>> {
    const v = await this.records.load(name);
    if (v.value.host !== this.d.hostName) {
      throw new HfError('HF_ERR_INVALID_STATE', `instance "${name}" lives on host ${v.value.host}: only that host acts on it (its API, or any member's, which forwards)`, { details: { host: v.value.host } });
    }
    return v;
  }
}

/** The action the lifecycle table judges: a forced stop is a kill. */
function checkedAs(action: LifecycleAction, force: boolean | undefined): LifecycleAction {
  return action === 'stop' && force ? 'kill' : action;
}

/** Which of vcpus and memory the user gave (the others may come from the image's defaults). */
function explicitSize(body: unknown): { vcpus: boolean; memory: boolean } {
  const given = typeof body === 'object' && body !== null ? (body as Record<string, unknown>) : {};
  return { vcpus: given.vcpus !== undefined, memory: given.memory !== undefined };
}

/** The record's placement field: only what was asked or said, none at all when nothing was. */
function placementRecord(group: string | undefined, spread: boolean | undefined, reason: string | undefined): Instance['placement'] {
  const p: NonNullable<Instance['placement']> = {};
  if (group !== undefined) p.group = group;
  if (spread !== undefined) p.spread = spread;
  if (reason !== undefined) p.reason = reason;
  return Object.keys(p).length > 0 ? p : undefined;
}
