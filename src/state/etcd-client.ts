// The etcd3 client as the etcd store uses it: connection options, fault handling and the mapping
// of client errors to HfErrors.
//
// Fault handling. The etcd3 client retries every "recoverable" error three times by default and
// opens a per-host circuit breaker for 5 s after three failures. Both are wrong for a store: a
// write whose outcome is unknown (deadline, dropped connection, "request timed out") must not be
// sent again (a compare-and-swap would then fail on its own success), and a breaker that stays
// open for 5 s after etcd came back delays recovery. So the client gets no global retry; the
// store retries itself (EtcdStateStore.call) only where that is safe: a write when the request
// never reached a member (connection refused, no leader), a read on any connection failure. Each
// host gets a small gate that skips it for a moment after a connection failure, so the retry
// goes to another member (the pool only moves to the next host when a host's policy refuses the
// call); with one endpoint there is nothing else to try and the gate stays open.
import { Etcd3, isRecoverableError, EtcdLeaseInvalidError, type IOptions } from 'etcd3';
import { HfError } from '../core/errors.js';
import { errMessage } from './sqlite-values.js';

export interface EtcdTls {
  /** PEM text of the CA that signed the members' certificates. */
  ca: string;
  /** PEM text of this client's certificate. */
  cert: string;
  /** PEM text of this client's private key. */
  key: string;
}

type Policy = NonNullable<NonNullable<IOptions['faultHandling']>['global']>;

/** How long a host that refused a connection is skipped while other hosts are tried. */
const HOST_SKIP_MS = 1_000;

/** Thrown by a host gate instead of calling a host that just failed: the pool then tries the next host. */
export class HostSkipped extends Error {
  constructor(host: string) {
    super(`etcd member ${host} failed a moment ago`);
    this.name = 'HostSkipped';
  }
}

/**
 * The etcd3 pool calls only `execute` of its policies (with a context nobody here reads), so a
 * plain object stands in for a cockatiel policy.
 */
function policy(execute: (fn: () => unknown) => Promise<unknown>): Policy {
  return { execute } as unknown as Policy;
}

/** One attempt, no retry: EtcdStateStore.call decides what may be tried again. */
const SINGLE_ATTEMPT = policy(async (fn) => fn());

/** Skips `host` for HOST_SKIP_MS after a connection failure (never when it is the only host). */
function hostGate(host: string, alone: boolean): Policy {
  let skipUntil = 0;
  return policy(async (fn) => {
    if (!alone && Date.now() < skipUntil) throw new HostSkipped(host);
    try {
      const r = await fn();
      skipUntil = 0;
      return r;
    } catch (e) {
      if (isConnectionError(e)) skipUntil = Date.now() + HOST_SKIP_MS;
      throw e;
    }
  });
}

/** Endpoints as the client takes them; refuses a scheme that does not match the TLS setting. */
export function checkEndpoints(endpoints: string[], tls: boolean): string[] {
  if (!Array.isArray(endpoints) || endpoints.length === 0) throw new HfError('HF_ERR_VALIDATION', 'etcd store: at least one endpoint is needed');
  return endpoints.map((e) => {
    const m = /^(?:(https?):\/\/)?([^/\s]+:\d+)\/?$/.exec(e);
    if (m === null) throw new HfError('HF_ERR_VALIDATION', `etcd endpoint ${JSON.stringify(e)} is not [http[s]://]host:port`);
    const scheme = m[1] ?? (tls ? 'https' : 'http');
    if ((scheme === 'https') !== tls) {
      throw new HfError('HF_ERR_VALIDATION', `etcd endpoint ${e}: ${tls ? 'TLS is configured, so endpoints are https://' : 'https:// needs the tls option (CA, certificate and key)'}`);
    }
    return `${scheme}://${m[2]}`;
  });
}

/**
 * `keepaliveMs`: how often an open connection is pinged, and how long an answer may take, before
 * gRPC calls it dead (a member cut off by the network: calls and watch streams on it would hang
 * until then). etcd refuses pings more often than its --grpc-keepalive-min-time (5 s by default;
 * the members Hyperfold runs allow 1 s), so the default suits any etcd.
 */
export function makeClient(endpoints: string[], tls: EtcdTls | undefined, keepaliveMs = 10_000): Etcd3 {
  const alone = endpoints.length === 1;
  return new Etcd3({
    hosts: endpoints,
    ...(tls && {
      credentials: { rootCertificate: Buffer.from(tls.ca), certChain: Buffer.from(tls.cert), privateKey: Buffer.from(tls.key) },
    }),
    grpcOptions: {
      // A list of many records can exceed gRPC's default 4 MiB (list() also pages).
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      // Reconnect within a second of a member coming back, not after gRPC's default of up to 2 min.
      'grpc.initial_reconnect_backoff_ms': 200,
      'grpc.max_reconnect_backoff_ms': 1_000,
      // Notice a dead peer, also on an idle watch stream.
      'grpc.keepalive_time_ms': keepaliveMs,
      'grpc.keepalive_timeout_ms': Math.max(1_000, Math.round(keepaliveMs / 2)),
      'grpc.keepalive_permit_without_calls': 1,
    },
    faultHandling: {
      global: SINGLE_ATTEMPT,
      host: (host: string) => hostGate(host, alone),
    },
  });
}

/** The gRPC status code of a client error, when it has one. */
function grpcCode(e: unknown): number | undefined {
  if (typeof e === 'object' && e !== null && 'code' in e && typeof e.code === 'number') return e.code;
  return undefined;
}

/**
 * True when the error means etcd could not be reached or could not answer (no connection,
 * deadline, no leader, dropped stream): the store is unavailable, not the request wrong.
 */
export function isConnectionError(e: unknown): boolean {
  if (e instanceof HostSkipped) return true;
  if (typeof e !== 'object' || e === null) return false;
  if (isRecoverableError(e as Error)) return true;
  const code = grpcCode(e);
  return code === 4 || code === 14; // DEADLINE_EXCEEDED, UNAVAILABLE (raw, uncast errors)
}

/**
 * True when the request certainly did not reach etcd's state machine, so even a write can be
 * sent again (to another member): no connection could be made, or the member had no leader.
 */
export function isNotDelivered(e: unknown): boolean {
  if (e instanceof HostSkipped) return true;
  if (!isConnectionError(e)) return false;
  return /No connection established|ECONNREFUSED|EHOSTUNREACH|ENETUNREACH|failed to connect|etcdserver: no leader|etcdserver: not capable/i.test(errMessage(e));
}

export function isLeaseNotFound(e: unknown): boolean {
  return e instanceof EtcdLeaseInvalidError || /requested lease not found/.test(errMessage(e));
}

export function isCompactedError(e: unknown): boolean {
  return /required revision has been compacted/.test(errMessage(e));
}

export function isFutureRevisionError(e: unknown): boolean {
  return /required revision is a future revision/.test(errMessage(e));
}

export function unavailable(endpoints: string[], what: string, cause: unknown): HfError {
  return new HfError('HF_ERR_CLUSTER_UNAVAILABLE', `etcd (${endpoints.join(', ')}) is unavailable: ${what} failed: ${errMessage(cause)}`, {
    cause,
    details: { endpoints },
  });
}
