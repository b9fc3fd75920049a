// The bounded console log of an instance: QEMU (logfile=) and the container console append to it,
// even while the daemon is down; the daemon reads its tail and trims it.
import { open, truncate } from 'node:fs/promises';
import { statSync } from 'node:fs';

/** The tail of a console log (at most `maxBytes`); empty when there is none. */
export async function readConsoleTail(file: string, maxBytes: number): Promise<string> {
  let fh;
  try {
    fh = await open(file, 'r');
  } catch {
    return '';
  }
  try {
    const { size } = await fh.stat();
    const len = Math.min(size, maxBytes);
    const buf = Buffer.alloc(len);
    await fh.read(buf, 0, len, size - len);
    return buf.toString('utf8');
  } finally {
    await fh.close();
  }
}

/** Keeps a console log under `maxBytes`: when it grows past it, the newest half stays. */
export async function trimConsoleLog(file: string, maxBytes: number): Promise<void> {
  // The usual answer (missing or small) without a trip through the thread pool: this is on the start path.
  let size: number;
  try {
    size = statSync(file).size;
  } catch {
    return;
  }
  if (size <= maxBytes) return;
  let fh;
  try {
    fh = await open(file, 'r+');
  } catch {
    return;
  }
  try {
    const { size } = await fh.stat();
    if (size <= maxBytes) return;
    const keep = Math.floor(maxBytes / 2);
    const buf = Buffer.alloc(keep);
    await fh.read(buf, 0, keep, size - keep);
    await truncate(file, 0);
    await fh.write(buf, 0, keep, 0);
  } finally {
    await fh.close();
  }
}
