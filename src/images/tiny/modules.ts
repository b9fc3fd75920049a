// Kernel-module selection for the tiny initramfs: index the extracted kernel's module tree,
// resolve dependencies (modules.dep when the package ships one — Debian's .deb does not, depmod
// writes it at install time — otherwise the `depends=` / `softdep=` entries of each module's
// .modinfo ELF section), and hand back the modules in load order, decompressed when needed.

import { spawn } from 'node:child_process';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { HfError } from '../../core/errors.js';
import { killGroup } from '../../util/exec.js';
import { findTool, missingDependency } from './tools.js';

/** Module name as the kernel sees it: '-' and '_' are interchangeable. */
export function modName(fileOrName: string): string {
  const base = fileOrName.split('/').pop()!;
  return base.replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');
}

export interface WantedModule {
  name: string;
  /** A required module must be either built in or present as a module. */
  required: boolean;
}

export interface SelectedModule {
  name: string;
  /** Path relative to lib/modules/<kver>/, always ending in plain `.ko` (decompressed). */
  rel: string;
  /** Uncompressed module bytes. */
  data: Buffer;
  depends: string[];
}

export interface ModuleSelection {
  /** Dependencies before dependents. */
  ordered: SelectedModule[];
  builtin: string[];
  missing: string[];
  /** Module compression found in the package: 'none', 'xz', 'zst' or 'gz'. */
  compression: string;
}

