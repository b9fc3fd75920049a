// The console of a container without a process holding it: init's stdin is a FIFO in the
// instance directory (opened read-write by the container itself, so it never sees end-of-file)
// and its stdout/stderr append to the console log. Attaching writes to the FIFO and follows the
// log from its current end. Nothing here needs to stay open while nobody is attached, so the
// console survives a daemon restart untouched.
import { constants, statSync, watch, type FSWatcher } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { HfError } from '../../core/errors.js';
import { run } from '../../util/exec.js';
import type { ConsoleAttachment } from '../driver.js';

export async function ensureFifo(path: string): Promise<void> {
  try {
    const st = statSync(path);
    if (st.isFIFO()) return;
    throw new HfError('HF_ERR_INTERNAL', `${path} exists and is not a FIFO`);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  await run('mkfifo', ['-m', '600', path]);
}

/** Follows a growing file from its current end; copes with the log being trimmed. */
export class LogFollower {
  private pos = 0;
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private reading = false;
  private again = false;
  private closed = false;
  private fh: FileHandle | undefined;

  constructor(private readonly file: string, private readonly onData: (b: Buffer) => void) {}

  async start(): Promise<void> {
    this.fh = await open(this.file, constants.O_RDONLY | constants.O_CREAT, 0o600);
    this.pos = (await this.fh.stat()).size;
    try {
      this.watcher = watch(this.file, () => void this.pump());
      this.watcher.on('error', () => undefined);
    } catch {
      // no inotify: the timer below still follows
    }
    // inotify misses nothing we wrote ourselves, but writes from inside a container may come
    // from another mount namespace view: poll as well, slowly.
    this.timer = setInterval(() => void this.pump(), 250);
    this.timer.unref();
  }

  private async pump(): Promise<void> {
    if (this.closed || !this.fh) return;
    if (this.reading) {
      this.again = true;
      return;
    }
    this.reading = true;
    try {
      do {
        this.again = false;
        const { size } = await this.fh.stat();
        if (size < this.pos) this.pos = 0; // trimmed: start over from the kept tail
        while (size > this.pos && !this.closed) {
          const buf = Buffer.alloc(Math.min(64 * 1024, size - this.pos));
          const { bytesRead } = await this.fh.read(buf, 0, buf.length, this.pos);
          if (bytesRead <= 0) break;
          this.pos += bytesRead;
          this.onData(buf.subarray(0, bytesRead));
        }
      } while (this.again && !this.closed);
    } catch {
      // file gone: the attachment closes with the instance
    } finally {
      this.reading = false;
    }
  }

  close(): void {
    this.closed = true;
    this.watcher?.close();
    if (this.timer) clearInterval(this.timer);
    void this.fh?.close().catch(() => undefined);
  }
}

/** One client on the console: input to the FIFO, output from the log. */
export async function attachFifoConsole(fifo: string, log: string): Promise<ConsoleAttachment> {
  let fh: FileHandle;
  try {
    // O_NONBLOCK: fails with ENXIO instead of hanging when no reader (the container) exists.
    fh = await open(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
  } catch (e) {
    throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', `the container's console is not open: ${(e as Error).message}`, { cause: e });
  }
  const dataCbs: Array<(b: Buffer) => void> = [];
  const closeCbs: Array<() => void> = [];
  let closed = false;
  const follower = new LogFollower(log, (b) => {
    for (const cb of dataCbs) cb(b);
  });
  await follower.start();
  let chain = Promise.resolve();
  const close = (): void => {
    if (closed) return;
    closed = true;
    follower.close();
    void chain.finally(() => fh.close().catch(() => undefined));
    for (const cb of closeCbs) cb();
  };
  return {
    write: (d) => {
      if (closed) return;
      const buf = typeof d === 'string' ? Buffer.from(d) : d;
      // Terminals send CR for Enter; the shell on a FIFO wants LF.
      const text = Buffer.from(buf.toString('utf8').replace(/\r(?!\n)/g, '\n'));
      chain = chain.then(async () => {
        try {
          await fh.write(text);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'EPIPE') close();
        }
      });
    },
    onData: (cb) => dataCbs.push(cb),
    onClose: (cb) => closeCbs.push(cb),
    close,
  };
}
