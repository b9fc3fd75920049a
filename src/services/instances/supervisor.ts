// Supervision of running instances: the daemon's live handles, what an exit means (stopped or
// crashed, restart or not), the restart policy's timers, and the reconcile pass after a daemon
// restart. Reconcile works as a controller: it reads each record's desired and observed state
// and moves the world one step towards what the user asked for; it does not trust the record's
// word that something crashed.
import { readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError } from '../../core/errors.js';
import { decideOnExit, isActive, restartBackoffMs } from '../../core/lifecycle.js';
import { nameSchema, type Instance, type InstanceState, type InstanceType } from '../../core/model/instance.js';
import type { ExitInfo, InstanceDriver, InstanceHandle, InstancePaths, StartContext } from '../../drivers/driver.js';
import type { Logger } from '../../util/log.js';
import type { EventBus } from '../events.js';
import type { InstanceExtension } from '../extensions.js';
import type { InstanceRecords } from './records.js';

export interface SupervisorDeps {
  records: InstanceRecords;
  driver: (type: InstanceType) => InstanceDriver;
  paths: (name: string) => InstancePaths;
  extensions: () => InstanceExtension[];
  events: EventBus;
  log: Logger;
  hostName: string;
  instancesDir: string;
  /** Starts an instance as an operation (restart policy, autostart, an interrupted start). */
  start: (name: string) => Promise<unknown>;
}

export interface ReconcileResult {
  /** Live guests the daemon re-attached to. */
  attached: string[];
  /** Guests whose process was gone (crashed, or stopped when a stop was in flight). */
  lost: string[];
  /** Starts a dead daemon left half-done: torn down and started again (desired: running). */
  resumed: string[];
  autostarted: string[];
  /** Instance directories without a record (a create the daemon died in), removed. */
  orphans: string[];
}

export const INTERRUPTED_START = 'start interrupted: the daemon stopped during it';

export class Supervisor {
  private readonly handles = new Map<string, InstanceHandle>();
  /** Instances whose current exit was asked for by a user (no restart policy then). */
  private readonly stopping = new Set<string>();
  private readonly restartTimers = new Map<string, NodeJS.Timeout>();
  private closed = false;

  constructor(private readonly d: SupervisorDeps) {}

  handle(name: string): InstanceHandle | undefined {
    return this.handles.get(name);
  }

  /** The live handle; HF_ERR_INSTANCE_NOT_RUNNING when there is none. */
  requireHandle(name: string): InstanceHandle {
    const h = this.handles.get(name);
    if (!h) throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', `instance "${name}" is not running`);
    return h;
  }

  names(): string[] {
    return [...this.handles.keys()];
  }

  /** What a driver needs to start or re-attach an instance. */
  startContext(name: string): StartContext {
    return { paths: this.d.paths(name), onOom: (o) => this.d.events.publish('instance.oom', { name, ...o }) };
  }

  /** Watches a live handle: its exit records the new state and applies the restart policy. */
  supervise(name: string, handle: InstanceHandle): void {
    this.handles.set(name, handle);
    void handle.exited.then((exit) => this.onExit(name, handle, exit));
  }

  /** Runs `fn` (a stop) with the instance's exit counted as asked for. */
  async whileStopping<T>(name: string, fn: () => Promise<T>): Promise<T> {
    this.stopping.add(name);
    try {
      return await fn();
    } finally {
      this.stopping.delete(name);
    }
  }

  cancelRestart(name: string): void {
    const t = this.restartTimers.get(name);
    if (t) clearTimeout(t);
    this.restartTimers.delete(name);
  }

  /** Extensions' afterStop hooks (taps, volumes…); a failing hook is logged, the others still run. */
  async runAfterStop(inst: Instance): Promise<void> {
    for (const ext of this.d.extensions()) {
      if (!ext.afterStop) continue;
      try {
        await ext.afterStop(inst);
      } catch (e) {
        this.d.log.warn('afterStop hook failed', { name: inst.name, extension: ext.name, error: (e as Error).message });
      }
    }
  }

  /** Detaches from every live guest without stopping any (daemon shutdown). */
  close(): void {
    this.closed = true;
    for (const t of this.restartTimers.values()) clearTimeout(t);
    this.restartTimers.clear();
    for (const h of this.handles.values()) h.detach();
    this.handles.clear();
  }

