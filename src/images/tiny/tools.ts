// Host tools the tiny-image builder shells out to: lookup on PATH (plus the sbin directories,
// which a non-login root shell may lack), a missing-tool error that names the exact apt-get
// command, and a small abortable process runner.

import { which } from '../../util/exec.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { open } from 'node:fs/promises';
import { HfError } from '../../core/errors.js';

/** Debian package that provides each tool the builder needs. */
export const TOOL_PACKAGES = {
  'apt-get': 'apt',
  'apt-cache': 'apt',
  dpkg: 'dpkg',
  cpio: 'cpio',
  'qemu-img': 'qemu-utils',
  busybox: 'busybox-static',
  mke2fs: 'e2fsprogs',
  xz: 'xz-utils',
  zstd: 'zstd',
} as const;

export type ToolName = keyof typeof TOOL_PACKAGES;

export async function findTool(name: string): Promise<string | undefined> {
  return which(name);
}

export function missingDependency(tools: string[], packages: string[], why?: string): HfError {
  const pkgs = [...new Set(packages)];
  const cmd = `apt-get install -y ${pkgs.join(' ')}`;
  return new HfError(
    'HF_ERR_MISSING_DEPENDENCY',
    `building the tiny image needs ${tools.map((t) => `'${t}'`).join(', ')}${why ? ` (${why})` : ''}; install with: ${cmd}`,
    { details: { tools, packages: pkgs, command: cmd } },
  );
}

/** Resolves every tool to an absolute path, or throws one error naming all missing packages. */
export async function requireTools<T extends ToolName>(names: readonly T[]): Promise<Record<T, string>> {
  const out = {} as Record<T, string>;
  const missing: T[] = [];
  for (const n of names) {
    const p = await findTool(n);
    if (p) out[n] = p;
    else missing.push(n);
  }
  if (missing.length) throw missingDependency(missing, missing.map((m) => TOOL_PACKAGES[m]));
  return out;
}

/** True when the ELF file at `path` has no PT_INTERP program header (statically linked). */
export async function isStaticElf(path: string): Promise<boolean> {
  const fh = await open(path, 'r');
  try {
    const hdr = Buffer.alloc(64);
    await fh.read(hdr, 0, 64, 0);
    if (hdr.readUInt32BE(0) !== 0x7f454c46 || hdr[4] !== 2 || hdr[5] !== 1) return false; // ELF64 LE only
    const phoff = Number(hdr.readBigUInt64LE(0x20));
    const phentsize = hdr.readUInt16LE(0x36);
    const phnum = hdr.readUInt16LE(0x38);
    const ph = Buffer.alloc(phentsize * phnum);
    await fh.read(ph, 0, ph.length, phoff);
    for (let i = 0; i < phnum; i++) if (ph.readUInt32LE(i * phentsize) === 3 /* PT_INTERP */) return false;
    return true;
  } finally {
    await fh.close();
  }
}

/** SIGKILLs a child spawned with `detached: true` together with everything in its process group. */
export function killTree(child: ChildProcess): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, 'SIGKILL');
  } catch {
    child.kill('SIGKILL');
  }
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  cwd?: string;
  signal?: AbortSignal;
  env?: NodeJS.ProcessEnv;
  /** Resolve with the result instead of throwing when the exit code is non-zero. */
  allowFail?: boolean;
  input?: string | Buffer;
}

/** Runs a command to completion; on abort the child gets SIGKILL and the abort reason is thrown. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    if (opts.signal?.aborted) return reject(opts.signal.reason);
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: { ...process.env, LC_ALL: 'C', ...opts.env },
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
      detached: true, // own process group, so an abort also stops grandchildren (dpkg -x runs dpkg-deb | tar)
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (d: Buffer) => out.push(d));
    child.stderr!.on('data', (d: Buffer) => err.push(d));
    const onAbort = () => killTree(child);
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    child.on('error', (e) => {
      opts.signal?.removeEventListener('abort', onAbort);
      reject(new HfError('HF_ERR_INTERNAL', `failed to run ${cmd}: ${e.message}`, { cause: e }));
    });
    child.on('close', (code, sig) => {
      opts.signal?.removeEventListener('abort', onAbort);
      if (opts.signal?.aborted) return reject(opts.signal.reason);
      const res = { code: code ?? (sig ? 128 : 1), stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') };
      if (res.code !== 0 && !opts.allowFail) {
        const tail = res.stderr.trim().split('\n').slice(-8).join('\n');
        return reject(
          new HfError('HF_ERR_INTERNAL', `${cmd} ${args.join(' ')} exited with ${sig ?? res.code}: ${tail}`, {
            details: { command: [cmd, ...args], exitCode: res.code, stderr: tail },
          }),
        );
      }
      resolve(res);
    });
  });
}
