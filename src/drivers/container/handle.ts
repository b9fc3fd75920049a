// A running container: the daemon's live link to one runc container (the InstanceHandle of the
// container driver), and the one timer that watches every container's init and OOM counter.
// Besides the lifecycle (observe, stop, kill, pause), it does what happens inside the running
// container: live limits (runc update), exec, and NIC hot-plug (the network layer makes the
// veth pair on the host; the handle moves its peer into the container and configures it).
import { randomUUID } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { HfError } from '../../core/errors.js';
import type { InstanceConfig, NicConfig, RuntimeInfo } from '../../core/model/instance.js';
import { run } from '../../util/exec.js';
import { isProcessAlive, waitForProcessExit } from '../../util/proc.js';
import type { ConsoleAttachment, ExecOptions, ExecSession, ExitInfo, InstanceHandle, InstancePaths, LiveChangeResult, NicPlug, ObservedState, StartContext } from '../driver.js';
import type { CgroupLayout, ContainerCgroup } from './cgroups.js';
import { attachFifoConsole } from './console.js';
import { plugNic, unplugNic } from './netns.js';
import type { Runc } from './runc.js';
import { CONTAINER_CAPS, DEFAULT_PATH, mergeEnv, type ContainerMeta, type containerResources } from './spec.js';

/** What a handle needs of its driver (the ContainerDriver): runc, the monitor, cgroups. */
export interface ContainerRuntime {
  readonly runc: Runc;
  readonly monitor: Monitor;
  readonly layout: CgroupLayout;
  cgroupOf(containerId: string): ContainerCgroup;
  resourcesFor(config: Pick<InstanceConfig, 'vcpus' | 'memoryMiB' | 'pidsLimit'>): ReturnType<typeof containerResources>;
}

/** One timer for every running container: init liveness and the OOM-kill counter. */
export class Monitor {
  private readonly handles = new Set<ContainerHandle>();
  private timer: NodeJS.Timeout | undefined;
  private ticking = false;

  constructor(private readonly intervalMs: number) {}

  add(h: ContainerHandle): void {
    this.handles.add(h);
    if (!this.timer) {
      this.timer = setInterval(() => void this.tick(), this.intervalMs);
      this.timer.unref();
    }
  }