  private async onExit(name: string, handle: InstanceHandle, exit: ExitInfo): Promise<void> {
    if (this.handles.get(name) !== handle) return;
    this.handles.delete(name);
    handle.detach();
    if (this.closed) return;
    const requested = this.stopping.has(name);
    let inst: Instance | undefined;
    try {
      inst = (await this.d.records.collection.get(name))?.value;
    } catch (e) {
      this.d.log.error('cannot read instance after exit', { name, error: (e as Error).message });
    }
    if (!inst) return;
    const decision = decideOnExit({ clean: exit.clean || requested, requestedStop: requested, policy: inst.config.restartPolicy, restartCount: inst.restartCount });
    await this.tearDown(inst);
    await this.d.records.setState(name, decision.state, (r) => ({
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

  /** Removes what a stopped instance's run left: driver leftovers, then the extensions' resources. */
  private async tearDown(inst: Instance): Promise<void> {
    await this.d.driver(inst.type).cleanup(inst, this.d.paths(inst.name)).catch((e: Error) => this.d.log.warn('driver cleanup failed', { name: inst.name, error: e.message }));
    await this.runAfterStop(inst);
  }

  private scheduleRestart(name: string, restartCount: number): void {
    this.cancelRestart(name);
    const delay = restartBackoffMs(restartCount);
    const timer = setTimeout(() => {
      this.restartTimers.delete(name);
      void this.d.start(name).catch((e: Error) => this.d.log.warn('automatic restart refused', { name, error: e.message }));
    }, delay);
    timer.unref();
    this.restartTimers.set(name, timer);
    this.d.log.info('restart scheduled by policy', { name, delayMs: delay });
  }

  /**
   * After a daemon restart (including a SIGKILL): re-attaches to every live guest of this host;
   * a start the dead daemon left half-done is torn down (a QEMU or container it spawned is
   * killed, taps go) and started again; a guest whose process is gone is marked crashed (or
   * stopped if a stop was in flight) and the restart policy applies. Autostart instances start
   * when the host has booted since we last ran. Runs before the API listens.
   */
  async reconcile(opts: { hostBooted: boolean }): Promise<ReconcileResult> {
    const out: ReconcileResult = { attached: [], lost: [], resumed: [], autostarted: [], orphans: [] };
    const all = await this.d.records.list();
    out.orphans = await this.removeOrphanDirs(new Set(all.map((i) => i.name)));
    for (const inst of all) {
      if (inst.host !== this.d.hostName || this.handles.has(inst.name)) continue;
      if (isActive(inst.state)) {
        const handle = await this.d.driver(inst.type).attach(inst, this.startContext(inst.name)).catch((e: Error) => {
          this.d.log.warn('re-attach failed', { name: inst.name, error: e.message });
          return null;
        });
        if (handle) {
          const observed = await handle.observe().catch(() => 'running' as const);
          const state: InstanceState = observed === 'paused' ? 'paused' : observed === 'running' ? 'running' : 'stopped';
          // A stop that was in flight when the daemon died converges to what the guest does now.
          await this.d.records.setState(inst.name, state, (r) => ({ ...r, runtime: handle.runtime }));
          this.supervise(inst.name, handle);
          out.attached.push(inst.name);
          continue;
        }
        if (inst.state === 'starting') {
          // No guest crashed: the daemon died while starting it (the runtime is recorded only
          // once running). attach() killed what it had spawned; the rest goes now.
          await this.tearDown(inst);
          await this.d.records.setState(inst.name, 'stopped', (r) => ({ ...r, runtime: undefined, lastExit: { at: new Date().toISOString(), reason: INTERRUPTED_START, clean: true } }));
          if (inst.desired === 'running') {
            out.resumed.push(inst.name);
            // A start that fails now records `stopped` with its reason, and its operation fails.
            void this.d.start(inst.name).catch((e: Error) => this.d.log.warn('cannot start again after an interrupted start', { name: inst.name, error: e.message }));
          }
          continue;
        }
        out.lost.push(inst.name);
        await this.onLost(inst, inst.state === 'stopping' || inst.desired === 'stopped');
        continue;
      }
      if (opts.hostBooted && inst.config.autostart) {
        out.autostarted.push(inst.name);
        void this.d.start(inst.name).catch((e: Error) => this.d.log.warn('autostart failed', { name: inst.name, error: e.message }));
      }
    }
    return out;
  }

  private async onLost(inst: Instance, wasStopping: boolean): Promise<void> {
    const reason = 'process was gone when the daemon started';
    const decision = decideOnExit({ clean: wasStopping, requestedStop: wasStopping, policy: inst.config.restartPolicy, restartCount: inst.restartCount });
    await this.tearDown(inst);
    await this.d.records.setState(inst.name, decision.state, (r) => ({
      ...r,
      runtime: undefined,
      lastExit: { at: new Date().toISOString(), reason, clean: wasStopping },
      restartCount: decision.restart ? r.restartCount + 1 : r.restartCount,
    }));
    if (decision.state === 'crashed') this.d.events.publish('instance.crashed', { name: inst.name, reason });
    if (decision.restart) this.scheduleRestart(inst.name, inst.restartCount);
  }

  /**
   * Instance directories without a record: the daemon died in a create before writing it (the
   * record is the create's last step). Nothing ever ran from them; they would block the name.
   */
  private async removeOrphanDirs(known: Set<string>): Promise<string[]> {
    let entries: string[];
    try {
      entries = readdirSync(this.d.instancesDir);
    } catch {
      return [];
    }
    const orphans = entries.filter((n) => nameSchema.safeParse(n).success && !known.has(n));
    for (const n of orphans) {
      await rm(join(this.d.instancesDir, n), { recursive: true, force: true });
      this.d.log.info('removed the directory of an unfinished create', { name: n });
    }
    return orphans;
  }
}
