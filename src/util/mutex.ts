// One lock a key: lifecycle operations on one instance run one after another. A waiter queues
// behind the holder (first come, first served); it can give up through an abort signal (a
// cancelled operation) or after a bound (a synchronous request), and the queue goes on without it.
import { HfError } from '../core/errors.js';

export interface LockOptions {
  /** Gives up waiting (rejects with the signal's reason) when aborted; ignored once the lock is held. */
  signal?: AbortSignal;
  /** Gives up waiting after this long with HF_ERR_BUSY naming the holder. */
  timeoutMs?: number;
  /** Called at once when the lock is held by someone else, with what holds it. */
  onQueued?: (holder: string) => void;
  /** Called when the lock is ours, before `fn` runs. */
  onAcquired?: () => void;
  /** How HF_ERR_BUSY names the key (e.g. `instance "web1"`). */
  label?: string;
}

export class KeyedMutex {
  private readonly tails = new Map<string, Promise<void>>();
  private readonly holders = new Map<string, string>();

  /** Whether a `run` on `key` would wait. */
  busy(key: string): boolean {
    return this.tails.has(key);
  }

  async run<T>(key: string, what: string, fn: () => Promise<T>, opts: LockOptions = {}): Promise<T> {
    opts.signal?.throwIfAborted();
    const prev = this.tails.get(key);
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = (prev ?? Promise.resolve()).then(() => mine);
    this.tails.set(key, tail);
    const pass = (): void => {
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    };
    if (prev) {
      opts.onQueued?.(this.holders.get(key) ?? 'another operation');
      try {
        await waitTurn(prev, opts, () => `${opts.label ?? `"${key}"`} is busy (${this.holders.get(key) ?? 'another operation'} in progress)`, () => this.holders.get(key));
      } catch (e) {
        // Our place in the queue passes on to whoever waits behind us once our turn comes.
        void prev.then(pass);
        throw e;
      }
    }
    this.holders.set(key, what);
    try {
      opts.onAcquired?.();
      return await fn();
    } finally {
      this.holders.delete(key);
      pass();
    }
  }
}

/** Resolves when `prev` does; rejects when the signal aborts or the bound passes first. */
function waitTurn(prev: Promise<void>, opts: LockOptions, busyMessage: () => string, holder: () => string | undefined): Promise<void> {
  if (!opts.signal && opts.timeoutMs === undefined) return prev;
  return new Promise<void>((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const done = (): void => {
      if (timer) clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
    };
    const onAbort = (): void => {
      done();
      reject(opts.signal!.reason);
    };
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    if (opts.timeoutMs !== undefined) {
      timer = setTimeout(() => {
        done();
        reject(new HfError('HF_ERR_BUSY', `${busyMessage()}: still busy after ${Math.round(opts.timeoutMs! / 100) / 10} s, try again when it is done`, { details: { busyWith: holder() } }));
      }, opts.timeoutMs);
    }
    void prev.then(() => {
      done();
      // an abort that came first has already rejected; resolving then is a no-op
      if (opts.signal?.aborted) reject(opts.signal.reason);
      else resolve();
    });
  });
}
