// Operations (tasks): every action that can take long runs as one. The API answers 202 with the
// operation at once; the work goes on here, reporting progress; clients poll with ?wait= or
// follow the event stream. Operations are persisted so that their outcome outlives the daemon.
import { randomUUID } from 'node:crypto';
import { HfError, toHfError } from '../core/errors.js';
import { operationSchema, type Operation } from '../core/model/operation.js';
import { Collection } from '../state/collection.js';
import type { StateStore } from '../state/store.js';
import type { Logger } from '../util/log.js';
import type { EventBus } from './events.js';

export interface OperationContext {
  readonly id: string;
  progress(percent: number, message: string): void;
  message(text: string): void;
}

const PERSIST_PROGRESS_EVERY_MS = 1000;
const KEEP_FINISHED = 500;

export class OperationManager {
  private readonly ops: Collection<Operation>;
  /** Live operations: the in-memory copy is the truth while they run. */
  private readonly live = new Map<string, { op: Operation; done: Promise<void>; lastPersist: number }>();

  constructor(
    store: StateStore,
    private readonly events: EventBus,
    private readonly host: string,
    private readonly log: Logger,
  ) {
    this.ops = new Collection<Operation>(store, '/operations/', operationSchema);
  }

  /** Marks operations left running by a previous daemon as failed. */
  async recover(): Promise<void> {
    for (const { value } of await this.ops.list()) {
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
  async start<T>(type: string, target: Operation['target'], fn: (ctx: OperationContext) => Promise<T>): Promise<Operation> {
    const t = now();
    const op: Operation = {
      id: randomUUID(),
      type,
      target,
      host: this.host,
      status: 'running',
      progress: { percent: 0, message: 'started' },
      messages: [],
      createdAt: t,
      updatedAt: t,
    };
    await this.ops.create(op.id, op);
    const entry = { op, done: Promise.resolve(), lastPersist: Date.now() };
    this.live.set(op.id, entry);
    this.events.publish('operation', { operation: op });

    const ctx: OperationContext = {
      id: op.id,
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
        op.status = 'failure';
        op.error = { code: err.code, message: err.message };
        this.log.warn('operation failed', { id: op.id, type, target: target.name, code: err.code, error: err.message });
      }
      op.updatedAt = now();
      op.finishedAt = op.updatedAt;
      await this.persist(op);
      this.live.delete(op.id);
      this.events.publish('operation', { operation: op });
    })();
    return { ...op };
  }

  /** Runs `fn` as an operation and waits for it; rethrows its error. For internal callers. */
  async run<T>(type: string, target: Operation['target'], fn: (ctx: OperationContext) => Promise<T>): Promise<Operation> {
    const op = await this.start(type, target, fn);
    const done = await this.wait(op.id, Infinity);
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
    const finished = (await this.ops.list()).filter((v) => v.value.status !== 'running').sort((a, b) => a.value.createdAt.localeCompare(b.value.createdAt));
    for (const v of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED))) await this.ops.delete(v.value.id);
  }
}

function now(): string {
  return new Date().toISOString();
}
