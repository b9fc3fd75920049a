// Images: what instances are created from. Each image is a record in the state store
// (`/images/<name>`) plus its files in `<data>/images/<name>/`. Built-in images are produced by
// registered builders (the `tiny` VM image from Debian's kernel and busybox; container images
// from their own builders); imports and templates register records the same way.
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError } from '../core/errors.js';
import { nameSchema } from '../core/model/instance.js';
import { imageRecordSchema, type ImageRecord } from '../core/model/image.js';
import type { Operation } from '../core/model/operation.js';
import { Collection } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import type { OperationContext, OperationManager } from './operations.js';

export { imageRecordSchema, type ImageRecord } from '../core/model/image.js';

/** Builds a built-in image into `destDir` (which it owns) and describes what it made. */
export interface ImageBuilder {
  readonly name: string;
  readonly type: 'vm' | 'container';
  readonly description: string;
  /** `signal` aborts when the build is cancelled: the builder stops and leaves no partial image. */
  build(opts: { destDir: string; cacheDir: string; progress: (percent: number, message: string) => void; signal?: AbortSignal }): Promise<Omit<ImageRecord, 'name' | 'type' | 'source' | 'createdAt'> & { createdAt?: string }>;
  /** An image built by an earlier daemon (before records existed) or by tests: adopt it. */
  adopt?(destDir: string): Promise<(Omit<ImageRecord, 'name' | 'type' | 'source' | 'createdAt'> & { createdAt?: string }) | undefined>;
}

/** Where images live on this host: `imagesDir/<name>/` per image, and a download cache for builders. */
export interface ImageDirs {
  imagesDir: string;
  cacheDir: string;
}

export class ImageService {
  private readonly records: Collection<ImageRecord>;
  private readonly builders = new Map<string, ImageBuilder>();
  /** Images being built, with their operation's id (empty while it is being started). */
  private readonly building = new Map<string, string>();
  /** Who still depends on an image (linked clones…): set by the storage service. */
  private usageResolver: ((rec: ImageRecord) => Promise<string[]>) | undefined;

  constructor(store: StateStore, private readonly dirs: ImageDirs, private readonly operations: OperationManager) {
    this.records = new Collection<ImageRecord>(store, '/images/', imageRecordSchema);
  }

  /** The storage service tells who uses an image; delete() refuses while anyone does. */
  setUsageResolver(fn: (rec: ImageRecord) => Promise<string[]>): void {
    this.usageResolver = fn;
  }

  registerBuilder(b: ImageBuilder): void {
    this.builders.set(b.name, b);
  }

  buildable(): string[] {
    return [...this.builders.keys()];
  }

  /** The directory an image's files live in. */
  dir(name: string): string {
    return join(this.dirs.imagesDir, name);
  }

  async list(): Promise<ImageRecord[]> {
    await this.adoptAll();
    return (await this.records.list()).map((v) => v.value);
  }

  async find(name: string): Promise<ImageRecord | undefined> {
    if (!nameSchema.safeParse(name).success) return undefined;
    const rec = (await this.records.get(name))?.value;
    if (rec) return rec;
    return this.adopt(name);
  }

