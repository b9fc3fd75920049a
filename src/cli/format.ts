// Terminal output: tables, sizes and a progress bar/spinner for operations.
import type { Operation } from '../core/model/operation.js';

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

const SPIN = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/** Renders an operation's progress on stderr: a bar on a terminal, nothing otherwise. */
export class ProgressView {
  private frame = 0;
  private drawn = false;
  private readonly tty = Boolean(process.stderr.isTTY);

  update(op: Operation): void {
    if (!this.tty) return;
    const pct = op.progress.percent;
    const width = 24;
    const filled = Math.round((pct / 100) * width);
    const bar = pct > 0 ? `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${String(pct).padStart(3)}%` : SPIN[this.frame++ % SPIN.length]!;
    process.stderr.write(`\r\x1b[2K${bar} ${op.type} ${op.target.name}: ${op.progress.message}`.slice(0, (process.stderr.columns || 100) - 1));
    this.drawn = true;
  }

  done(): void {
    if (this.drawn) process.stderr.write('\r\x1b[2K');
    this.drawn = false;
  }
}
