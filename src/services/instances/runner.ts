// The steps of starting, stopping and pausing one instance, run by the service under the
// instance's lock inside an operation. A start registers the undo of every step that changed
// the world (extensions' taps, the driver's process), so a failure anywhere before `running` is
// recorded leaves nothing behind.
import { performance } from 'node:perf_hooks';
import { toHfError } from '../../core/errors.js';
import type { Action, Allowed } from '../../core/lifecycle.js';
import type { Instance, InstanceConfig, InstanceState, InstanceType } from '../../core/model/instance.js';
import { checkCanCommit, type HostCapacity, type OvercommitPolicy } from '../../core/resources.js';
import type { InstanceDriver, InstanceHandle, InstancePaths } from '../../drivers/driver.js';
import { failpoint } from '../../util/failpoint.js';
import type { Logger } from '../../util/log.js';
import { UndoStack } from '../../util/undo.js';
import type { EventBus } from '../events.js';
import type { InstanceExtension } from '../extensions.js';
import type { OperationContext } from '../operations.js';
import { trimConsoleLog } from './console.js';
import type { InstanceRecords } from './records.js';
import type { Supervisor } from './supervisor.js';

export interface InstanceRunnerDeps {
  records: InstanceRecords;
  supervisor: Supervisor;
  driver: (type: InstanceType) => InstanceDriver;
  paths: (name: string) => InstancePaths;
  extensions: () => InstanceExtension[];
  /** The lifecycle table's answer for an action on the instance as it is now (throws the named refusal). */
  allowed: (inst: Instance, action: Action) => Allowed;
  events: EventBus;
  log: Logger;
  hostName: string;
  capacity: () => HostCapacity;
  overcommit: OvercommitPolicy;
  stopTimeoutMs: number;
  consoleLogMaxBytes: number;
}

/** How long a stop waits for the exit handler to record the instance stopped (cleanup, extensions' afterStop). */
const EXIT_RECORD_TIMEOUT_MS = 30_000;

export class InstanceRunner {
  constructor(private readonly d: InstanceRunnerDeps) {}

  async start(name: string, ctx: OperationContext): Promise<{ state: InstanceState }> {
    const t0 = performance.now();
    const marks: Record<string, number> = {};
    const mark = (what: string) => (marks[what] = Math.round((performance.now() - t0) * 10) / 10);
    const cur = (await this.d.records.load(name)).value;
    this.d.allowed(cur, 'start');
    this.d.supervisor.cancelRestart(name);
    // Pending changes apply now.
    const config: InstanceConfig = { ...cur.config, ...cur.pending };
    const committed = await this.d.records.committed(this.d.hostName, name);
    checkCanCommit({ name, vcpus: config.vcpus, memoryMiB: config.memoryMiB }, committed, this.d.capacity(), this.d.overcommit);
    const driver = this.d.driver(cur.type);
    mark('admitted');
    let starting = await this.d.records.setState(name, 'starting', (r) => ({ ...r, config, pending: {}, desired: 'running' }));
    failpoint('launch.after-record');
    const paths = this.d.paths(name);
    await trimConsoleLog(paths.consoleLog, this.d.consoleLogMaxBytes);
    mark('recorded');
    const undo = new UndoStack(this.d.log);
    let handle: InstanceHandle;
    try {
      await driver.check(starting);
      const before = JSON.stringify(starting.config);
      for (const ext of this.d.extensions()) {
        if (!ext.beforeStart) continue;
        starting = await ext.beforeStart(starting, undo);
      }
      // Record what the extensions filled in (a NIC's tap, a MAC), and only when they did.
      if (JSON.stringify(starting.config) !== before) starting = await this.d.records.setState(name, 'starting', (r) => ({ ...r, config: starting.config }));
      mark('checked');
      ctx.progress(10, 'starting hypervisor');
      // The driver registers the undo of what it made (QEMU killed, sockets removed) on our stack.
      const started = await driver.start(starting, { ...this.d.supervisor.startContext(name), undo, progress: (p, m) => ctx.progress(10 + p * 0.9, m) });
      handle = started;
      undo.add('stop the new instance', async () => {
        await started.kill();
        started.detach();
      });
      mark('running');
      failpoint('launch.before-running');
      await this.d.records.setState(name, 'running', (r) => ({ ...r, runtime: started.runtime }));
      undo.commit();
    } catch (e) {
      await undo.unwind();
      const err = toHfError(e, 'HF_ERR_HYPERVISOR');
      await this.d.records.setState(name, 'stopped', (r) => ({ ...r, desired: 'stopped', runtime: undefined, lastExit: { at: new Date().toISOString(), reason: `start failed: ${err.message}`, clean: false } }));
      await driver.cleanup(starting, paths).catch(() => undefined);
      throw err;
    }
    this.d.supervisor.supervise(name, handle);
    mark('done');
    this.d.log.info('instance started', { name, pid: handle.runtime.pid, accel: handle.runtime.accel, ms: marks });
    return { state: 'running' };
  }

  async stop(name: string, ctx: OperationContext, opts: { force?: boolean; timeoutMs?: number }): Promise<{ state: InstanceState }> {
    const cur = (await this.d.records.load(name)).value;
    this.d.supervisor.cancelRestart(name);
    const handle = this.d.supervisor.handle(name);
    if (!handle) {
      // Nothing runs: the record may say otherwise after a failure; converge it.
      if (cur.state !== 'stopped') await this.d.records.setState(name, 'stopped', (r) => ({ ...r, desired: 'stopped', runtime: undefined }));
      return { state: 'stopped' };
    }
    await this.d.supervisor.whileStopping(name, async () => {
      await this.d.records.setState(name, 'stopping', (r) => ({ ...r, desired: 'stopped' }));
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
          await this.d.records.setState(name, 'running', (r) => ({ ...r, desired: 'running' }));
          ctx.signal.throwIfAborted();
        }
        if (outcome === 'timeout') {
          ctx.message(`guest did not shut down within ${Math.round(timeoutMs / 1000)} s: forcing`);
          ctx.progress(80, 'forcing stop');
        }
      }
      await handle.kill();
      await handle.exited;
      // The exit handler records the final state; wait for it so the operation ends consistent.
      await this.d.records.waitForState(name, ['stopped', 'crashed'], EXIT_RECORD_TIMEOUT_MS);
    });
    return { state: 'stopped' };
  }

  async pause(name: string, pause: boolean): Promise<{ state: InstanceState }> {
    const cur = (await this.d.records.load(name)).value;
    this.d.allowed(cur, pause ? 'pause' : 'resume');
    const handle = this.d.supervisor.requireHandle(name);
    if (pause) await handle.pause();
    else await handle.resume();
    const state: InstanceState = pause ? 'paused' : 'running';
    await this.d.records.setState(name, state, (r) => ({ ...r, desired: pause ? 'paused' : 'running' }));
    return { state };
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