  async get(name: string): Promise<ImageRecord> {
    if (!nameSchema.safeParse(name).success) {
      throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid image name`);
    }
    const img = await this.find(name);
    if (img) return img;
    const op = this.building.get(name);
    if (op) {
      throw new HfError('HF_ERR_IMAGE_BUILDING', `image "${name}" is being built (operation ${op}): wait for it with \`hyperfold operation wait ${op}\``, { details: { operation: op } });
    }
    if (this.builders.has(name)) {
      throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `image "${name}" is not built yet: run \`hyperfold image build ${name}\``);
    }
    throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `image "${name}" not found (buildable: ${this.buildable().join(', ') || 'none'})`);
  }

  /** Registers an image whose files are already in `dir(name)` (imports, templates). */
  async register(rec: ImageRecord): Promise<ImageRecord> {
    return (await this.records.create(rec.name, rec)).value;
  }

  async update(name: string, fn: (r: ImageRecord) => ImageRecord): Promise<ImageRecord> {
    return (await this.records.update(name, fn)).value;
  }

  /** Builds (or rebuilds) a built-in image as an operation. One build per image at a time. */
  async build(name: string): Promise<Operation> {
    const b = this.builders.get(name);
    if (!b) throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `no recipe to build image "${name}" (buildable: ${this.buildable().join(', ')})`);
    if (this.building.has(name)) throw new HfError('HF_ERR_BUSY', `image "${name}" is already being built`);
    this.building.set(name, '');
    let op: Operation;
    try {
      op = await this.startBuild(name, b);
    } catch (e) {
      this.building.delete(name);
      throw e;
    }
    if (this.building.has(name)) this.building.set(name, op.id);
    return op;
  }

  private startBuild(name: string, b: ImageBuilder): Promise<Operation> {
    return this.operations.start('image.build', { kind: 'image', name }, async (ctx: OperationContext) => {
      try {
        await mkdir(this.dirs.imagesDir, { recursive: true });
        const made = await b.build({ destDir: this.dir(name), cacheDir: this.dirs.cacheDir, progress: (p, m) => ctx.progress(p, m), signal: ctx.signal });
        const rec: ImageRecord = { ...made, name, type: b.type, source: 'builtin', createdAt: made.createdAt ?? new Date().toISOString() };
        await this.records.delete(name);
        await this.records.create(name, imageRecordSchema.parse(rec));
        return { name, sizeBytes: rec.sizeBytes };
      } finally {
        this.building.delete(name);
      }
    }, { cancellable: true });
  }

  /**
   * Deletes an image. `inUse` lists what still depends on it (linked clones…); when it is not
   * empty the delete is refused and the error names them.
   */
  async delete(name: string, inUse: string[] = []): Promise<void> {
    const rec = await this.get(name);
    if (!inUse.length && this.usageResolver) inUse = await this.usageResolver(rec);
    if (inUse.length) {
      throw new HfError('HF_ERR_CONFLICT', `image "${name}" is used by ${inUse.join(', ')}: delete those first`, { details: { usedBy: inUse } });
    }
    await this.records.delete(name);
    await rm(this.dir(name), { recursive: true, force: true });
    // Images kept in another storage pool name the directory they own.
    if (typeof rec.details.dir === 'string' && rec.details.dir.startsWith('/')) await rm(rec.details.dir, { recursive: true, force: true });
  }

  private async adopt(name: string): Promise<ImageRecord | undefined> {
    const b = this.builders.get(name);
    if (!b?.adopt) return undefined;
    const made = await b.adopt(this.dir(name));
    if (!made) return undefined;
    const rec: ImageRecord = imageRecordSchema.parse({ ...made, name, type: b.type, source: 'builtin', createdAt: made.createdAt ?? new Date().toISOString() });
    try {
      await this.records.create(name, rec);
    } catch {
      // adopted concurrently: fine
    }
    return rec;
  }

  private async adoptAll(): Promise<void> {
    for (const name of this.builders.keys()) if (!(await this.records.get(name))) await this.adopt(name);
  }
}

/** The built-in `tiny` VM image: Debian's kernel, a busybox initramfs and a small data disk. */
export async function tinyImageBuilder(): Promise<ImageBuilder> {
  const { buildTinyImage, readTinyManifest } = await import('../images/tiny/build.js');
  type Manifest = NonNullable<Awaited<ReturnType<typeof readTinyManifest>>>;
  const describe = (dir: string, m: Manifest) => ({
    description: `Debian kernel ${m.kernelVersion} with a busybox ${m.busyboxVersion} userland`,
    boot: { kind: 'kernel' as const, kernel: join(dir, m.kernel), initrd: join(dir, m.initrd), cmdline: m.cmdline },
    disk: { path: join(dir, m.disk), format: 'qcow2' as const },
    defaults: {},
    sizeBytes: m.sizeBytes,
    sha256: m.sha256,
    createdAt: m.builtAt,
    details: { kernelVersion: m.kernelVersion, busyboxVersion: m.busyboxVersion },
  });
  return {
    name: 'tiny',
    type: 'vm',
    description: 'Debian kernel with a busybox userland',
    build: async ({ destDir, cacheDir, progress, signal }) => describe(destDir, await buildTinyImage({ destDir, cacheDir, onProgress: progress, signal })),
    adopt: async (destDir) => {
      const m = await readTinyManifest(destDir);
      return m ? describe(destDir, m) : undefined;
    },
  };
}
