// Host tools the tiny-image builder shells out to: lookup on PATH (plus the sbin directories,
// which a non-login root shell may lack), a missing-tool error that names the exact apt-get
// command, and a small abortable process runner.

import { which } from '../../util/exec.js';
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
