// The QEMU driver: virtual machines behind the InstanceDriver interface. It joins the pure
// argv builder, the accelerator verdict, process supervision and QMP; it keeps no state of its
// own beyond what each handle holds, so a restarted daemon re-attaches from the instance record.
import { copyFile, readFile, rm, stat } from 'node:fs/promises';
import { mkdirSync, rmSync, statSync } from 'node:fs';
import { isProcessAlive, waitForProcessExit } from '../../util/proc.js';
import net from 'node:net';
import { join } from 'node:path';
import { HfError } from '../../core/errors.js';
import type { DiskConfig, Instance, InstanceConfig, RuntimeInfo } from '../../core/model/instance.js';
import type { Logger } from '../../util/log.js';
import { which } from '../../util/exec.js';
import type { ImageRecord } from '../../core/model/image.js';
import { QemuImg } from '../../storage/qemu-img.js';
import { failpoint } from '../../util/failpoint.js';
import { UndoStack } from '../../util/undo.js';
import type { ConsoleAttachment, DiskRequest, InstanceDriver, InstanceHandle, InstancePaths, LiveChangeResult, ObservedState, StartContext } from '../driver.js';
import { provisionVmDisks } from './provision.js';
import type { AccelVerdict } from '../../core/model/host.js';
import { resolveAccel } from './accel.js';
import { buildQemuArgv } from './argv.js';
import { hotplugDisk, resizeDiskLive, unplugDisk } from './block.js';
import { hotplugNic, unplugNic } from './nic.js';
import type { NicConfig } from '../../core/model/instance.js';
import { applyLiveChanges, enableGuestStats, readLiveInfo } from './live.js';
import { deleteSnapshotLive, loadSnapshotLive, saveSnapshotLive, snapshotDisksLive } from './snapshot.js';
import { QemuProcess } from './process.js';
import { Spawner } from '../../util/spawner.js';
import { QmpLog } from './qmp/log.js';
import { QEMU_CAPABILITIES } from './capabilities.js';

export interface QemuDriverOptions {
  binary: string;
  /** The accelerator verdict (probed once per host and cached). */
  accelVerdict: () => Promise<AccelVerdict>;
  log: Logger;
  ovmf?: { code: string; varsTemplate: string };
  startTimeoutMs?: number;
  /**
   * Where QMP and console sockets live. Unix socket paths are limited to 107 bytes, so they sit
   * in a short runtime directory keyed by instance id rather than in the instance directory.
   */
  runDir?: string;
  /** Creates disk images at provision (blank disks, overlays qemu-img must write). */
  qemuImg?: QemuImg;
}

export const DEFAULT_RUN_DIR = '/run/hyperfold';

export const DEFAULT_OVMF = { code: '/usr/share/OVMF/OVMF_CODE_4M.fd', varsTemplate: '/usr/share/OVMF/OVMF_VARS_4M.fd' };

interface QemuRuntimeDetails {
  qmpSocket: string;
  consoleSocket: string;
}

function files(paths: InstancePaths, sockDir: string) {
  return {
    sockDir,
    qmpSocket: join(sockDir, 'qmp.sock'),
    consoleSocket: join(sockDir, 'console.sock'),
    pidFile: join(paths.dir, 'qemu.pid'),
    stderrLog: join(paths.dir, 'qemu.log'),
    qmpLog: join(paths.dir, 'qmp.log'),
    uefiVars: join(paths.dir, 'uefi-vars.fd'),
  };
}

export class QemuDriver implements InstanceDriver {
  readonly type = 'vm' as const;
  readonly capabilities = QEMU_CAPABILITIES;
  private binaryChecked: string | undefined;
  /** Starts QEMU without forking the daemon (see util/spawner.ts). */
  private readonly spawner = new Spawner();

  private readonly qemuImg: QemuImg;

  constructor(private readonly opts: QemuDriverOptions) {
    this.qemuImg = opts.qemuImg ?? new QemuImg();
  }

