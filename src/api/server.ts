// The REST API under /api/v1 (Fastify). Listeners share one route table: TCP, which requires the
// bearer token; a root-only unix socket in the data directory, which does not; and in a cluster
// the cluster listener (HTTPS), where a client certificate signed by the cluster CA stands for
// the token. In a cluster, a request about another host's instance or operation is forwarded to
// that host (forward.ts).
import Fastify, { type FastifyBaseLogger, type FastifyError, type FastifyInstance } from 'fastify';
import websocket from '@fastify/websocket';
import { timingSafeEqual } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import { z } from 'zod';
import { HfError, toHfError } from '../core/errors.js';
import type { ExecSession } from '../drivers/driver.js';
import type { Logger } from '../util/log.js';
import { Forwarder, forwardRules, type ClusterTls, type WebsocketHandler } from './forward.js';
import { buildOpenApi } from './openapi.js';
import { RouteTable } from './routes.js';
import { PUBLIC_CLUSTER_ROUTES, registerClusterRoutes } from './routes/cluster.js';
import { registerContainerRoutes } from './routes/containers.js';
import { registerInstanceRoutes } from './routes/instances.js';
import { registerNetworkRoutes } from './routes/networks.js';
import { registerSystemRoutes } from './routes/system.js';
import { registerStorageRoutes } from './routes/storage.js';
import type { ApiServices } from './services.js';

export interface ApiOptions {
  /** Bearer token required on this listener; undefined = no auth (the root-only unix socket). */
  token?: string;
  log: Logger;
  version: string;
  /**
   * Makes this app the cluster listener: HTTPS with the host's certificate, asking clients for
   * theirs. A request whose certificate chains to the cluster CA is authenticated (another host
   * forwarding); without a certificate the bearer token is required (none configured: refused);
   * a certificate the CA did not sign is refused.
   */
  clusterTls?: ClusterTls;
}

export function buildRouteTable(svc: ApiServices, version: string): RouteTable {
  const table = new RouteTable();
  registerInstanceRoutes(table, svc);
  registerSystemRoutes(table, svc);
  registerNetworkRoutes(table, svc);
  registerContainerRoutes(table, svc);
  registerStorageRoutes(table, svc);
  registerClusterRoutes(table, svc);
  table.add({
    method: 'GET',
    url: '/api/v1/events',
    summary: 'Live event stream (server-sent events): instance.state, instance.crashed, operation, …; ?since=SEQ replays recent events, ?types=a,b filters',
    tag: 'events',
    query: z.object({ since: z.coerce.number().int().optional(), types: z.string().optional() }),
    responses: { 200: 'text/event-stream' },
    docOnly: true,
    handler: async () => undefined,
  });
  table.add({
    method: 'GET',
    url: '/api/v1/instances/:name/console',
    summary: 'Interactive console (websocket upgrade): binary frames both ways',
    tag: 'instances',
    responses: { 101: 'switching protocols to a websocket' },
    docOnly: true,
    handler: async () => undefined,
  });
  table.add({
    method: 'GET',
    url: '/api/v1/containers/:name/exec',
    summary:
      'Interactive exec in a container (websocket upgrade). First message: JSON { command, env?, cwd?, tty?, cols?, rows? }. ' +
      'Then: client binary frames are stdin, client text frames are control ({"resize":{"cols","rows"}}, {"eof":true}, {"signal":"SIGINT"}); ' +
      'server binary frames carry output, their first byte the stream (1 stdout, 2 stderr; a terminal has only 1); the last server text frame is {"exit":CODE}',
    tag: 'containers',
    responses: { 101: 'switching protocols to a websocket' },
    docOnly: true,
    handler: async () => undefined,
  });
  const openapi = buildOpenApi(table, version);
  table.add({
    method: 'GET',
    url: '/api/v1/openapi.json',
    summary: 'This OpenAPI document',
    tag: 'system',
    responses: { 200: 'OpenAPI 3 document' },
    handler: async () => openapi,
  });
  return table;
}

