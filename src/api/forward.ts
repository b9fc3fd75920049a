// Forwarding requests to the host of the cluster that holds the record they name. Every daemon
// sees every record, but only the host of an instance acts on it (and only the host that runs an
// operation can wait for it or cancel it): a request about another host's instance or operation
// is passed to that host's cluster listener over mutual TLS (the host's certificate is its client
// certificate, both signed by the cluster CA) and its answer streamed back unchanged. Websockets
// (console, exec) are relayed message by message.
//
// Which routes forward comes from the route table: a path whose first parameter after
// /api/v1/instances/ or /api/v1/containers/ names an instance, or after /api/v1/operations/ an
// operation id. The decision is taken in an onRequest hook, before the body is read, so the body
// travels as the bytes the client sent.
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { IncomingHttpHeaders, IncomingMessage, OutgoingHttpHeaders } from 'node:http';
import https from 'node:https';
import { pipeline } from 'node:stream';
import WebSocket from 'ws';
import { HfError } from '../core/errors.js';

/** The header a forwarding host adds: a request that carries it is always answered locally. */
export const FORWARDED_BY = 'x-hyperfold-forwarded-by';

/** The cluster's certificates as PEM text: its CA, and this host's certificate and key. */
export interface ClusterTls {
  ca: string;
  cert: string;
  key: string;
}

/** What the API needs to know about the cluster; the daemon implements it over its records. */
export interface ClusterRouting {
  localHost: string;
  /** The host that holds this instance; undefined when no such instance (let the local route answer 404). */
  instanceHost(name: string): Promise<string | undefined>;
  /** The host an operation runs on (operations have a `host` field). */
  operationHost(id: string): Promise<string | undefined>;
  /** How to reach a host's cluster listener, or throws HF_ERR_HOST_OFFLINE / HF_ERR_HOST_NOT_FOUND naming the host. */
  endpoint(host: string): Promise<{ url: string /* https://ip:port */; tls: ClusterTls }>;
}

/** What a route's path names: an instance or an operation, in which path parameter. */
export interface ForwardRule {
  kind: 'instance' | 'operation';
  param: string;
}

const INSTANCE_PATH = /^\/api\/v1\/(?:instances|containers)\/:(\w+)(?:\/|$)/;
const OPERATION_PATH = /^\/api\/v1\/operations\/:(\w+)(?:\/|$)/;

/** The record a route path (as declared, `/api/v1/instances/:name/nics`) names, if any. */
export function forwardRule(url: string): ForwardRule | undefined {
  const inst = INSTANCE_PATH.exec(url);
  if (inst) return { kind: 'instance', param: inst[1]! };
  const op = OPERATION_PATH.exec(url);
  if (op) return { kind: 'operation', param: op[1]! };
  return undefined;
}

/** The forwarding rule of every route of a table that names an instance or an operation, by path. */
export function forwardRules(routes: ReadonlyArray<{ url: string }>): Map<string, ForwardRule> {
  const rules = new Map<string, ForwardRule>();
  for (const r of routes) {
    const rule = forwardRule(r.url);
    if (rule) rules.set(r.url, rule);
  }
  return rules;
}

// Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection, never to the next one.
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailer', 'transfer-encoding', 'upgrade']);

/** Request headers for the next hop: no hop-by-hop ones, no credentials (the client certificate authenticates), no Expect (the body is already on its way), and who forwarded it. */
export function forwardHeaders(headers: IncomingHttpHeaders, localHost: string): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  const named = connectionTokens(headers.connection);
  for (const [k, v] of Object.entries(headers)) {
    if (v === undefined || HOP_BY_HOP.has(k) || named.has(k)) continue;
    if (k === 'host' || k === 'authorization' || k === 'expect' || k === FORWARDED_BY) continue;
    out[k] = v;
  }
  out[FORWARDED_BY] = localHost;
  return out;
}

/** Response headers to pass back to the client: all but the hop-by-hop ones. */
export function responseHeaders(headers: IncomingHttpHeaders): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  const named = connectionTokens(headers.connection);
  for (const [k, v] of Object.entries(headers)) {
    if (v !== undefined && !HOP_BY_HOP.has(k) && !named.has(k)) out[k] = v;
  }
  return out;
}

