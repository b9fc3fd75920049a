// QEMU process supervision: spawn detached from the daemon (so guests survive a daemon crash),
// connect QMP, and tell how the process ended. When the daemon is the direct parent it learns
// the exit from the child; after a re-attach it learns it from the QMP socket closing and
// /proc (a zombie counts as dead: PID 1 here reaps orphans late).
import { spawn, type ChildProcess } from 'node:child_process';
import { openSync, closeSync, readFileSync } from 'node:fs';
import { HfError } from '../../core/errors.js';
import type { ExitInfo } from '../driver.js';
import { isProcessAlive, readProcStat, waitForProcessExit } from '../../util/proc.js';
import { QmpClient, type QmpEvent } from './qmp/client.js';
import { Spawner, SpawnerUnavailable } from '../../util/spawner.js';
import { constants } from 'node:os';
import type { QmpLog } from './qmp/log.js';

export interface QemuProcessFiles {
  qmpSocket: string;
  /** QEMU's own stdout/stderr. */
  stderrLog: string;
}

/**
 * One QEMU process under supervision. Records the SHUTDOWN event so that an exit after a guest
 * power-off (or our quit) counts as clean, and one without it as a crash.
 */
export class QemuProcess {
  readonly exited: Promise<ExitInfo>;
  private resolveExit!: (e: ExitInfo) => void;
  private shutdownEvent: QmpEvent | undefined;
  private killRequested = false;
  private done = false;
  private pollTimer: NodeJS.Timeout | undefined;

  private constructor(
    readonly pid: number,
    readonly startTime: number,
    readonly qmp: QmpClient,
    private readonly child: ChildProcess | undefined,
    /** The exit status reported by the spawner that started it (while that lives). */
    spawnerExit?: Promise<number>,
  ) {
    this.exited = new Promise((r) => (this.resolveExit = r));
    qmp.on('event', (ev) => {
      if (ev.event === 'SHUTDOWN') this.shutdownEvent = ev;
    });
    if (child) {
      child.once('exit', (code, signal) => this.finish(code, signal));
    } else {
      spawnerExit?.then(
        (status) => this.finish(status > 128 ? null : status, status > 128 ? signalName(status - 128) : null),
        () => undefined,
      );
      // Not our child: the QMP socket closing is the first sign; /proc confirms.
      qmp.once('disconnect', () => void this.confirmGone());
      // Belt and braces: a QEMU that hangs with its socket open but whose process vanished.
      this.pollTimer = setInterval(() => {
        if (!isProcessAlive(this.pid, this.startTime)) void this.confirmGone();
      }, 2000);
      this.pollTimer.unref();
    }
  }

