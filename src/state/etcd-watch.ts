// One watch of the etcd store: a gRPC watch stream of its own that survives disconnects.
//
// The etcd3 client's Watcher also reconnects, but it resumes from the revision in the last
// response header, which during a catch-up from an old revision is the store's current revision,
// not the last event delivered (a disconnect in the middle of a replay would lose the rest), and
// it drops a compaction's compact revision. So this watch keeps its own resume point: `next` is
// the revision of the last event delivered + 1, or a progress notification's header revision + 1
// (etcd sends those only to watchers that are caught up). After a disconnect it opens a new
// stream from `next` with a growing delay; events below `next` are never delivered twice.
//
// Only a compaction (or the store's close, or etcd cancelling the watch for another reason) ends
// it, through onError. Events are delivered in revision order from a queue, never re-entrantly.
import type { IDuplexStream, IEvent, IWatchRequest, IWatchResponse } from 'etcd3';
import { HfError } from '../core/errors.js';
import { errMessage } from './sqlite-values.js';
import type { Watch, WatchEvent, WatchFailure } from './store.js';

export type WatchStream = IDuplexStream<IWatchRequest, IWatchResponse>;

export interface EtcdWatchDeps {
  /** Opens a new watch stream (on some member). */
  open(): Promise<WatchStream>;
  /** The etcd key range watched. */
  key: Buffer;
  rangeEnd: Buffer;
  /** The store key of an etcd key (the store's namespace removed). */
  storeKey(key: Buffer): string;
  cb: (ev: WatchEvent) => void;
  onError: (failure: WatchFailure) => void;
  onWatcherError: (err: unknown, ev: WatchEvent) => void;
  /** Told about each lost stream (for logging); the watch reconnects by itself. */
  onDisconnect: (err: unknown) => void;
  /** Called once when the watch ends, however it ends. */
  onEnd: (w: EtcdWatch) => void;
}

const MIN_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 2_000;

/**
 * Cancels a stream we no longer read. It is ended first: the etcd3 client treats an error on a
 * stream that is still writable (the CANCELLED that cancel() causes) as a failed host and closes
 * every channel to it, which would drop the other watches' streams. The late error must not go
 * unhandled either.
 */
export function dropStream(stream: { on(event: 'error', fn: (err: Error) => void): unknown; end(): void; cancel(): void } | undefined): void {
  if (stream === undefined) return;
  stream.on('error', () => undefined);
  try {
    stream.end();
    stream.cancel();
  } catch {
    // already closed
  }
}

export class EtcdWatch implements Watch {
  /** The first revision not delivered yet: where a new stream starts. */
  private next: number;
  private stream: WatchStream | undefined;
  /** Bumped per stream opened: events of a replaced stream are ignored. */
  private generation = 0;
  private backoffMs = MIN_BACKOFF_MS;
  private timer: NodeJS.Timeout | undefined;
  private readonly queue: WatchEvent[] = [];
  private draining = false;
  private ended = false;

  constructor(
    private readonly deps: EtcdWatchDeps,
    fromRevision: number,
    readonly prefix: string,
  ) {
    this.next = fromRevision;
  }

  /** Opens the first stream. */
  start(): void {
    this.connect();
  }

  cancel(): void {
    this.end();
  }

  /** Ends the watch with `failure` (reported from a microtask). */
  fail(failure: WatchFailure): void {
    if (this.ended) return;
    this.end();
    queueMicrotask(() => this.deps.onError(failure));
  }

  private end(): void {
    if (this.ended) return;
    this.ended = true;
    this.queue.length = 0;
    clearTimeout(this.timer);
    dropStream(this.stream);
    this.stream = undefined;
    this.deps.onEnd(this);
  }

