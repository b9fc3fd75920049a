// Operations (tasks): every action that can take long runs as one. The API answers 202 with the
// operation at once; the work goes on here, reporting progress; clients poll with ?wait= or
// follow the event stream. Operations are persisted so that their outcome outlives the daemon.
// An operation that waits for its instance's lock says `queued`; a user can cancel it then (it
// never runs) or, when its work can stop cleanly (`cancellable`), while it runs: the work gets an
// AbortSignal and the operation ends `cancelled` when the work gives up.
import { randomUUID } from 'node:crypto';
import { ERROR_CODES, HfError, toHfError, type ErrorCode } from '../core/errors.js';
import { isFinished, operationSchema, type Operation } from '../core/model/operation.js';
import { Collection } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import type { Logger } from '../util/log.js';
import type { EventBus } from './events.js';

export interface OperationContext {
  readonly id: string;
  /** Aborted when a user cancels the operation: long work passes it down and stops cleanly. */
  readonly signal: AbortSignal;
  progress(percent: number, message: string): void;
  message(text: string): void;
  /** The work waits for something it needs (the instance's lock): status `queued`. */
  queued(why: string): void;
  /** The work has what it needs and runs: status `running`. */
  running(): void;
}

export interface StartOptions {
  /** The work stops cleanly when `ctx.signal` aborts; otherwise a running operation refuses a cancel. */
  cancellable?: boolean;
  /** Starts in status `queued` (the caller knows the work will wait for a lock). */
  queued?: boolean;
}

const PERSIST_PROGRESS_EVERY_MS = 1000;
const KEEP_FINISHED = 500;

export class OperationManager {
  private readonly ops: Collection<Operation>;
  /** Live operations: the in-memory copy is the truth while they run. */
  private readonly live = new Map<string, { op: Operation; done: Promise<void>; lastPersist: number; abort: AbortController }>();

  constructor(
    store: StateStore,
    private readonly events: EventBus,
    private readonly host: string,
    private readonly log: Logger,
  ) {
    this.ops = new Collection<Operation>(store, '/operations/', operationSchema);
  }

  /**
   * Operations left by a previous daemon: running ones are marked failed; queued ones never ran,
   * so they are marked cancelled (nothing of theirs happened).
   */
  async recover(): Promise<void> {
    for (const { value } of await this.ops.list()) {
      if (value.status === 'queued' && value.host === this.host) {
        await this.ops.update(value.id, (cur) => ({
          ...cur,
          status: 'cancelled',
          error: { code: 'HF_ERR_CANCELLED', message: 'the daemon stopped before this operation ran' },
          updatedAt: now(),
          finishedAt: now(),
        }));
      }
      if (value.status === 'running' && value.host === this.host) {
        await this.ops.update(value.id, (cur) => ({
          ...cur,
          status: 'failure',
          error: { code: 'HF_ERR_INTERNAL', message: 'the daemon stopped while this operation ran' },
          updatedAt: now(),
          finishedAt: now(),
        }));
      }
    }
    await this.prune();
  }

  /**
   * Starts `fn` as an operation and returns the operation record right away.
   * `fn`'s result becomes `result`; a thrown error becomes `error` with its stable code.
   */
  async start<T>(type: string, target: Operation['target'], fn: (ctx: OperationContext) => Promise<T>, opts: StartOptions = {}): Promise<Operation> {
    const t = now();
    const op: Operation = {
      id: randomUUID(),
      type,
      target,
      host: this.host,
      status: opts.queued ? 'queued' : 'running',
      cancellable: opts.cancellable ?? false,
      progress: { percent: 0, message: opts.queued ? 'queued' : 'started' },
      messages: [],
      createdAt: t,
      updatedAt: t,
    };
    await this.ops.create(op.id, op);
    const abort = new AbortController();
    const entry = { op, done: Promise.resolve(), lastPersist: Date.now(), abort };
    this.live.set(op.id, entry);
    this.events.publish('operation', { operation: op });

    const setStatus = (status: 'queued' | 'running', message: string): void => {
      if (op.status === status || isFinished(op)) return;
      op.status = status;
      op.progress = { ...op.progress, message };
      op.updatedAt = now();
      entry.lastPersist = Date.now();
      void this.persist(op);
      this.events.publish('operation', { operation: op });
    };
    const ctx: OperationContext = {
      id: op.id,
      signal: abort.signal,
      queued: (why) => setStatus('queued', why),
      running: () => setStatus('running', 'started'),
      progress: (percent, message) => {
        op.progress = { percent: Math.max(0, Math.min(100, Math.round(percent))), message };
        op.updatedAt = now();
        this.events.publish('operation', { operation: op });
        if (Date.now() - entry.lastPersist >= PERSIST_PROGRESS_EVERY_MS) {
          entry.lastPersist = Date.now();
          void this.persist(op);
        }
      },
      message: (text) => {
        op.messages.push({ at: now(), text });
        if (op.messages.length > 100) op.messages.splice(0, op.messages.length - 100);
      },
    };

    entry.done = (async () => {
      try {
        const result = await fn(ctx);
        op.status = 'success';
        op.progress = { percent: 100, message: 'done' };
        if (result !== undefined) op.result = result;
      } catch (e) {
        const err = toHfError(e);
        if (abort.signal.aborted) {
          // The work gave up because it was asked to: whatever it threw, that is a cancel.
          const reason = toHfError(abort.signal.reason);
          op.status = 'cancelled';
          op.error = { code: reason.code, message: reason.message };
          this.log.info('operation cancelled', { id: op.id, type, target: target.name, error: err.message });
        } else {
          op.status = 'failure';
          op.error = { code: err.code, message: err.message };
          this.log.warn('operation failed', { id: op.id, type, target: target.name, code: err.code, error: err.message });
        }
      }
      op.updatedAt = now();
      op.finishedAt = op.updatedAt;
      await this.persist(op);
      this.live.delete(op.id);
      this.events.publish('operation', { operation: op });
    })();
    return { ...op };
  }

