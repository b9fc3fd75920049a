// Builds Hyperfold's built-in `tiny` guest image from host packages only:
//   kernel   Debian's kernel (the package linux-image-amd64 depends on), fetched with
//            `apt-get download` into cacheDir and unpacked with `dpkg -x`
//   initrd   newc cpio + gzip: static busybox with its applet links, the storage/network/ACPI
//            modules with their dependencies, and the init scripts of ./guest.ts
//   disk     64 MiB ext4 (`mke2fs -d`) holding /hyperfold-disk, converted to qcow2
// The image is assembled in a temp dir beside destDir and moved into place with rename().

import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readFile, readdir, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { HfError } from '../../core/errors.js';
import { TINY_CMDLINE, TINY_DISK_MARKER, guestFiles } from './guest.js';
import { modulesDep, selectModules, type WantedModule } from './modules.js';
import { killGroup, run as runCommand, type RunOptions } from '../../util/exec.js';
import { sha256File } from '../../util/hash.js';
import { isStaticElf, missingDependency, requireTools } from './tools.js';

export { TINY_CMDLINE, TINY_DISK_MARKER, TINY_READY_MARKER } from './guest.js';

export interface TinyImageManifest {
  name: 'tiny';
  /** File names relative to the image dir. */
  kernel: string;
  initrd: string;
  disk: string;
  cmdline: string;
  kernelVersion: string;
  busyboxVersion: string;
  sha256: Record<string, string>;
  builtAt: string;
  sizeBytes: number;
}

export interface BuildTinyImageOptions {
  destDir: string;
  cacheDir: string;
  onProgress?: (percent: number, message: string) => void;
  signal?: AbortSignal;
}

export const TINY_MANIFEST_FILE = 'image.json';
const KERNEL_FILE = 'vmlinuz';
const INITRD_FILE = 'initrd.img';
const DISK_FILE = 'disk.qcow2';
const DISK_SIZE = '64M';
const KERNEL_META_PACKAGE = 'linux-image-amd64';

/** Modules the guest loads, in this order (each preceded by its dependencies). */
const WANTED_MODULES: WantedModule[] = [
  // input + ACPI power button first: acpid opens /dev/input/event* when it starts
  { name: 'evdev', required: true },
  { name: 'button', required: false },
  // disk class drivers before host adapters so disks bind as soon as they are found
  { name: 'sd_mod', required: true },
  { name: 'sr_mod', required: true },
  { name: 'virtio_pci', required: true },
  { name: 'virtio_blk', required: true },
  { name: 'virtio_scsi', required: true },
  { name: 'ata_piix', required: true },
  { name: 'ahci', required: true },
  { name: 'ata_generic', required: true },
  { name: 'virtio_net', required: true },
  { name: 'e1000', required: true },
  { name: 'virtio_balloon', required: true },
  { name: 'virtio_rng', required: true },
  { name: 'virtio_console', required: true },
  // ext4 needs a crc32c implementation (softdep "pre: crc32c"); the generic one always loads
  { name: 'crc32c_generic', required: false },
  { name: 'ext4', required: true },
];

const APT_ENV = { DEBIAN_FRONTEND: 'noninteractive' };

/** The tools' output is parsed: in the C locale. */
const run = (cmd: string, args: string[], opts: RunOptions = {}) => runCommand(cmd, args, { ...opts, env: { LC_ALL: 'C', ...opts.env } });