  private connect(): void {
    if (this.ended) return;
    const gen = ++this.generation;
    this.deps.open().then(
      (stream) => {
        if (this.ended || gen !== this.generation) return dropStream(stream);
        this.stream = stream;
        stream.on('data', (res) => {
          if (gen === this.generation) this.onResponse(res);
        });
        stream.on('error', (err) => {
          if (gen === this.generation) this.lost(err);
        });
        stream.on('end', () => {
          if (gen === this.generation) this.lost(new Error('the watch stream ended'));
        });
        stream.write({
          create_request: { key: this.deps.key, range_end: this.deps.rangeEnd, start_revision: this.next, prev_kv: true, progress_notify: true },
        });
      },
      (err: unknown) => {
        if (gen === this.generation) this.lost(err);
      },
    );
  }

  /** The stream is gone: open another from `next` after a growing delay. */
  private lost(err: unknown): void {
    if (this.ended) return;
    this.generation++;
    dropStream(this.stream);
    this.stream = undefined;
    this.deps.onDisconnect(err);
    const delay = this.backoffMs;
    this.backoffMs = Math.min(this.backoffMs * 2, MAX_BACKOFF_MS);
    this.timer = setTimeout(() => this.connect(), delay);
    this.timer.unref();
  }

  private onResponse(res: IWatchResponse): void {
    if (res.created) this.backoffMs = MIN_BACKOFF_MS;
    if (res.canceled) {
      const compactRevision = Number(res.compact_revision);
      if (compactRevision > 0) {
        const error = new HfError('HF_ERR_STATE_COMPACTED', `revision compacted: cannot watch ${this.prefix} from revision ${this.next}; etcd keeps revisions from ${compactRevision}`, {
          details: { fromRevision: this.next, compactRevision },
        });
        return this.fail({ kind: 'compacted', compactRevision, error });
      }
      const error = new HfError('HF_ERR_CLUSTER_UNAVAILABLE', `etcd cancelled the watch on ${this.prefix}: ${res.cancel_reason || 'no reason given'}`);
      return this.fail({ kind: 'disconnected', error });
    }
    if (res.events.length === 0) {
      // A progress notification: everything up to its header revision has been delivered.
      if (!res.created) this.next = Math.max(this.next, Number(res.header.revision) + 1);
      return;
    }
    // One revision's events always arrive in one response, so a batch starts at a new revision.
    const from = this.next;
    for (const ev of res.events) {
      const rev = Number(ev.kv.mod_revision);
      if (rev < from) continue;
      let event: WatchEvent;
      try {
        event = this.toEvent(ev, rev);
      } catch (e) {
        return this.fail({ kind: 'disconnected', error: e instanceof HfError ? e : new HfError('HF_ERR_INTERNAL', errMessage(e)) });
      }
      this.queue.push(event);
      this.next = rev + 1;
    }
    this.drain();
  }

  private toEvent(ev: IEvent, rev: number): WatchEvent {
    const key = this.deps.storeKey(ev.kv.key);
    const parse = (buf: Buffer): unknown => {
      try {
        return JSON.parse(buf.toString('utf8')) as unknown;
      } catch (e) {
        throw new HfError('HF_ERR_INTERNAL', `corrupt JSON in state entry ${key} at revision ${rev}: ${errMessage(e)}`, { details: { key } });
      }
    };
    if (String(ev.type).toUpperCase() === 'DELETE') {
      // The previous value is missing only when its revision was compacted away.
      return { type: 'delete', key, value: ev.prev_kv ? parse(ev.prev_kv.value) : undefined, modRevision: rev };
    }
    return { type: 'put', key, value: parse(ev.kv.value), modRevision: rev };
  }

  /** Delivers the queue in order; a callback that causes more events never runs nested. */
  private drain(): void {
    if (this.draining) return;
    this.draining = true;
    try {
      while (!this.ended && this.queue.length > 0) {
        const ev = this.queue.shift() as WatchEvent;
        try {
          const r = this.deps.cb(ev) as unknown;
          if (r instanceof Promise) r.catch((err: unknown) => this.deps.onWatcherError(err, ev));
        } catch (err) {
          this.deps.onWatcherError(err, ev);
        }
      }
    } finally {
      this.draining = false;
    }
  }
}
