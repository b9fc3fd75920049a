// One lock a key: lifecycle operations on one instance run one after another.
export class KeyedMutex {
  private readonly tails = new Map<string, Promise<void>>();
  private readonly holders = new Map<string, string>();

  /** The description of what holds the lock on `key`, if anything. */
  holder(key: string): string | undefined {
    return this.holders.get(key);
  }

  async run<T>(key: string, what: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.tails.set(key, tail);
    await prev;
    this.holders.set(key, what);
    try {
      return await fn();
    } finally {
      this.holders.delete(key);
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    }
  }
}
