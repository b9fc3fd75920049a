// The live event stream: lifecycle changes and operation updates, published in-process and
// served to clients over SSE. Each event gets a sequence number so a client can tell gaps.
export interface HfEvent {
  seq: number;
  at: string;
  /** e.g. "instance.state", "instance.created", "instance.deleted", "operation", "instance.console" */
  type: string;
  host: string;
  data: Record<string, unknown>;
}

type Listener = (ev: HfEvent) => void;

export class EventBus {
  private seq = 0;
  private readonly listeners = new Set<Listener>();
  private readonly recent: HfEvent[] = [];

  constructor(private readonly host: string, private readonly keep = 500) {}

  /** Publishes a snapshot of `data`: publishers keep mutating their objects (an operation's progress), and a replayed event must show what was true when it happened. */
  publish(type: string, data: Record<string, unknown>): HfEvent {
    const ev: HfEvent = { seq: ++this.seq, at: new Date().toISOString(), type, host: this.host, data: structuredClone(data) };
    this.recent.push(ev);
    if (this.recent.length > this.keep) this.recent.splice(0, this.recent.length - this.keep);
    for (const l of this.listeners) {
      try {
        l(ev);
      } catch {
        // a broken listener must not stop the others
      }
    }
    return ev;
  }

  subscribe(listener: Listener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Events after `seq` still in the recent buffer (for clients that reconnect). */
  since(seq: number): HfEvent[] {
    return this.recent.filter((e) => e.seq > seq);
  }

  /** Resolves with the first event matching `pred`, or rejects after `timeoutMs`. */
  waitFor(pred: (ev: HfEvent) => boolean, timeoutMs: number): Promise<HfEvent> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new Error(`no matching event within ${timeoutMs} ms`));
      }, timeoutMs);
      const off = this.subscribe((ev) => {
        if (!pred(ev)) return;
        clearTimeout(timer);
        off();
        resolve(ev);
      });
    });
  }
}
