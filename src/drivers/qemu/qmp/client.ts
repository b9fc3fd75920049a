// The QMP core: one connection to a QEMU monitor socket (unix), newline-delimited JSON both ways.
//
//  - connect(): optional retry while the socket does not exist yet / refuses (QEMU creates it a
//    few tens of ms after spawn), read the greeting, negotiate capabilities (`qmp_capabilities`).
//  - run(): every command carries a unique `id` and its own timeout; replies are matched by id,
//    so any number of commands may be in flight. QEMU errors become HF_ERR_QMP_COMMAND (with the
//    QMP error class and desc in `details`), timeouts HF_ERR_QMP_TIMEOUT (a late reply is logged
//    and dropped), a closed socket HF_ERR_QMP_DISCONNECTED for everything still pending.
//  - Asynchronous events are emitted as 'event'; 'disconnect' is emitted exactly once.
//
// Typed wrappers for individual commands live in commands.ts.
import net from 'node:net';
import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { HfError, isHfError } from '../../../core/errors.js';
import { QmpLog, redactArgs } from './log.js';

export interface QmpVersionTriple {
  major: number;
  minor: number;
  micro: number;
}

/** The first message QEMU sends on a new QMP connection. */
export interface QmpGreeting {
  QMP: {
    version: { qemu: QmpVersionTriple; package: string };
    capabilities: string[];
  };
}

/** An asynchronous QMP event. */
export interface QmpEvent {
  event: string;
  /** The event's `data` member ({} when QEMU sent none). */
  data: Record<string, unknown>;
  /** When QEMU emitted it, in ms since the epoch (from QEMU's {seconds, microseconds}). */
  timestamp: number;
}

export interface QmpDisconnectInfo {
  /** true when close() was called; false when QEMU closed the socket (quit, crash, kill). */
  initiatedByClient: boolean;
  /** Human-readable reason ("closed by client", "connection closed by QEMU", socket error text…). */
  reason: string;
  /** The socket error, if the connection ended with one. */
  error?: Error;
}

/** Events a QmpClient emits. */
export interface QmpClientEvents {
  event: [QmpEvent];
  disconnect: [QmpDisconnectInfo];
}

export interface QmpConnectOptions {
  /**
   * Budget for one connection attempt plus the handshake (greeting + qmp_capabilities).
   * Default 5000 ms.
   */
  connectTimeoutMs?: number;
  /** Timeout of commands run without an explicit one. Default 10000 ms. */
  defaultTimeoutMs?: number;
  /** Command log to record into; by default the client keeps a small in-memory one. */
  log?: QmpLog;
  /**
   * Keep retrying while the socket is missing (ENOENT) or refuses (ECONNREFUSED, EAGAIN) until
   * this deadline. Either a duration in ms from the call (e.g. 5000), or an absolute
   * `Date.now()`-style timestamp (any value >= 1e12 is taken as one). Default: no retry.
   */
  retryUntilMs?: number;
  /**
   * Gives up connecting (e.g. the QEMU process exited while we were retrying): connect()
   * rejects with HF_ERR_QMP_DISCONNECTED, cause = signal.reason.
   */
  signal?: AbortSignal;
  /** Told of each failed attempt that will be retried (for logs, and for tests to step in). */
  onRetry?: (attempt: { attempts: number; errno: string }) => void;
}

export interface QmpWaitOptions {
  /** Stops waiting (the promise rejects with `signal.reason`). */
  signal?: AbortSignal;
}

export interface QmpRunOptions {
  /** Overrides the client's default command timeout. */
  timeoutMs?: number;
}