function connectionTokens(value: string | undefined): Set<string> {
  return new Set((value ?? '').split(',').map((t) => t.trim().toLowerCase()).filter(Boolean));
}

/** The request's path and query without `token=` (the browser's form of the bearer token: a credential, dropped like Authorization). */
export function forwardPath(url: string): string {
  const q = url.indexOf('?');
  if (q < 0) return url;
  const kept = url.slice(q + 1).split('&').filter((p) => p !== '' && p !== 'token' && !p.startsWith('token='));
  return kept.length ? `${url.slice(0, q)}?${kept.join('&')}` : url.slice(0, q);
}

/** Close codes a close frame may carry (1005 and 1006 are only ever reported, never sent). */
function sendableCloseCode(code: number): boolean {
  return (code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 && code !== 1006) || (code >= 3000 && code <= 4999);
}

/** Closes `ws` the way its peer was closed: the same code and reason, or abruptly after an abrupt end. */
function closeLike(ws: WebSocket, code: number, reason: Buffer): void {
  if (ws.readyState === WebSocket.CLOSING || ws.readyState === WebSocket.CLOSED) return;
  if (code === 1005) ws.close();
  else if (sendableCloseCode(code)) ws.close(code, reason);
  else ws.terminate();
}

/** A connection to another host's websocket route, opened before the client's upgrade completes: what arrives meanwhile waits. */
class UpstreamSocket {
  private client: WebSocket | undefined;
  private readonly queued: Array<{ data: Buffer; isBinary: boolean }> = [];
  private ended: { code: number; reason: Buffer } | undefined;

  constructor(readonly ws: WebSocket) {
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (this.client) send(this.client, data, isBinary);
      else this.queued.push({ data, isBinary });
    });
    ws.on('close', (code: number, reason: Buffer) => {
      if (this.client) closeLike(this.client, code, reason);
      else this.ended = { code, reason };
    });
    // An error is followed by 'close' (code 1006), which ends the client's side.
    ws.on('error', () => undefined);
  }

  /** Pipes the upgraded client socket and this one both ways. */
  attach(client: WebSocket): void {
    this.client = client;
    for (const m of this.queued.splice(0)) send(client, m.data, m.isBinary);
    if (this.ended) return closeLike(client, this.ended.code, this.ended.reason);
    client.on('message', (data: Buffer, isBinary: boolean) => send(this.ws, data, isBinary));
    client.on('close', (code: number, reason: Buffer) => closeLike(this.ws, code, reason));
  }

  get attached(): boolean {
    return this.client !== undefined;
  }
}

function send(ws: WebSocket, data: Buffer, isBinary: boolean): void {
  if (ws.readyState === WebSocket.OPEN) ws.send(data, { binary: isBinary });
}

/** A host's cluster listener as reached from here: its address and a keep-alive connection pool. */
interface Target {
  host: string;
  url: string;
  hostname: string;
  port: number;
  tls: ClusterTls;
  agent: https.Agent;
}

/** How long a connection (TCP and TLS handshake) to another host may take before it counts as offline. */
const CONNECT_TIMEOUT_MS = 5_000;
/** Idle pooled connections close after this, before the other side's keep-alive timeout (72 s in Fastify) closes them under a request. */
const IDLE_SOCKET_MS = 30_000;

/** A websocket route handler as @fastify/websocket calls it. */
export type WebsocketHandler = (socket: WebSocket, req: FastifyRequest) => void | Promise<void>;

/**
 * The forwarding of one API app: `onRequest` is its hook; `websocket(handler)` wraps a websocket
 * route so that a connection the hook opened to another host is piped instead of served here.
 */
export class Forwarder {
  private readonly targets = new Map<string, Target>();
  private readonly upstreams = new WeakMap<IncomingMessage, UpstreamSocket>();
  private readonly open = new Set<WebSocket>();

  constructor(
    private readonly routing: ClusterRouting,
    private readonly rules: Map<string, ForwardRule>,
  ) {}

