// Disk files through qemu-img: blank disks, overlays (linked clones), conversion with progress,
// consistency checks, space estimates, resizing, internal snapshots and inspection.
import { spawn } from 'node:child_process';
import { open } from 'node:fs/promises';
import { HfError } from '../core/errors.js';
import { run } from '../util/exec.js';
import { QemuImgProgressParser } from './progress.js';

export interface ImageInfo {
  format: string;
  virtualSize: number;
  actualSize: number;
  backingFile?: string;
  /** qemu-img's format-specific block (vmdk extents, qcow2 compat…). */
  formatSpecific?: { type: string; data: Record<string, unknown> };
  dirty?: boolean;
}

export interface CheckResult {
  /** false when the format has no checker (raw, vpc). */
  supported: boolean;
  ok: boolean;
  /** What qemu-img said (first lines) when not ok. */
  message: string;
  leaks: number;
}

export interface ConvertOptions {
  outFormat: 'qcow2' | 'raw' | 'vmdk';
  srcFormat?: string;
  /** Output as an overlay of this backing file (only data differing from it is written). */
  backing?: { path: string; format: 'qcow2' | 'raw' };
  /** vmdk: streamOptimized etc.; qcow2: compat… */
  options?: string;
  onProgress?: (percent: number) => void;
  signal?: AbortSignal;
}

export interface InternalSnapshot {
  id: string;
  name: string;
  vmStateSize: number;
}

/** Errors from qemu-img that mean "the target filled up". */
export function isNoSpace(text: string): boolean {
  return /No space left on device|ENOSPC|Disk quota exceeded/i.test(text);
}

export class QemuImg {
  constructor(private readonly binary = 'qemu-img') {}

  async createBlank(path: string, sizeBytes: number, format: 'qcow2' | 'raw' = 'qcow2'): Promise<void> {
    await this.exec(['create', '-q', '-f', format, path, String(sizeBytes)]);
  }

  /** A qcow2 overlay whose reads fall through to `backing`: a linked clone. */
  async createOverlay(path: string, backing: string, backingFormat: 'qcow2' | 'raw', sizeBytes?: number): Promise<void> {
    const args = ['create', '-q', '-f', 'qcow2', '-F', backingFormat, '-b', backing, path];
    if (sizeBytes !== undefined) args.push(String(sizeBytes));
    await this.exec(args);
  }

  async info(path: string, format?: string): Promise<ImageInfo> {
    const args = ['info', '--output=json', '-U'];
    if (format) args.push('-f', format);
    args.push(path);
    const { stdout } = await this.exec(args, 'HF_ERR_BAD_IMAGE');
    const j = JSON.parse(stdout) as {
      format: string;
      'virtual-size': number;
      'actual-size': number;
      'backing-filename'?: string;
      'format-specific'?: { type: string; data: Record<string, unknown> };
      'dirty-flag'?: boolean;
    };
    if (!j.format) throw new HfError('HF_ERR_BAD_IMAGE', `qemu-img info ${path}: no format`);
    return {
      format: j.format,
      virtualSize: j['virtual-size'],
      actualSize: j['actual-size'],
      backingFile: j['backing-filename'],
      formatSpecific: j['format-specific'],
      dirty: j['dirty-flag'],
    };
  }

  /**
   * `qemu-img check`. Exit codes: 0 clean, 1 check failed, 2 corrupt, 3 leaked clusters only
   * (harmless), 63 no checker for the format.
   */
  async check(path: string, format?: string): Promise<CheckResult> {
    const args = ['check', '-U'];
    if (format) args.push('-f', format);
    args.push(path);
    const r = await run(this.binary, args, { allowFailure: true, errorCode: 'HF_ERR_HYPERVISOR' });
    const text = `${r.stdout}\n${r.stderr}`.trim();
    const leaks = Number(/(\d+) leaked clusters/.exec(text)?.[1] ?? 0);
    if (r.code === 0 || r.code === 3) return { supported: true, ok: true, message: '', leaks };
    if (r.code === 63 || /does not support checks/.test(text)) return { supported: false, ok: true, message: '', leaks: 0 };
    const lines = text.split('\n').filter((l) => l.trim());
    const summary = lines.filter((l) => /errors? (were )?found|corrupt|Could not|Image end/i.test(l)).slice(0, 3);
    return { supported: true, ok: false, message: (summary.length ? summary : lines.slice(-3)).join('; '), leaks };
  }

