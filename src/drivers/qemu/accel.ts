// Which accelerators can this host really use? A FUNCTIONAL probe, not a look at /dev/kvm: on a
// host where nested virtualization is broken, /dev/kvm opens fine and QEMU starts, but the guest
// never makes progress. So we run a tiny guest under each accelerator, with a hard deadline, and
// believe only what the guest itself reports.
//
// The probe guest is a 64 KiB `-bios` image. From the reset vector it walks through the mode
// switches every real OS makes: 16-bit real mode -> 32-bit protected mode -> PAE paging + long
// mode -> 64-bit code, then writes 0x31 to an isa-debug-exit port, which makes QEMU exit with
// status (0x31 << 1) | 1 = 99. Along the way it writes progress letters to a debugcon port (R
// real mode, E protection enabled, P protected mode, G paging on, L long mode) so a stalled probe
// can say how far it got. A real-mode-only probe is NOT enough: on the PVM-based nested KVM of our
// CI hosts, real-mode code runs (and exits 99) while the far jump into protected mode spins
// forever — exactly the "KVM guests hang" symptom.
import { spawn, execFile } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { access, mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { HfError } from '../../core/errors.js';
import type { AccelVerdict } from '../../core/model/host.js';

export type AccelName = 'kvm' | 'tcg';
export type RequestedAccel = 'auto' | 'kvm' | 'tcg';

export type { AccelVerdict };

export interface ProbeOptions {
  qemuBinary: string;
  /** How long the probe guest may take under KVM (and under TCG), in ms. Default 3000. */
  deadlineMs?: number;
  /** Device node to check before running the KVM probe. Default /dev/kvm (tests override it). */
  kvmDevice?: string;
  /** Called with the pid of every probe process QEMU spawns (for logging and leak tests). */
  onSpawn?: (pid: number, accel: AccelName) => void;
  /** Where the probe's scratch directory goes (default: the OS temp dir; the daemon: its data directory). */
  workDir?: string;
}

export const DEFAULT_PROBE_DEADLINE_MS = 3000;
/** Scratch directories of probes are named so (a daemon killed mid-probe leaves one behind). */
const PROBE_DIR_PREFIX = 'hf-accel-probe-';
/** Exit status QEMU reports when the probe guest wrote PROBE_EXIT_VALUE to isa-debug-exit. */
export const PROBE_EXIT_STATUS = (0x31 << 1) | 1; // 99

/*
 * The probe image, assembled with GNU as (`as --32` + `ld -Ttext 0 --oformat binary`) from:
 *
 *         .code16
 * _start: cli
 *         mov $0x402, %dx ; mov $'R', %al ; out %al, %dx        # debugcon: real mode
 *         mov $0xf000, %ax ; mov %ax, %ds
 *         lgdtl gdt_desc
 *         mov %cr0, %eax ; or $1, %eax ; mov %eax, %cr0          # CR0.PE
 *         mov $'E', %al ; out %al, %dx
 *         ljmpl $0x08, $(0xF0000 + pm32)
 *         .code32
 * pm32:   mov $0x10, %ax ; mov %ax, %ds ; mov %ax, %es ; mov %ax, %ss
 *         mov $'P', %al ; out %al, %dx
 *         mov $0x1000, %edi ; xor %eax, %eax ; mov $3072, %ecx ; cld ; rep stosl
 *         movl $0x2003, 0x1000 ; movl $0x3003, 0x2000 ; movl $0x83, 0x3000   # PML4, PDPT, 2M page
 *         mov %cr4, %eax ; or $0x20, %eax ; mov %eax, %cr4        # CR4.PAE
 *         mov $0x1000, %eax ; mov %eax, %cr3
 *         mov $0xC0000080, %ecx ; rdmsr ; or $0x100, %eax ; wrmsr # EFER.LME
 *         mov $0x402, %dx
 *         mov %cr0, %eax ; or $0x80000000, %eax ; mov %eax, %cr0  # CR0.PG
 *         mov $'G', %al ; out %al, %dx
 *         ljmp $0x18, $(0xF0000 + lm64)
 *         .code64
 * lm64:   mov $'L', %al ; out %al, %dx
 *         mov $0x31, %al ; out %al, $0xf4                          # isa-debug-exit -> status 99
 * 1:      hlt ; jmp 1b
 *         .balign 8
 * gdt:    .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF
 * gdt_desc: .word 31 ; .long 0xF0000 + gdt
 *         .code16
 *         . = 0xFFF0
 * reset:  ljmp $0xf000, $_start                                    # the reset vector
 *
 * The 64 KiB image is mapped both below 1 MiB (0xF0000) and at the top of 4 GiB.
 */
const PROBE_CODE_HEX =
  'faba0204b052eeb800f08ed8660f0116c8000f20c06683c8010f22c0b045ee66ea27000f00080066b810008ed88ec08e' +
  'd0b050eebf0010000031c0b9000c0000fcf3abc7050010000003200000c7050020000003300000c70500300000830000' +
  '000f20e083c8200f22e0b8001000000f22d8b9800000c00f320d000100000f3066ba02040f20c00d000000800f22c0b0' +
  '47eeea99000f001800b04ceeb031e6f4f4ebfd8db40000900000000000000000ffff0000009acf00ffff00000092cf00' +
  'ffff0000009aaf001f00a8000f00';
const PROBE_RESET_HEX = 'ea000000f0'; // ljmp $0xf000, $0 at offset 0xFFF0

/** The 64 KiB probe firmware image (see the listing above). */
export function probeFirmwareImage(): Buffer {
  const image = Buffer.alloc(0x10000, 0);
  Buffer.from(PROBE_CODE_HEX, 'hex').copy(image, 0);
  Buffer.from(PROBE_RESET_HEX, 'hex').copy(image, 0xfff0);
  return image;
}

const PROGRESS_STAGES: Record<string, string> = {
  '': 'the guest never executed its first instruction',
  R: 'the guest ran real-mode code but stalled switching to protected mode',
  RE: 'the guest set CR0.PE but stalled on the far jump into 32-bit protected mode',
  REP: 'the guest reached 32-bit protected mode but stalled enabling paging / long mode',
  REPG: 'the guest enabled paging but stalled entering 64-bit code',
  REPGL: 'the guest reached 64-bit long mode but the exit port did not stop QEMU',
};

function describeProgress(progress: string): string {
  const known = PROGRESS_STAGES[progress];
  if (known !== undefined) return known;
  // Every reset starts over with "R": several of them mean the guest triple-faulted and reset.
  if (progress.indexOf('R', 1) > 0) return `the guest kept resetting (triple fault?), progress markers "${progress.slice(0, 16)}…"`;
  return `unexpected progress markers "${progress.slice(0, 16)}"`;
}

/** Argv (without the binary) that runs the probe image under one accelerator. */
export function probeArgv(accel: AccelName, firmwarePath: string, progressPath: string): string[] {
  return [
    '-no-user-config',
    '-nodefaults',
    '-display', 'none',
    '-machine', `pc,accel=${accel}`,
    '-cpu', accel === 'kvm' ? 'host' : 'max',
    '-m', '16',
    '-bios', firmwarePath,
    '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
    '-chardev', `file,id=progress,path=${progressPath.replaceAll(',', ',,')}`,
    '-device', 'isa-debugcon,iobase=0x402,chardev=progress',
  ];
}

export interface ProbeRun {
  /** 'ran': exited with PROBE_EXIT_STATUS; 'timeout': killed at the deadline; 'failed': anything else. */
  outcome: 'ran' | 'timeout' | 'failed';
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  durationMs: number;
  /** Progress letters the guest wrote (see PROGRESS_STAGES). */
  progress: string;
  /** Last lines QEMU wrote on stderr. */
  stderr: string;
  pid?: number;
  /** Set when the process could not be confirmed gone after SIGKILL. */
  leaked?: boolean;
}

const KILL_WAIT_MS = 2000;
const STDERR_MAX = 4096;

/** Runs the probe guest once under `accel` and always leaves no process behind. */
export async function runProbeGuest(
  qemuBinary: string,
  accel: AccelName,
  deadlineMs: number,
  onSpawn?: (pid: number, accel: AccelName) => void,
  workDir = os.tmpdir(),
): Promise<ProbeRun> {
  const dir = await mkdtemp(path.join(workDir, PROBE_DIR_PREFIX));
  try {
    const firmware = path.join(dir, 'probe.bin');
    const progressFile = path.join(dir, 'progress');
    await writeFile(firmware, probeFirmwareImage());
    const started = performance.now();
    // coreutils `timeout` is a watchdog that outlives us: if the daemon dies mid-probe (SIGKILL),
    // a hung KVM guest would otherwise spin forever as an orphan. Both run in their own process
    // group so that our own kill at the deadline reaches QEMU too.
    const watchdogSeconds = String(Math.ceil(deadlineMs / 1000) + 2);
    const child = spawn('timeout', ['--signal=KILL', watchdogSeconds, qemuBinary, ...probeArgv(accel, firmware, progressFile)], {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true,
    });
    let stderr = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => {
      stderr = (stderr + d).slice(-STDERR_MAX);
    });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: Error }>((resolve) => {
      child.once('error', (error) => resolve({ code: null, signal: null, error }));
      child.once('exit', (code, signal) => resolve({ code, signal }));
    });
    if (child.pid !== undefined) onSpawn?.(child.pid, accel);

    type Exit = Awaited<typeof exited>;
    let timer: NodeJS.Timeout | undefined;
    const raced: Exit | 'deadline' = await Promise.race([
      exited,
      new Promise<'deadline'>((resolve) => {
        timer = setTimeout(() => resolve('deadline'), deadlineMs);
      }),
    ]);
    clearTimeout(timer);
    const timedOut = raced === 'deadline';
    let exit: Exit | undefined = timedOut ? undefined : raced;
    if (timedOut) {
      // Always kill at the deadline, then wait for the exit so no process outlives the probe.
      try {
        if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
      let killTimer: NodeJS.Timeout | undefined;
      const gone: Exit | 'stuck' = await Promise.race([
        exited,
        new Promise<'stuck'>((resolve) => {
          killTimer = setTimeout(() => resolve('stuck'), KILL_WAIT_MS);
        }),
      ]);
      clearTimeout(killTimer);
      exit = gone === 'stuck' ? undefined : gone;
    }
    const durationMs = Math.round(performance.now() - started);
    const progress = (await readFile(progressFile, 'utf8').catch(() => '')).trim().slice(0, 256);
    const run: ProbeRun = {
      outcome: timedOut ? 'timeout' : exit?.code === PROBE_EXIT_STATUS ? 'ran' : 'failed',
      exitCode: exit?.code ?? null,
      signal: exit?.signal ?? null,
      durationMs,
      progress,
      stderr: exit?.error ? exit.error.message : stderr.trim(),
    };
    // `timeout` reports a QEMU it could not execute as 127 (missing) or 126 (not executable).
    if ((run.exitCode === 127 || run.exitCode === 126) && /failed to run command/.test(run.stderr)) {
      run.stderr = `spawn ${qemuBinary} ${run.exitCode === 127 ? 'ENOENT' : 'EACCES'}`;
      run.exitCode = null;
      run.outcome = 'failed';
    }
    if (child.pid !== undefined) run.pid = child.pid;
    if (timedOut && exit === undefined) run.leaked = true;
    return run;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function lastLine(text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
  return lines.at(-1) ?? '';
}

function failureReason(run: ProbeRun, accel: AccelName): string {
  const detail = lastLine(run.stderr);
  if (run.exitCode === null && run.signal === null) return `could not run QEMU: ${detail || 'unknown error'}`;
  const status = run.signal ? `was killed by ${run.signal}` : `exited with status ${run.exitCode}`;
  return `QEMU ${status} instead of running the ${accel.toUpperCase()} probe guest${detail ? `: ${detail}` : ''}`;
}

/** `qemu-system-x86_64 --version` → "7.2.22" (undefined when the binary cannot run). */
export async function qemuVersionOf(qemuBinary: string, timeoutMs = 5000): Promise<string | undefined> {
  return new Promise((resolve) => {
    execFile(qemuBinary, ['--version'], { timeout: timeoutMs, killSignal: 'SIGKILL' }, (err, stdout) => {
      if (err) return resolve(undefined);
      const m = /version\s+(\d+\.\d+(?:\.\d+)?)/i.exec(String(stdout));
      resolve(m?.[1] ?? (String(stdout).split('\n')[0]?.trim() || undefined));
    });
  });
}

/** Probes TCG and KVM by running the probe guest under each. Never leaves a process behind. */
export async function probeAccelerators(opts: ProbeOptions): Promise<AccelVerdict> {
  const deadlineMs = opts.deadlineMs ?? DEFAULT_PROBE_DEADLINE_MS;
  const kvmDevice = opts.kvmDevice ?? '/dev/kvm';
  const qemuVersion = await qemuVersionOf(opts.qemuBinary);

  // TCG first: it validates the probe image and the QEMU binary, and needs no privileges.
  let tcg: AccelVerdict['tcg'];
  const tcgRun = await runProbeGuest(opts.qemuBinary, 'tcg', Math.max(deadlineMs, DEFAULT_PROBE_DEADLINE_MS), opts.onSpawn, opts.workDir);
  if (tcgRun.outcome === 'ran') tcg = { usable: true, reason: 'probe guest ran under TCG' };
  else if (tcgRun.outcome === 'timeout') tcg = { usable: false, reason: `TCG guest did not run the probe within ${Math.max(deadlineMs, DEFAULT_PROBE_DEADLINE_MS)} ms` };
  else tcg = { usable: false, reason: failureReason(tcgRun, 'tcg') };

  const probedAt = new Date().toISOString();
  let kvm: AccelVerdict['kvm'];
  const accessError = await access(kvmDevice, fsConstants.R_OK | fsConstants.W_OK).then(
    () => undefined,
    (e: NodeJS.ErrnoException) => e,
  );
  if (accessError) {
    const reason = accessError.code === 'ENOENT' ? `${kvmDevice} missing` : `${kvmDevice} not accessible (${accessError.code ?? accessError.message})`;
    kvm = { usable: false, reason, probedAt, durationMs: 0 };
  } else {
    const run = await runProbeGuest(opts.qemuBinary, 'kvm', deadlineMs, opts.onSpawn, opts.workDir);
    let reason: string;
    if (run.outcome === 'ran') reason = 'probe guest ran under KVM';
    else if (run.outcome === 'timeout') {
      reason = `KVM guest did not run the probe within ${deadlineMs} ms (nested virtualization not working?): ${describeProgress(run.progress)}`;
      if (run.leaked) reason += `; probe process ${run.pid} did not exit after SIGKILL`;
    } else reason = failureReason(run, 'kvm');
    kvm = { usable: run.outcome === 'ran', reason, probedAt, durationMs: run.durationMs };
  }
  return qemuVersion === undefined ? { kvm, tcg } : { kvm, tcg, qemuVersion };
}

/** Picks the accelerator to start a guest with. Throws HF_ERR_ACCEL_UNAVAILABLE when it cannot. */
export function resolveAccel(requested: RequestedAccel, verdict: AccelVerdict): AccelName {
  switch (requested) {
    case 'kvm':
      if (!verdict.kvm.usable) throw new HfError('HF_ERR_ACCEL_UNAVAILABLE', `KVM is not usable on this host: ${verdict.kvm.reason}`, { details: { requested, kvm: verdict.kvm.reason } });
      return 'kvm';
    case 'tcg':
      if (!verdict.tcg.usable) throw new HfError('HF_ERR_ACCEL_UNAVAILABLE', `TCG is not usable on this host: ${verdict.tcg.reason}`, { details: { requested, tcg: verdict.tcg.reason } });
      return 'tcg';
    case 'auto':
      if (verdict.kvm.usable) return 'kvm';
      if (verdict.tcg.usable) return 'tcg';
      throw new HfError('HF_ERR_ACCEL_UNAVAILABLE', `no accelerator is usable on this host: KVM: ${verdict.kvm.reason}; TCG: ${verdict.tcg.reason}`, {
        details: { requested, kvm: verdict.kvm.reason, tcg: verdict.tcg.reason },
      });
    default: {
      const never: never = requested;
      throw new HfError('HF_ERR_VALIDATION', `unknown accelerator "${String(never)}"`);
    }
  }
}

// ---- cache -------------------------------------------------------------------------------

/** What a cached verdict depends on: change any of these and the probe runs again. */
export interface AccelCacheKey {
  qemuBinary: string;
  qemuVersion: string;
  kernelRelease: string;
  /** Whether the KVM device node existed (module loaded/unloaded since the probe). */
  kvmDevicePresent: boolean;
}

export interface AccelCacheFile {
  schema: 1;
  key: AccelCacheKey;
  verdict: AccelVerdict;
}

export function sameCacheKey(a: AccelCacheKey, b: AccelCacheKey): boolean {
  return a.qemuBinary === b.qemuBinary && a.qemuVersion === b.qemuVersion && a.kernelRelease === b.kernelRelease && a.kvmDevicePresent === b.kvmDevicePresent;
}

export interface LoadOrProbeOptions extends ProbeOptions {
  /** Probe even if the cache matches. */
  force?: boolean;
  /** Injected for tests; defaults to probeAccelerators. */
  prober?: (opts: ProbeOptions) => Promise<AccelVerdict>;
  /** Injected for tests; defaults to qemu --version, os.release() and a look at the KVM device. */
  hostKey?: (opts: ProbeOptions) => Promise<AccelCacheKey | undefined>;
}

/** The cache key of this host now; undefined when QEMU's version cannot be read (nothing is cached then). */
export async function currentCacheKey(opts: ProbeOptions): Promise<AccelCacheKey | undefined> {
  const qemuVersion = await qemuVersionOf(opts.qemuBinary);
  if (qemuVersion === undefined) return undefined;
  const kvmDevicePresent = await access(opts.kvmDevice ?? '/dev/kvm').then(
    () => true,
    () => false,
  );
  return { qemuBinary: opts.qemuBinary, qemuVersion, kernelRelease: os.release(), kvmDevicePresent };
}

function parseCacheFile(text: string): AccelCacheFile | undefined {
  try {
    const v = JSON.parse(text) as Partial<AccelCacheFile> | null;
    if (!v || v.schema !== 1 || typeof v.key !== 'object' || v.key === null || typeof v.verdict !== 'object' || v.verdict === null) return undefined;
    const k = v.key;
    if (typeof k.qemuBinary !== 'string' || typeof k.qemuVersion !== 'string' || typeof k.kernelRelease !== 'string' || typeof k.kvmDevicePresent !== 'boolean') return undefined;
    const verdict = v.verdict;
    if (typeof verdict.kvm?.usable !== 'boolean' || typeof verdict.kvm.reason !== 'string' || typeof verdict.tcg?.usable !== 'boolean' || typeof verdict.tcg.reason !== 'string') return undefined;
    return v as AccelCacheFile;
  } catch {
    return undefined;
  }
}

const inFlight = new Map<string, Promise<AccelVerdict>>();

/**
 * Returns the cached verdict when it was made for the same QEMU binary + version, kernel release
 * and KVM device presence; otherwise probes and stores the verdict (atomically). Concurrent calls
 * for the same cache file share one probe.
 */
export function loadOrProbe(cacheFile: string, opts: LoadOrProbeOptions): Promise<AccelVerdict> {
  const running = inFlight.get(cacheFile);
  if (running) return running;
  const p = doLoadOrProbe(cacheFile, opts).finally(() => inFlight.delete(cacheFile));
  inFlight.set(cacheFile, p);
  return p;
}

async function doLoadOrProbe(cacheFile: string, opts: LoadOrProbeOptions): Promise<AccelVerdict> {
  const { force, prober, hostKey, ...probeOpts } = opts;
  const key = await (hostKey ?? currentCacheKey)(probeOpts);
  if (!force && key) {
    const cached = parseCacheFile(await readFile(cacheFile, 'utf8').catch(() => ''));
    if (cached && sameCacheKey(cached.key, key)) return cached.verdict;
  }
  // Probe next to the cache file (the data directory), after removing what a probe of a daemon
  // killed mid-way left there; one probe at a time per cache file (inFlight).
  const workDir = probeOpts.workDir ?? path.dirname(cacheFile);
  await mkdir(workDir, { recursive: true });
  for (const e of await readdir(workDir).catch(() => [] as string[])) {
    if (e.startsWith(PROBE_DIR_PREFIX)) await rm(path.join(workDir, e), { recursive: true, force: true });
  }
  const verdict = await (prober ?? probeAccelerators)({ ...probeOpts, workDir });
  if (key) {
    const body: AccelCacheFile = { schema: 1, key, verdict };
    await mkdir(path.dirname(cacheFile), { recursive: true });
    const tmp = `${cacheFile}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(body, null, 2) + '\n');
    await rename(tmp, cacheFile);
  }
  return verdict;
}
