// `qemu-img convert -p` prints its progress as "    (12.34/100%)\r" records on stdout, with no
// newline between them and chunk boundaries anywhere. This parser turns the byte stream into
// percentages (0-100, never going backwards).

export class QemuImgProgressParser {
  private buf = '';
  private last = -1;

  /** Feeds a chunk of stdout; returns the new percentages it completed (possibly none). */
  push(chunk: string | Buffer): number[] {
    this.buf += typeof chunk === 'string' ? chunk : chunk.toString('utf8');
    const out: number[] = [];
    let i: number;
    while ((i = this.buf.search(/[\r\n]/)) >= 0) {
      const record = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + 1);
      const p = parseProgressRecord(record);
      if (p !== undefined && p > this.last) {
        this.last = p;
        out.push(p);
      }
    }
    // A record never grows beyond a few dozen characters: anything longer is noise.
    if (this.buf.length > 256) this.buf = this.buf.slice(-64);
    return out;
  }

  /** The last percentage seen (-1 before any). */
  get percent(): number {
    return this.last;
  }
}

/** "    (45.45/100%)" → 45.45; anything else → undefined. */
export function parseProgressRecord(record: string): number | undefined {
  const m = /\(\s*(\d{1,3}(?:\.\d+)?)\s*\/\s*100%\s*\)/.exec(record);
  if (!m) return undefined;
  const v = Number(m[1]);
  if (!Number.isFinite(v) || v < 0 || v > 100) return undefined;
  return v;
}
