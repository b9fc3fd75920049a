// An undo stack for multi-step work (after Incus's revert package): each step that changes the
// world registers how to take it back; on failure the stack unwinds newest-first; on success
// it is dropped. Creating an instance that half-fails leaves no stray file, tap or row.
import type { Logger } from './log.js';

export class UndoStack {
  private steps: Array<{ what: string; undo: () => Promise<void> | void }> = [];

  constructor(private readonly log?: Logger) {}

  add(what: string, undo: () => Promise<void> | void): void {
    this.steps.push({ what, undo });
  }

  /** Runs every registered undo, newest first; failures are logged and do not stop the unwind. */
  async unwind(): Promise<void> {
    const steps = this.steps.reverse();
    this.steps = [];
    for (const s of steps) {
      try {
        await s.undo();
      } catch (e) {
        this.log?.warn('undo step failed', { step: s.what, error: (e as Error).message });
      }
    }
  }

  /** Success: forget the undo steps. */
  commit(): void {
    this.steps = [];
  }

  /** Runs `fn` with a fresh stack; unwinds it if `fn` throws, then rethrows. */
  static async run<T>(fn: (undo: UndoStack) => Promise<T>, log?: Logger): Promise<T> {
    const undo = new UndoStack(log);
    try {
      const r = await fn(undo);
      undo.commit();
      return r;
    } catch (e) {
      await undo.unwind();
      throw e;
    }
  }
}
