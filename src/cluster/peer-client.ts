// Requests from this host to another host's cluster listener that are not forwarded user
// requests (those are api/forward.ts's): this host's own calls, authenticated by its cluster
// certificate, e.g. downloading an image's files. An answer other than 200 becomes the HfError
// the other host sent.
import https from 'node:https';
import type { IncomingMessage } from 'node:http';
import { ERROR_CODES, HfError, type ErrorCode } from '../core/errors.js';

/** The cluster's certificates as PEM text: its CA, and this host's certificate and key. */
export interface PeerTls {
  ca: string;
  cert: string;
  key: string;
}

/** How long connecting (TCP and the TLS handshake) may take, and how long an answer may stall. */
const CONNECT_TIMEOUT_MS = 5_000;
const IDLE_TIMEOUT_MS = 60_000;
/** An error answer is JSON of a few hundred bytes; more is not read. */
const MAX_ERROR_BODY = 64 * 1024;

/** The HfError an answer's `{ error: { code, message, details } }` body carries, or one that says what came back. */
export function errorFromAnswer(status: number, body: unknown, what: string): HfError {
  const err = (body as { error?: { code?: unknown; message?: unknown; details?: unknown } } | undefined)?.error;
  if (typeof err?.code === 'string' && typeof err.message === 'string') {
    const code: ErrorCode = err.code in ERROR_CODES ? (err.code as ErrorCode) : 'HF_ERR_INTERNAL';
    return new HfError(code, err.message, err.details && typeof err.details === 'object' ? { details: err.details as Record<string, unknown> } : {});
  }
  return new HfError('HF_ERR_INTERNAL', `${what}: HTTP ${status} ${JSON.stringify(body).slice(0, 200)}`);
}

async function readBody(res: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of res) {
    size += (c as Buffer).length;
    if (size > MAX_ERROR_BODY) break;
    chunks.push(c as Buffer);
  }
  res.destroy();
  const text = Buffer.concat(chunks).toString('utf8');
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/**
 * GETs `url` (https, another host's cluster listener) with this host's certificate and answers
 * the response, to be read as a stream, once it says 200. Unreachable: HF_ERR_HOST_OFFLINE naming
 * `host`; any other answer: the error it carries. Aborting `signal` ends the request.
 */
export function getFromPeer(url: string, tls: PeerTls, opts: { host: string; signal?: AbortSignal }): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = https.request(url, { method: 'GET', ca: tls.ca, cert: tls.cert, key: tls.key, signal: opts.signal, timeout: IDLE_TIMEOUT_MS });
    const connect = setTimeout(() => req.destroy(new Error(`no connection within ${CONNECT_TIMEOUT_MS / 1000} s`)), CONNECT_TIMEOUT_MS);
    req.once('socket', (s) => {
      // A pooled connection is connected already.
      if (req.reusedSocket) clearTimeout(connect);
      else s.once('secureConnect', () => clearTimeout(connect));
    });
    req.on('timeout', () => req.destroy(new Error(`no data for ${IDLE_TIMEOUT_MS / 1000} s`)));
    req.once('response', (res) => {
      clearTimeout(connect);
      if (res.statusCode === 200) return resolve(res);
      readBody(res).then((body) => reject(errorFromAnswer(res.statusCode ?? 0, body, `host ${opts.host} answered ${url}`)), reject);
    });
    req.once('error', (e) => {
      clearTimeout(connect);
      if (opts.signal?.aborted) return reject(opts.signal.reason);
      reject(new HfError('HF_ERR_HOST_OFFLINE', `host ${opts.host} is offline: cannot reach its cluster listener at ${new URL(url).origin}: ${e.message}`, { cause: e, details: { host: opts.host } }));
    });
    req.end();
  });
}
