// Images: what an instance is created from. The built-in `tiny` image (Debian kernel + busybox
// initramfs + a small data disk) is built on this host from Debian's packages.
import { rm } from 'node:fs/promises';
import { HfError } from '../core/errors.js';
import type { BootConfig } from '../core/model/instance.js';
import { buildTinyImage, readTinyManifest } from '../images/tiny/build.js';
import type { DataPaths } from '../daemon/config.js';
import type { Operation } from '../core/model/operation.js';
import type { OperationManager } from './operations.js';
import { join } from 'node:path';

export interface ImageRecord {
  name: string;
  type: 'vm' | 'container';
  description: string;
  builtin: boolean;
  /** How instances made from this image boot. */
  boot: BootConfig;
  /** Disk template that instances get a linked clone (qcow2 overlay) of. */
  disk?: { path: string; format: 'qcow2' | 'raw' };
  sizeBytes: number;
  createdAt: string;
  details: Record<string, unknown>;
}

export const BUILTIN_IMAGES = ['tiny'] as const;

export class ImageService {
  private building: Promise<Operation> | undefined;

  constructor(private readonly paths: DataPaths, private readonly operations: OperationManager) {}

  async list(): Promise<ImageRecord[]> {
    const out: ImageRecord[] = [];
    for (const name of BUILTIN_IMAGES) {
      const img = await this.find(name);
      if (img) out.push(img);
    }
    return out;
  }

  async find(name: string): Promise<ImageRecord | undefined> {
    if (name !== 'tiny') return undefined;
    const dir = this.paths.image('tiny');
    const m = await readTinyManifest(dir);
    if (!m) return undefined;
    return {
      name: 'tiny',
      type: 'vm',
      description: `Debian kernel ${m.kernelVersion} with a busybox ${m.busyboxVersion} userland`,
      builtin: true,
      boot: { kind: 'kernel', kernel: join(dir, m.kernel), initrd: join(dir, m.initrd), cmdline: m.cmdline },
      disk: { path: join(dir, m.disk), format: 'qcow2' },
      sizeBytes: m.sizeBytes,
      createdAt: m.builtAt,
      details: { kernelVersion: m.kernelVersion, busyboxVersion: m.busyboxVersion, sha256: m.sha256 },
    };
  }

  async get(name: string): Promise<ImageRecord> {
    const img = await this.find(name);
    if (img) return img;
    if ((BUILTIN_IMAGES as readonly string[]).includes(name)) {
      throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `image "${name}" is not built yet: run \`hyperfold image build ${name}\``);
    }
    throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `image "${name}" not found (built-in images: ${BUILTIN_IMAGES.join(', ')})`);
  }

  /** Builds (or rebuilds) a built-in image as an operation. One build at a time. */
  async build(name: string): Promise<Operation> {
    if (!(BUILTIN_IMAGES as readonly string[]).includes(name)) {
      throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `no recipe to build image "${name}" (buildable: ${BUILTIN_IMAGES.join(', ')})`);
    }
    if (this.building) throw new HfError('HF_ERR_BUSY', `an image build is already running`);
    const op = this.operations.start('image.build', { kind: 'image', name }, async (ctx) => {
      try {
        const m = await buildTinyImage({
          destDir: this.paths.image(name),
          cacheDir: this.paths.cacheDir,
          onProgress: (p, msg) => ctx.progress(p, msg),
        });
        return { name, kernelVersion: m.kernelVersion, sizeBytes: m.sizeBytes };
      } finally {
        this.building = undefined;
      }
    });
    this.building = op;
    return op;
  }

  async delete(name: string): Promise<void> {
    await this.get(name);
    await rm(this.paths.image(name), { recursive: true, force: true });
  }
}
