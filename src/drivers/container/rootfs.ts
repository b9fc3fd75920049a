// Root filesystems of containers: copying a tree while shifting its owners into a container's
// id range (root inside = an unprivileged id outside), and making the path to it traversable
// for that unprivileged root. Copies keep hard links, symbolic links, modes and FIFOs; device
// nodes are skipped (a container's /dev is a fresh tmpfs with runc's safe device set).
import { chmod, copyFile, link, lchown, lstat, mkdir, readdir, readlink, symlink } from 'node:fs/promises';
import { chmodSync, constants, copyFileSync, lchownSync, linkSync, lstatSync, mkdirSync, readdirSync, readlinkSync, statSync, symlinkSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { HfError } from '../../core/errors.js';
import { run } from '../../util/exec.js';

export interface IdShift {
  /** Host id that uid/gid 0 of the source tree is at (0 for an image tree). */
  fromBase: number;
  /** Host id that uid/gid 0 of the copy should be at (0 for an unshifted copy). */
  toBase: number;
  /** Size of the range; ids outside it become the overflow id (65534 inside). */
  size: number;
}

export const NO_SHIFT: IdShift = { fromBase: 0, toBase: 0, size: 2 ** 32 - 1 };

export function shiftId(id: number, s: IdShift): number {
  const inside = id - s.fromBase;
  if (inside < 0 || inside >= s.size) return s.toBase + Math.min(65_534, s.size - 1);
  return s.toBase + inside;
}

export interface CopyStats {
  files: number;
  dirs: number;
  symlinks: number;
  hardlinks: number;
  skipped: number;
  bytes: number;
}

/** A small semaphore: bounds the file operations in flight. */
class Limiter {
  private active = 0;
  private readonly queue: Array<() => void> = [];
  constructor(private readonly max: number) {}
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.max) await new Promise<void>((r) => this.queue.push(r));
    this.active++;
    try {
      return await fn();
    } finally {
      this.active--;
      this.queue.shift()?.();
    }
  }
}

/**
 * Copies the tree `src` to `dst` (an empty or missing directory), shifting owners. Files are cloned when
 * the filesystem can (reflink), copied otherwise.
 */
export async function copyTreeShifted(src: string, dst: string, shift: IdShift, onProgress?: (s: CopyStats) => void): Promise<CopyStats> {
  const stats: CopyStats = { files: 0, dirs: 0, symlinks: 0, hardlinks: 0, skipped: 0, bytes: 0 };
  const own = ownerSetter(lchown);
  const limit = new Limiter(32);
  /** First copy of each multiply-linked inode: later names become hard links to it. */
  const inodes = new Map<string, Promise<string>>();
  let lastReport = Date.now();
  const fifos: Array<{ path: string; mode: number; uid: number; gid: number }> = [];

  const copyEntry = async (s: string, d: string): Promise<void> => {
    const st = await limit.run(() => lstat(s));
    const uid = shiftId(st.uid, shift);
    const gid = shiftId(st.gid, shift);
    if (st.isDirectory()) {
      // The top directory may exist already (claimed for an id range); nothing below may.
      await limit.run(async () => {
        await mkdir(d, { recursive: d === dst, mode: 0o700 });
      });
      stats.dirs++;
      const names = await limit.run(() => readdir(s));
      await Promise.all(names.map((n) => copyEntry(join(s, n), join(d, n))));
      await limit.run(async () => {
        await own(d, uid, gid);
        await chmod(d, st.mode & 0o7777);
      });
    } else if (st.isSymbolicLink()) {
      await limit.run(async () => {
        await symlink(await readlink(s), d);
        await own(d, uid, gid);
      });
      stats.symlinks++;
    } else if (st.isFile()) {
      const key = `${st.dev}:${st.ino}`;
      const first = st.nlink > 1 ? inodes.get(key) : undefined;
      if (first) {
        const target = await first;
        await limit.run(() => link(target, d));
        stats.hardlinks++;
        return;
      }
      const copied = limit.run(async () => {
        await copyFile(s, d, constants.COPYFILE_FICLONE);
        await own(d, uid, gid);
        await chmod(d, st.mode & 0o7777);
        return d;
      });
      if (st.nlink > 1) inodes.set(key, copied);
      await copied;
      stats.files++;
      stats.bytes += st.size;
    } else if (st.isFIFO()) {
      fifos.push({ path: d, mode: st.mode & 0o7777, uid, gid });
    } else {
      stats.skipped++;
    }
    if (onProgress && Date.now() - lastReport > 500) {
      lastReport = Date.now();
      onProgress(stats);
    }
  };

  await copyEntry(src, dst);
  for (const f of fifos) {
    await run('mkfifo', ['-m', f.mode.toString(8), f.path]);
    await lchown(f.path, f.uid, f.gid);
    stats.files++;
  }
  return stats;
}