export async function buildTinyImage(opts: BuildTinyImageOptions): Promise<TinyImageManifest> {
  const { signal } = opts;
  const destDir = resolve(opts.destDir);
  const cacheDir = resolve(opts.cacheDir);
  const progress = (p: number, m: string) => opts.onProgress?.(p, m);
  signal?.throwIfAborted();

  const tools = await requireTools(['apt-get', 'apt-cache', 'dpkg', 'cpio', 'qemu-img', 'busybox', 'mke2fs'] as const);
  if (!(await isStaticElf(tools.busybox).catch(() => false))) {
    throw missingDependency(['busybox (static)'], ['busybox-static'], `${tools.busybox} is not a statically linked busybox`);
  }
  const busyboxVersion = await getBusyboxVersion(tools.busybox, signal);

  await mkdir(cacheDir, { recursive: true });
  await mkdir(dirname(destDir), { recursive: true });
  await removeStale(dirname(destDir), `.${basename(destDir)}.tmp-`);
  await removeStale(cacheDir, '.download-');
  const stage = await mkdtemp(join(dirname(destDir), `.${basename(destDir)}.tmp-`));
  const out = join(stage, 'image');
  const work = join(stage, 'work');
  try {
    await mkdir(out);
    await mkdir(work);

    // 1. kernel package
    progress(0, 'resolving kernel package');
    const deb = await fetchKernelDeb(tools, cacheDir, progress, signal);
    signal?.throwIfAborted();

    progress(30, `extracting ${basename(deb)}`);
    const ex = join(work, 'kernel');
    await mkdir(ex);
    await run(tools.dpkg, ['-x', deb, ex], { signal });
    const { kernelVersion, vmlinuz, modDir } = await locateKernel(ex);
    await copyFile(vmlinuz, join(out, KERNEL_FILE));

    // 2. initramfs
    progress(45, 'building initramfs');
    const root = join(work, 'initramfs');
    await buildInitramfsTree(root, { busybox: tools.busybox, kernelVersion, busyboxVersion, modDir }, signal);
    await rm(ex, { recursive: true, force: true }); // ~400 MB of modules we no longer need
    progress(65, 'compressing initramfs');
    await writeCpioGz(tools.cpio, root, join(out, INITRD_FILE), signal);

    // 3. data disk
    progress(75, 'building data disk');
    await buildDisk(tools, work, join(out, DISK_FILE), signal);

    // 4. manifest + atomic move into place
    progress(90, 'writing image');
    const files = [KERNEL_FILE, INITRD_FILE, DISK_FILE];
    const sha256: Record<string, string> = {};
    let sizeBytes = 0;
    for (const f of files) {
      sha256[f] = await sha256File(join(out, f));
      sizeBytes += (await stat(join(out, f))).size;
    }
    const manifest: TinyImageManifest = {
      name: 'tiny',
      kernel: KERNEL_FILE,
      initrd: INITRD_FILE,
      disk: DISK_FILE,
      cmdline: TINY_CMDLINE,
      kernelVersion,
      busyboxVersion,
      sha256,
      builtAt: new Date().toISOString(),
      sizeBytes,
    };
    await writeFile(join(out, TINY_MANIFEST_FILE), JSON.stringify(manifest, null, 2) + '\n');
    signal?.throwIfAborted();
    await rm(work, { recursive: true, force: true });
    await replaceDir(out, destDir, stage);
    progress(100, 'done');
    return manifest;
  } finally {
    await rm(stage, { recursive: true, force: true }).catch(() => undefined);
  }
}

