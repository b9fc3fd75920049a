// The built-in `busybox` container image: Debian's static busybox, every applet as a symbolic
// link, busybox init as PID 1 with a shell on the console. Tiny (about 2 MB) and built in well
// under a second, so it is built on first use.
import { createHash } from 'node:crypto';
import { chmod, copyFile, mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { HfError } from '../../core/errors.js';
import { run } from '../../util/exec.js';
import { buildIntoPlace, readManifest } from './staging.js';

export const BUSYBOX_CANDIDATES = ['/bin/busybox', '/usr/bin/busybox'];

export interface BusyboxManifest {
  version: 1;
  busyboxVersion: string;
  builtAt: string;
  sizeBytes: number;
  sha256: string;
}

/** An ELF executable without a PT_INTERP program header needs no dynamic loader (static). */
export function isStaticElf(buf: Buffer): boolean {
  if (buf.length < 64 || buf.readUInt32BE(0) !== 0x7f454c46) return false;
  if (buf[4] !== 2) return false; // 64-bit only here
  const phoff = Number(buf.readBigUInt64LE(32));
  const phentsize = buf.readUInt16LE(54);
  const phnum = buf.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > buf.length) return false;
    if (buf.readUInt32LE(off) === 3) return false; // PT_INTERP
  }
  return true;
}

export async function findStaticBusybox(): Promise<string> {
  for (const p of BUSYBOX_CANDIDATES) {
    try {
      const head = Buffer.alloc(4096);
      const { open } = await import('node:fs/promises');
      const fh = await open(p, 'r');
      try {
        await fh.read(head, 0, head.length, 0);
      } finally {
        await fh.close();
      }
      if (isStaticElf(head)) return p;
    } catch {
      // next
    }
  }
  throw new HfError('HF_ERR_MISSING_DEPENDENCY', 'a static busybox is needed for the busybox container image: run `apt-get install -y busybox-static`');
}

const INITTAB = `# busybox init in a Hyperfold container
::sysinit:/etc/init.d/rcS
::respawn:/bin/sh -i
::shutdown:/bin/echo "hyperfold: container shutting down"
`;

const RCS = `#!/bin/sh
# First thing init runs. /proc, /sys, /dev and /run are mounted by the runtime.
mkdir -p /run /var/run /tmp /var/log
[ -d /etc/local.d ] && for f in /etc/local.d/*.start; do [ -x "$f" ] && "$f"; done
echo "hyperfold: $(hostname) is up (busybox init)"
`;

const PROFILE = `export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\\h:\\w\\$ '
`;

/** Builds the rootfs into `destDir/rootfs` (atomically: a temporary tree renamed into place). */
export async function buildBusyboxImage(destDir: string, progress?: (p: number, m: string) => void): Promise<BusyboxManifest> {
  const bb = await findStaticBusybox();
  return buildIntoPlace(destDir, async (tmp) => {
    const root = join(tmp, 'rootfs');
    progress?.(10, `copying ${bb}`);
    for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc/init.d', 'etc/local.d', 'dev', 'proc', 'sys', 'run', 'tmp', 'var/log', 'var/run', 'root', 'home', 'mnt']) {
      await mkdir(join(root, d), { recursive: true, mode: 0o755 });
    }
    await chmod(join(root, 'tmp'), 0o1777);
    await chmod(join(root, 'root'), 0o700);
    await copyFile(bb, join(root, 'bin/busybox'));
    await chmod(join(root, 'bin/busybox'), 0o755);
    const help = await run(bb, ['--help'], { allowFailure: true });
    const version = /BusyBox v(\S+)/.exec(help.stdout + help.stderr)?.[1] ?? 'unknown';
    const applets = (await run(bb, ['--list-full'])).stdout.split('\n').map((s) => s.trim()).filter(Boolean);
    progress?.(40, `linking ${applets.length} applets`);
    for (const a of applets) {
      if (a === 'bin/busybox' || a.includes('..')) continue;
      const p = join(root, a);
      await mkdir(dirname(p), { recursive: true });
      await symlink('/bin/busybox', p).catch((e: NodeJS.ErrnoException) => {
        if (e.code !== 'EEXIST') throw e;
      });
    }
    const files: Record<string, string> = {
      'etc/inittab': INITTAB,
      'etc/init.d/rcS': RCS,
      'etc/profile': PROFILE,
      'etc/passwd': 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n',
      'etc/group': 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n',
      'etc/shadow': 'root:*:19000:0:99999:7:::\n',
      'etc/hosts': '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n',
      'etc/hostname': 'busybox\n',
      'etc/os-release': `NAME="BusyBox"\nID=busybox\nVERSION_ID="${version}"\nPRETTY_NAME="BusyBox ${version} (Hyperfold container image)"\n`,
    };
    for (const [f, text] of Object.entries(files)) await writeFile(join(root, f), text, { mode: f === 'etc/shadow' ? 0o600 : 0o644 });
    await chmod(join(root, 'etc/init.d/rcS'), 0o755);
    const bin = await readFile(bb);
    const manifest: BusyboxManifest = {
      version: 1,
      busyboxVersion: version,
      builtAt: new Date().toISOString(),
      sizeBytes: bin.length,
      sha256: createHash('sha256').update(bin).digest('hex'),
    };
    await writeFile(join(tmp, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    return manifest;
  }, progress);
}

export function readBusyboxManifest(destDir: string): Promise<BusyboxManifest | undefined> {
  return readManifest<BusyboxManifest>(destDir);
}
