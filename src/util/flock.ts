// Liveness by lock: a daemon holds an exclusive flock(2) on <data dir>/daemon.lock for as long
// as it runs; the kernel drops the lock when the process ends, however it ends (SIGKILL too).
// So "is the daemon of that data directory alive?" is "is its lock held?", which a leftover
// file, a reused pid or a deleted directory cannot fake.
//
// Node has no flock(2). util-linux flock(1) takes the lock for us on a descriptor we pass it as
// its stdin: flock locks belong to the open file description, which the child shares with us,
// so the lock stays held after flock(1) exits, until our descriptor is closed. Files Node opens
// are close-on-exec, so no other child (QEMU, runc, helpers) inherits the descriptor and keeps
// the lock past our death.
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { HfError } from '../core/errors.js';

/** The lock file of the daemon of a data directory. */
export function daemonLockFile(dataDir: string): string {
  return join(dataDir, 'daemon.lock');
}

/** flock(1)'s exit status when the lock is held elsewhere (or the wait ran out). */
const CONFLICT = 75;

/** An flock held by this process: released by release() or when the process ends. */
export class HeldLock {
  private fd: number | undefined;

  constructor(readonly path: string, fd: number) {
    this.fd = fd;
  }

  release(): void {
    if (this.fd === undefined) return;
    closeSync(this.fd);
    this.fd = undefined;
  }
}

/** Runs flock(1) on `fd` (as its stdin); resolves true when it got the lock. */
function flockFd(fd: number, args: string[]): Promise<boolean> {
  return new Promise((resolve, reject) => {
    let stderr = '';
    const child = spawn('flock', [...args, '-E', String(CONFLICT), '0'], { stdio: [fd, 'ignore', 'pipe'] });
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', (e) => reject(new HfError('HF_ERR_MISSING_DEPENDENCY', `cannot run flock (util-linux): ${e.message}`, { cause: e })));
    child.once('close', (code) => {
      if (code === 0) resolve(true);
      else if (code === CONFLICT) resolve(false);
      else reject(new HfError('HF_ERR_INTERNAL', `flock ${args.join(' ')} failed (${code}): ${stderr.trim()}`));
    });
  });
}

/**
 * Takes the exclusive lock on `path` (created if missing) and holds it until release() or the end
 * of this process. Undefined when another process holds it. Waits up to `waitMs` for a holder to
 * let go: isLockHeld() holds a shared lock for a moment while it looks.
 */
export async function tryLock(path: string, waitMs = 2000): Promise<HeldLock | undefined> {
  let fd: number;
  try {
    fd = openSync(path, 'a', 0o600);
  } catch (e) {
    throw new HfError('HF_ERR_DATA_DIR', `cannot open the lock file ${path}: ${(e as Error).message}`, { cause: e });
  }
  try {
    if (await flockFd(fd, ['-x', '-w', String(Math.max(0.01, waitMs / 1000))])) return new HeldLock(path, fd);
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  closeSync(fd);
  return undefined;
}

/**
 * Whether some process holds the exclusive lock on `path`. A missing file is a lock nobody holds.
 * Looks with a shared lock (so that two lookers do not see each other), released at once.
 */
export async function isLockHeld(path: string): Promise<boolean> {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw new HfError('HF_ERR_INTERNAL', `cannot open the lock file ${path}: ${(e as Error).message}`, { cause: e });
  }
  try {
    return !(await flockFd(fd, ['-s', '-n']));
  } finally {
    closeSync(fd);
  }
}
