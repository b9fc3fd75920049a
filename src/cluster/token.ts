// Join tokens: `hfj1.<base64url JSON>` carrying the cluster id, the token id, its secret, the CA's
// fingerprint (the joiner pins the CA by it before it trusts anything the cluster sends) and the
// expiry. The cluster keeps only the secret's SHA-256 under the token id; a join consumes it.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { HfError } from '../core/errors.js';

const PREFIX = 'hfj1.';

export interface JoinToken {
  clusterId: string;
  id: string;
  secret: string;
  caFingerprint: string;
  /** Unix time in seconds. */
  expiresAt: number;
}

export function newJoinToken(clusterId: string, caFingerprint: string, ttlSeconds: number, now = Date.now()): JoinToken {
  return { clusterId, id: randomBytes(8).toString('hex'), secret: randomBytes(24).toString('base64url'), caFingerprint, expiresAt: Math.floor(now / 1000) + ttlSeconds };
}

export function encodeJoinToken(t: JoinToken): string {
  const body = { c: t.clusterId, i: t.id, s: t.secret, f: t.caFingerprint, e: t.expiresAt };
  return PREFIX + Buffer.from(JSON.stringify(body)).toString('base64url');
}

export function decodeJoinToken(text: string): JoinToken {
  const bad = (why: string) => new HfError('HF_ERR_TOKEN_INVALID', `invalid join token: ${why} (get a new one with \`hyperfold cluster token\` on a member)`);
  if (!text.startsWith(PREFIX)) throw bad('it does not start with hfj1.');
  let b: Record<string, unknown>;
  try {
    b = JSON.parse(Buffer.from(text.slice(PREFIX.length), 'base64url').toString('utf8')) as Record<string, unknown>;
  } catch {
    throw bad('it is not readable');
  }
  if (typeof b.c !== 'string' || typeof b.i !== 'string' || typeof b.s !== 'string' || typeof b.f !== 'string' || typeof b.e !== 'number') throw bad('fields are missing');
  return { clusterId: b.c, id: b.i, secret: b.s, caFingerprint: b.f, expiresAt: b.e };
}

export function tokenExpired(t: { expiresAt: number }, now = Date.now()): boolean {
  return Math.floor(now / 1000) >= t.expiresAt;
}

export function hashSecret(secret: string): string {
  return createHash('sha256').update(secret).digest('hex');
}

export function secretMatches(secret: string, hash: string): boolean {
  const a = Buffer.from(hashSecret(secret), 'hex');
  const b = Buffer.from(hash, 'hex');
  return a.length === b.length && timingSafeEqual(a, b);
}