  /**
   * Spawns QEMU and connects to its QMP socket; fails with QEMU's own words if it dies first.
   * With a spawner, QEMU is started by that small shell instead of forking the daemon (fork
   * copies the daemon's page tables: milliseconds at ~100 MiB resident).
   */
  static async spawn(binary: string, argv: string[], files: QemuProcessFiles, log: QmpLog, timeoutMs = 15_000, spawner?: Spawner): Promise<QemuProcess> {
    if (spawner?.usable([binary, ...argv], '/dev/null', files.stderrLog)) {
      let started: { pid: number; exit: Promise<number> } | undefined;
      try {
        started = await spawner.start([binary, ...argv], '/dev/null', files.stderrLog, timeoutMs);
      } catch (e) {
        if (!(e instanceof SpawnerUnavailable)) throw e;
      }
      if (started) {
        const { pid, exit } = started;
        const abort = new AbortController();
        const early = exit.then((status) => {
          abort.abort();
          throw new HfError('HF_ERR_HYPERVISOR', `QEMU exited during start (status ${status}): ${tail(files.stderrLog)}`);
        });
        early.catch(() => undefined);
        try {
          const qmp = await Promise.race([QmpClient.connect(files.qmpSocket, { retryUntilMs: timeoutMs, log, connectTimeoutMs: timeoutMs, signal: abort.signal }), early]);
          return new QemuProcess(pid, readProcStat(pid)?.startTime ?? 0, qmp, undefined, exit);
        } catch (e) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone
          }
          throw e;
        }
      }
    }
    const errFd = openSync(files.stderrLog, 'a', 0o600);
    let child: ChildProcess;
    try {
      child = spawn(binary, argv, { detached: true, stdio: ['ignore', errFd, errFd] });
    } finally {
      closeSync(errFd);
    }
    const spawnError = new Promise<never>((_, reject) => {
      child.once('error', (e: NodeJS.ErrnoException) =>
        reject(
          e.code === 'ENOENT'
            ? new HfError('HF_ERR_MISSING_DEPENDENCY', `${binary} is not installed: apt-get install qemu-system-x86`, { cause: e })
            : new HfError('HF_ERR_HYPERVISOR', `cannot start ${binary}: ${e.message}`, { cause: e }),
        ),
      );
      child.once('exit', (code, signal) =>
        reject(new HfError('HF_ERR_HYPERVISOR', `QEMU exited during start (${signal ?? `status ${code}`}): ${tail(files.stderrLog)}`)),
      );
    });
    child.unref();
    try {
      const qmp = await Promise.race([QmpClient.connect(files.qmpSocket, { retryUntilMs: timeoutMs, log, connectTimeoutMs: timeoutMs }), spawnError]);
      const st = readProcStat(child.pid!);
      const proc = new QemuProcess(child.pid!, st?.startTime ?? 0, qmp, child);
      spawnError.catch(() => undefined);
      return proc;
    } catch (e) {
      spawnError.catch(() => undefined);
      if (child.pid && child.exitCode === null) child.kill('SIGKILL');
      throw e;
    }
  }

  /** Re-attaches to a QEMU started by an earlier daemon. Null when the process is gone. */
  static async attach(pid: number, startTime: number, qmpSocket: string, log: QmpLog): Promise<QemuProcess | null> {
    if (!isProcessAlive(pid, startTime)) return null;
    let qmp: QmpClient;
    try {
      qmp = await QmpClient.connect(qmpSocket, { connectTimeoutMs: 3000, retryUntilMs: 3000, log });
    } catch (e) {
      if (!isProcessAlive(pid, startTime)) return null;
      // Alive but deaf: an unmanageable QEMU is worse than none.
      process.kill(pid, 'SIGKILL');
      await waitForProcessExit(pid, startTime, 5000);
      throw new HfError('HF_ERR_HYPERVISOR', `QEMU ${pid} did not answer on QMP and was killed`, { cause: e });
    }
    return new QemuProcess(pid, startTime, qmp, undefined);
  }

  /** SIGKILL and wait until the process is gone. */
  async kill(): Promise<void> {
    if (this.done) return;
    this.killRequested = true;
    try {
      process.kill(this.pid, 'SIGKILL');
    } catch {
      // already gone
    }
    if (!this.child) await this.confirmGone();
    await this.exited;
  }

  /** Closes daemon-side resources; the QEMU process keeps running. */
  detach(): void {
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.child?.removeAllListeners('exit');
    void this.qmp.close();
  }

  private async confirmGone(): Promise<void> {
    if (this.done) return;
    const gone = await waitForProcessExit(this.pid, this.startTime, 10_000);
    if (gone) this.finish(null, null);
  }

  private finish(code: number | null, signal: NodeJS.Signals | null): void {
    if (this.done) return;
    this.done = true;
    if (this.pollTimer) clearInterval(this.pollTimer);
    void this.qmp.close();
    const sd = this.shutdownEvent;
    let info: ExitInfo;
    if (this.killRequested) info = { clean: true, reason: 'stopped by force', exitCode: code, signal };
    else if (sd) {
      const reason = typeof sd.data.reason === 'string' ? sd.data.reason : 'shutdown';
      info = { clean: reason !== 'host-signal', reason: `QEMU shut down (${reason})`, exitCode: code, signal };
    } else if (signal) info = { clean: false, reason: `QEMU was killed by ${signal}`, exitCode: code, signal };
    else if (code !== null) info = { clean: false, reason: `QEMU exited with status ${code} without a shutdown`, exitCode: code, signal };
    else info = { clean: false, reason: 'QEMU process vanished without a shutdown', exitCode: null, signal: null };
    this.resolveExit(info);
  }
}

function tail(file: string, bytes = 2000): string {
  try {
    const s = readFileSync(file, 'utf8');
    return s.slice(-bytes).trim() || '(no output)';
  } catch {
    return '(no output)';
  }
}

function signalName(n: number): NodeJS.Signals | null {
  const found = Object.entries(constants.signals).find(([, v]) => v === n);
  return found ? (found[0] as NodeJS.Signals) : null;
}