  remove(h: ContainerHandle): void {
    this.handles.delete(h);
    if (this.handles.size === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  get size(): number {
    return this.handles.size;
  }

  private async tick(): Promise<void> {
    if (this.ticking) return;
    this.ticking = true;
    try {
      await Promise.all([...this.handles].map((h) => h.poll()));
    } finally {
      this.ticking = false;
    }
  }
}

/** A running container. */
export class ContainerHandle implements InstanceHandle {
  readonly exited: Promise<ExitInfo>;
  private resolveExit!: (e: ExitInfo) => void;
  private done = false;
  private killRequested = false;
  private shutdownRequested = false;
  private oomKills = 0;
  private readonly cgroup: ContainerCgroup;
  private readonly consoles = new Set<ConsoleAttachment>();
  private readonly id: string;

  constructor(
    private readonly driver: ContainerRuntime,
    readonly runtime: RuntimeInfo,
    private readonly paths: InstancePaths,
    private readonly meta: ContainerMeta,
    private readonly ctx: StartContext,
    /** The FIFO to init's stdin (the console's input). */
    private readonly consoleIn: string,
  ) {
    this.exited = new Promise((r) => (this.resolveExit = r));
    this.id = String(runtime.details.containerId);
    this.cgroup = driver.cgroupOf(this.id);
  }

  /** The OOM counter's starting point is read in the background: the first poll waits for it. */
  private baseline: Promise<void> | undefined;

  async init(): Promise<void> {
    this.baseline = this.cgroup.oomKills().then(
      (n) => void (this.oomKills = n ?? 0),
      () => undefined,
    );
    this.driver.monitor.add(this);
  }

  private alive(): boolean {
    return isProcessAlive(this.runtime.pid, this.runtime.pidStartTime);
  }

  /** Called by the monitor: notices OOM kills and the end of init. */
  async poll(): Promise<void> {
    if (this.done) return;
    await this.checkOom();
    if (!this.alive()) await this.finish();
  }

  private async checkOom(): Promise<number> {
    await this.baseline;
    const n = await this.cgroup.oomKills();
    if (n === undefined || n <= this.oomKills) return 0;
    const delta = n - this.oomKills;
    this.oomKills = n;
    try {
      this.ctx.onOom?.({ kills: delta, total: n });
    } catch {
      // a listener's failure is not ours
    }
    return delta;
  }

  private async finish(): Promise<void> {
    if (this.done) return;
    this.done = true;
    this.driver.monitor.remove(this);
    const oom = await this.checkOom().catch(() => 0);
    for (const c of this.consoles) c.close();
    this.consoles.clear();
    let info: ExitInfo;
    if (this.killRequested) info = { clean: true, reason: 'stopped by force', exitCode: null, signal: 'SIGKILL' };
    else if (this.shutdownRequested && oom === 0) info = { clean: true, reason: `init shut down after ${this.meta.stopSignal}`, exitCode: null, signal: null };
    else if (oom > 0) info = { clean: false, reason: `init (pid ${this.runtime.pid}) was killed after the container ran out of memory`, exitCode: null, signal: 'SIGKILL' };
    else info = { clean: false, reason: `init (pid ${this.runtime.pid}) exited`, exitCode: null, signal: null };
    this.resolveExit(info);
  }

  async observe(): Promise<ObservedState> {
    if (this.done || !this.alive()) return 'stopped';
    const frozen = await this.cgroup.frozen();
    if (frozen === undefined) {
      const st = await this.driver.runc.state(this.id);
      return st?.status === 'paused' ? 'paused' : st?.status === 'stopped' || !st ? 'stopped' : 'running';
    }
    return frozen ? 'paused' : 'running';
  }

  async requestShutdown(): Promise<void> {
    if (!this.alive()) return;
    this.shutdownRequested = true;
    process.kill(this.runtime.pid, this.meta.stopSignal as NodeJS.Signals);
  }

  async kill(): Promise<void> {
    if (this.done) return;
    this.killRequested = true;
    // SIGKILL to the init of a PID namespace ends every process in it.
    if (this.alive()) {
      try {
        process.kill(this.runtime.pid, 'SIGKILL');
      } catch {
        // gone already
      }
      // Frozen tasks cannot die until thawed.
      if ((await this.cgroup.frozen().catch(() => false)) === true) await this.driver.runc.resume(this.id).catch(() => undefined);
    }
    await waitForProcessExit(this.runtime.pid, this.runtime.pidStartTime, 10_000, 10);
    await this.finish();
  }

  async pause(): Promise<void> {
    await this.driver.runc.pause(this.id);
  }

  async resume(): Promise<void> {
    await this.driver.runc.resume(this.id);
  }

  async attachConsole(): Promise<ConsoleAttachment> {
    const con = await attachFifoConsole(this.consoleIn, this.paths.consoleLog);
    this.consoles.add(con);
    con.onClose(() => this.consoles.delete(con));
    return con;
  }

  detach(): void {
    this.driver.monitor.remove(this);
    for (const c of this.consoles) c.close();
    this.consoles.clear();
  }

  async applyLive(changes: Partial<InstanceConfig>, current: InstanceConfig): Promise<LiveChangeResult> {
    const applied: string[] = [];
    const pending: string[] = [];
    const notes: string[] = [];
    const liveKeys = ['vcpus', 'memoryMiB', 'pidsLimit'] as const;
    const next = { ...current };
    for (const [k, v] of Object.entries(changes) as Array<[keyof InstanceConfig, unknown]>) {
      if ((liveKeys as readonly string[]).includes(k)) {
        (next as Record<string, unknown>)[k] = v;
        applied.push(k);
      } else {
        pending.push(k);
        notes.push(`${k} applies at the next start`);
      }
    }
    if (applied.length) await this.driver.runc.update(this.id, this.driver.resourcesFor(next));
    return { applied, pending, notes };
  }

  async liveInfo(): Promise<Record<string, unknown>> {
    return {
      pid: this.runtime.pid,
      containerId: this.id,
      cgroup: this.cgroup.path,
      cgroupMode: this.driver.layout.mode,
      privileged: this.meta.idmap === undefined,
      idmap: this.meta.idmap ?? null,
      usage: await this.cgroup.usage(),
    };
  }

  /** Moves the veth peer the network layer made (`plug.peer`) into the container, as `nic`. */
  async attachNic(nic: NicConfig, plug?: NicPlug): Promise<void> {
    if (!plug?.peer) throw new HfError('HF_ERR_INTERNAL', `no host interface was prepared for ${nic.name}`);
    if (!this.alive()) throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', 'the container is not running');
    await plugNic(this.runtime.pid, plug.peer, { name: nic.name, mac: nic.mac, address: plug.address, gateway: plug.gateway });
  }

  async detachNic(nicName: string): Promise<void> {
    if (!this.alive()) return; // its namespace, and the interface with it, went with init
    await unplugNic(this.runtime.pid, nicName);
  }

  async exec(argv: string[], opts: ExecOptions): Promise<ExecSession> {
    if (!this.alive()) throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', 'the container is not running');
    if (argv.length === 0) throw new HfError('HF_ERR_VALIDATION', 'give a command to run');
    const caps = [...CONTAINER_CAPS];
    const size = { cols: opts.cols ?? 80, rows: opts.rows ?? 24 };
    const proc = {
      terminal: opts.tty,
      ...(opts.tty ? { consoleSize: { width: size.cols, height: size.rows } } : {}),
      user: { uid: 0, gid: 0 },
      args: argv,
      env: mergeEnv([DEFAULT_PATH, 'TERM=xterm', 'container=hyperfold', ...this.meta.env], Object.entries(opts.env ?? {}).map(([k, v]) => `${k}=${v}`)),
      cwd: opts.cwd ?? '/',
      capabilities: { bounding: caps, effective: caps, permitted: caps },
      noNewPrivileges: false,
    };
    const base = join(this.paths.dir, `exec-${randomUUID()}`);
    const file = `${base}.json`;
    const pidFile = `${base}.pid`;
    await writeFile(file, JSON.stringify(proc), { mode: 0o600 });
    const child = opts.tty ? await this.driver.runc.spawnExecTty(this.id, file, pidFile, size) : await this.driver.runc.spawnExec(this.id, file, 'pipe');
    const exit = new Promise<number>((resolve) => {
      child.once('error', () => resolve(127));
      child.once('close', (code, signal) => {
        // Gone before the exit is told, so that a session that has ended has left nothing.
        rmSync(file, { force: true });
        rmSync(pidFile, { force: true });
        resolve(code ?? (signal ? 128 + (signalNumber(signal) ?? 9) : 1));
      });
    });
    // In a terminal session runc (under `script`) is not our child: find it by the pid its shell wrote.
    const runcPid = (): number | undefined => {
      const pid = Number(readFileOr(pidFile));
      return pid > 0 && isProcessAlive(pid) ? pid : undefined;
    };
    return {
      stdin: (d) => child.stdin?.write(d),
      closeStdin: () => child.stdin?.end(),
      onStdout: (cb) => child.stdout?.on('data', cb),
      onStderr: (cb) => child.stderr?.on('data', cb),
      exit,
      kill: (sig = 'SIGKILL') => {
        const pid = opts.tty ? runcPid() : undefined;
        // runc forwards the signal to the process in the container; `script` then ends by itself.
        try {
          if (pid) process.kill(pid, sig);
          else child.kill(sig);
        } catch {
          // already gone
        }
      },
      ...(opts.tty
        ? {
            resize: (cols: number, rows: number) => {
              const pid = runcPid();
              if (!pid) return;
              // runc follows its own terminal's size on SIGWINCH: set that terminal's size first.
              void run('stty', ['-F', `/proc/${pid}/fd/0`, 'rows', String(rows), 'cols', String(cols)], { allowFailure: true, timeoutMs: 5000 }).then((r) => {
                if (r.code === 0 && isProcessAlive(pid)) process.kill(pid, 'SIGWINCH');
              });
            },
          }
        : {}),
    };
  }
}

function signalNumber(sig: NodeJS.Signals): number | undefined {
  return (osConstants.signals as Record<string, number>)[sig];
}

function readFileOr(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return '';
  }
}