  async check(instance: Instance): Promise<void> {
    if (!this.binaryChecked) {
      const found = await which(this.opts.binary);
      if (!found) {
        throw new HfError('HF_ERR_MISSING_DEPENDENCY', `QEMU binary "${this.opts.binary}" not found: run \`apt-get install -y qemu-system-x86\``);
      }
      this.binaryChecked = found;
    }
    resolveAccel(instance.config.accel, await this.opts.accelVerdict());
    for (const d of instance.config.disks) {
      try {
        statSync(d.path);
      } catch {
        throw new HfError('HF_ERR_VALIDATION', `disk ${d.name} of ${instance.name}: ${d.path} is missing`);
      }
    }
    if (instance.config.boot.kind === 'kernel') {
      try {
        await stat(instance.config.boot.kernel);
      } catch {
        throw new HfError('HF_ERR_VALIDATION', `kernel ${instance.config.boot.kernel} of ${instance.name} is missing`);
      }
    }
    const firmware = instance.config.boot.kind === 'kernel' ? 'bios' : instance.config.boot.firmware;
    if (firmware === 'uefi') {
      const ovmf = this.opts.ovmf ?? DEFAULT_OVMF;
      try {
        await stat(ovmf.code);
      } catch {
        throw new HfError('HF_ERR_MISSING_DEPENDENCY', `UEFI firmware ${ovmf.code} not found: run \`apt-get install -y ovmf\``);
      }
    }
  }

  /** The VM's disks from its image and the create request (provision.ts). */
  provision(instance: Instance, image: ImageRecord | undefined, paths: InstancePaths, _progress?: (percent: number, message: string) => void, disks: DiskRequest[] = []): Promise<Instance> {
    return provisionVmDisks(instance, image, paths, disks, this.qemuImg);
  }

  /**
   * Spawns QEMU and resolves once the guest runs. Every step after the spawn can fail (QMP, a
   * failpoint, the caller recording the start): the QEMU is killed and its sockets removed then,
   * through the caller's undo stack when it gives one (ctx.undo), else through our own.
   */
  async start(instance: Instance, ctx: StartContext): Promise<InstanceHandle> {
    const own = ctx.undo ? undefined : new UndoStack(this.opts.log);
    const undo = ctx.undo ?? own!;
    try {
      const handle = await this.spawn(instance, ctx, undo);
      own?.commit();
      return handle;
    } catch (e) {
      await own?.unwind();
      throw e;
    }
  }

  private async spawn(instance: Instance, ctx: StartContext, undo: UndoStack): Promise<InstanceHandle> {
    const f = files(ctx.paths, this.sockDir(instance));
    // Quick syscalls on the start path: synchronous, not trips through the thread pool.
    mkdirSync(f.sockDir, { recursive: true, mode: 0o700 });
    const accel = resolveAccel(instance.config.accel, await this.opts.accelVerdict());
    for (const stale of [f.qmpSocket, f.consoleSocket, f.pidFile]) rmSync(stale, { force: true });
    let uefi: { codePath: string; varsPath: string } | undefined;
    if (instance.config.boot.kind !== 'kernel' && instance.config.boot.firmware === 'uefi') {
      const ovmf = this.opts.ovmf ?? DEFAULT_OVMF;
      try {
        await stat(f.uefiVars);
      } catch {
        await copyFile(ovmf.varsTemplate, f.uefiVars);
      }
      uefi = { codePath: ovmf.code, varsPath: f.uefiVars };
    }
    const argv = buildQemuArgv({
      instance,
      accel,
      qmpSocket: f.qmpSocket,
      consoleSocket: f.consoleSocket,
      consoleLog: ctx.paths.consoleLog,
      pidFile: f.pidFile,
      uefi,
    });
    ctx.progress?.(20, `spawning QEMU (${accel})`);
    const log = new QmpLog({ file: f.qmpLog });
    // Registered before the spawn: a QEMU that fails to start leaves its socket files too.
    undo.add('remove QEMU sockets and pid file', () => this.cleanup(instance, ctx.paths));
    const proc = await QemuProcess.spawn(this.opts.binary, argv, { qmpSocket: f.qmpSocket, stderrLog: f.stderrLog }, log, this.opts.startTimeoutMs, this.spawner);
    undo.add('kill QEMU', async () => {
      await proc.kill();
      proc.detach();
    });
    failpoint('launch.after-spawn');
    const runtime: RuntimeInfo = {
      pid: proc.pid,
      pidStartTime: proc.startTime,
      accel,
      startedAt: new Date().toISOString(),
      details: { qmpSocket: f.qmpSocket, consoleSocket: f.consoleSocket } satisfies QemuRuntimeDetails,
    };
    const handle = new QemuHandle(proc, runtime, f.consoleSocket);
    // Make sure the guest runs (QEMU starts it at once unless -S; `cont` is harmless otherwise).
    const st = await handle.observe();
    if (st !== 'running') await proc.qmp.run('cont');
    // Balloon statistics for `info` (live.ts); a VM without a balloon just has none. Off the
    // start path: it is two or three QMP round trips nobody waits for (commands queue in order).
    enableGuestStats(proc.qmp).catch((e: Error) => this.opts.log.debug('guest statistics not enabled', { name: instance.name, error: e.message }));
    ctx.progress?.(100, 'running');
    this.opts.log.debug('qemu spawned', { name: instance.name, pid: proc.pid, argv: argv.join(' ') });
    return handle;
  }