  /** The onRequest hook: forwards the request when it names a record of another host. */
  readonly onRequest = async (req: FastifyRequest, reply: FastifyReply): Promise<unknown> => {
    // A forwarded request is answered here, whatever this host thinks: no request goes round in circles.
    if (req.headers[FORWARDED_BY] !== undefined) return undefined;
    const rule = this.rules.get(req.routeOptions.url ?? '');
    if (!rule) return undefined;
    const key = (req.params as Record<string, string | undefined>)[rule.param];
    if (!key) return undefined;
    const host = rule.kind === 'instance' ? await this.routing.instanceHost(key) : await this.routing.operationHost(key);
    if (host === undefined || host === this.routing.localHost) return undefined;
    let target: Target;
    try {
      target = await this.target(host);
    } catch (e) {
      // Showing an instance of an offline host is answered here, from the record (state `unknown`):
      // what there is to know without its host. Everything else about it names the host.
      if (req.method === 'GET' && req.routeOptions.url === '/api/v1/instances/:name' && (e as HfError).code === 'HF_ERR_HOST_OFFLINE') return undefined;
      throw e;
    }
    if ((req as FastifyRequest & { ws?: boolean }).ws) return this.connectWebsocket(req, reply, target);
    return this.proxy(req, reply, target);
  };

  /** Wraps a websocket route handler: a connection forwarded by the hook is relayed, others are served by `handler`. */
  websocket(handler: WebsocketHandler): WebsocketHandler {
    return (socket, req) => {
      const upstream = this.upstreams.get(req.raw);
      if (!upstream) return handler(socket, req);
      this.upstreams.delete(req.raw);
      upstream.attach(socket);
    };
  }

  /** Drops the connection pools and ends relayed websockets (the app is closing). */
  close(): void {
    for (const t of this.targets.values()) t.agent.destroy();
    this.targets.clear();
    for (const ws of this.open) ws.terminate();
    this.open.clear();
  }

  private async target(host: string): Promise<Target> {
    const ep = await this.routing.endpoint(host);
    const known = this.targets.get(host);
    if (known && known.url === ep.url && known.tls.ca === ep.tls.ca && known.tls.cert === ep.tls.cert && known.tls.key === ep.tls.key) return known;
    known?.agent.destroy();
    const u = new URL(ep.url);
    if (u.protocol !== 'https:') throw new HfError('HF_ERR_INTERNAL', `host ${host}: its cluster endpoint ${ep.url} is not an https URL`);
    const t: Target = {
      host,
      url: ep.url,
      hostname: u.hostname.replace(/^\[(.*)\]$/, '$1'),
      port: Number(u.port || 443),
      tls: ep.tls,
      agent: new https.Agent({ keepAlive: true, noDelay: true, timeout: IDLE_SOCKET_MS, ca: ep.tls.ca, cert: ep.tls.cert, key: ep.tls.key }),
    };
    this.targets.set(host, t);
    return t;
  }

  private offline(t: Target, e: Error): HfError {
    return new HfError('HF_ERR_HOST_OFFLINE', `host ${t.host} is offline: cannot reach its cluster listener at ${t.url}: ${e.message}`, { cause: e, details: { host: t.host } });
  }

  /**
   * Sends a request a route has already read to `host` with `body` as its JSON body (a create the
   * scheduler placed on another host) and streams the answer back.
   */
  async send(host: string, req: FastifyRequest, reply: FastifyReply, body: unknown, extraHeaders: Record<string, string> = {}): Promise<void> {
    return this.proxy(req, reply, await this.target(host), Buffer.from(JSON.stringify(body)), extraHeaders);
  }

