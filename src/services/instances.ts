// The instance service: every lifecycle action on instances, whatever their type. It validates,
// checks state and resources, runs the driver, records state in the store and publishes events.
// Route handlers only translate HTTP to calls here.
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { rm, stat, open, truncate } from 'node:fs/promises';
import { mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { HfError, toHfError } from '../core/errors.js';
import { checkAllowed, decideOnExit, isActive, restartBackoffMs, type Action, type Allowed, type Capability, type LifecycleAction } from '../core/lifecycle.js';
import {
  createInstanceSchema,
  instanceSchema,
  nameSchema,
  updateInstanceSchema,
  type CreateInstance,
  type DiskConfig,
  type Instance,
  type InstanceConfig,
  type InstanceState,
  type InstanceType,
} from '../core/model/instance.js';
import type { Operation } from '../core/model/operation.js';
import { checkCanCommit, checkFitsHost, type HostCapacity, type OvercommitPolicy } from '../core/resources.js';
import { parseSize } from '../core/units.js';
import { parseInput } from '../core/validate.js';
import type { ConsoleAttachment, ExitInfo, InstanceDriver, InstanceHandle, InstancePaths } from '../drivers/driver.js';
import { Collection, type Versioned } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import { QemuImg } from '../storage/qemu-img.js';
import { createLinkedClone } from '../storage/overlay.js';
import type { Logger } from '../util/log.js';
import { KeyedMutex } from '../util/mutex.js';
import { UndoStack } from '../util/undo.js';
import type { EventBus } from './events.js';
import type { ImageService } from './images.js';
import type { InstanceExtension } from './extensions.js';
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
  qemuImg?: QemuImg;
  /** Areas that attach host resources to instances (networks, volumes). */
  extensions?: InstanceExtension[];
  /**
   * How long a synchronous change (PATCH) waits for a busy instance before answering HF_ERR_BUSY
   * naming what holds it (default 10 s). Operations queue without a bound instead.
   */
  busyWaitMs?: number;
}

const DEFAULT_BUSY_WAIT_MS = 10_000;



export class InstanceService {
  private readonly records: Collection<Instance>;
  private readonly handles = new Map<string, InstanceHandle>();
  /** Instances whose current exit was asked for by a user (no restart policy then). */
  private readonly stopping = new Set<string>();
  private readonly restartTimers = new Map<string, NodeJS.Timeout>();
  private readonly locks = new KeyedMutex();
  private readonly qemuImg: QemuImg;
  private closed = false;

  constructor(private readonly d: InstanceServiceDeps) {
    this.records = new Collection<Instance>(d.store, '/instances/', instanceSchema);
    this.qemuImg = d.qemuImg ?? new QemuImg();
  }

  // ---- queries -------------------------------------------------------------------------------

  async list(): Promise<Instance[]> {
    return (await this.records.list()).map((v) => v.value);
  }

  async get(name: string): Promise<Instance> {
    return (await this.load(name)).value;
  }

  /** What the hypervisor reports about a running instance right now (balloon, cgroup usage…). */
  async liveInfo(name: string): Promise<Record<string, unknown> | undefined> {
    await this.load(name);
    const h = this.handles.get(name);
    if (!h?.liveInfo) return undefined;
    try {
      return await h.liveInfo();
    } catch (e) {
      return { error: (e as Error).message };
    }
  }

  paths(name: string): InstancePaths {
    const dir = join(this.d.instancesDir, name);
    return { dir, consoleLog: join(dir, 'console.log') };
  }

  // ---- create --------------------------------------------------------------------------------

