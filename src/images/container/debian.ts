// The built-in `debian-12` container image: Debian bookworm made with debootstrap from Debian's
// own mirror (minbase plus sysvinit and procps), with a real init as PID 1. debootstrap's result
// is cached (it takes most of a minute); the image is a copy of it, adapted to a container:
// no gettys, a console shell, SIGPWR as the request to shut down.
import { chmod, mkdir, readFile, readdir, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { HfError } from '../../core/errors.js';
import { killGroup, run, which } from '../../util/exec.js';
import { buildIntoPlace, readManifest } from './staging.js';

export const DEBIAN_SUITE = 'bookworm';
export const DEBIAN_PACKAGES = ['sysvinit-core', 'procps'];

export interface DebianManifest {
  version: 1;
  suite: string;
  mirror: string;
  packages: string[];
  builtAt: string;
  sizeBytes: number;
  files: number;
}

/** The mirror: HYPERFOLD_DEBIAN_MIRROR, else the host's own apt source for Debian, else deb.debian.org. */
export async function debianMirror(): Promise<string> {
  if (process.env.HYPERFOLD_DEBIAN_MIRROR) return process.env.HYPERFOLD_DEBIAN_MIRROR;
  const texts: string[] = [];
  for (const f of ['/etc/apt/sources.list']) texts.push(await readFile(f, 'utf8').catch(() => ''));
  try {
    for (const f of await readdir('/etc/apt/sources.list.d')) texts.push(await readFile(join('/etc/apt/sources.list.d', f), 'utf8').catch(() => ''));
  } catch {
    // none
  }
  return parseDebianMirror(texts.join('\n')) ?? 'http://deb.debian.org/debian';
}

/** First http(s) URI of a Debian archive (not security, not updates-only) in apt sources (pure). */
export function parseDebianMirror(text: string): string | undefined {
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (t.startsWith('#')) continue;
    const deb = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)/.exec(t);
    const uris = /^URIs:\s*(.+)$/i.exec(t)?.[1]?.split(/\s+/) ?? (deb ? [deb[1]!] : []);
    for (const u of uris) if (/^https?:\/\/.*\/debian\/?$/.test(u)) return u.replace(/\/$/, '');
  }
  return undefined;
}

const INITTAB = `# sysvinit in a Hyperfold container: no gettys (there are no terminals), a root shell on the
# console, and SIGPWR (what \`hyperfold stop\` sends) shuts down cleanly.
id:2:initdefault:
si::sysinit:/etc/init.d/rcS
l0:0:wait:/etc/init.d/rc 0
l1:1:wait:/etc/init.d/rc 1
l2:2:wait:/etc/init.d/rc 2
l3:3:wait:/etc/init.d/rc 3
l4:4:wait:/etc/init.d/rc 4
l5:5:wait:/etc/init.d/rc 5
l6:6:wait:/etc/init.d/rc 6
ca:12345:ctrlaltdel:/sbin/shutdown -t1 -a -r now
pf::powerwait:/sbin/shutdown -t1 -h now
co:2345:respawn:/bin/sh -c 'exec /bin/bash -i </dev/hf-console-in >/dev/console 2>&1'
`;

/**
 * PID 1 for a moment. sysvinit closes its stdio and talks to /dev/console: make that a FIFO
 * whose reader copies to the console log (our stdout, opened for appending by the host), and
 * copy our stdin (the host's console FIFO) into the FIFO the console shell reads.
 */
const HF_INIT = `#!/bin/sh
mkfifo -m 600 /dev/console /dev/hf-console-in 2>/dev/null || true
exec 3<&0
cat <>/dev/console &
cat <&3 1<>/dev/hf-console-in &
exec 3<&-
exec /sbin/init "$@"
`;

function cacheRoot(cacheDir: string): string {
  return process.env.HYPERFOLD_DEBOOTSTRAP_CACHE ?? join(cacheDir, 'debootstrap');
}