  async attach(instance: Instance, ctx: StartContext): Promise<InstanceHandle | null> {
    const rt = instance.runtime;
    const f = files(ctx.paths, this.sockDir(instance));
    if (!rt) {
      // The daemon died between spawning QEMU and recording it: a half-started guest nobody
      // tracks. Find it by its pid file (checking it is really this instance's QEMU) and stop it.
      await killStray(f.pidFile, instance.id);
      return null;
    }
    const qmpSocket = typeof rt.details.qmpSocket === 'string' ? rt.details.qmpSocket : f.qmpSocket;
    const consoleSocket = typeof rt.details.consoleSocket === 'string' ? rt.details.consoleSocket : f.consoleSocket;
    const proc = await QemuProcess.attach(rt.pid, rt.pidStartTime, qmpSocket, new QmpLog({ file: f.qmpLog }));
    if (!proc) return null;
    return new QemuHandle(proc, rt, consoleSocket);
  }

  async cleanup(instance: Instance, paths: InstancePaths): Promise<void> {
    const f = files(paths, this.sockDir(instance));
    await Promise.all([rm(f.sockDir, { recursive: true, force: true }), rm(f.pidFile, { force: true })]);
  }

  private sockDir(instance: Instance): string {
    return join(this.opts.runDir ?? DEFAULT_RUN_DIR, instance.id);
  }
}

