// Fetches an http(s) URL into a file with progress; a failed or aborted download leaves no file.
import { createWriteStream } from 'node:fs';
import { rm } from 'node:fs/promises';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { HfError } from '../core/errors.js';
import { isNoSpace } from './qemu-img.js';

export async function download(
  url: string,
  dest: string,
  opts: { onProgress?: (percent: number, bytes: number, total: number | undefined) => void; beforeWrite?: (total: number | undefined) => void; timeoutMs?: number } = {},
): Promise<{ bytes: number; contentType: string | undefined }> {
  let res: Response;
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), opts.timeoutMs ?? 30 * 60_000);
  try {
    try {
      res = await fetch(url, { redirect: 'follow', signal: ac.signal });
    } catch (e) {
      throw new HfError('HF_ERR_VALIDATION', `cannot download ${url}: ${(e as Error).message}`, { cause: e });
    }
    if (!res.ok || !res.body) throw new HfError('HF_ERR_VALIDATION', `cannot download ${url}: HTTP ${res.status} ${res.statusText}`);
    const len = Number(res.headers.get('content-length') ?? NaN);
    const total = Number.isFinite(len) && len > 0 ? len : undefined;
    opts.beforeWrite?.(total);
    let bytes = 0;
    let lastPct = -1;
    const counter = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        bytes += chunk.length;
        if (total) {
          const pct = Math.floor((bytes / total) * 100);
          if (pct !== lastPct) {
            lastPct = pct;
            opts.onProgress?.(pct, bytes, total);
          }
        }
        cb(null, chunk);
      },
    });
    try {
      await pipeline(Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>), counter, createWriteStream(dest, { mode: 0o600 }));
    } catch (e) {
      await rm(dest, { force: true });
      const msg = (e as Error).message;
      if (isNoSpace(msg) || (e as NodeJS.ErrnoException).code === 'ENOSPC') throw new HfError('HF_ERR_POOL_FULL', `no space left while downloading ${url}`, { cause: e });
      throw new HfError('HF_ERR_VALIDATION', `download of ${url} failed: ${msg}`, { cause: e });
    }
    if (total !== undefined && bytes !== total) {
      await rm(dest, { force: true });
      throw new HfError('HF_ERR_BAD_IMAGE', `download of ${url} is truncated: got ${bytes} of ${total} bytes`);
    }
    return { bytes, contentType: res.headers.get('content-type') ?? undefined };
  } finally {
    clearTimeout(timer);
  }
}