  /**
   * Cancels an operation: a queued one at once (it never runs; answered `cancelled`); a running
   * cancellable one is asked to stop through its signal (answered still `running`; it ends
   * `cancelled` when its work returns). HF_ERR_NOT_CANCELLABLE for running work that cannot
   * stop half-way, HF_ERR_OPERATION_FINISHED for one that has ended.
   */
  async cancel(id: string): Promise<Operation> {
    const l = this.live.get(id);
    if (!l) {
      const op = await this.get(id);
      if (isFinished(op)) throw new HfError('HF_ERR_OPERATION_FINISHED', `operation ${id} has already ended (${op.status})`, { details: { status: op.status } });
      throw new HfError('HF_ERR_NOT_CANCELLABLE', `operation ${id} runs on host ${op.host}: cancel it there`);
    }
    const { op, abort } = l;
    const reason = new HfError('HF_ERR_CANCELLED', `operation ${id} (${op.type} ${op.target.name}) was cancelled`);
    if (op.status === 'queued') {
      abort.abort(reason);
      await l.done;
      return this.get(id);
    }
    if (!op.cancellable) {
      throw new HfError('HF_ERR_NOT_CANCELLABLE', `operation ${id} (${op.type} ${op.target.name}) cannot be interrupted: wait for it to end`, { details: { type: op.type } });
    }
    if (!abort.signal.aborted) {
      op.messages.push({ at: now(), text: 'cancel requested' });
      abort.abort(reason);
      this.events.publish('operation', { operation: op });
    }
    return { ...op };
  }

  /**
   * Waits for an operation another service started, for internal callers. Only `success` is
   * success: its failure, or its cancellation (a user cancelled the stop a revert waits for…),
   * becomes the caller's error with its code.
   */
  async succeeded(started: Promise<Operation>): Promise<Operation> {
    const op = await started;
    const done = await this.wait(op.id, Infinity);
    if (done.status !== 'success') {
      const fallback: ErrorCode = done.status === 'cancelled' ? 'HF_ERR_CANCELLED' : 'HF_ERR_INTERNAL';
      const code = (done.error?.code && done.error.code in ERROR_CODES ? done.error.code : fallback) as ErrorCode;
      throw new HfError(code, done.error?.message ?? `${done.type} ${done.status === 'cancelled' ? 'was cancelled' : 'failed'}`);
    }
    return done;
  }

  async get(id: string): Promise<Operation> {
    const l = this.live.get(id);
    if (l) return { ...l.op };
    const found = await this.ops.get(id);
    if (!found) throw new HfError('HF_ERR_OPERATION_NOT_FOUND', `operation ${id} not found`);
    return found.value;
  }

  async list(): Promise<Operation[]> {
    const stored = (await this.ops.list()).map((v) => this.live.get(v.value.id)?.op ?? v.value);
    return stored.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  /** Waits up to `timeoutMs` for the operation to finish and returns it (finished or not). */
  async wait(id: string, timeoutMs: number): Promise<Operation> {
    const l = this.live.get(id);
    if (l && timeoutMs > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        l.done,
        Number.isFinite(timeoutMs) ? new Promise<void>((r) => (timer = setTimeout(r, timeoutMs))) : new Promise<void>(() => undefined),
      ]);
      if (timer) clearTimeout(timer);
    }
    return this.get(id);
  }

  /** Waits for every live operation (used at shutdown and in tests). */
  async drain(): Promise<void> {
    await Promise.all([...this.live.values()].map((l) => l.done));
  }

  private async persist(op: Operation): Promise<void> {
    try {
      await this.ops.update(op.id, () => ({ ...op }));
    } catch (e) {
      this.log.error('cannot persist operation', { id: op.id, error: (e as Error).message });
    }
  }

  private async prune(): Promise<void> {
    const finished = (await this.ops.list()).filter((v) => isFinished(v.value)).sort((a, b) => a.value.createdAt.localeCompare(b.value.createdAt));
    for (const v of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED))) await this.ops.delete(v.value.id);
  }
}

function now(): string {
  return new Date().toISOString();
}
