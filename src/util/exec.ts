// Running helper programs (qemu-img, ip, apt-get…) with captured output and a clear error. In
// the daemon they start from a small shell (a command runner, util/spawner.ts) rather than by
// forking the daemon: about 0.5 ms a program instead of 5.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { HfError, isHfError, type ErrorCode } from '../core/errors.js';
import { Spawner, SpawnerUnavailable } from './spawner.js';

export interface ExecResult {
  stdout: string;
  stderr: string;
  code: number;
}

export interface RunOptions {
  timeoutMs?: number;
  /** The code of the error thrown on failure (default HF_ERR_INTERNAL). */
  errorCode?: ErrorCode;
  input?: string | Buffer;
  /** Added to (or overriding) this process's environment. */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Resolve with the result instead of throwing when the exit code is non-zero. */
  allowFailure?: boolean;
  /**
   * Aborting kills the command with everything it started (it runs in a process group of its own:
   * `dpkg -x` runs `dpkg-deb | tar`), and run() rejects with the abort reason.
   */
  signal?: AbortSignal;
}

let runner: { spawner: Spawner; dir: string; seq: number } | undefined;

/**
 * From now on, run() starts commands through `spawner` (no fork of this process), their input and
 * output passing through files in `dir` (made if missing; each call removes its own). Commands
 * with their own environment, working directory or abort signal, or arguments a request line
 * cannot carry, are still spawned directly. The daemon calls this once at start.
 */
export function useCommandRunner(spawner: Spawner, dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  runner = { spawner, dir, seq: 0 };
}

/** Runs a command to completion with its output captured; a failure is an HfError naming the command and its stderr. */
export async function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
  if (runner && !opts.env && !opts.cwd && !opts.signal && runner.spawner.usable([cmd, ...args], runner.dir)) {
    try {
      return await runThroughRunner(runner, cmd, args, opts);
    } catch (e) {
      if (!(e instanceof SpawnerUnavailable)) throw e;
      // the runner could not start it at all: spawn it ourselves
    }
  }
  return runSpawned(cmd, args, opts);
}

async function runThroughRunner(r: NonNullable<typeof runner>, cmd: string, args: string[], opts: RunOptions): Promise<ExecResult> {
  const base = join(r.dir, `${process.pid}-${++r.seq}`);
  const files = { stdin: opts.input === undefined ? '/dev/null' : `${base}.in`, stdout: `${base}.out`, stderr: `${base}.err` };
  try {
    if (opts.input !== undefined) writeFileSync(files.stdin, opts.input, { mode: 0o600 });
    let code: number;
    let timedOut = false;
    try {
      code = await r.spawner.capture([cmd, ...args], files, opts.timeoutMs ?? 2 ** 31 - 1, cmd);
    } catch (e) {
      if (!isHfError(e) || e.code !== 'HF_ERR_TIMEOUT') throw e;
      // killed as a directly spawned command would be
      timedOut = true;
      code = -1;
    }
    const read = (f: string) => {
      try {
        return readFileSync(f, 'utf8');
      } catch {
        return '';
      }
    };
    const res = { stdout: read(files.stdout), stderr: read(files.stderr), code };
    // The shell says "not found" with status 127 where spawn() fails with ENOENT.
    if (code === 127 && /not found/.test(res.stderr)) throw new HfError('HF_ERR_MISSING_DEPENDENCY', `${cmd} is not installed (not found on PATH)`);
    return settle(cmd, args, opts, res, timedOut ? 'SIGKILL' : code > 128 ? `signal ${code - 128}` : null);
  } finally {
    for (const f of [files.stdout, files.stderr, ...(opts.input === undefined ? [] : [files.stdin])]) rmSync(f, { force: true });
  }
}

/** The result, or the error a failed command makes (unless failure is allowed). */
function settle(cmd: string, args: string[], opts: RunOptions, res: ExecResult, signal: string | null): ExecResult {
  if (res.code === 0 || opts.allowFailure) return res;
  const why = signal ? `killed by ${signal}` : `exit ${res.code}`;
  throw new HfError(opts.errorCode ?? 'HF_ERR_INTERNAL', `${cmd} ${args.join(' ')} failed (${why}): ${res.stderr.trim() || res.stdout.trim()}`, {
    details: { command: [cmd, ...args], code: res.code, stderr: res.stderr.slice(-2000) },
  });
}

function runSpawned(cmd: string, args: string[], opts: RunOptions): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const { signal } = opts;
    if (signal?.aborted) return reject(signal.reason);
    const child = spawn(cmd, args, {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: opts.env ? { ...process.env, ...opts.env } : process.env,
      cwd: opts.cwd,
      detached: signal !== undefined,
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = opts.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs) : undefined;
    const onAbort = () => killGroup(child);
    signal?.addEventListener('abort', onAbort, { once: true });
    const done = () => {
      if (timer) clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    child.on('error', (e: NodeJS.ErrnoException) => {
      done();
      if (e.code === 'ENOENT') reject(new HfError('HF_ERR_MISSING_DEPENDENCY', `${cmd} is not installed (not found on PATH)`, { cause: e }));
      else reject(new HfError(opts.errorCode ?? 'HF_ERR_INTERNAL', `${cmd}: ${e.message}`, { cause: e }));
    });
    child.on('close', (code, sig) => {
      done();
      if (signal?.aborted) return reject(signal.reason);
      try {
        resolve(settle(cmd, args, opts, { stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), code: code ?? -1 }, sig));
      } catch (e) {
        reject(e);
      }
    });
    // A command that does not read its input may have exited already: that is no failure of ours.
    child.stdin.on('error', () => undefined);
    child.stdin.end(opts.input);
  });
}

/** SIGKILLs a child spawned with `detached: true` together with everything in its process group. */
export function killGroup(child: ChildProcess): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, 'SIGKILL');
  } catch {
    child.kill('SIGKILL');
  }
}

/** Where programs are looked for after PATH: root's sbin directories are often missing from it. */
const EXTRA_DIRS = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];

/** Resolves the absolute path of an executable (on PATH, then the usual bin/sbin dirs), or undefined. */
export async function which(cmd: string): Promise<string | undefined> {
  const { access } = await import('node:fs/promises');
  const candidates = cmd.includes('/') ? [cmd] : [...new Set([...(process.env.PATH ?? '').split(':').filter(Boolean), ...EXTRA_DIRS])].map((d) => `${d}/${cmd}`);
  for (const p of candidates) {
    try {
      await access(p, 1);
      return p;
    } catch {
      // next
    }
  }
  return undefined;
}
