// Running helper programs (qemu-img, ip, apt-get…) with captured output and a clear error.
import { spawn, type ChildProcess } from 'node:child_process';
import { HfError, type ErrorCode } from '../core/errors.js';

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

/** Runs a command to completion with its output captured; a failure is an HfError naming the command and its stderr. */
export async function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
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
    const settle = () => {
      if (timer) clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    child.on('error', (e: NodeJS.ErrnoException) => {
      settle();
      if (e.code === 'ENOENT') reject(new HfError('HF_ERR_MISSING_DEPENDENCY', `${cmd} is not installed (not found on PATH)`, { cause: e }));
      else reject(new HfError(opts.errorCode ?? 'HF_ERR_INTERNAL', `${cmd}: ${e.message}`, { cause: e }));
    });
    child.on('close', (code, sig) => {
      settle();
      if (signal?.aborted) return reject(signal.reason);
      const res = { stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), code: code ?? -1 };
      if (code === 0 || opts.allowFailure) return resolve(res);
      const why = sig ? `killed by ${sig}` : `exit ${code}`;
      reject(new HfError(opts.errorCode ?? 'HF_ERR_INTERNAL', `${cmd} ${args.join(' ')} failed (${why}): ${res.stderr.trim() || res.stdout.trim()}`, { details: { command: [cmd, ...args], code, stderr: res.stderr.slice(-2000) } }));
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
