// Watch delivery for the SQLite store. Committed changes are queued per watcher and delivered
// from a microtask, one watcher queue at a time, never from inside a write: a callback that
// writes to the store sees its own event later, in order, not re-entrantly.
import type { Watch, WatchEvent, WatchFailure } from './store.js';

/** A committed change, value still as JSON text: each watcher parses its own copy. */
export interface Change {
  type: 'put' | 'delete';
  key: string;
  json: string;
  rev: number;
}

interface Watcher {
  prefix: string;
  cb: (ev: WatchEvent) => void;
  onError: (failure: WatchFailure) => void;
  /** Only events with a revision above this are delivered (replayed ones included). */
  afterRevision: number;
  queue: WatchEvent[];
  scheduled: boolean;
  ended: boolean;
}

export interface WatchHubOptions {
  /** Called when a watch callback throws (or its promise rejects). */
  onWatcherError: (err: unknown, ev: WatchEvent) => void;
  /** Called for a watch failure when the watcher gave no onError. */
  onUnhandledFailure: (failure: WatchFailure) => void;
}

export class WatchHub {
  private readonly watchers = new Set<Watcher>();

  constructor(private readonly opts: WatchHubOptions) {}

  /** Registers a watcher that first gets `replay` (already filtered to revisions above `afterRevision`). */
  add(prefix: string, cb: (ev: WatchEvent) => void, onError: ((f: WatchFailure) => void) | undefined, afterRevision: number, replay: WatchEvent[]): Watch {
    const w: Watcher = { prefix, cb, onError: onError ?? this.opts.onUnhandledFailure, afterRevision, queue: replay, scheduled: false, ended: false };
    this.watchers.add(w);
    this.schedule(w);
    return { cancel: () => this.end(w) };
  }

  /** A watch that failed before it started: reports `failure` from a microtask and delivers nothing. */
  failed(onError: ((f: WatchFailure) => void) | undefined, failure: WatchFailure): Watch {
    let cancelled = false;
    const report = onError ?? this.opts.onUnhandledFailure;
    queueMicrotask(() => {
      if (!cancelled) this.report(report, failure);
    });
    return {
      cancel: () => {
        cancelled = true;
      },
    };
  }

  /** Queues committed changes for every interested watcher (each gets its own parsed copy). */
  dispatch(changes: Change[]): void {
    for (const w of this.watchers) {
      let added = false;
      for (const c of changes) {
        if (c.rev > w.afterRevision && c.key.startsWith(w.prefix)) {
          w.queue.push({ type: c.type, key: c.key, value: JSON.parse(c.json) as unknown, modRevision: c.rev });
          added = true;
        }
      }
      if (added) this.schedule(w);
    }
  }

  /** Ends every watcher with `failure` (queued events are dropped: the watcher relists anyway). */
  failAll(failure: WatchFailure): void {
    for (const w of [...this.watchers]) {
      this.end(w);
      queueMicrotask(() => this.report(w.onError, failure));
    }
  }

  get size(): number {
    return this.watchers.size;
  }

  private end(w: Watcher): void {
    w.ended = true;
    w.queue.length = 0;
    this.watchers.delete(w);
  }

  private schedule(w: Watcher): void {
    if (w.scheduled || w.queue.length === 0) return;
    w.scheduled = true;
    queueMicrotask(() => this.drain(w));
  }

  /** Delivers a watcher's queue in order; events queued by its own callback are delivered here too. */
  private drain(w: Watcher): void {
    try {
      while (!w.ended && w.queue.length > 0) {
        const ev = w.queue.shift() as WatchEvent;
        try {
          const r = w.cb(ev) as unknown;
          if (r instanceof Promise) r.catch((err: unknown) => this.reportWatcherError(err, ev));
        } catch (err) {
          this.reportWatcherError(err, ev);
        }
      }
    } finally {
      w.scheduled = false;
    }
  }

  private report(onError: (f: WatchFailure) => void, failure: WatchFailure): void {
    try {
      onError(failure);
    } catch {
      // a throwing handler must not take the store down: the failure still gets logged
      if (onError !== this.opts.onUnhandledFailure) this.opts.onUnhandledFailure(failure);
    }
  }

  private reportWatcherError(err: unknown, ev: WatchEvent): void {
    try {
      this.opts.onWatcherError(err, ev);
    } catch {
      // an error reporter that throws must not break delivery either
    }
  }
}
