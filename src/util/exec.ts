// Running helper programs (qemu-img, ip, apt-get…) with captured output and a clear error.
import { spawn } from 'node:child_process';
import { HfError, type ErrorCode } from '../core/errors.js';

export interface ExecResult {
  stdout: string;
  stderr: string;
  code: number;
}

export async function run(
  cmd: string,
  args: string[],
  opts: { timeoutMs?: number; errorCode?: ErrorCode; input?: string; env?: NodeJS.ProcessEnv; allowFailure?: boolean } = {},
): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = opts.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs) : undefined;
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (timer) clearTimeout(timer);
      if (e.code === 'ENOENT') reject(new HfError('HF_ERR_MISSING_DEPENDENCY', `${cmd} is not installed (not found on PATH)`, { cause: e }));
      else reject(new HfError(opts.errorCode ?? 'HF_ERR_INTERNAL', `${cmd}: ${e.message}`, { cause: e }));
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      const res = { stdout, stderr, code: code ?? -1 };
      if (code === 0 || opts.allowFailure) return resolve(res);
      const why = signal ? `killed by ${signal}` : `exit ${code}`;
      reject(new HfError(opts.errorCode ?? 'HF_ERR_INTERNAL', `${cmd} ${args.join(' ')} failed (${why}): ${stderr.trim() || stdout.trim()}`, { details: { code, stderr: stderr.slice(-2000) } }));
    });
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
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