/** Runs debootstrap into the cache once; later builds reuse it. Returns the cached rootfs. */
export async function debootstrapCached(cacheDir: string, progress: (p: number, m: string) => void, signal?: AbortSignal): Promise<string> {
  const dir = join(cacheRoot(cacheDir), `${DEBIAN_SUITE}-minbase-${DEBIAN_PACKAGES.join('+')}`);
  const rootfs = join(dir, 'rootfs');
  try {
    await stat(join(dir, 'done'));
    progress(60, 'using the cached debootstrap tree');
    return rootfs;
  } catch {
    // build below
  }
  const bin = (await which('debootstrap')) ?? (await which('/usr/sbin/debootstrap'));
  if (!bin) throw new HfError('HF_ERR_MISSING_DEPENDENCY', 'debootstrap is needed to build the debian-12 image: run `apt-get install -y debootstrap`');
  const mirror = await debianMirror();
  const tmp = `${dir}.tmp-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  progress(2, `debootstrap ${DEBIAN_SUITE} from ${mirror}`);
  let out = '';
  const code = await new Promise<number>((resolve, reject) => {
    // Its own process group: a cancelled build kills debootstrap and the dpkg runs under it.
    const child = spawn(bin, ['--variant=minbase', `--include=${DEBIAN_PACKAGES.join(',')}`, DEBIAN_SUITE, join(tmp, 'rootfs'), mirror], { stdio: ['ignore', 'pipe', 'pipe'], detached: signal !== undefined });
    const onAbort = () => killGroup(child);
    signal?.addEventListener('abort', onAbort, { once: true });
    child.once('close', () => signal?.removeEventListener('abort', onAbort));
    const onLine = (line: string) => {
      out = (out + line + '\n').slice(-4000);
      const p = debootstrapProgress(line);
      if (p) progress(p.percent, p.message);
    };
    let buf = '';
    const feed = (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        onLine(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    };
    child.stdout.on('data', feed);
    child.stderr.on('data', feed);
    child.once('error', reject);
    child.once('close', (c) => resolve(c ?? 1));
  });
  if (signal?.aborted) {
    await rm(tmp, { recursive: true, force: true });
    throw signal.reason;
  }
  if (code !== 0) {
    await rm(tmp, { recursive: true, force: true });
    throw new HfError('HF_ERR_INTERNAL', `debootstrap failed (exit ${code}): ${out.trim().split('\n').slice(-8).join('\n')}`);
  }
  await writeFile(join(tmp, 'done'), new Date().toISOString() + '\n');
  await rm(dir, { recursive: true, force: true });
  await rename(tmp, dir);
  return rootfs;
}

/** Maps debootstrap's "I: …" lines to progress (pure). */
export function debootstrapProgress(line: string): { percent: number; message: string } | undefined {
  const m = /^I: (Retrieving|Validating|Extracting|Unpacking|Configuring|Installing|Checking|Resolving|Found|Base system installed)\s*(.*)$/.exec(line.trim());
  if (!m) return undefined;
  const stage: Record<string, [number, number]> = {
    Checking: [2, 4], Resolving: [4, 6], Found: [4, 6], Retrieving: [6, 30], Validating: [6, 30], Extracting: [30, 40],
    Installing: [40, 45], Unpacking: [45, 52], Configuring: [52, 58], 'Base system installed': [58, 58],
  };
  const [lo] = stage[m[1]!] ?? [0, 0];
  return { percent: lo, message: `debootstrap: ${m[1]} ${m[2]}`.trim() };
}

export async function buildDebianImage(destDir: string, cacheDir: string, progress: (p: number, m: string) => void, signal?: AbortSignal): Promise<DebianManifest> {
  signal?.throwIfAborted();
  const cached = await debootstrapCached(cacheDir, progress, signal);
  return buildIntoPlace(destDir, async (tmp) => {
    progress(62, 'copying the debootstrap tree');
    await run('cp', ['-a', '--reflink=auto', cached, join(tmp, 'rootfs')], { timeoutMs: 10 * 60_000, signal });
    const root = join(tmp, 'rootfs');
    progress(85, 'adapting it to a container');
    await writeFile(join(root, 'etc/inittab'), INITTAB);
    await mkdir(join(root, 'usr/local/sbin'), { recursive: true });
    await writeFile(join(root, 'usr/local/sbin/hyperfold-init'), HF_INIT);
    await chmod(join(root, 'usr/local/sbin/hyperfold-init'), 0o755);
    await writeFile(join(root, 'etc/fstab'), '# the container runtime mounts /proc, /sys, /dev and /run\n');
    await writeFile(join(root, 'etc/hostname'), 'debian\n');
    await writeFile(join(root, 'etc/hosts'), '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n');
    // Scripts that manage hardware a container does not have.
    for (const s of ['S01hwclock.sh', 'S08brightness', 'S03checkroot.sh', 'S04checkfs.sh']) await unlink(join(root, 'etc/rcS.d', s)).catch(() => undefined);
    signal?.throwIfAborted();
    const { stdout } = await run('du', ['-sb', root]);
    const files = Number((await run('sh', ['-c', `find "$1" | wc -l`, 'sh', root])).stdout.trim());
    const manifest: DebianManifest = {
      version: 1,
      suite: DEBIAN_SUITE,
      mirror: await debianMirror(),
      packages: DEBIAN_PACKAGES,
      builtAt: new Date().toISOString(),
      sizeBytes: Number(stdout.split(/\s/)[0]),
      files,
    };
    await writeFile(join(tmp, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    return manifest;
  }, progress);
}

export function readDebianManifest(destDir: string): Promise<DebianManifest | undefined> {
  return readManifest<DebianManifest>(destDir);
}
