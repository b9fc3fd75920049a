// Disk files through qemu-img: blank disks, overlays (linked clones) and inspection.
import { HfError } from '../core/errors.js';
import { run } from '../util/exec.js';

export interface ImageInfo {
  format: string;
  virtualSize: number;
  actualSize: number;
  backingFile?: string;
}

export class QemuImg {
  constructor(private readonly binary = 'qemu-img') {}

  async createBlank(path: string, sizeBytes: number, format: 'qcow2' | 'raw' = 'qcow2'): Promise<void> {
    await run(this.binary, ['create', '-q', '-f', format, path, String(sizeBytes)], { errorCode: 'HF_ERR_HYPERVISOR' });
  }

  /** A qcow2 overlay whose reads fall through to `backing`: a linked clone. */
  async createOverlay(path: string, backing: string, backingFormat: 'qcow2' | 'raw', sizeBytes?: number): Promise<void> {
    const args = ['create', '-q', '-f', 'qcow2', '-F', backingFormat, '-b', backing, path];
    if (sizeBytes !== undefined) args.push(String(sizeBytes));
    await run(this.binary, args, { errorCode: 'HF_ERR_HYPERVISOR' });
  }

  async info(path: string): Promise<ImageInfo> {
    const { stdout } = await run(this.binary, ['info', '--output=json', '-U', path], { errorCode: 'HF_ERR_HYPERVISOR' });
    const j = JSON.parse(stdout) as { format: string; 'virtual-size': number; 'actual-size': number; 'backing-filename'?: string };
    if (!j.format) throw new HfError('HF_ERR_HYPERVISOR', `qemu-img info ${path}: no format`);
    return { format: j.format, virtualSize: j['virtual-size'], actualSize: j['actual-size'], backingFile: j['backing-filename'] };
  }
}