async function walk(dir: string, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const rel = prefix ? `${prefix}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...(await walk(join(dir, e.name), rel)));
    else if (/\.ko(\.(xz|zst|gz))?$/.test(e.name)) out.push(rel);
  }
  return out;
}

/** Strings of the `.modinfo` section of an ELF64 little-endian object (what modinfo(8) prints). */
export function parseModinfo(buf: Buffer): Map<string, string[]> {
  const info = new Map<string, string[]>();
  let section: Buffer | undefined;
  if (buf.length > 64 && buf.readUInt32BE(0) === 0x7f454c46 && buf[4] === 2 && buf[5] === 1) {
    const shoff = Number(buf.readBigUInt64LE(0x28));
    const shentsize = buf.readUInt16LE(0x3a);
    const shnum = buf.readUInt16LE(0x3c);
    const shstrndx = buf.readUInt16LE(0x3e);
    const sh = (i: number) => shoff + i * shentsize;
    const strOff = Number(buf.readBigUInt64LE(sh(shstrndx) + 0x18));
    for (let i = 0; i < shnum; i++) {
      const nameOff = strOff + buf.readUInt32LE(sh(i));
      const end = buf.indexOf(0, nameOff);
      if (buf.toString('latin1', nameOff, end) !== '.modinfo') continue;
      const off = Number(buf.readBigUInt64LE(sh(i) + 0x18));
      const size = Number(buf.readBigUInt64LE(sh(i) + 0x20));
      section = buf.subarray(off, off + size);
      break;
    }
  }
  if (!section) throw new HfError('HF_ERR_INTERNAL', 'kernel module has no readable .modinfo section');
  for (const s of section.toString('latin1').split('\0')) {
    const eq = s.indexOf('=');
    if (eq <= 0) continue;
    const k = s.slice(0, eq);
    const list = info.get(k) ?? [];
    list.push(s.slice(eq + 1));
    info.set(k, list);
  }
  return info;
}

async function readModule(abs: string, signal?: AbortSignal): Promise<Buffer> {
  if (abs.endsWith('.ko')) return readFile(abs);
  if (abs.endsWith('.gz')) return gunzipSync(await readFile(abs));
  // busybox insmod cannot be relied on to decompress, so modules are stored uncompressed.
  const tool = abs.endsWith('.xz') ? 'xz' : 'zstd';
  const bin = await findTool(tool);
  if (!bin) throw missingDependency([tool], [tool === 'xz' ? 'xz-utils' : 'zstd'], `kernel modules are ${tool}-compressed`);
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['-dc', abs], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const chunks: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const onAbort = () => killGroup(child);
    signal?.addEventListener('abort', onAbort, { once: true });
    child.on('error', reject);
    child.on('close', (code) => {
      signal?.removeEventListener('abort', onAbort);
      if (signal?.aborted) return reject(signal.reason);
      if (code !== 0) return reject(new HfError('HF_ERR_INTERNAL', `${tool} -dc ${abs} failed: ${err.trim()}`));
      resolve(Buffer.concat(chunks));
    });
  });
}

/**
 * Picks `wanted` and their transitive dependencies (plus `softdep pre:` modules) out of
 * `modDir` (= .../lib/modules/<kver>).
 */
export async function selectModules(modDir: string, wanted: WantedModule[], signal?: AbortSignal): Promise<ModuleSelection> {
  const files = await walk(join(modDir, 'kernel'));
  const byName = new Map<string, string>(); // name -> rel path under modDir
  for (const f of files) byName.set(modName(f), `kernel/${f}`);
  const exts = new Set(files.map((f) => (f.match(/\.ko\.(xz|zst|gz)$/)?.[1] ?? 'none')));

  const builtinSet = new Set<string>();
  try {
    for (const l of (await readFile(join(modDir, 'modules.builtin'), 'utf8')).split('\n')) if (l.trim()) builtinSet.add(modName(l.trim()));
  } catch {
    /* no modules.builtin: treat nothing as built in */
  }

  // modules.dep, when present (i.e. depmod has run on this tree), is authoritative.
  let depFile: Map<string, string[]> | undefined;
  try {
    depFile = new Map();
    for (const l of (await readFile(join(modDir, 'modules.dep'), 'utf8')).split('\n')) {
      const m = l.match(/^([^:]+):\s*(.*)$/);
      if (m) depFile.set(modName(m[1]!), m[2]!.split(/\s+/).filter(Boolean).map(modName));
    }
  } catch {
    depFile = undefined;
  }

  const selected = new Map<string, SelectedModule>();
  const builtin: string[] = [];
  const missing: string[] = [];
  const visiting = new Set<string>();
  const ordered: SelectedModule[] = [];

  const visit = async (name: string, required: boolean): Promise<void> => {
    name = modName(name);
    if (selected.has(name) || visiting.has(name)) return;
    signal?.throwIfAborted();
    const rel = byName.get(name);
    if (!rel) {
      if (builtinSet.has(name)) builtin.push(name);
      else if (required) missing.push(name);
      return;
    }
    visiting.add(name);
    const data = await readModule(join(modDir, rel), signal);
    const info = parseModinfo(data);
    const depends = depFile?.get(name) ?? (info.get('depends') ?? []).flatMap((d) => d.split(',')).filter(Boolean).map(modName);
    const softPre: string[] = [];
    for (const s of info.get('softdep') ?? []) {
      const m = s.match(/pre:\s*([^:]*?)(\s+post:|$)/);
      if (m) softPre.push(...m[1]!.split(/\s+/).filter(Boolean));
    }
    for (const d of depends) await visit(d, true);
    for (const s of softPre) {
      // softdeps usually name a crypto alias (e.g. "crc32c"); its portable implementation is <alias>_generic.
      const n = modName(s);
      if (byName.has(n) || builtinSet.has(n)) await visit(n, false);
      else if (byName.has(`${n}_generic`)) await visit(`${n}_generic`, false);
    }
    const mod: SelectedModule = { name, rel: rel.replace(/\.ko\.(xz|zst|gz)$/, '.ko'), data, depends };
    visiting.delete(name);
    selected.set(name, mod);
    ordered.push(mod);
  };

  for (const w of wanted) await visit(w.name, w.required);
  return { ordered, builtin, missing, compression: [...exts].join(',') };
}

/** A modules.dep for the selected set, so `modprobe` works inside the guest too. */
export function modulesDep(sel: ModuleSelection): string {
  const relOf = new Map(sel.ordered.map((m) => [m.name, m.rel]));
  const closure = (m: SelectedModule, acc: string[] = []): string[] => {
    for (const d of m.depends) {
      const dm = sel.ordered.find((x) => x.name === d);
      if (!dm || acc.includes(dm.rel)) continue;
      acc.push(dm.rel);
      closure(dm, acc);
    }
    return acc;
  };
  return sel.ordered.map((m) => `${relOf.get(m.name)}: ${closure(m).join(' ')}`.trimEnd() + '\n').join('');
}