export async function buildApp(svc: ApiServices, opts: ApiOptions): Promise<FastifyInstance> {
  // Fastify logs through our pino (its own warnings and errors only: requests are not logged).
  const pinoLog: FastifyBaseLogger | undefined = opts.log.pino?.child({ component: 'api' }, { level: 'warn' });
  const tls = opts.clusterTls;
  // The certificate is checked in the hook below, not in the handshake: a client without one may still bring the token.
  const https = tls ? { https: { ca: tls.ca, cert: tls.cert, key: tls.key, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2' as const } } : {};
  const app = Fastify({
    ...(pinoLog ? { loggerInstance: pinoLog } : { logger: false }),
    ...https,
    disableRequestLogging: true,
    bodyLimit: 4 * 1024 * 1024,
    forceCloseConnections: true,
  }) as unknown as FastifyInstance;
  await app.register(websocket);
  // Answers leave at once: with Nagle's algorithm a reply written in two pieces waits for the
  // client's delayed ACK (tens of ms on every forwarded call between hosts).
  app.server.on(tls ? 'secureConnection' : 'connection', (socket: { setNoDelay(v: boolean): void }) => socket.setNoDelay(true));
  const table = buildRouteTable(svc, opts.version);
  const peerOnly = new Set(table.routes.filter((r) => r.peerOnly).map((r) => r.url));

  app.addHook('onRequest', async (req) => {
    if (req.url === '/api/v1/openapi.json' || req.url === '/') return;
    // A joining host has neither the token nor a certificate yet: the join token in the body is its credential.
    if (PUBLIC_CLUSTER_ROUTES.has(`${req.method} ${req.url.split('?')[0]}`)) return;
    if (tls) {
      const socket = req.raw.socket as Partial<TLSSocket>;
      if (socket.authorized === true) return;
      const peer = socket.getPeerCertificate?.();
      if (peer && Object.keys(peer).length > 0) {
        throw new HfError('HF_ERR_UNAUTHORIZED', `client certificate refused: not signed by this cluster's CA (${String(socket.authorizationError)})`);
      }
      if (!opts.token) throw new HfError('HF_ERR_UNAUTHORIZED', "this listener requires a client certificate signed by the cluster's CA");
    }
    // Whatever the credential, a route between hosts answers only to another host's certificate.
    if (peerOnly.has(req.routeOptions.url ?? '')) {
      throw new HfError('HF_ERR_FORBIDDEN', `${req.method} ${req.url.split('?')[0]} is for the other hosts of the cluster only (their cluster certificate, on the cluster listener)`);
    }
    if (!opts.token) return;
    const header = req.headers.authorization;
    let given: string | undefined;
    if (header?.startsWith('Bearer ')) given = header.slice(7).trim();
    else {
      // Browsers cannot set headers on EventSource and WebSocket: allow ?token= there.
      const q = req.query as Record<string, unknown> | undefined;
      if (typeof q?.token === 'string') given = q.token;
    }
    if (!given) throw new HfError('HF_ERR_UNAUTHORIZED', 'missing bearer token (Authorization: Bearer <token>)');
    const a = Buffer.from(given);
    const b = Buffer.from(opts.token);
    if (a.length !== b.length || !timingSafeEqual(a, b)) throw new HfError('HF_ERR_UNAUTHORIZED', 'invalid bearer token');
  });

  app.setErrorHandler((err: FastifyError | HfError | Error, req, reply) => {
    let e: HfError;
    if (err instanceof HfError) e = err;
    else if ('code' in err && typeof err.code === 'string' && err.code.startsWith('FST_ERR_CTP')) {
      e = new HfError('HF_ERR_BAD_JSON', `malformed request body: ${err.message}`, { cause: err });
    } else if (err instanceof SyntaxError || ('statusCode' in err && err.statusCode === 400)) {
      e = new HfError('HF_ERR_BAD_JSON', `malformed request body: ${err.message}`, { cause: err });
    } else if ('statusCode' in err && err.statusCode === 413) {
      e = new HfError('HF_ERR_VALIDATION', 'request body too large', { cause: err });
    } else {
      e = toHfError(err);
      opts.log.error('unhandled API error', { url: req.url, error: err.message, stack: err.stack });
    }
    void reply.status(e.status).send({ error: e.toJSON() });
  });

  // A cluster member that lost its store still answers reads from its caches: it marks them stale.
  if (svc.stale) {
    const stale = svc.stale;
    app.addHook('onSend', async (_req, reply, payload) => {
      if (stale()) void reply.header('x-hyperfold-stale', 'true');
      return payload;
    });
  }

  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send({ error: { code: 'HF_ERR_NOT_FOUND', message: `no route ${req.method} ${req.url.split('?')[0]}` } });
  });

  // In a cluster, after the authentication above: requests about another host's records go there.
  let forwarder: Forwarder | undefined;
  if (svc.cluster) {
    const f = new Forwarder(svc.cluster, forwardRules(table.routes));
    app.addHook('onRequest', f.onRequest);
    app.addHook('onClose', async () => f.close());
    forwarder = f;
  }
  table.register(app, svc.operations, forwarder);
  registerStreamRoutes(app, svc, forwarder);
  return app;
}

