// The joining host's side of a join, before it has any certificate: it fetches the cluster's CA
// without trusting it, pins it by the fingerprint the token carries (kubeadm's discovery hash),
// and from then on talks to the member only over TLS verified against that CA.
import { request } from 'node:https';
import { HfError } from '../core/errors.js';
import { CLUSTER_PORT } from './config.js';
import { errorFromAnswer } from './peer-client.js';
import { fingerprint } from './pki.js';

interface HttpsAnswer {
  status: number;
  body: unknown;
}

function call(url: URL, opts: { method: 'GET' | 'POST'; body?: unknown; ca?: string; timeoutMs?: number }): Promise<HttpsAnswer> {
  const payload = opts.body === undefined ? undefined : Buffer.from(JSON.stringify(opts.body));
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      {
        method: opts.method,
        // Only the CA fetch goes unverified: its answer is checked against the token's fingerprint.
        ...(opts.ca ? { ca: opts.ca } : { rejectUnauthorized: false }),
        headers: payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {},
        timeout: opts.timeoutMs ?? 30_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let body: unknown = text;
          try {
            body = JSON.parse(text);
          } catch {
            // not JSON: kept as text for the error message
          }
          resolve({ status: res.statusCode ?? 0, body });
        });
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`no answer from ${url.origin} within ${opts.timeoutMs ?? 30_000} ms`)));
    req.on('error', (e) => reject(new HfError('HF_ERR_HOST_OFFLINE', `cannot reach the cluster member at ${url.origin}: ${e.message}`, { cause: e })));
    req.end(payload);
  });
}

function joinUrl(base: string, path: string): URL {
  let u: URL;
  try {
    u = new URL(path, base.endsWith('/') ? base : `${base}/`);
  } catch {
    throw new HfError('HF_ERR_VALIDATION', `${base} is not a URL (expected https://HOST:PORT of a cluster member)`);
  }
  if (u.protocol !== 'https:') throw new HfError('HF_ERR_VALIDATION', `${base}: a cluster member is joined over https (https://HOST:${CLUSTER_PORT})`);
  return u;
}

/** The member's CA certificate, accepted only when its fingerprint is the one the token carries. */
export async function fetchPinnedCa(memberUrl: string, expectedFingerprint: string): Promise<string> {
  const res = await call(joinUrl(memberUrl, 'api/v1/cluster/ca'), { method: 'GET', timeoutMs: 10_000 });
  const caPem = (res.body as { caPem?: unknown }).caPem;
  if (res.status !== 200 || typeof caPem !== 'string') throw new HfError('HF_ERR_HOST_OFFLINE', `${memberUrl} did not answer as a cluster member (HTTP ${res.status})`);
  const got = fingerprint(caPem);
  if (got !== expectedFingerprint) {
    throw new HfError('HF_ERR_TOKEN_INVALID', `the member at ${memberUrl} presents CA ${got}, the token names ${expectedFingerprint}: wrong URL, a token of another cluster, or someone in between`);
  }
  return caPem;
}

/** POSTs the join request to the member, verifying its certificate against the pinned CA. */
export async function requestJoin<T>(memberUrl: string, caPem: string, body: unknown): Promise<T> {
  const res = await call(joinUrl(memberUrl, 'api/v1/cluster/members'), { method: 'POST', body, ca: caPem, timeoutMs: 60_000 });
  if (res.status >= 200 && res.status < 300) return res.body as T;
  throw errorFromAnswer(res.status, res.body, `the member at ${memberUrl} refused the join`);
}