/** The shape of a QMP error reply's `error` member. */
export interface QmpErrorBody {
  class: string;
  desc: string;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 5000;
const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;
const DEFAULT_ALIVE_TIMEOUT_MS = 1000;
/** A line longer than this means the peer is not QEMU (or is broken): drop the connection. */
const MAX_LINE_CHARS = 32 * 1024 * 1024;
/** Ids of timed-out commands remembered to name late replies in the log. */
const MAX_TIMED_OUT_REMEMBERED = 64;
const RETRYABLE_CONNECT_ERRORS = new Set(['ENOENT', 'ECONNREFUSED', 'EAGAIN']);

interface Pending {
  id: string;
  command: string;
  sentAt: number;
  timeoutMs: number;
  timer: NodeJS.Timeout;
  resolve: (value: unknown) => void;
  reject: (err: HfError) => void;
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function errnoOf(e: unknown): string | undefined {
  return isObject(e) && typeof e.code === 'string' ? e.code : undefined;
}

function resolveDeadline(retryUntilMs: number | undefined): number {
  if (retryUntilMs === undefined || retryUntilMs <= 0) return 0;
  return retryUntilMs >= 1e12 ? retryUntilMs : Date.now() + retryUntilMs;
}

/** Opens the unix socket, with a timeout. Rejects with the raw socket error (errno in `.code`). */
function openSocket(path: string, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ path });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new HfError('HF_ERR_QMP_TIMEOUT', `QMP connect to ${path} timed out after ${timeoutMs}ms`, { details: { socketPath: path, timeoutMs } }));
    }, timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.removeAllListeners('error');
      resolve(sock);
    });
    sock.once('error', (e) => {
      clearTimeout(timer);
      sock.destroy();
      reject(e);
    });
  });
}

export class QmpClient extends EventEmitter<QmpClientEvents> {
  readonly socketPath: string;
  readonly log: QmpLog;
  readonly defaultTimeoutMs: number;

  private readonly socket: net.Socket;
  private readonly pending = new Map<string, Pending>();
  private readonly timedOut = new Map<string, string>();
  private seq = 0;
  private buf = '';
  private isClosed = false;
  /** QEMU closed its end (EOF): nothing more will be answered even if 'close' has not fired yet. */
  private remoteEnded = false;
  private closeRequested = false;
  private socketError: Error | undefined;
  private greetingMsg: QmpGreeting | undefined;
  private greetingWaiter: ((g: QmpGreeting | HfError) => void) | undefined;
  private readonly closedPromise: Promise<void>;
  private resolveClosed!: () => void;