/** Routes that hold a connection open: the event stream (SSE) and the console (websocket). */
function registerStreamRoutes(app: FastifyInstance, svc: ApiServices, forwarder: Forwarder | undefined): void {
  // A websocket forwarded to another host is relayed there instead of served here.
  const ws = (handler: WebsocketHandler): WebsocketHandler => (forwarder ? forwarder.websocket(handler) : handler);
  app.get('/api/v1/events', async (req, reply) => {
    const q = req.query as { since?: string; types?: string };
    const types = q.types ? new Set(q.types.split(',')) : undefined;
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' });
    res.write(': hyperfold event stream\n\n');
    const send = (ev: { seq: number; type: string }) => {
      if (types && !types.has(ev.type)) return;
      res.write(`id: ${ev.seq}\nevent: ${ev.type}\ndata: ${JSON.stringify(ev)}\n\n`);
    };
    const since = Number(q.since ?? req.headers['last-event-id'] ?? NaN);
    if (Number.isFinite(since)) for (const ev of svc.events.since(since)) send(ev);
    const off = svc.events.subscribe(send);
    const ping = setInterval(() => res.write(': ping\n\n'), 15_000);
    req.raw.on('close', () => {
      off();
      clearInterval(ping);
    });
  });

  app.get('/api/v1/instances/:name/console', { websocket: true }, ws(async (socket, req) => {
    const { name } = req.params as { name: string };
    // Input can arrive before the console is attached: queue it instead of losing it.
    const queued: Buffer[] = [];
    let write: ((b: Buffer) => void) | undefined;
    let closed = false;
    socket.on('message', (data: Buffer) => (write ? write(data) : queued.push(data)));
    socket.on('close', () => (closed = true));
    try {
      const con = await svc.instances.attachConsole(name);
      if (closed) {
        con.close();
        return;
      }
      con.onData((b) => {
        if (socket.readyState === socket.OPEN) socket.send(b);
      });
      con.onClose(() => socket.close(1000, 'console closed'));
      socket.on('close', () => con.close());
      write = (b) => con.write(b);
      for (const b of queued.splice(0)) con.write(b);
    } catch (e) {
      const err = toHfError(e);
      socket.send(JSON.stringify({ error: err.toJSON() }));
      socket.close(4000 + Math.min(999, err.status), err.code);
    }
  }));

  app.get('/api/v1/containers/:name/exec', { websocket: true }, ws((socket, req) => {
    const { name } = req.params as { name: string };
    const fail = (e: unknown): void => {
      const err = toHfError(e);
      if (socket.readyState === socket.OPEN) socket.send(JSON.stringify({ error: err.toJSON() }));
      socket.close(4000 + Math.min(999, err.status), err.code);
    };
    let session: ExecSession | undefined;
    let opening = false;
    const early: Array<{ data: Buffer; isBinary: boolean }> = [];
    const control = (session: ExecSession, data: Buffer): void => {
      let msg: { resize?: { cols?: unknown; rows?: unknown }; eof?: unknown; signal?: unknown };
      try {
        msg = JSON.parse(data.toString('utf8')) as typeof msg;
      } catch {
        return;
      }
      const { cols, rows } = msg.resize ?? {};
      if (Number.isInteger(cols) && Number.isInteger(rows) && (cols as number) > 0 && (rows as number) > 0) session.resize?.(Math.min(cols as number, 1000), Math.min(rows as number, 1000));
      if (msg.eof === true) session.closeStdin();
      if (msg.signal === 'SIGINT' || msg.signal === 'SIGTERM' || msg.signal === 'SIGKILL' || msg.signal === 'SIGHUP') session.kill(msg.signal);
    };
    const deliver = (s: ExecSession, data: Buffer, isBinary: boolean): void => (isBinary ? s.stdin(data) : control(s, data));
    socket.on('message', (data: Buffer, isBinary: boolean) => {
      if (session) return deliver(session, data, isBinary);
      if (opening) return void early.push({ data, isBinary });
      opening = true;
      let request: unknown;
      try {
        request = JSON.parse(data.toString('utf8'));
      } catch {
        return fail(new HfError('HF_ERR_BAD_JSON', 'the first message must be the exec request as JSON: { "command": ["sh"], "tty": true }'));
      }
      if (!svc.containers) return fail(new HfError('HF_ERR_UNSUPPORTED', 'containers are not available on this host'));
      svc.containers.openExec(name, request).then((s) => {
        if (socket.readyState !== socket.OPEN) {
          s.kill('SIGKILL');
          return;
        }
        session = s;
        const out = (channel: number) => (b: Buffer) => {
          if (socket.readyState === socket.OPEN) socket.send(Buffer.concat([Buffer.of(channel), b]));
        };
        s.onStdout(out(1));
        s.onStderr(out(2));
        for (const m of early.splice(0)) deliver(s, m.data, m.isBinary);
        void s.exit.then((code) => {
          if (socket.readyState !== socket.OPEN) return;
          socket.send(JSON.stringify({ exit: code }));
          socket.close(1000, 'exited');
        });
      }, fail);
    });
    // The client went away: the command goes with it (like a terminal hanging up).
    socket.on('close', () => session?.kill('SIGHUP'));
  }));
}
