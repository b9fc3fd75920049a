// Terminal output: tables, sizes and a progress bar/spinner for operations.
import cliProgress from 'cli-progress';
import type { Operation } from '../core/model/operation.js';

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

const SPIN = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
const BAR_WIDTH = 24;

/**
 * One line of an operation's progress: "[#####...]  42% vm.start web1: booting" once it reports a
 * percentage, a spinner frame before that.
 */
export function progressLine(op: Operation, frame: number): string {
  const pct = Math.max(0, Math.min(100, Math.round(op.progress.percent)));
  const filled = Math.round((pct / 100) * BAR_WIDTH);
  const head = pct > 0 ? `[${'#'.repeat(filled)}${'.'.repeat(BAR_WIDTH - filled)}] ${String(pct).padStart(3)}%` : SPIN[frame % SPIN.length]!;
  return `${head} ${op.type} ${op.target.name}: ${op.progress.message}`;
}

/**
 * Renders an operation's progress on stderr: a bar on a terminal, nothing otherwise (so scripts
 * and tests read only the command's output). cli-progress owns the terminal side: redraws at a
 * bounded rate, cuts the line to the terminal's width, clears it at the end.
 */
export class ProgressView {
  private frame = 0;
  private bar: cliProgress.SingleBar | undefined;
  private op: Operation | undefined;

  constructor(private readonly stream: NodeJS.WriteStream = process.stderr) {}

  update(op: Operation): void {
    if (!this.stream.isTTY) return;
    this.op = op;
    this.frame++;
    if (!this.bar) {
      this.bar = new cliProgress.SingleBar({
        stream: this.stream,
        format: () => (this.op ? progressLine(this.op, this.frame) : ''),
        clearOnComplete: true,
        hideCursor: null,
        linewrap: false,
        fps: 10,
      });
      this.bar.start(100, op.progress.percent);
    } else {
      this.bar.update(op.progress.percent);
    }
  }

  done(): void {
    this.bar?.stop();
    this.bar = undefined;
  }
}