/**
 * lchown, skipped when the owner asked for is the one a new file gets anyway (ours: an unshifted
 * copy of a root-owned tree, a privileged container's, needs no chown at all). The copies create
 * their directories 0700 and set the final mode after the contents, so no set-group-id directory
 * hands its group down meanwhile.
 */
function ownerSetter<R>(chown: (p: string, uid: number, gid: number) => R): (p: string, uid: number, gid: number) => R | undefined {
  const euid = process.geteuid?.() ?? -1;
  const egid = process.getegid?.() ?? -1;
  return (p, uid, gid) => (uid === euid && gid === egid ? undefined : chown(p, uid, gid));
}

/** A preparation of a root filesystem that runs off the request path (a spare, see spares.ts). */
export interface SpareJob {
  /** The image's tree (a directory) or archive (a tarball). */
  src: string;
  format: 'dir' | 'tar';
  /** The new root filesystem (must not exist). */
  dst: string;
  /** Where uid/gid 0 of the tree lands (the block's first id). */
  toBase: number;
  size: number;
  /** A FIFO to make next to it (the container's console input), mode 0600. */
  fifo?: string;
}

/** Makes a spare root filesystem: the synchronous copy for directories (in a worker thread), tar + shift for archives. */
export async function prepareSpare(job: SpareJob, tick?: () => void): Promise<void> {
  if (job.format === 'dir') {
    copyTreeShiftedSync(job.src, job.dst, { fromBase: 0, toBase: job.toBase, size: job.size }, tick);
  } else {
    const { extractRootfsArchive } = await import('../../images/container/tar.js');
    await mkdir(job.dst, { mode: 0o755 });
    await extractRootfsArchive(job.src, job.dst);
    await shiftTreeInPlace(job.dst, { fromBase: 0, toBase: job.toBase, size: job.size });
  }
  if (job.fifo) mkfifoSync(job.fifo, 0o600);
}

function mkfifoSync(path: string, mode: number): void {
  const r = spawnSync('mkfifo', ['-m', mode.toString(8), path], { encoding: 'utf8' });
  if (r.error) throw new HfError('HF_ERR_MISSING_DEPENDENCY', `mkfifo: ${r.error.message}`);
  if (r.status !== 0) throw new HfError('HF_ERR_INTERNAL', `mkfifo ${path} failed: ${(r.stderr ?? '').trim()}`);
}

/**
 * copyTreeShifted with synchronous calls, for a worker thread: the calls run on that thread (not
 * the daemon's libuv pool, where they would queue ahead of requests) at that thread's priority.
 * `tick` is called every few entries (the worker checks whether someone waits for it).
 */
