// A per-VM QMP command log: a bounded in-memory ring of the last N messages exchanged with QEMU
// (for `hyperfold debug`, error reports and tests), optionally mirrored as JSON lines to a file
// whose size is capped (when it grows past the cap, only the newest half is kept).
import { appendFile, readFile, stat, writeFile } from 'node:fs/promises';

export type QmpLogKind =
  /** The greeting QEMU sends on connect. */
  | 'greeting'
  /** A command we sent. */
  | 'command'
  /** A successful reply to one of our commands. */
  | 'reply'
  /** An error reply to one of our commands. */
  | 'error'
  /** An asynchronous event. */
  | 'event'
  /** A command we gave up waiting for. */
  | 'timeout'
  /** A reply that arrived after its command timed out (or with an id we never sent). */
  | 'late-reply'
  /** A line that was not valid QMP (or valid JSON). */
  | 'garbage'
  /** The connection went away. */
  | 'disconnect';

export interface QmpLogEntry {
  /** Wall-clock time, ms since the epoch. */
  ts: number;
  /** 'out' = sent to QEMU, 'in' = received from QEMU, 'local' = something the client decided (timeout, disconnect). */
  dir: 'out' | 'in' | 'local';
  kind: QmpLogKind;
  /** The command id (commands, replies, errors, timeouts). */
  id?: string;
  /** Command name (for replies and errors too, looked up from the id). */
  command?: string;
  /** Command arguments (secrets redacted). */
  args?: unknown;
  /** Reply payload (`return`). */
  reply?: unknown;
  /** QMP error class and description. */
  error?: { class: string; desc: string };
  /** Event name and data. */
  event?: string;
  data?: unknown;
  /** For replies, errors and timeouts: ms between sending the command and this entry. */
  durationMs?: number;
  /** Free text (disconnect reason, garbage line…). */
  note?: string;
}

export interface QmpLogOptions {
  /** Ring size (entries kept in memory). Default 200. */
  capacity?: number;
  /** When set, every entry is also appended to this file as one JSON line. */
  file?: string;
  /** Size cap of `file` in bytes; past it the oldest half is dropped. Default 1 MiB. */
  maxFileBytes?: number;
  /** Longest line written to `file`; bigger payloads are replaced by a truncated preview. Default 16 KiB. */
  maxLineBytes?: number;
}

const DEFAULT_CAPACITY = 200;
const DEFAULT_MAX_FILE_BYTES = 1024 * 1024;
const DEFAULT_MAX_LINE_BYTES = 16 * 1024;

/** Keys whose values never reach the log (passwords in set_password, secret objects' data…). */
const SECRET_KEYS = new Set(['password', 'data', 'key', 'passphrase']);

/**
 * Removes secrets from command arguments before they are logged: `password`-like keys anywhere,
 * and `data` of `secret` objects (object-add qom-type=secret).
 */
export function redactArgs(command: string, args: unknown): unknown {
  if (args === undefined || args === null || typeof args !== 'object') return args;
  const isSecretObject = command === 'object-add' && (args as Record<string, unknown>)['qom-type'] === 'secret';
  const walk = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(walk);
    if (v === null || typeof v !== 'object') return v;
    const out: Record<string, unknown> = {};
    for (const [k, val] of Object.entries(v as Record<string, unknown>)) {
      if (k === 'password' || k === 'passphrase' || (isSecretObject && SECRET_KEYS.has(k))) out[k] = '<redacted>';
      else out[k] = walk(val);
    }
    return out;
  };
  return walk(args);
}

export class QmpLog {
  readonly capacity: number;
  readonly file: string | undefined;
  readonly maxFileBytes: number;
  readonly maxLineBytes: number;

  private readonly ring: QmpLogEntry[] = [];
  /** Index of the oldest entry once the ring is full. */
  private head = 0;
  /** Lines waiting to be appended to the file. */
  private pending: string[] = [];
  /** The write in progress (appends are serialized). */
  private writing: Promise<void> | null = null;
  /** Current size of the file as far as we know; undefined until first stat. */
  private fileSize: number | undefined;
  private fileError: Error | undefined;

  constructor(opts: QmpLogOptions = {}) {
    this.capacity = Math.max(1, opts.capacity ?? DEFAULT_CAPACITY);
    this.file = opts.file;
    this.maxFileBytes = Math.max(1024, opts.maxFileBytes ?? DEFAULT_MAX_FILE_BYTES);
    this.maxLineBytes = Math.max(256, opts.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES);
  }

  /** Adds an entry (timestamped now unless `ts` is given). */
  record(entry: Omit<QmpLogEntry, 'ts'> & { ts?: number }): QmpLogEntry {
    const { ts, ...rest } = entry;
    const full: QmpLogEntry = { ts: ts ?? Date.now(), ...rest };
    if (this.ring.length < this.capacity) this.ring.push(full);
    else {
      this.ring[this.head] = full;
      this.head = (this.head + 1) % this.capacity;
    }
    if (this.file !== undefined) {
      this.pending.push(this.toLine(full));
      if (!this.writing) this.writing = this.drain();
    }
    return full;
  }

  /** The ring, oldest first (a copy). */
  entries(): QmpLogEntry[] {
    return this.ring.length < this.capacity ? this.ring.slice() : [...this.ring.slice(this.head), ...this.ring.slice(0, this.head)];
  }

  clear(): void {
    this.ring.length = 0;
    this.head = 0;
  }

  /** Resolves once everything recorded so far is in the file. Never rejects. */
  async flush(): Promise<void> {
    while (this.writing) await this.writing;
  }

  /** The last error writing the file, if any (the log never throws for file problems). */
  get lastFileError(): Error | undefined {
    return this.fileError;
  }

  private toLine(e: QmpLogEntry): string {
    let line = JSON.stringify(e);
    if (Buffer.byteLength(line) > this.maxLineBytes) {
      const { reply, data, args, ...rest } = e;
      const big = JSON.stringify(reply ?? data ?? args ?? null);
      const preview = big.slice(0, Math.floor(this.maxLineBytes / 4));
      line = JSON.stringify({ ...rest, truncated: { bytes: Buffer.byteLength(big), preview } });
    }
    return line + '\n';
  }

  private async drain(): Promise<void> {
    const file = this.file as string;
    try {
      while (this.pending.length > 0) {
        const chunk = this.pending.join('');
        this.pending = [];
        try {
          if (this.fileSize === undefined) {
            try {
              this.fileSize = (await stat(file)).size;
            } catch {
              this.fileSize = 0;
            }
          }
          await appendFile(file, chunk, { mode: 0o640 });
          this.fileSize += Buffer.byteLength(chunk);
          if (this.fileSize > this.maxFileBytes) await this.trim(file);
        } catch (e) {
          this.fileError = e instanceof Error ? e : new Error(String(e));
          this.fileSize = undefined;
        }
      }
    } finally {
      this.writing = null;
    }
  }

  /** Keeps the newest half (cut at a line boundary). */
  private async trim(file: string): Promise<void> {
    const buf = await readFile(file);
    let start = buf.length - Math.floor(this.maxFileBytes / 2);
    if (start <= 0) {
      this.fileSize = buf.length;
      return;
    }
    const nl = buf.indexOf(0x0a, start - 1);
    start = nl === -1 ? buf.length : nl + 1;
    const kept = buf.subarray(start);
    await writeFile(file, kept, { mode: 0o640 });
    this.fileSize = kept.length;
  }
}