async function killStray(pidFile: string, instanceId: string): Promise<void> {
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (!(pid > 0) || !isProcessAlive(pid)) return;
  const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  if (!cmdline.includes(instanceId)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  await waitForProcessExit(pid, undefined, 5000);
}

/** A running VM: lifecycle through QMP, exit through QemuProcess, console through a hub. */
class QemuHandle implements InstanceHandle {
  readonly exited;
  private console: ConsoleHub | undefined;

  constructor(private readonly proc: QemuProcess, readonly runtime: RuntimeInfo, private readonly consoleSocket: string) {
    this.exited = proc.exited;
  }

  async observe(): Promise<ObservedState> {
    const st = await this.proc.qmp.run<{ status: string; running: boolean }>('query-status', undefined, { timeoutMs: 5000 });
    if (st.running) return 'running';
    if (st.status === 'shutdown' || st.status === 'guest-panicked' || st.status === 'internal-error') return 'stopped';
    return 'paused';
  }

  async requestShutdown(): Promise<void> {
    await this.proc.qmp.run('system_powerdown');
  }

  kill(): Promise<void> {
    return this.proc.kill();
  }

  async pause(): Promise<void> {
    await this.proc.qmp.run('stop');
  }

  async resume(): Promise<void> {
    await this.proc.qmp.run('cont');
  }

  /** The serial console accepts one connection: the hub holds it and fans out to clients. */
  async attachConsole(): Promise<ConsoleAttachment> {
    if (!this.console || this.console.closed) this.console = await ConsoleHub.connect(this.consoleSocket);
    return this.console.attach();
  }

  qmp() {
    return this.proc.qmp;
  }

  // ---- live resources (live.ts): everything is read from QEMU on each call, so a re-attached
  // daemon sees hot-plugged DIMMs and vCPUs exactly as a fresh one would ----
  applyLive(changes: Partial<InstanceConfig>, current: InstanceConfig): Promise<LiveChangeResult> {
    return applyLiveChanges(this.proc.qmp, changes, current);
  }
  async liveInfo(): Promise<Record<string, unknown>> {
    return { ...(await readLiveInfo(this.proc.qmp)) };
  }

  // ---- storage capabilities (block.ts, snapshot.ts) ----
  async attachDisk(disk: DiskConfig): Promise<void> {
    await hotplugDisk(this.proc.qmp, disk);
  }
  detachDisk(diskName: string): Promise<void> {
    return unplugDisk(this.proc.qmp, diskName);
  }
  resizeDisk(diskName: string, sizeBytes: number): Promise<void> {
    return resizeDiskLive(this.proc.qmp, diskName, sizeBytes);
  }
  snapshotDisks(tag: string, diskNames: string[]): Promise<void> {
    return snapshotDisksLive(this.proc.qmp, tag, diskNames);
  }
  saveSnapshot(tag: string, vmstateDisk: string, diskNames: string[], progress?: (percent: number) => void): Promise<void> {
    return saveSnapshotLive(this.proc.qmp, tag, vmstateDisk, diskNames, progress);
  }
  loadSnapshot(tag: string, vmstateDisk: string, diskNames: string[], progress?: (percent: number) => void): Promise<void> {
    return loadSnapshotLive(this.proc.qmp, tag, vmstateDisk, diskNames, progress);
  }
  deleteSnapshot(tag: string, diskNames: string[]): Promise<void> {
    return deleteSnapshotLive(this.proc.qmp, tag, diskNames);
  }

  // ---- network capabilities (nic.ts) ----
  async attachNic(nic: NicConfig): Promise<void> {
    await hotplugNic(this.proc.qmp, nic);
  }
  detachNic(nicName: string): Promise<void> {
    return unplugNic(this.proc.qmp, nicName);
  }

  detach(): void {
    this.console?.close();
    this.proc.detach();
  }
}

class ConsoleHub {
  closed = false;
  private readonly clients = new Set<{ data: Array<(b: Buffer) => void>; close: Array<() => void> }>();

  private constructor(private readonly sock: net.Socket) {
    sock.on('data', (b: Buffer) => {
      for (const c of this.clients) for (const cb of c.data) cb(b);
    });
    sock.on('close', () => {
      this.closed = true;
      for (const c of this.clients) for (const cb of c.close) cb();
      this.clients.clear();
    });
    sock.on('error', () => undefined);
  }

  static connect(path: string): Promise<ConsoleHub> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ path });
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(new ConsoleHub(s));
      });
      s.once('error', (e) => reject(new HfError('HF_ERR_HYPERVISOR', `cannot open the serial console: ${e.message}`, { cause: e })));
    });
  }

  attach(): ConsoleAttachment {
    const client = { data: [] as Array<(b: Buffer) => void>, close: [] as Array<() => void> };
    this.clients.add(client);
    return {
      write: (d) => {
        if (!this.closed) this.sock.write(d);
      },
      onData: (cb) => client.data.push(cb),
      onClose: (cb) => client.close.push(cb),
      close: () => {
        this.clients.delete(client);
      },
    };
  }

  close(): void {
    this.closed = true;
    this.sock.destroy();
  }
}