  /** Sends the request to `t` and streams the answer back; only a failure before the answer begins is an error (HF_ERR_HOST_OFFLINE). */
  private async proxy(req: FastifyRequest, reply: FastifyReply, t: Target, json?: Buffer, extraHeaders: Record<string, string> = {}): Promise<void> {
    const headers = { ...forwardHeaders(req.headers, this.routing.localHost), ...extraHeaders };
    if (json) {
      delete headers['transfer-encoding'];
      headers['content-type'] = 'application/json';
      headers['content-length'] = String(json.length);
    }
    const path = forwardPath(req.raw.url ?? '/');
    const hasBody = json !== undefined || req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length'] ?? 0) > 0;
    const attempt = (): Promise<IncomingMessage> =>
      new Promise((resolve, reject) => {
        const up = https.request({ agent: t.agent, hostname: t.hostname, port: t.port, method: req.method, path, headers });
        up.once('socket', (s) => {
          // (The agent's noDelay option does not reach a TLS socket everywhere: set it here.)
          s.setNoDelay(true);
          if (up.reusedSocket) return;
          const timer = setTimeout(() => up.destroy(new Error(`no connection within ${CONNECT_TIMEOUT_MS / 1000} s`)), CONNECT_TIMEOUT_MS);
          s.once('secureConnect', () => clearTimeout(timer));
          s.once('close', () => clearTimeout(timer));
        });
        let answered = false;
        up.once('response', (res) => {
          answered = true;
          resolve(res);
        });
        // After the answer began, a failure ends the answer's stream (the pipeline below) instead.
        up.on('error', (e: NodeJS.ErrnoException) => {
          if (answered) return;
          // A pooled connection the other side closed while idle: a request without a body can go again.
          if (up.reusedSocket && e.code === 'ECONNRESET' && !hasBody) attempt().then(resolve, reject);
          else reject(e);
        });
        // The client gave up before the answer: so does the forwarded request.
        reply.raw.once('close', () => {
          if (!reply.raw.headersSent) up.destroy();
        });
        if (json) up.end(json);
        else if (hasBody) req.raw.pipe(up);
        else up.end();
      });
    let res: IncomingMessage;
    try {
      res = await attempt();
    } catch (e) {
      throw this.offline(t, e as Error);
    }
    reply.hijack();
    reply.raw.writeHead(res.statusCode ?? 502, res.statusMessage, responseHeaders(res.headers));
    // Headers now: a client of a stream (events, a long wait) learns at once that it is answered.
    reply.raw.flushHeaders();
    // Either side ending early ends the other (pipeline destroys both on an error or a close).
    pipeline(res, reply.raw, () => undefined);
  }

  /** Opens the websocket to `t` before the client's upgrade completes; a refusal is answered as the other host answered it. */
  private connectWebsocket(req: FastifyRequest, reply: FastifyReply, t: Target): Promise<unknown> {
    const protocols = (req.headers['sec-websocket-protocol'] ?? '').split(',').map((p) => p.trim()).filter(Boolean);
    const url = `wss://${t.hostname.includes(':') ? `[${t.hostname}]` : t.hostname}:${t.port}${forwardPath(req.raw.url ?? '/')}`;
    const ws = new WebSocket(url, protocols, {
      ca: t.tls.ca,
      cert: t.tls.cert,
      key: t.tls.key,
      headers: { [FORWARDED_BY]: this.routing.localHost },
      handshakeTimeout: CONNECT_TIMEOUT_MS,
      perMessageDeflate: false,
    });
    this.open.add(ws);
    ws.once('close', () => this.open.delete(ws));
    return new Promise((resolve, reject) => {
      let settled = false;
      ws.once('open', () => {
        settled = true;
        const upstream = new UpstreamSocket(ws);
        this.upstreams.set(req.raw, upstream);
        // The client left before its upgrade completed: nobody will attach.
        req.raw.socket.once('close', () => {
          if (!upstream.attached) ws.terminate();
        });
        resolve(undefined);
      });
      ws.once('unexpected-response', (_up, res: IncomingMessage) => {
        settled = true;
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.once('error', (e) => reject(this.offline(t, e)));
        res.once('end', () => {
          ws.terminate();
          const h = responseHeaders(res.headers);
          delete h['content-length'];
          void reply.status(res.statusCode ?? 502).headers(h).send(Buffer.concat(chunks));
          resolve(reply);
        });
      });
      ws.on('error', (e) => {
        if (!settled) reject(this.offline(t, e));
      });
    });
  }
}