export async function readTinyManifest(dir: string): Promise<TinyImageManifest | undefined> {
  let raw: string;
  try {
    raw = await readFile(join(dir, TINY_MANIFEST_FILE), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT' || (e as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined;
    throw e;
  }
  let m: unknown;
  try {
    m = JSON.parse(raw);
  } catch {
    return undefined;
  }
  if (!isManifest(m)) return undefined;
  for (const f of [m.kernel, m.initrd, m.disk]) {
    try {
      if (!(await stat(join(dir, f))).isFile()) return undefined;
    } catch {
      return undefined;
    }
  }
  return m;
}

function isManifest(m: unknown): m is TinyImageManifest {
  if (!m || typeof m !== 'object') return false;
  const o = m as Record<string, unknown>;
  const str = (k: string) => typeof o[k] === 'string' && (o[k] as string).length > 0;
  const file = (k: string) => str(k) && !(o[k] as string).includes('/') && !(o[k] as string).startsWith('.');
  return (
    o.name === 'tiny' &&
    file('kernel') &&
    file('initrd') &&
    file('disk') &&
    typeof o.cmdline === 'string' &&
    str('kernelVersion') &&
    str('busyboxVersion') &&
    str('builtAt') &&
    typeof o.sizeBytes === 'number' &&
    !!o.sha256 &&
    typeof o.sha256 === 'object'
  );
}

// ---------------------------------------------------------------------------------------------

async function getBusyboxVersion(busybox: string, signal?: AbortSignal): Promise<string> {
  // `busybox` with no arguments prints "BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) multi-call binary."
  const r = await run(busybox, [], { signal, allowFailure: true });
  const m = (r.stdout + r.stderr).match(/BusyBox v(\S+)/);
  return m ? m[1]! : 'unknown';
}

type AptTools = { 'apt-get': string; 'apt-cache': string };

/** Returns the path of the kernel .deb in cacheDir, downloading it when it is not there yet. */
async function fetchKernelDeb(
  tools: AptTools,
  cacheDir: string,
  progress: (p: number, m: string) => void,
  signal?: AbortSignal,
): Promise<string> {
  let updated = false;
  const update = async () => {
    updated = true;
    progress(5, 'apt-get update');
    await run(tools['apt-get'], ['update', '-q'], { signal, env: APT_ENV, allowFailure: true });
  };

  let pkg = await resolveKernelPackage(tools, signal);
  if (!pkg) {
    await update();
    pkg = await resolveKernelPackage(tools, signal);
  }
  if (!pkg) {
    // No package lists and no network: fall back to whatever kernel is already cached.
    const cached = await newestCachedDeb(cacheDir, /^linux-image-.*-amd64_.*\.deb$/);
    if (cached) return cached;
    throw new HfError(
      'HF_ERR_MISSING_DEPENDENCY',
      `cannot resolve the kernel package that ${KERNEL_META_PACKAGE} depends on; run: apt-get update`,
      { details: { command: 'apt-get update' } },
    );
  }

  const esc = pkg.replace(/[.+]/g, '\\$&');
  const cached = await newestCachedDeb(cacheDir, new RegExp(`^${esc}_[^_]+_amd64\\.deb$`));
  if (cached) {
    progress(25, `using cached ${basename(cached)}`);
    return cached;
  }

  progress(10, `downloading ${pkg}`);
  // Download into a private dir first so concurrent builds never see a partial .deb.
  const dl = await mkdtemp(join(cacheDir, '.download-'));
  try {
    // (As root in a dir the _apt user cannot read, apt warns that the download is unsandboxed: harmless.)
    let r = await run(tools['apt-get'], ['download', '-q', pkg], { cwd: dl, signal, env: APT_ENV, allowFailure: true });
    if (r.code !== 0 && !updated) {
      await update();
      progress(10, `downloading ${pkg}`);
      r = await run(tools['apt-get'], ['download', '-q', pkg], { cwd: dl, signal, env: APT_ENV, allowFailure: true });
    }
    const got = (await readdir(dl)).filter((f) => f.endsWith('.deb'));
    if (r.code !== 0 || got.length !== 1) {
      const tail = r.stderr.trim().split('\n').slice(-5).join('\n');
      throw new HfError('HF_ERR_MISSING_DEPENDENCY', `apt-get download ${pkg} failed: ${tail || `exit ${r.code}`}`, {
        details: { command: `apt-get update && apt-get download ${pkg}`, stderr: tail },
      });
    }
    const final = join(cacheDir, got[0]!);
    await rename(join(dl, got[0]!), final);
    progress(25, `downloaded ${got[0]}`);
    return final;
  } finally {
    await rm(dl, { recursive: true, force: true }).catch(() => undefined);
  }
}

async function resolveKernelPackage(tools: AptTools, signal?: AbortSignal): Promise<string | undefined> {
  const r = await run(tools['apt-cache'], ['depends', KERNEL_META_PACKAGE], { signal, allowFailure: true });
  if (r.code !== 0) return undefined;
  const m = r.stdout.match(/^\s*\|?Depends:\s*(linux-image-[^\s<>]+)/m);
  return m?.[1];
}

async function newestCachedDeb(cacheDir: string, re: RegExp): Promise<string | undefined> {
  let best: { path: string; mtime: number } | undefined;
  for (const f of await readdir(cacheDir).catch(() => [] as string[])) {
    if (!re.test(f)) continue;
    const s = await stat(join(cacheDir, f)).catch(() => undefined);
    if (s?.isFile() && s.size > 0 && (!best || s.mtimeMs > best.mtime)) best = { path: join(cacheDir, f), mtime: s.mtimeMs };
  }
  return best?.path;
}

async function locateKernel(ex: string): Promise<{ kernelVersion: string; vmlinuz: string; modDir: string }> {
  for (const base of ['lib/modules', 'usr/lib/modules']) {
    const dirs = await readdir(join(ex, base)).catch(() => [] as string[]);
    for (const kver of dirs) {
      const vmlinuz = join(ex, 'boot', `vmlinuz-${kver}`);
      if (await stat(vmlinuz).then((s) => s.isFile(), () => false)) return { kernelVersion: kver, vmlinuz, modDir: join(ex, base, kver) };
    }
  }
  throw new HfError('HF_ERR_INTERNAL', 'kernel package has no boot/vmlinuz-<version> with a matching modules directory');
}

async function buildInitramfsTree(
  root: string,
  info: { busybox: string; kernelVersion: string; busyboxVersion: string; modDir: string },
  signal?: AbortSignal,
): Promise<void> {
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'dev', 'proc', 'sys', 'run', 'tmp', 'mnt', 'root', 'var/log', 'var/run', 'etc/hyperfold']) {
    await mkdir(join(root, d), { recursive: true });
  }
  await chmod(join(root, 'tmp'), 0o1777);

  // busybox + one symlink per applet, at the path busybox itself reports
  await copyFile(info.busybox, join(root, 'bin/busybox'));
  await chmod(join(root, 'bin/busybox'), 0o755);
  const list = await run(info.busybox, ['--list-full'], { signal });
  for (const applet of list.stdout.split('\n').map((s) => s.trim().replace(/^\/+/, ''))) {
    if (!applet || applet === 'bin/busybox' || applet.includes('..')) continue;
    const link = join(root, applet);
    await mkdir(dirname(link), { recursive: true });
    await symlink(relative(dirname(link), join(root, 'bin/busybox')), link).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'EEXIST') throw e;
    });
  }

  // kernel modules, uncompressed, in load order
  const sel = await selectModules(info.modDir, WANTED_MODULES, signal);
  if (sel.missing.length) {
    throw new HfError('HF_ERR_INTERNAL', `kernel ${info.kernelVersion} lacks required drivers: ${sel.missing.join(', ')}`, {
      details: { missing: sel.missing },
    });
  }
  const kmods = join(root, 'lib/modules', info.kernelVersion);
  for (const m of sel.ordered) {
    await mkdir(dirname(join(kmods, m.rel)), { recursive: true });
    await writeFile(join(kmods, m.rel), m.data);
  }
  await writeFile(join(kmods, 'modules.dep'), modulesDep(sel));
  for (const f of ['modules.builtin', 'modules.order']) await copyFile(join(info.modDir, f), join(kmods, f)).catch(() => undefined);
  await writeFile(join(root, 'etc/hyperfold/modules'), sel.ordered.map((m) => m.rel).join('\n') + '\n');

  for (const f of guestFiles(info)) {
    const p = join(root, f.path);
    await mkdir(dirname(p), { recursive: true });
    await writeFile(p, f.content);
    await chmod(p, f.mode);
  }

  // The kernel opens /dev/console before running /init; creating the node needs root (the
  // builder normally is). Without it /init still works: it reopens stdio after mounting devtmpfs.
  const mknod = (args: string[]) => run('mknod', args, { signal, allowFailure: true }).catch(() => undefined);
  await mknod(['-m', '600', join(root, 'dev/console'), 'c', '5', '1']);
  await mknod(['-m', '666', join(root, 'dev/null'), 'c', '1', '3']);
}