  /** Space the converted image needs (qemu-img measure). */
  async measure(src: string, outFormat: 'qcow2' | 'raw', srcFormat?: string): Promise<{ required: number; fullyAllocated: number }> {
    const args = ['measure', '--output=json', '-O', outFormat];
    if (srcFormat) args.push('-f', srcFormat);
    args.push(src);
    const { stdout } = await this.exec(args, 'HF_ERR_BAD_IMAGE');
    const j = JSON.parse(stdout) as { required: number; 'fully-allocated': number };
    return { required: j.required, fullyAllocated: j['fully-allocated'] };
  }

  /** Converts (copies, flattens) `src` into `dst` with progress; ENOSPC becomes HF_ERR_POOL_FULL. */
  async convert(src: string, dst: string, o: ConvertOptions): Promise<void> {
    const args = ['convert', '-p', '-O', o.outFormat];
    if (o.srcFormat) args.push('-f', o.srcFormat);
    if (o.backing) args.push('-B', o.backing.path, '-F', o.backing.format);
    if (o.options) args.push('-o', o.options);
    args.push(src, dst);
    await new Promise<void>((resolve, reject) => {
      const child = spawn(this.binary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
      const parser = new QemuImgProgressParser();
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => {
        for (const p of parser.push(d)) o.onProgress?.(p);
      });
      child.stderr.on('data', (d: Buffer) => {
        if (stderr.length < 64 * 1024) stderr += d.toString();
      });
      const onAbort = (): void => void child.kill('SIGKILL');
      o.signal?.addEventListener('abort', onAbort, { once: true });
      child.on('error', (e: NodeJS.ErrnoException) => {
        o.signal?.removeEventListener('abort', onAbort);
        reject(e.code === 'ENOENT' ? new HfError('HF_ERR_MISSING_DEPENDENCY', `${this.binary} is not installed: run \`apt-get install -y qemu-utils\``) : new HfError('HF_ERR_HYPERVISOR', e.message));
      });
      child.on('close', (code, signal) => {
        o.signal?.removeEventListener('abort', onAbort);
        if (code === 0) return resolve();
        const why = stderr.trim() || (signal ? `killed by ${signal}` : `exit ${code}`);
        if (isNoSpace(why)) reject(new HfError('HF_ERR_POOL_FULL', `no space left while writing ${dst}: ${why}`));
        else reject(new HfError('HF_ERR_BAD_IMAGE', `qemu-img convert ${src} failed: ${why}`, { details: { stderr: stderr.slice(-2000) } }));
      });
    });
  }

  async resize(path: string, format: 'qcow2' | 'raw', sizeBytes: number): Promise<void> {
    await this.exec(['resize', '-q', '-f', format, path, String(sizeBytes)]);
  }

  async snapshotCreate(path: string, name: string): Promise<void> {
    await this.exec(['snapshot', '-q', '-c', name, path]);
  }

  async snapshotApply(path: string, name: string): Promise<void> {
    await this.exec(['snapshot', '-q', '-a', name, path]);
  }

  async snapshotDelete(path: string, name: string): Promise<void> {
    await this.exec(['snapshot', '-q', '-d', name, path]);
  }

  async snapshotList(path: string): Promise<InternalSnapshot[]> {
    const { stdout } = await this.exec(['info', '--output=json', '-U', '-f', 'qcow2', path]);
    const j = JSON.parse(stdout) as { snapshots?: Array<{ id: string; name: string; 'vm-state-size': number }> };
    return (j.snapshots ?? []).map((s) => ({ id: s.id, name: s.name, vmStateSize: s['vm-state-size'] }));
  }

  private async exec(args: string[], errorCode: 'HF_ERR_HYPERVISOR' | 'HF_ERR_BAD_IMAGE' = 'HF_ERR_HYPERVISOR'): Promise<{ stdout: string }> {
    try {
      return await run(this.binary, args, { errorCode });
    } catch (e) {
      if (e instanceof HfError && isNoSpace(e.message)) throw new HfError('HF_ERR_POOL_FULL', e.message.replace(/^\S+ /, 'qemu-img '), { cause: e });
      throw e;
    }
  }
}

/** The backing file a qcow2 image names in its header (undefined for other formats / none). Reads 1 KiB at most. */
export async function readQcow2Backing(path: string): Promise<string | undefined> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch {
    return undefined;
  }
  try {
    const head = Buffer.alloc(32);
    const { bytesRead } = await fh.read(head, 0, 32, 0);
    if (bytesRead < 20 || head.readUInt32BE(0) !== 0x514649fb) return undefined;
    const off = Number(head.readBigUInt64BE(8));
    const len = head.readUInt32BE(16);
    if (off === 0 || len === 0 || len > 1023) return undefined;
    const name = Buffer.alloc(len);
    await fh.read(name, 0, len, off);
    return name.toString('utf8');
  } finally {
    await fh.close();
  }
}