  /** Validates a create request and creates the instance (stopped). Synchronous-ish: disks are overlays. */
  async create(body: unknown): Promise<Instance> {
    const req = parseInput(createInstanceSchema, body);
    const driver = this.driver(req.type);
    if (await this.records.get(req.name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance "${req.name}" already exists`);

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

        const given = typeof body === 'object' && body !== null ? (body as Record<string, unknown>) : {};
        const config = await this.buildConfig(req, paths.dir, { vcpus: given.vcpus !== undefined, memory: given.memory !== undefined });
        const now = new Date().toISOString();
        let inst: Instance = {
          id: randomUUID(),
          name: req.name,
          type: req.type,
          host: this.d.hostName,
          project: 'default',
          image: req.image,
          description: req.description,
          config,
          pending: {},
          state: 'stopped',
          desired: 'stopped',
          restartCount: 0,
          createdAt: now,
          updatedAt: now,
        };
        if (driver.provision) inst = await driver.provision(inst, req.image ? await this.d.images.get(req.image) : undefined, paths);
        for (const ext of this.extensions) if (ext.onCreate) inst = await ext.onCreate(req, inst, undo);
        if (req.nics.length > 0 && inst.config.nics.length === 0) {
          throw new HfError('HF_ERR_UNSUPPORTED', 'networking is not available on this host: cannot attach NICs');
        }
        await driver.check(inst);
        const created = await this.records.create(inst.name, inst);
        this.d.events.publish('instance.created', { name: inst.name, type: inst.type });
        this.d.log.info('instance created', { name: inst.name, id: inst.id });
        return created.value;
      }, this.d.log),
    );
  }

  private async buildConfig(req: CreateInstance, dir: string, explicit: { vcpus: boolean; memory: boolean }): Promise<InstanceConfig> {
    let boot = req.boot;
    const disks: DiskConfig[] = [];
    let vcpus = req.vcpus;
    let memoryMiB = req.memory;
    if (req.image) {
      const img = await this.d.images.get(req.image);
      // An image may carry defaults (from an OVF, or the instance it was published from).
      // (only where they fit under ceilings the user gave)
      const dv = img.defaults.vcpus;
      const dm = img.defaults.memoryMiB;
      if (!explicit.vcpus && dv && (req.maxVcpus === undefined || dv <= req.maxVcpus)) vcpus = dv;
      if (!explicit.memory && dm && (req.maxMemory === undefined || dm <= req.maxMemory)) memoryMiB = dm;
      if (img.type !== req.type) throw new HfError('HF_ERR_VALIDATION', `image "${img.name}" is for ${img.type}s, not ${req.type}s`);
      boot ??= img.boot;
      if (img.disk) {
        const root = join(dir, 'root.qcow2');
        await createLinkedClone(root, img.disk.path, img.disk.format, this.qemuImg);
        disks.push({ name: 'root', path: root, format: 'qcow2', media: 'disk', readonly: false });
      }
    }
    for (const d of req.disks) {
      if (disks.some((x) => x.name === d.name)) throw new HfError('HF_ERR_VALIDATION', `disk name "${d.name}" is used twice`);
      let path = d.path ?? '';
      if (d.size !== undefined) {
        path = join(dir, `${d.name}.${d.format ?? 'qcow2'}`);
        await this.qemuImg.createBlank(path, parseSize(d.size, `disk ${d.name} size`), d.format ?? 'qcow2');
      } else {
        try {
          await stat(path);
        } catch {
          throw new HfError('HF_ERR_VALIDATION', `disk ${d.name}: ${path} does not exist`);
        }
      }
      disks.push({ name: d.name, path, format: d.format ?? 'qcow2', media: d.media ?? 'disk', bus: d.bus, readonly: d.readonly ?? d.media === 'cdrom', volume: d.volume });
    }
    if (!boot && req.type === 'vm') throw new HfError('HF_ERR_VALIDATION', 'give an image or a boot source');
    // Containers boot their image's init; the boot field is unused for them.
    boot ??= { kind: 'disk', firmware: 'bios' };
    checkFitsHost({ name: req.name, vcpus, memoryMiB }, this.d.capacity());
    return {
      vcpus,
      maxVcpus: req.maxVcpus,
      memoryMiB,
      maxMemoryMiB: req.maxMemory,
      disks,
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

  private get extensions(): InstanceExtension[] {
    return this.d.extensions ?? [];
  }

  private async runAfterStop(inst: Instance): Promise<void> {
    for (const ext of this.extensions) {
      if (!ext.afterStop) continue;
      try {
        await ext.afterStop(inst);
      } catch (e) {
        this.d.log.warn('afterStop hook failed', { name: inst.name, extension: ext.name, error: (e as Error).message });
      }
    }
  }

  /** Create then (optionally) start, as one operation. */
  async createOperation(body: unknown): Promise<{ instance: Instance; operation?: Operation }> {
    const start = typeof body === 'object' && body !== null && (body as { start?: unknown }).start === true;
    const inst = await this.create(body);
    if (!start) return { instance: inst };
    const operation = await this.action(inst.name, 'start');
    return { instance: inst, operation };
  }

  // ---- update --------------------------------------------------------------------------------

  async update(name: string, body: unknown): Promise<{ instance: Instance; applied: string[]; pending: string[]; notes: string[] }> {
    const patch = parseInput(updateInstanceSchema, body);
    await this.load(name);
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
      const handle = this.handles.get(name);
      let live: { applied: string[]; pending: string[]; notes: string[] } = { applied: [], pending: [], notes: [] };
      if (running && Object.keys(next).length > 0) {
        // Growing a running instance commits more of the host now.
        checkCanCommit({ name, vcpus: merged.vcpus, memoryMiB: merged.memoryMiB }, await this.committed(name), this.d.capacity(), this.d.overcommit);
        if (allowed.live && handle?.applyLive) live = await handle.applyLive(next, cur.config);
        else live = { applied: [], pending: Object.keys(next), notes: [`${cur.type} driver applies changes at the next start`] };
      }

      const applied: string[] = [];
      const pending: string[] = [];
      const updated = await this.records.update(name, (r) => {
        const out: Instance = { ...r, config: { ...r.config }, pending: { ...r.pending }, updatedAt: new Date().toISOString() };
        // Policies and metadata apply at once, whatever the state.
        if (patch.restartPolicy !== undefined) { out.config.restartPolicy = patch.restartPolicy; applied.push('restartPolicy'); }
        if (patch.autostart !== undefined) { out.config.autostart = patch.autostart; applied.push('autostart'); }
        if (patch.description !== undefined) { out.description = patch.description; applied.push('description'); }
        for (const [k, v] of Object.entries(next) as Array<[keyof InstanceConfig, unknown]>) {
          if (running && !live.applied.includes(k)) {
            (out.pending as Record<string, unknown>)[k] = v;
            pending.push(k);
          } else {
            (out.config as Record<string, unknown>)[k] = v;
            delete (out.pending as Record<string, unknown>)[k];
            applied.push(k);
          }
        }
        return out;
      });
      this.d.events.publish('instance.updated', { name, applied, pending });
      return { instance: updated.value, applied, pending, notes: live.notes };
    }, wait);
  }

  // ---- lifecycle actions -----------------------------------------------------------------------

  /**
   * Starts a lifecycle action as an operation. On an idle instance the state check runs first,
   * so a request that makes no sense now fails at once with a named error and no operation. On a
   * busy one the action queues (status `queued`) and is checked when its turn comes.
   */
  async action(name: string, action: LifecycleAction, opts: { force?: boolean; timeoutMs?: number } = {}): Promise<Operation> {
    const inst = (await this.load(name)).value;
    const check: LifecycleAction = action === 'stop' && opts.force ? 'kill' : action;
    const queued = this.locks.busy(name);
    if (!queued) this.allowed(inst, check);
    // Only a graceful stop's wait for the guest can stop half-way and leave things as they were.
    const cancellable = action === 'stop' && !opts.force;
    return this.d.operations.start(
      `instance.${action}`,
      { kind: 'instance', name },
      (ctx) =>
        this.locked(name, action, ctx, async () => {
          this.allowed((await this.load(name)).value, check);
          switch (action) {
            case 'start':
              return this.doStart(name, ctx);
            case 'stop':
              return opts.force ? this.doStop(name, ctx, { force: true }) : this.doStop(name, ctx, { timeoutMs: opts.timeoutMs });
            case 'kill':
              return this.doStop(name, ctx, { force: true });
            case 'restart':
              await this.doStop(name, ctx, { timeoutMs: opts.timeoutMs, force: opts.force });
              return this.doStart(name, ctx);
            case 'pause':
              return this.doPause(name, true);
            case 'resume':
              return this.doPause(name, false);
          }
        }),
      { cancellable, queued },
    );
  }

  async delete(name: string, opts: { force?: boolean } = {}): Promise<Operation> {
    const inst = (await this.load(name)).value;
    const queued = this.locks.busy(name);
    if (!opts.force && !queued) this.allowed(inst, 'delete');
    return this.d.operations.start('instance.delete', { kind: 'instance', name }, (ctx) =>
      this.locked(name, 'delete', ctx, async () => {
        const cur = (await this.load(name)).value;
        if (isActive(cur.state) || this.handles.has(name)) {
          if (!opts.force) this.allowed(cur, 'delete');
          await this.doStop(name, ctx, { force: true });
        }
        this.cancelRestart(name);
        const after = (await this.load(name)).value;
        await this.driver(after.type).cleanup(after, this.paths(name));
        for (const ext of this.extensions) if (ext.onDelete) await ext.onDelete(after);
        await this.records.delete(name);
        await rm(this.paths(name).dir, { recursive: true, force: true });
        this.d.events.publish('instance.deleted', { name });
        this.d.log.info('instance deleted', { name });
      }),
      { queued },
    );
  }

  private async doStart(name: string, ctx: OperationContext): Promise<{ state: InstanceState }> {
    const t0 = performance.now();
    const marks: Record<string, number> = {};
    const mark = (what: string) => (marks[what] = Math.round((performance.now() - t0) * 10) / 10);
    const cur = (await this.load(name)).value;
    this.allowed(cur, 'start');
    this.cancelRestart(name);
    // Pending changes apply now.
    const config: InstanceConfig = { ...cur.config, ...cur.pending };
    const committed = await this.committed(name);
    checkCanCommit({ name, vcpus: config.vcpus, memoryMiB: config.memoryMiB }, committed, this.d.capacity(), this.d.overcommit);
    const driver = this.driver(cur.type);
    mark('admitted');
    let starting = await this.setState(name, 'starting', (r) => ({ ...r, config, pending: {}, desired: 'running' }));
    const paths = this.paths(name);
    await this.trimConsoleLog(paths.consoleLog);
    mark('recorded');
    const undo = new UndoStack(this.d.log);
    let handle: InstanceHandle;
    try {
      await driver.check(starting);
      const before = JSON.stringify(starting.config);
      for (const ext of this.extensions) {
        if (!ext.beforeStart) continue;
        starting = await ext.beforeStart(starting, undo);
      }
      // Record what the extensions filled in (a NIC's tap, a MAC), and only when they did.
      if (JSON.stringify(starting.config) !== before) starting = await this.setState(name, 'starting', (r) => ({ ...r, config: starting.config }));
      mark('checked');
      ctx.progress(10, 'starting hypervisor');
      handle = await driver.start(starting, { paths, progress: (p, m) => ctx.progress(10 + p * 0.9, m), onOom: (o) => this.d.events.publish('instance.oom', { name, ...o }) });
      mark('running');
      undo.commit();
    } catch (e) {
      await undo.unwind();
      const err = toHfError(e, 'HF_ERR_HYPERVISOR');
      await this.setState(name, 'stopped', (r) => ({ ...r, desired: 'stopped', runtime: undefined, lastExit: { at: new Date().toISOString(), reason: `start failed: ${err.message}`, clean: false } }));
      await driver.cleanup(starting, paths).catch(() => undefined);
      throw err;
    }
    await this.setState(name, 'running', (r) => ({ ...r, runtime: handle.runtime }));
    this.supervise(name, handle);
    mark('done');
    this.d.log.info('instance started', { name, pid: handle.runtime.pid, accel: handle.runtime.accel, ms: marks });
    return { state: 'running' };
  }

  private async doStop(name: string, ctx: OperationContext, opts: { force?: boolean; timeoutMs?: number }): Promise<{ state: InstanceState }> {
    const cur = (await this.load(name)).value;
    this.cancelRestart(name);
    const handle = this.handles.get(name);
    if (!handle) {
      // Nothing runs: the record may say otherwise after a failure; converge it.
      if (cur.state !== 'stopped') await this.setState(name, 'stopped', (r) => ({ ...r, desired: 'stopped', runtime: undefined }));
      return { state: 'stopped' };
    }
    this.stopping.add(name);
    try {
      await this.setState(name, 'stopping', (r) => ({ ...r, desired: 'stopped' }));
      if (!opts.force) {
        const timeoutMs = opts.timeoutMs ?? this.d.stopTimeoutMs;
        ctx.progress(20, `asking the guest to shut down (up to ${Math.round(timeoutMs / 1000)} s)`);
        try {
          if ((await handle.observe()) === 'paused') await handle.resume();
          await handle.requestShutdown();
        } catch (e) {
          this.d.log.warn('graceful shutdown request failed', { name, error: (e as Error).message });
        }
        const outcome = await waitForShutdown(handle, timeoutMs, ctx.signal);
        if (outcome === 'cancelled') {
          // The user gave up on the stop: the guest keeps running (it may still power itself
          // off, having been asked; then its exit is recorded as any other).
          this.stopping.delete(name);
          await this.setState(name, 'running', (r) => ({ ...r, desired: 'running' }));
          ctx.signal.throwIfAborted();
        }
        if (outcome === 'timeout') {
          ctx.message(`guest did not shut down within ${Math.round(timeoutMs / 1000)} s: forcing`);
          ctx.progress(80, 'forcing stop');
        }
      }
      await handle.kill();
      await handle.exited;
      // the exit handler records the final state; wait for it so the operation ends consistent
      await this.waitForState(name, ['stopped', 'crashed'], 5000);
    } finally {
      this.stopping.delete(name);
    }
    return { state: 'stopped' };
  }

  private async doPause(name: string, pause: boolean): Promise<{ state: InstanceState }> {
    const cur = (await this.load(name)).value;
    this.allowed(cur, pause ? 'pause' : 'resume');
    const handle = this.requireHandle(name);
    if (pause) await handle.pause();
    else await handle.resume();
    const state: InstanceState = pause ? 'paused' : 'running';
    await this.setState(name, state, (r) => ({ ...r, desired: pause ? 'paused' : 'running' }));
    return { state };
  }

  // ---- supervision -------------------------------------------------------------------------------

  /** Watches a live handle: its exit records the new state and applies the restart policy. */
  private supervise(name: string, handle: InstanceHandle): void {
    this.handles.set(name, handle);
    void handle.exited.then((exit) => this.onExit(name, handle, exit));
  }

  private async onExit(name: string, handle: InstanceHandle, exit: ExitInfo): Promise<void> {
    if (this.handles.get(name) !== handle) return;
    this.handles.delete(name);
    handle.detach();
    if (this.closed) return;
    const requested = this.stopping.has(name);
    let rec: Versioned<Instance> | undefined;
    try {
      rec = await this.records.get(name);
    } catch (e) {
      this.d.log.error('cannot read instance after exit', { name, error: (e as Error).message });
    }
    if (!rec) return;
    const inst = rec.value;
    const decision = decideOnExit({ clean: exit.clean || requested, requestedStop: requested, policy: inst.config.restartPolicy, restartCount: inst.restartCount });
    await this.driver(inst.type).cleanup(inst, this.paths(name)).catch(() => undefined);
    await this.runAfterStop(inst);
    await this.setState(name, decision.state, (r) => ({
      ...r,
      runtime: undefined,
      desired: decision.restart ? 'running' : 'stopped',
      lastExit: { at: new Date().toISOString(), reason: exit.reason, clean: exit.clean },
      restartCount: decision.restart ? r.restartCount + 1 : r.restartCount,
    }));
    this.d.log.info('instance exited', { name, clean: exit.clean, reason: exit.reason, state: decision.state, restart: decision.restart });
    if (decision.state === 'crashed') this.d.events.publish('instance.crashed', { name, reason: exit.reason });
    if (decision.restart) this.scheduleRestart(name, inst.restartCount);
  }

  private scheduleRestart(name: string, restartCount: number): void {
    this.cancelRestart(name);
    const delay = restartBackoffMs(restartCount);
    const timer = setTimeout(() => {
      this.restartTimers.delete(name);
      void this.action(name, 'start').catch((e) => this.d.log.warn('automatic restart refused', { name, error: (e as Error).message }));
    }, delay);
    timer.unref();
    this.restartTimers.set(name, timer);
    this.d.log.info('restart scheduled by policy', { name, delayMs: delay });
  }

  private cancelRestart(name: string): void {
    const t = this.restartTimers.get(name);
    if (t) clearTimeout(t);
    this.restartTimers.delete(name);
  }

  /**
   * Re-attaches to every instance of this host that the store says is active (after a daemon
   * restart, including a SIGKILL); instances whose process is gone are marked and the restart
   * policy applies. Autostart instances start when the host has booted since we last ran.
   */
  async reconcile(opts: { hostBooted: boolean }): Promise<{ attached: string[]; lost: string[]; autostarted: string[] }> {
    const attached: string[] = [];
    const lost: string[] = [];
    const autostarted: string[] = [];
    for (const inst of await this.list()) {
      if (inst.host !== this.d.hostName) continue;
      if (this.handles.has(inst.name)) continue;
      if (isActive(inst.state)) {
        const driver = this.driver(inst.type);
        let handle: InstanceHandle | null = null;
        try {
          handle = await driver.attach(inst, { paths: this.paths(inst.name), onOom: (o) => this.d.events.publish('instance.oom', { name: inst.name, ...o }) });
        } catch (e) {
          this.d.log.warn('re-attach failed', { name: inst.name, error: (e as Error).message });
        }
        if (handle) {
          const observed = await handle.observe().catch(() => 'running' as const);
          const state: InstanceState = observed === 'paused' ? 'paused' : observed === 'running' ? 'running' : 'stopped';
          // A stop or start that was in flight when the daemon died converges to what the guest does now.
          await this.setState(inst.name, state, (r) => ({ ...r, runtime: handle!.runtime }));
          this.supervise(inst.name, handle);
          attached.push(inst.name);
          continue;
        }
        lost.push(inst.name);
        const wasStopping = inst.state === 'stopping' || inst.desired === 'stopped';
        await this.onExitOfLost(inst, wasStopping);
        continue;
      }
      if (inst.state === 'starting' || inst.state === 'stopping') {
        await this.setState(inst.name, 'stopped', (r) => ({ ...r, runtime: undefined }));
      }
      if (opts.hostBooted && inst.config.autostart && !isActive(inst.state)) {
        autostarted.push(inst.name);
        void this.action(inst.name, 'start').catch((e) => this.d.log.warn('autostart failed', { name: inst.name, error: (e as Error).message }));
      }
    }
    return { attached, lost, autostarted };
  }

  private async onExitOfLost(inst: Instance, wasStopping: boolean): Promise<void> {
    const decision = decideOnExit({ clean: wasStopping, requestedStop: wasStopping, policy: inst.config.restartPolicy, restartCount: inst.restartCount });
    await this.driver(inst.type).cleanup(inst, this.paths(inst.name)).catch(() => undefined);
    await this.runAfterStop(inst);
    await this.setState(inst.name, decision.state, (r) => ({
      ...r,
      runtime: undefined,
      lastExit: { at: new Date().toISOString(), reason: 'process was gone when the daemon started', clean: wasStopping },
      restartCount: decision.restart ? r.restartCount + 1 : r.restartCount,
    }));
    if (decision.state === 'crashed') this.d.events.publish('instance.crashed', { name: inst.name, reason: 'process was gone when the daemon started' });
    if (decision.restart) this.scheduleRestart(inst.name, inst.restartCount);
  }

  // ---- console -----------------------------------------------------------------------------------

  async attachConsole(name: string): Promise<ConsoleAttachment> {
    this.allowed((await this.load(name)).value, 'console');
    return this.requireHandle(name).attachConsole();
  }

  /** The tail of the bounded console log (at most `maxBytes`). */
  async consoleLog(name: string, maxBytes = 256 * 1024): Promise<string> {
    await this.load(name);
    const file = this.paths(name).consoleLog;
    let fh;
    try {
      fh = await open(file, 'r');
    } catch {
      return '';
    }
    try {
      const { size } = await fh.stat();
      const len = Math.min(size, maxBytes);
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, size - len);
      return buf.toString('utf8');
    } finally {
      await fh.close();
    }
  }

  /**
   * Keeps the console log bounded: QEMU appends to it (O_APPEND) even while the daemon is down;
   * when it grows past the cap we keep the newest half.
   */
  async trimConsoleLog(file: string): Promise<void> {
    // The usual answer (missing or small) without a trip through the thread pool: this is on the start path.
    let size: number;
    try {
      size = statSync(file).size;
    } catch {
      return;
    }
    if (size <= this.d.consoleLogMaxBytes) return;
    let fh;
    try {
      fh = await open(file, 'r+');
    } catch {
      return;
    }
    try {
      const { size } = await fh.stat();
      if (size <= this.d.consoleLogMaxBytes) return;
      const keep = Math.floor(this.d.consoleLogMaxBytes / 2);
      const buf = Buffer.alloc(keep);
      await fh.read(buf, 0, keep, size - keep);
      await truncate(file, 0);
      await fh.write(buf, 0, keep, 0);
    } finally {
      await fh.close();
    }
  }

  /** Trims every running instance's console log; called periodically by the daemon. */
  async trimConsoleLogs(): Promise<void> {
    for (const name of this.handles.keys()) await this.trimConsoleLog(this.paths(name).consoleLog).catch(() => undefined);
  }

  // ---- for other services (network, storage, live changes) -------------------------------------

  /**
   * Runs `fn` under the instance's lock with its current record and live handle (if running).
   * Other services use this to change an instance's config and the running guest together.
   */
  async withInstance<T>(name: string, what: string, fn: (inst: Instance, handle: InstanceHandle | undefined) => Promise<T>, ctx?: OperationContext): Promise<T> {
    await this.load(name);
    return this.locked(name, what, ctx, async () => fn((await this.load(name)).value, this.handles.get(name)));
  }

  /**
   * The lifecycle table's answer for `action` on `inst` as it is now, with the capabilities of
   * its running handle (or else its driver). Throws the named refusal. Every service asks this
   * before touching an instance, instead of keeping state lists or `if (!handle.x)` checks.
   */
  allowed(inst: Instance, action: Action): Allowed {
    return checkAllowed(inst, action, this.capabilities(inst));
  }

  /** What `inst` can do: its running handle's capabilities, or else its driver's. */
  capabilities(inst: Instance): ReadonlySet<Capability> {
    return this.handles.get(inst.name)?.capabilities ?? this.driver(inst.type).capabilities;
  }

  /** Compare-and-swap update of an instance record (call inside withInstance). */
  async patch(name: string, fn: (r: Instance) => Instance): Promise<Instance> {
    const v = await this.records.update(name, (r) => ({ ...fn(r), updatedAt: new Date().toISOString() }));
    this.d.events.publish('instance.updated', { name });
    return v.value;
  }

  /** Whether the instance's lock is held, and by what ("busy" errors name it). */
  busyWith(name: string): string | undefined {
    return this.locks.holder(name);
  }

  // ---- internals ---------------------------------------------------------------------------------

  /** Detaches from every live guest without stopping any (daemon shutdown). */
  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.restartTimers.values()) clearTimeout(t);
    this.restartTimers.clear();
    for (const h of this.handles.values()) h.detach();
    this.handles.clear();
  }

  handle(name: string): InstanceHandle | undefined {
    return this.handles.get(name);
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

  private requireHandle(name: string): InstanceHandle {
    const h = this.handles.get(name);
    if (!h) throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', `instance "${name}" is not running`);
    return h;
  }

  private driver(type: InstanceType): InstanceDriver {
    const d = this.d.drivers.get(type);
    if (!d) throw new HfError('HF_ERR_UNSUPPORTED', `no driver for ${type} instances on this host`);
    return d;
  }

  private async load(name: string): Promise<Versioned<Instance>> {
    const parsed = nameSchema.safeParse(name);
    if (!parsed.success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid instance name`);
    const v = await this.records.get(name);
    if (!v) throw new HfError('HF_ERR_INSTANCE_NOT_FOUND', `instance "${name}" not found`);
    return v;
  }

  private async setState(name: string, state: InstanceState, fn: (r: Instance) => Instance = (r) => r): Promise<Instance> {
    let prev: InstanceState | undefined;
    const v = await this.records.update(name, (r) => {
      prev = r.state;
      return { ...fn(r), state, updatedAt: new Date().toISOString() };
    });
    if (prev !== state) this.d.events.publish('instance.state', { name, state, previous: prev });
    return v.value;
  }

  private async waitForState(name: string, states: InstanceState[], timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      const v = await this.records.get(name);
      if (!v || states.includes(v.value.state)) return;
      await sleep(20);
    }
  }

  /** vCPUs and memory committed by this host's active instances, other than `except`. */
  private async committed(except: string): Promise<{ vcpus: number; memoryMiB: number }> {
    let vcpus = 0;
    let memoryMiB = 0;
    for (const i of await this.list()) {
      if (i.name === except || i.host !== this.d.hostName || !isActive(i.state)) continue;
      vcpus += i.config.vcpus;
      memoryMiB += i.config.memoryMiB;
    }
    return { vcpus, memoryMiB };
  }
}

/** Waits for a guest asked to shut down: it exited, the timeout passed, or the stop was cancelled. */
function waitForShutdown(handle: InstanceHandle, timeoutMs: number, signal: AbortSignal): Promise<'exited' | 'timeout' | 'cancelled'> {
  if (signal.aborted) return Promise.resolve('cancelled');
  return new Promise((resolve) => {
    const finish = (how: 'exited' | 'timeout' | 'cancelled'): void => {
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      resolve(how);
    };
    const onAbort = (): void => finish('cancelled');
    const timer = setTimeout(() => finish('timeout'), timeoutMs);
    signal.addEventListener('abort', onAbort, { once: true });
    void handle.exited.then(() => finish('exited'));
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