async function listTree(root: string, rel = ''): Promise<string[]> {
  const out: string[] = [];
  const entries = (await readdir(join(root, rel), { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1));
  for (const e of entries) {
    const p = rel ? `${rel}/${e.name}` : e.name;
    out.push(p);
    if (e.isDirectory()) out.push(...(await listTree(root, p)));
  }
  return out;
}

async function writeCpioGz(cpio: string, root: string, dest: string, signal?: AbortSignal): Promise<void> {
  const names = await listTree(root);
  signal?.throwIfAborted();
  const child = spawn(cpio, ['--create', '--format=newc', '--null', '--owner=0:0', '--reproducible', '--quiet'], {
    cwd: root,
    stdio: ['pipe', 'pipe', 'pipe'],
    detached: true,
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number>((res, rej) => {
    child.on('error', rej);
    child.on('close', (code) => res(code ?? 1));
  });
  child.stdin.end(names.join('\0') + '\0');
  try {
    await pipeline(child.stdout, createGzip({ level: 6 }), createWriteStream(dest), { signal });
    const code = await exited;
    if (code !== 0) throw new HfError('HF_ERR_INTERNAL', `cpio exited with ${code}: ${stderr.trim()}`);
  } catch (e) {
    killGroup(child);
    await exited.catch(() => undefined);
    if (signal?.aborted) throw signal.reason;
    throw e;
  }
}

async function buildDisk(tools: { mke2fs: string; 'qemu-img': string }, work: string, dest: string, signal?: AbortSignal): Promise<void> {
  const src = join(work, 'disk-root');
  await mkdir(src, { recursive: true });
  await writeFile(join(src, 'hyperfold-disk'), `${TINY_DISK_MARKER}\n`);
  const raw = join(work, 'disk.raw');
  await run(tools.mke2fs, ['-q', '-F', '-t', 'ext4', '-L', 'hyperfold-tiny', '-m', '0', '-E', 'root_owner=0:0', '-d', src, raw, DISK_SIZE], { signal });
  await run(tools['qemu-img'], ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, dest], { signal });
  await rm(raw, { force: true });
}

/**
 * Moves the finished image to destDir. A previous image is first moved aside into the stage dir
 * (rename() cannot replace a non-empty dir); retried because a concurrent build may be doing the same.
 */
async function replaceDir(src: string, destDir: string, stage: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await rename(src, destDir);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if ((code !== 'ENOTEMPTY' && code !== 'EEXIST') || attempt >= 5) throw e;
    }
    await rename(destDir, join(stage, `old-${randomBytes(4).toString('hex')}`)).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT') throw e;
    });
  }
}

/** Removes temp dirs that crashed or killed builds left behind (anything older than an hour). */
async function removeStale(dir: string, prefix: string): Promise<void> {
  for (const f of await readdir(dir).catch(() => [] as string[])) {
    if (!f.startsWith(prefix)) continue;
    const s = await stat(join(dir, f)).catch(() => undefined);
    if (s && Date.now() - s.mtimeMs > 3600_000) await rm(join(dir, f), { recursive: true, force: true }).catch(() => undefined);
  }
}
