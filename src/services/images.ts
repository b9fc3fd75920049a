// Images: what instances are created from. Each image is a record in the state store
// (`/images/<name>`) plus its files in `<data>/images/<name>/`. Built-in images are produced by
// registered builders (the `tiny` VM image from Debian's kernel and busybox; container images
// from their own builders); imports and templates register records the same way.
//
// In a cluster each host holds its own images (its records are scoped to it), and a host that
// needs an image it does not have fetches it from a host that has it: the other hosts' records
// and their files come through `ImagePeers` (the cluster service). A fetch is an operation;
// everyone who needs the image meanwhile waits for that one fetch.
import { mkdir, mkdtemp, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { HfError, toHfError } from '../core/errors.js';
import { nameSchema } from '../core/model/instance.js';
import { imageEntries, imageRecordSchema, relocateImage, type ImageRecord, type ImageView } from '../core/model/image.js';
import type { Operation } from '../core/model/operation.js';
import { formatBytes } from '../core/units.js';
import { packImageFiles, receiveImageFiles, type PackedImage } from '../images/transfer.js';
import { Collection } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import type { Logger } from '../util/log.js';
import { UndoStack } from '../util/undo.js';
import type { OperationContext, OperationManager } from './operations.js';

export { imageRecordSchema, type ImageRecord, type ImageView } from '../core/model/image.js';

/** One other host's record of an image, and whether that host is online now. */
export interface PeerImage {
  host: string;
  online: boolean;
  record: ImageRecord;
}

/** The cluster's other hosts as the image service needs them (the cluster service implements it). */
export interface ImagePeers {
  /** This host's name. */
  readonly localHost: string;
  /** The other hosts' records: of image `name`, or of every image. */
  records(name?: string): Promise<PeerImage[]>;
  /** Opens the stream of an image's files from `host` (its cluster listener; a tar, images/transfer.ts). */
  download(host: string, name: string, signal: AbortSignal): Promise<{ stream: Readable; bytes?: number }>;
}

/** A fetch in flight: its operation, the host it fetches from, and what it ends with. */
interface Fetch {
  op: Operation;
  host: string;
  done: Promise<ImageRecord>;
  /** Everyone waiting for it who wants its progress (a create's operation). */
  watchers: Set<(percent: number, message: string) => void>;
}

/** Directories of fetches in flight start with this (a daemon that died mid-fetch leaves them; init() removes them). */
const FETCH_DIR_PREFIX = '.fetch-';

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
  /** The other hosts of the cluster (undefined on a single host). */
  private peers: ImagePeers | undefined;
  /** Fetches in flight, by image (the promise: while the fetch is being started). */
  private readonly fetches = new Map<string, Promise<Fetch | undefined>>();

  constructor(
    store: StateStore,
    private readonly dirs: ImageDirs,
    private readonly operations: OperationManager,
    private readonly log?: Logger,
  ) {
    this.records = new Collection<ImageRecord>(store, '/images/', imageRecordSchema);
  }

  /** Removes what fetches of a daemon that died left (their directories and staging archives). */
  async init(): Promise<void> {
    for (const f of await readdir(this.dirs.imagesDir).catch(() => [] as string[])) {
      if (f.startsWith(FETCH_DIR_PREFIX)) await rm(join(this.dirs.imagesDir, f), { recursive: true, force: true });
    }
  }

  /** In a cluster: the other hosts, whose images this host can fetch. */
  setPeers(peers: ImagePeers): void {
    this.peers = peers;
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
    const held = await this.heldElsewhere(name);
    if (held.length) {
      throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `image "${name}" is not on this host (${held.map((h) => h.host).join(', ')} hold${held.length === 1 ? 's' : ''} it): \`hyperfold image fetch ${name}\` fetches it, a launch from it does so by itself`, {
        details: { hosts: held.map((h) => h.host) },
      });
    }
    if (this.builders.has(name)) {
      throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `image "${name}" is not built yet: run \`hyperfold image build ${name}\``);
    }
    throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `image "${name}" not found (buildable: ${this.buildable().join(', ') || 'none'})`);
  }

  /**
   * An image's record for weighing a new instance (its type and default size): this host's, or in
   * a cluster another host's (the create then fetches the image). Throws as get() does when no
   * host has it.
   */
  async describe(name: string): Promise<ImageRecord> {
    const local = await this.find(name);
    if (local) return local;
    const held = await this.heldElsewhere(name);
    return held[0]?.record ?? this.get(name);
  }

  /** An image as `image show` tells it: this host's record, else another host's; in a cluster with the hosts that hold it. */
  async show(name: string): Promise<ImageView> {
    const local = await this.find(name);
    if (!this.peers) return local ?? this.get(name);
    const held = await this.heldElsewhere(name);
    const rec = local ?? held[0]?.record;
    if (!rec) return this.get(name);
    return { ...rec, hosts: [...(local ? [this.peers.localHost] : []), ...held.map((h) => h.host)].sort() };
  }

  /** Every image; in a cluster every host's, each once, with the hosts that hold it (this host's record where it has one). */
  async overview(): Promise<ImageView[]> {
    const mine = await this.list();
    if (!this.peers) return mine;
    const byName = new Map<string, { rec: ImageRecord; hosts: string[] }>();
    for (const rec of mine) byName.set(rec.name, { rec, hosts: [this.peers.localHost] });
    for (const p of await this.peers.records()) {
      const cur = byName.get(p.record.name);
      if (cur) cur.hosts.push(p.host);
      else byName.set(p.record.name, { rec: p.record, hosts: [p.host] });
    }
    return [...byName.values()].sort((a, b) => a.rec.name.localeCompare(b.rec.name)).map(({ rec, hosts }) => ({ ...rec, hosts: hosts.sort() }));
  }

  /**
   * Refuses a name a new image (an import, a publish) cannot take: not a valid name, an image of
   * this host or a built-in one, or, in a cluster, an image another host holds (a name means one
   * image on every host: a fetch takes it from any of them).
   */
  async checkNewName(name: string): Promise<void> {
    if (!nameSchema.safeParse(name).success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid image name`);
    if (await this.find(name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `image "${name}" already exists`);
    if (this.builders.has(name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `"${name}" is the name of a built-in image`);
    const held = await this.heldElsewhere(name);
    if (held.length) {
      throw new HfError('HF_ERR_ALREADY_EXISTS', `image "${name}" exists on host ${held.map((h) => h.host).join(', ')}: fetch it (\`hyperfold image fetch ${name}\`) or choose another name`, {
        details: { hosts: held.map((h) => h.host) },
      });
    }
  }

  /** The files of one of this host's images as a tar stream, for another host that fetches it. */
  async files(name: string): Promise<PackedImage> {
    const rec = await this.get(name);
    return packImageFiles(this.filesDir(rec), rec);
  }

  // ---- fetching from other hosts ---------------------------------------------------------------

  /** Whether using `name` here means fetching it first: not on this host nor being built here, and held by another host. */
  async needsFetch(name: string): Promise<boolean> {
    if (!this.peers || this.building.has(name) || (await this.find(name))) return false;
    return this.fetches.has(name) || (await this.heldElsewhere(name)).length > 0;
  }

  /**
   * Fetches an image from another host of the cluster (`from`, or the first online host that
   * holds it), as an operation. A fetch of the image already under way is answered with its
   * operation: one image is fetched once at a time.
   */
  async fetch(name: string, opts: { from?: string } = {}): Promise<Operation> {
    if (!nameSchema.safeParse(name).success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid image name`);
    if (!this.peers) throw new HfError('HF_ERR_NOT_CLUSTERED', `this host is not part of a cluster: there is no other host to fetch image "${name}" from`);
    if (opts.from === this.peers.localHost) throw new HfError('HF_ERR_VALIDATION', `--from names this host (${opts.from}): fetch from another host`);
    if (await this.find(name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `image "${name}" is already on this host`);
    const f = await this.fetchOf(name, opts.from);
    if (!f) throw new HfError('HF_ERR_ALREADY_EXISTS', `image "${name}" is already on this host`);
    return f.op;
  }

  /**
   * The image's record on this host, fetched first when another host holds it and this one does
   * not. `ctx`, the operation that needs it (a create), shows the fetch's progress, and its
   * cancel stops the wait (the fetch goes on for whoever else waits; cancel it by its own id).
   */
  async ensure(name: string, ctx?: OperationContext): Promise<ImageRecord> {
    const local = await this.find(name);
    if (local) return local;
    if (!this.peers || this.building.has(name)) return this.get(name);
    const f = await this.fetchOf(name);
    if (!f) return this.get(name);
    ctx?.message(`image ${name} is not on this host: fetching it from ${f.host} (operation ${f.op.id})`);
    const watch = (p: number, m: string): void => ctx?.progress(p * 0.9, m);
    f.watchers.add(watch);
    try {
      return await untilAborted(f.done, ctx?.signal);
    } finally {
      f.watchers.delete(watch);
    }
  }

  /** The fetch of `name` under way, or a new one; undefined when the image turned up on this host meanwhile. */
  private fetchOf(name: string, from?: string): Promise<Fetch | undefined> {
    const cur = this.fetches.get(name);
    if (cur) return cur;
    const started = this.startFetch(name, from);
    this.fetches.set(name, started);
    started.then(
      (f) => {
        if (!f) this.fetches.delete(name);
      },
      () => this.fetches.delete(name),
    );
    return started;
  }

  private async startFetch(name: string, from: string | undefined): Promise<Fetch | undefined> {
    if (await this.find(name)) return undefined;
    const holder = await this.holder(name, from);
    const dest = this.dir(name);
    // What would make the fetch fail is refused before it starts: a record that does not say what
    // its files are or names files outside its directory, a directory already in the way.
    if (!Object.keys(holder.record.sha256).length) {
      throw new HfError('HF_ERR_BAD_IMAGE', `image "${name}" on host ${holder.host} carries no checksums of its files (made by an older version): rebuild or re-import it there, then fetch it`);
    }
    imageEntries(holder.record);
    relocateImage(holder.record, dest, { host: holder.host, at: '' });
    if (await stat(dest).catch(() => undefined)) {
      throw new HfError('HF_ERR_ALREADY_EXISTS', `${dest} exists but no image record names it (left over from an earlier image?): remove it, then fetch again`);
    }
    let settle!: { resolve: (r: ImageRecord) => void; reject: (e: unknown) => void };
    const done = new Promise<ImageRecord>((resolve, reject) => (settle = { resolve, reject }));
    done.catch(() => undefined); // a fetch nobody waits for fails in its operation only
    const watchers = new Set<(percent: number, message: string) => void>();
    const op = await this.operations.start(
      'image.fetch',
      { kind: 'image', name },
      async (ctx) => {
        try {
          const rec = await this.receive(ctx, holder, (p, m) => {
            ctx.progress(p, m);
            for (const w of watchers) w(p, m);
          });
          settle.resolve(rec);
          return { image: name, from: holder.host, sizeBytes: rec.sizeBytes };
        } catch (e) {
          settle.reject(ctx.signal.aborted ? toHfError(ctx.signal.reason) : e);
          throw e;
        } finally {
          this.fetches.delete(name);
        }
      },
      { cancellable: true },
    );
    return { op, host: holder.host, done, watchers };
  }

  /** The host to fetch `name` from: `from`, or the first online host that holds it. */
  private async holder(name: string, from: string | undefined): Promise<PeerImage> {
    const held = await this.heldElsewhere(name);
    if (from !== undefined) {
      const h = held.find((x) => x.host === from);
      if (!h) throw new HfError('HF_ERR_IMAGE_NOT_FOUND', `host ${from} holds no image "${name}"${held.length ? ` (${held.map((x) => x.host).join(', ')} do)` : ''}`);
      if (!h.online) throw new HfError('HF_ERR_HOST_OFFLINE', `host ${from} is offline: image "${name}" cannot be fetched from it`, { details: { host: from } });
      return h;
    }
    if (!held.length) {
      // No other host has it: the answer is this host's (not found, buildable, being built).
      await this.get(name);
      throw new HfError('HF_ERR_ALREADY_EXISTS', `image "${name}" is already on this host`);
    }
    const online = held.find((x) => x.online);
    if (!online) {
      throw new HfError('HF_ERR_HOST_OFFLINE', `image "${name}" is only on offline host(s) ${held.map((x) => x.host).join(', ')}: it cannot be fetched now`, { details: { hosts: held.map((x) => x.host) } });
    }
    return online;
  }

  /** Downloads the holder's files into a directory of their own, checks them, moves them into place and registers the record. */
  private async receive(ctx: OperationContext, holder: PeerImage, progress: (percent: number, message: string) => void): Promise<ImageRecord> {
    const name = holder.record.name;
    const dest = this.dir(name);
    await mkdir(this.dirs.imagesDir, { recursive: true });
    return UndoStack.run(async (undo) => {
      const tmp = await mkdtemp(join(this.dirs.imagesDir, `${FETCH_DIR_PREFIX}${name}-`));
      undo.add('remove the partial download', () => rm(tmp, { recursive: true, force: true }));
      progress(0, `connecting to ${holder.host}`);
      const { stream, bytes } = await this.peers!.download(holder.host, name, ctx.signal);
      const total = bytes ?? holder.record.sizeBytes;
      let got = 0;
      let shown = -1;
      await receiveImageFiles(stream, tmp, holder.record, {
        from: holder.host,
        signal: ctx.signal,
        onBytes: (n) => {
          got += n;
          const pct = total > 0 ? Math.min(99, Math.floor((got * 100) / total)) : 0;
          if (pct === shown) return;
          shown = pct;
          progress(pct, `fetching image ${name} from ${holder.host}: ${formatBytes(got)} of ${formatBytes(total)}`);
        },
      });
      await rename(tmp, dest);
      undo.add('remove the image directory', () => rm(dest, { recursive: true, force: true }));
      const rec = imageRecordSchema.parse(relocateImage(holder.record, dest, { host: holder.host, at: new Date().toISOString() }));
      await this.records.create(name, rec);
      this.log?.info('image fetched', { image: name, from: holder.host, bytes: got });
      return rec;
    }, this.log);
  }

  /** Other hosts' records of `name`, by host name. */
  private async heldElsewhere(name: string): Promise<PeerImage[]> {
    if (!this.peers || !nameSchema.safeParse(name).success) return [];
    return (await this.peers.records(name)).sort((a, b) => a.host.localeCompare(b.host));
  }

  /** Where one of this host's images keeps its files: its own directory, or the one in another pool its record names. */
  private filesDir(rec: ImageRecord): string {
    return typeof rec.details.dir === 'string' && rec.details.dir.startsWith('/') ? rec.details.dir : this.dir(rec.name);
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
    if (this.filesDir(rec) !== this.dir(name)) await rm(this.filesDir(rec), { recursive: true, force: true });
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

/** `p`, or the abort reason as soon as `signal` aborts (what `p` does then is no longer waited for). */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}
