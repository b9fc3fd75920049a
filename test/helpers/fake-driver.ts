// A driver that runs nothing: for unit tests of the services and the API (the real QEMU driver
// is covered by the integration tests). Each "process" is a promise the test can end.
import type { Capability } from '../../src/core/lifecycle.js';
import type { Instance, InstanceConfig } from '../../src/core/model/instance.js';
import type { ConsoleAttachment, ExitInfo, InstanceDriver, InstanceHandle, LiveChangeResult, ObservedState, StartContext } from '../../src/drivers/driver.js';
import { HfError } from '../../src/core/errors.js';
import { QEMU_CAPABILITIES } from '../../src/drivers/qemu/capabilities.js';

let nextPid = 100_000;

export class FakeHandle implements InstanceHandle {
  readonly exited: Promise<ExitInfo>;
  state: ObservedState = 'running';
  detached = false;
  /** Set by a test to make the handle take changes live (absent: everything waits for the next start). */
  applyLive?: (changes: Partial<InstanceConfig>, current: InstanceConfig) => Promise<LiveChangeResult>;
  /** Set by a test to narrow what this running instance can do (absent: the driver's set). */
  capabilities?: ReadonlySet<Capability>;
  private resolveExit!: (e: ExitInfo) => void;
  constructor(readonly runtime: Instance['runtime'] & object, private readonly powerOffOnShutdown: boolean) {
    this.exited = new Promise((r) => (this.resolveExit = r));
  }
  async observe(): Promise<ObservedState> {
    return this.state;
  }
  async requestShutdown(): Promise<void> {
    if (this.powerOffOnShutdown) setTimeout(() => this.exit({ clean: true, reason: 'guest powered off' }), 5);
  }
  async kill(): Promise<void> {
    this.exit({ clean: true, reason: 'stopped by force' });
  }
  async pause(): Promise<void> {
    this.state = 'paused';
  }
  async resume(): Promise<void> {
    this.state = 'running';
  }
  async attachConsole(): Promise<ConsoleAttachment> {
    throw new HfError('HF_ERR_UNSUPPORTED', 'no console in the fake driver');
  }
  detach(): void {
    this.detached = true;
  }
  /** Ends the "process" (a crash when clean is false). */
  exit(e: ExitInfo): void {
    this.state = 'stopped';
    this.resolveExit(e);
  }
}

export class FakeDriver implements InstanceDriver {
  readonly type = 'vm' as const;
  /** Like a VM's by default; a test may take capabilities away. */
  capabilities: ReadonlySet<Capability> = QEMU_CAPABILITIES;
  readonly handles = new Map<string, FakeHandle>();
  /** pids considered alive for attach() after a simulated daemon restart */
  readonly alive = new Set<number>();
  failStart: HfError | undefined;
  powerOffOnShutdown = true;
  starts = 0;

  async check(): Promise<void> {}

  async start(instance: Instance, _ctx: StartContext): Promise<InstanceHandle> {
    if (this.failStart) throw this.failStart;
    this.starts++;
    const h = new FakeHandle({ pid: nextPid++, pidStartTime: 1, accel: 'tcg', startedAt: new Date().toISOString(), details: {} }, this.powerOffOnShutdown);
    this.handles.set(instance.name, h);
    this.alive.add(h.runtime.pid);
    void h.exited.then(() => this.alive.delete(h.runtime.pid));
    return h;
  }

  async attach(instance: Instance): Promise<InstanceHandle | null> {
    if (!instance.runtime || !this.alive.has(instance.runtime.pid)) return null;
    const h = new FakeHandle(instance.runtime, this.powerOffOnShutdown);
    this.handles.set(instance.name, h);
    return h;
  }

  async cleanup(): Promise<void> {}
}