export function copyTreeShiftedSync(src: string, dst: string, shift: IdShift, tick?: () => void): CopyStats {
  const stats: CopyStats = { files: 0, dirs: 0, symlinks: 0, hardlinks: 0, skipped: 0, bytes: 0 };
  const own = ownerSetter(lchownSync);
  const inodes = new Map<string, string>();
  const fifos: Array<{ path: string; mode: number; uid: number; gid: number }> = [];
  let n = 0;
  const copyEntry = (s: string, d: string): void => {
    if (tick && ++n % 16 === 0) tick();
    const st = lstatSync(s);
    const uid = shiftId(st.uid, shift);
    const gid = shiftId(st.gid, shift);
    if (st.isDirectory()) {
      mkdirSync(d, { recursive: d === dst, mode: 0o700 });
      stats.dirs++;
      for (const name of readdirSync(s)) copyEntry(join(s, name), join(d, name));
      own(d, uid, gid);
      chmodSync(d, st.mode & 0o7777);
    } else if (st.isSymbolicLink()) {
      symlinkSync(readlinkSync(s), d);
      own(d, uid, gid);
      stats.symlinks++;
    } else if (st.isFile()) {
      const key = `${st.dev}:${st.ino}`;
      const first = st.nlink > 1 ? inodes.get(key) : undefined;
      if (first) {
        linkSync(first, d);
        stats.hardlinks++;
        return;
      }
      copyFileSync(s, d, constants.COPYFILE_FICLONE);
      own(d, uid, gid);
      chmodSync(d, st.mode & 0o7777);
      if (st.nlink > 1) inodes.set(key, d);
      stats.files++;
      stats.bytes += st.size;
    } else if (st.isFIFO()) {
      fifos.push({ path: d, mode: st.mode & 0o7777, uid, gid });
    } else {
      stats.skipped++;
    }
  };
  copyEntry(src, dst);
  for (const f of fifos) {
    mkfifoSync(f.path, f.mode);
    lchownSync(f.path, f.uid, f.gid);
    stats.files++;
  }
  return stats;
}

/** Changes the owners of a tree in place (a privileged container's tree ↔ an id range). */
export async function shiftTreeInPlace(root: string, shift: IdShift): Promise<number> {
  const limit = new Limiter(32);
  let n = 0;
  const walk = async (p: string): Promise<void> => {
    const st = await limit.run(() => lstat(p));
    if (st.isDirectory()) {
      const names = await limit.run(() => readdir(p));
      await Promise.all(names.map((x) => walk(join(p, x))));
    }
    await limit.run(async () => {
      await lchown(p, shiftId(st.uid, shift), shiftId(st.gid, shift));
      // chown clears set-id bits: put them back
      if (!st.isSymbolicLink() && st.mode & 0o6000) await chmod(p, st.mode & 0o7777);
    });
    n++;
  };
  await walk(root);
  return n;
}

/**
 * The unprivileged root of a container must be able to reach its root filesystem: every
 * directory from `stopAt` down to `dir` gets the search bit for others (0711: not listable).
 * Directories above `stopAt` are not ours to change: when one of them lacks the bit, the start
 * would fail, so say so now. Synchronous (a handful of stats: cheaper than round trips through the
 * thread pool on the start path); directories in `known` were checked before and are skipped, and
 * the ones checked now are added to it.
 */
export function ensureTraversable(dir: string, stopAt: string, known?: Set<string>): void {
  let p = dir;
  const ours: string[] = [];
  while (p.startsWith(stopAt) && p !== dirname(p)) {
    ours.push(p);
    if (p === stopAt) break;
    p = dirname(p);
  }
  for (const d of ours) {
    if (known?.has(d)) continue;
    const st = statSync(d);
    if ((st.mode & 0o001) === 0) chmodSync(d, (st.mode & 0o7777) | 0o011);
    known?.add(d);
  }
  for (let q = dirname(stopAt); ; q = dirname(q)) {
    if (known?.has(q)) break;
    const st = statSync(q);
    if ((st.mode & 0o001) === 0) {
      throw new HfError('HF_ERR_DATA_DIR', `${q} is not searchable by others (mode ${(st.mode & 0o777).toString(8)}): unprivileged containers cannot reach their root filesystem under it (chmod o+x ${q}, or use a privileged container)`);
    }
    if (q === dirname(q)) {
      // every ancestor is fine: remember them all
      for (let r = dirname(stopAt); ; r = dirname(r)) {
        known?.add(r);
        if (r === dirname(r)) break;
      }
      break;
    }
  }
}