  /** Use QmpClient.connect(). */
  private constructor(socketPath: string, socket: net.Socket, opts: QmpConnectOptions) {
    super();
    this.socketPath = socketPath;
    this.socket = socket;
    this.log = opts.log ?? new QmpLog({ capacity: 100 });
    this.defaultTimeoutMs = opts.defaultTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    this.closedPromise = new Promise((r) => (this.resolveClosed = r));
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (e) => {
      this.socketError ??= e;
    });
    socket.on('end', () => {
      this.remoteEnded = true;
    });
    socket.on('close', () => this.onClose());
  }

  /**
   * Connects to a QMP unix socket, waits for the greeting and leaves capabilities negotiation
   * mode. Errors: HF_ERR_QMP_DISCONNECTED (socket missing/refused after the retry deadline,
   * or closed during the handshake), HF_ERR_QMP_TIMEOUT (no greeting: often another client
   * holds the monitor, QEMU serves one at a time), HF_ERR_QMP_COMMAND (capabilities refused).
   */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const connectTimeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const deadline = resolveDeadline(opts.retryUntilMs);
    let delay = 2;
    let attempts = 0;
    let socket: net.Socket;
    const { signal } = opts;
    const aborted = (): HfError =>
      new HfError('HF_ERR_QMP_DISCONNECTED', `connecting to QMP socket ${socketPath} was aborted`, { cause: signal?.reason, details: { socketPath, attempts } });
    for (;;) {
      if (signal?.aborted) throw aborted();
      attempts++;
      try {
        socket = await openSocket(socketPath, connectTimeoutMs);
        break;
      } catch (e) {
        if (isHfError(e)) throw e;
        const errno = errnoOf(e);
        const remaining = deadline - Date.now();
        if (errno !== undefined && RETRYABLE_CONNECT_ERRORS.has(errno) && remaining > 0) {
          opts.onRetry?.({ attempts, errno });
          await new Promise<void>((resolve) => {
            const done = (): void => {
              clearTimeout(timer);
              signal?.removeEventListener('abort', done);
              resolve();
            };
            const timer = setTimeout(done, Math.min(delay, remaining));
            signal?.addEventListener('abort', done, { once: true });
          });
          delay = Math.min(delay * 2, 10);
          continue;
        }
        throw new HfError('HF_ERR_QMP_DISCONNECTED', `cannot connect to QMP socket ${socketPath}: ${e instanceof Error ? e.message : String(e)}`, {
          cause: e,
          details: { socketPath, errno, attempts },
        });
      }
    }
    const client = new QmpClient(socketPath, socket, opts);
    const onAbort = (): void => {
      client.socket.destroy();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      await client.handshake(connectTimeoutMs);
    } catch (e) {
      client.socket.destroy();
      throw signal?.aborted ? aborted() : e;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    return client;
  }

  /** The greeting received on connect (QEMU version and capabilities). */
  get greeting(): QmpGreeting {
    return this.greetingMsg as QmpGreeting;
  }

  /** true once the connection is gone (either side closed it). */
  get closed(): boolean {
    return this.isClosed;
  }

  /** Number of commands waiting for a reply. */
  get pendingCount(): number {
    return this.pending.size;
  }

  /**
   * Runs a QMP command and resolves to its `return` value. Rejects with HF_ERR_QMP_COMMAND
   * (details: command, class, desc), HF_ERR_QMP_TIMEOUT or HF_ERR_QMP_DISCONNECTED.
   */
  run<T = unknown>(command: string, args?: object, opts: QmpRunOptions = {}): Promise<T> {
    if (this.isClosed || this.remoteEnded) {
      return Promise.reject(new HfError('HF_ERR_QMP_DISCONNECTED', `QMP ${command}: not connected to QEMU`, { details: { command, socketPath: this.socketPath } }));
    }
    const id = `hf-${++this.seq}`;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    const message = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
    return new Promise<T>((resolve, reject) => {
      const pending: Pending = {
        id,
        command,
        sentAt: performance.now(),
        timeoutMs,
        timer: setTimeout(() => this.onTimeout(id), timeoutMs),
        resolve: resolve as (value: unknown) => void,
        reject,
      };
      this.pending.set(id, pending);
      this.log.record({ dir: 'out', kind: 'command', id, command, ...(args === undefined ? {} : { args: redactArgs(command, args) }) });
      this.socket.write(JSON.stringify(message) + '\n');
    });
  }

  /**
   * Resolves with the next event called `name` (and matching `predicate`, if given).
   * Subscribe before triggering what emits the event: events are not buffered.
   * Rejects with HF_ERR_QMP_TIMEOUT or HF_ERR_QMP_DISCONNECTED.
   */
  waitForEvent(name: string, timeoutMs?: number): Promise<QmpEvent>;
  waitForEvent(name: string, predicate: ((e: QmpEvent) => boolean) | undefined, timeoutMs?: number, opts?: QmpWaitOptions): Promise<QmpEvent>;
  waitForEvent(name: string, predicateOrTimeout?: ((e: QmpEvent) => boolean) | number, maybeTimeout?: number, opts: QmpWaitOptions = {}): Promise<QmpEvent> {
    const predicate = typeof predicateOrTimeout === 'function' ? predicateOrTimeout : undefined;
    const timeoutMs = (typeof predicateOrTimeout === 'number' ? predicateOrTimeout : maybeTimeout) ?? this.defaultTimeoutMs;
    const { signal } = opts;
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.isClosed) {
      return Promise.reject(new HfError('HF_ERR_QMP_DISCONNECTED', `waiting for QMP event ${name}: not connected to QEMU`, { details: { event: name, socketPath: this.socketPath } }));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('disconnect', onDisconnect);
        signal?.removeEventListener('abort', onAbort);
      };
      const onAbort = (): void => {
        cleanup();
        reject(signal?.reason);
      };
      const onEvent = (e: QmpEvent): void => {
        if (e.event !== name) return;
        let ok: boolean;
        try {
          ok = predicate ? predicate(e) : true;
        } catch (err) {
          cleanup();
          reject(err);
          return;
        }
        if (!ok) return;
        cleanup();
        resolve(e);
      };
      const onDisconnect = (info: QmpDisconnectInfo): void => {
        cleanup();
        reject(new HfError('HF_ERR_QMP_DISCONNECTED', `QMP connection closed while waiting for event ${name}: ${info.reason}`, { details: { event: name, socketPath: this.socketPath } }));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new HfError('HF_ERR_QMP_TIMEOUT', `QMP event ${name} did not arrive within ${timeoutMs}ms`, { details: { event: name, timeoutMs } }));
      }, timeoutMs);
      this.on('event', onEvent);
      this.on('disconnect', onDisconnect);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Calls `cb` for every event called `name`; returns the unsubscribe function. */
  onEvent(name: string, cb: (e: QmpEvent) => void): () => void {
    const listener = (e: QmpEvent): void => {
      if (e.event === name) cb(e);
    };
    this.on('event', listener);
    return () => this.off('event', listener);
  }

  /**
   * Tells "QEMU is alive and answering" from "QEMU is gone or hung": sends query-status with a
   * short timeout. Any reply (even an error) means alive. Note that QEMU runs QMP commands one at
   * a time, so a command that is itself stuck makes this report false too.
   */
  async isAlive(timeoutMs: number = DEFAULT_ALIVE_TIMEOUT_MS): Promise<boolean> {
    if (this.isClosed) return false;
    try {
      await this.run('query-status', undefined, { timeoutMs });
      return true;
    } catch (e) {
      return isHfError(e, 'HF_ERR_QMP_COMMAND');
    }
  }

  /**
   * Closes the connection (QEMU keeps running). Pending commands reject with
   * HF_ERR_QMP_DISCONNECTED; 'disconnect' is emitted with initiatedByClient=true.
   */
  close(): Promise<void> {
    if (!this.isClosed) {
      this.closeRequested = true;
      this.socket.destroy();
    }
    return this.closedPromise;
  }

  /** Resolves once the connection is gone, however it ended. */
  get whenClosed(): Promise<void> {
    return this.closedPromise;
  }

  // --- internals -----------------------------------------------------------------------------

  private async handshake(timeoutMs: number): Promise<void> {
    const started = Date.now();
    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.greetingWaiter = undefined;
        reject(new HfError('HF_ERR_QMP_TIMEOUT', `no QMP greeting on ${this.socketPath} within ${timeoutMs}ms (is another client connected? QEMU serves one QMP client at a time)`, {
          details: { socketPath: this.socketPath, timeoutMs },
        }));
      }, timeoutMs);
      this.greetingWaiter = (g) => {
        clearTimeout(timer);
        this.greetingWaiter = undefined;
        if (g instanceof HfError) reject(g);
        else resolve(g);
      };
      if (this.greetingMsg) this.greetingWaiter(this.greetingMsg);
      else if (this.isClosed) this.greetingWaiter(this.disconnectError('handshake'));
    });
    this.greetingMsg = greeting;
    const remaining = Math.max(1, timeoutMs - (Date.now() - started));
    await this.run('qmp_capabilities', undefined, { timeoutMs: remaining });
  }

  private onData(chunk: string): void {
    let start = 0;
    const lines: string[] = [];
    for (;;) {
      const nl = chunk.indexOf('\n', start);
      if (nl === -1) break;
      const piece = chunk.slice(start, nl);
      lines.push(this.buf.length > 0 ? this.buf + piece : piece);
      this.buf = '';
      start = nl + 1;
    }
    if (start < chunk.length) this.buf += chunk.slice(start);
    if (this.buf.length > MAX_LINE_CHARS) {
      this.buf = '';
      this.socketError ??= new Error(`QMP message longer than ${MAX_LINE_CHARS} characters`);
      this.socket.destroy();
    }
    // Parse everything first so a throwing 'event' listener cannot lose the rest of the chunk.
    let listenerError: { e: unknown } | undefined;
    for (const raw of lines) {
      const line = raw.trim();
      if (line.length === 0) continue;
      try {
        this.onLine(line);
      } catch (e) {
        listenerError ??= { e };
      }
    }
    if (listenerError) {
      const { e } = listenerError;
      queueMicrotask(() => {
        throw e;
      });
    }
  }

  private onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      this.log.record({ dir: 'in', kind: 'garbage', note: line.slice(0, 1000) });
      return;
    }
    if (!isObject(msg)) {
      this.log.record({ dir: 'in', kind: 'garbage', note: line.slice(0, 1000) });
      return;
    }
    if (isObject(msg.QMP)) {
      const greeting = msg as unknown as QmpGreeting;
      this.log.record({ dir: 'in', kind: 'greeting', data: greeting.QMP });
      if (!this.greetingMsg) this.greetingMsg = greeting;
      this.greetingWaiter?.(greeting);
      return;
    }
    if (typeof msg.event === 'string') {
      const ts = isObject(msg.timestamp) ? msg.timestamp : {};
      const seconds = typeof ts.seconds === 'number' ? ts.seconds : 0;
      const micros = typeof ts.microseconds === 'number' ? ts.microseconds : 0;
      const event: QmpEvent = {
        event: msg.event,
        data: isObject(msg.data) ? msg.data : {},
        timestamp: seconds * 1000 + Math.floor(micros / 1000),
      };
      this.log.record({ dir: 'in', kind: 'event', event: event.event, ...(msg.data === undefined ? {} : { data: msg.data }) });
      this.emit('event', event);
      return;
    }
    if ('return' in msg || isObject(msg.error)) {
      const id = typeof msg.id === 'string' ? msg.id : msg.id === undefined ? undefined : JSON.stringify(msg.id);
      const pending = id === undefined ? undefined : this.pending.get(id);
      if (!pending) {
        // A reply to a command that already timed out, or an id-less error (QEMU answers
        // unparsable input that way): nothing waits for it.
        const command = id === undefined ? undefined : this.timedOut.get(id);
        if (id !== undefined) this.timedOut.delete(id);
        this.log.record({
          dir: 'in',
          kind: 'late-reply',
          ...(id === undefined ? {} : { id }),
          ...(command === undefined ? {} : { command }),
          ...('return' in msg ? { reply: msg.return } : { error: msg.error as unknown as QmpErrorBody }),
        });
        return;
      }
      this.pending.delete(pending.id);
      clearTimeout(pending.timer);
      const durationMs = Math.round((performance.now() - pending.sentAt) * 1000) / 1000;
      if (isObject(msg.error)) {
        const cls = typeof msg.error.class === 'string' ? msg.error.class : 'GenericError';
        const desc = typeof msg.error.desc === 'string' ? msg.error.desc : JSON.stringify(msg.error);
        this.log.record({ dir: 'in', kind: 'error', id: pending.id, command: pending.command, error: { class: cls, desc }, durationMs });
        pending.reject(new HfError('HF_ERR_QMP_COMMAND', `QMP ${pending.command} failed: ${desc}`, { details: { command: pending.command, class: cls, desc } }));
      } else {
        this.log.record({ dir: 'in', kind: 'reply', id: pending.id, command: pending.command, reply: msg.return, durationMs });
        pending.resolve(msg.return);
      }
      return;
    }
    this.log.record({ dir: 'in', kind: 'garbage', note: line.slice(0, 1000) });
  }

  private onTimeout(id: string): void {
    const pending = this.pending.get(id);
    if (!pending) return;
    this.pending.delete(id);
    this.timedOut.set(id, pending.command);
    if (this.timedOut.size > MAX_TIMED_OUT_REMEMBERED) {
      const oldest = this.timedOut.keys().next().value;
      if (oldest !== undefined) this.timedOut.delete(oldest);
    }
    this.log.record({ dir: 'local', kind: 'timeout', id, command: pending.command, durationMs: pending.timeoutMs });
    pending.reject(new HfError('HF_ERR_QMP_TIMEOUT', `QMP ${pending.command} timed out after ${pending.timeoutMs}ms`, {
      details: { command: pending.command, timeoutMs: pending.timeoutMs, socketPath: this.socketPath },
    }));
  }

  private disconnectError(command: string): HfError {
    const reason = this.disconnectReason();
    return new HfError('HF_ERR_QMP_DISCONNECTED', `QMP ${command}: connection to QEMU lost (${reason})`, {
      ...(this.socketError ? { cause: this.socketError } : {}),
      details: { command, socketPath: this.socketPath, reason },
    });
  }

  private disconnectReason(): string {
    if (this.closeRequested) return 'closed by client';
    if (this.socketError) return this.socketError.message;
    return 'connection closed by QEMU';
  }

  private onClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    const reason = this.disconnectReason();
    this.greetingWaiter?.(this.disconnectError('handshake'));
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(this.disconnectError(p.command));
    }
    this.log.record({ dir: 'local', kind: 'disconnect', note: reason });
    const info: QmpDisconnectInfo = { initiatedByClient: this.closeRequested, reason, ...(this.socketError && !this.closeRequested ? { error: this.socketError } : {}) };
    this.resolveClosed();
    this.emit('disconnect', info);
  }
}
