// A fake QEMU monitor for unit tests: a unix-socket server that speaks the QMP handshake and
// answers commands from a table of handlers. Default handlers replay replies recorded from
// QEMU 7.2 (test/unit/fixtures/qmp/*.json) and keep a tiny run state (prelaunch → cont →
// running → stop → paused, quit closes the connection) with the matching events.
// Tests can override handlers, delay or withhold replies, answer late, inject events, write raw
// bytes (split or coalesced messages) and drop the connection.
import net from 'node:net';
import { existsSync, mkdtempSync, readFileSync, rmSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface FakeQmpErrorBody {
  class: string;
  desc: string;
}

export interface FakeEventSpec {
  event: string;
  data?: Record<string, unknown>;
}

/** What a handler wants the server to do with one command. */
export interface FakeReply {
  /** The `return` value (default {} when neither return nor error is given). */
  return?: unknown;
  error?: FakeQmpErrorBody;
  /** Wait this long before answering (replies to other commands may overtake this one). */
  delayMs?: number;
  /** Events sent (in order) just before the reply, as QEMU does for cont/stop. */
  eventsBefore?: FakeEventSpec[];
  /** Events sent just after the reply. */
  eventsAfter?: FakeEventSpec[];
  /** Never answer (the test may answer later with server.reply(id, …)). */
  noReply?: boolean;
  /** Close the connection instead of answering (after eventsBefore). */
  drop?: boolean;
  /** Close the connection right after answering. */
  closeAfter?: boolean;
}

export interface FakeCommandContext {
  server: FakeQmpServer;
  command: string;
  id: unknown;
  conn: net.Socket;
}

export type FakeHandler = (args: Record<string, unknown> | undefined, ctx: FakeCommandContext) => FakeReply | Promise<FakeReply>;

export interface ReceivedCommand {
  command: string;
  args?: Record<string, unknown>;
  id: unknown;
  /** ms since the server started. */
  at: number;
}

export interface FakeQmpServerOptions {
  /** Where to listen; default a fresh temp dir. An existing file there is replaced (like QEMU). */
  socketPath?: string;
  /** Greeting to send (default: the one recorded from QEMU 7.2). */
  greeting?: object;
  /** Send no greeting at all (like QEMU to a second client while the first is connected). */
  noGreeting?: boolean;
  /** Delay before the greeting. */
  greetingDelayMs?: number;
  /** Extra handlers / overrides of the default ones. */
  handlers?: Record<string, FakeHandler>;
  /**
   * When set, every write is cut into pieces of this many bytes written separately (with a
   * short pause between), so the client sees partial lines and split UTF-8 sequences.
   */
  fragmentBytes?: number;
}

const FIXTURE_DIR_CANDIDATES = (): string[] => {
  const here = dirname(fileURLToPath(import.meta.url));
  return [
    join(here, '..', 'unit', 'fixtures', 'qmp'), // test/helpers (ts-node / tsx)
    join(here, '..', '..', '..', 'test', 'unit', 'fixtures', 'qmp'), // dist/test/helpers
    join(process.cwd(), 'test', 'unit', 'fixtures', 'qmp'),
  ];
};

let fixtureDir: string | undefined;

/** Loads a recorded QMP message from test/unit/fixtures/qmp/<name>.json. */
export function loadQmpFixture<T = Record<string, unknown>>(name: string): T {
  if (fixtureDir === undefined) {
    fixtureDir = FIXTURE_DIR_CANDIDATES().find((d) => existsSync(join(d, 'greeting.json')));
    if (fixtureDir === undefined) throw new Error(`QMP fixtures not found (looked in ${FIXTURE_DIR_CANDIDATES().join(', ')})`);
  }
  return JSON.parse(readFileSync(join(fixtureDir, `${name}.json`), 'utf8')) as T;
}

/** A recorded reply ({return} or {error}) as a FakeReply. */
export function fixtureReply(name: string): FakeReply {
  return loadQmpFixture<FakeReply>(name);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class FakeQmpServer {
  readonly socketPath: string;
  /** Every command received, in order, across connections. */
  readonly received: ReceivedCommand[] = [];
  /** Number of connections accepted so far. */
  connectionCount = 0;
  /** Run state served by the default query-status / cont / stop handlers. */
  status: 'prelaunch' | 'running' | 'paused' | 'shutdown' = 'prelaunch';

  private readonly server: net.Server;
  private readonly conns = new Set<net.Socket>();
  /** Per-connection serialized writer: a message (JSON-encoded + CRLF), raw text, or null (just wait for the queue). */
  private readonly senders = new Map<net.Socket, (m: object | { raw: string } | null) => Promise<void>>();
  private readonly handlers = new Map<string, FakeHandler>();
  private readonly opts: FakeQmpServerOptions;
  private readonly tmpDir: string | undefined;
  private readonly started = Date.now();
  private commandWaiters: Array<{ command: string; nth: number; resolve: (c: ReceivedCommand) => void }> = [];

  private constructor(opts: FakeQmpServerOptions) {
    this.opts = opts;
    if (opts.socketPath) this.socketPath = opts.socketPath;
    else {
      this.tmpDir = mkdtempSync(join(tmpdir(), 'hf-fake-qmp-'));
      this.socketPath = join(this.tmpDir, 'qmp.sock');
    }
    this.installDefaultHandlers();
    for (const [name, h] of Object.entries(opts.handlers ?? {})) this.handlers.set(name, h);
    this.server = net.createServer((c) => this.onConnection(c));
  }

  static async start(opts: FakeQmpServerOptions = {}): Promise<FakeQmpServer> {
    const s = new FakeQmpServer(opts);
    try {
      unlinkSync(s.socketPath);
    } catch {
      /* nothing there */
    }
    await new Promise<void>((resolve, reject) => {
      s.server.once('error', reject);
      s.server.listen(s.socketPath, () => {
        s.server.off('error', reject);
        resolve();
      });
    });
    return s;
  }

  /** Sets (or replaces) the handler of one command. */
  setHandler(command: string, handler: FakeHandler): void {
    this.handlers.set(command, handler);
  }

  /** Makes `command` always answer `reply` (a static FakeReply). */
  respond(command: string, reply: FakeReply): void {
    this.handlers.set(command, () => reply);
  }

  /** Sends an event to every connected client. */
  sendEvent(event: string, data?: Record<string, unknown>): void {
    this.broadcast(this.eventMessage({ event, ...(data ? { data } : {}) }));
  }

  /** Answers command `id` (typically one whose handler returned noReply). */
  reply(id: unknown, body: { return?: unknown; error?: FakeQmpErrorBody }): void {
    const msg = body.error ? { error: body.error, id } : { return: body.return ?? {}, id };
    this.broadcast(msg);
  }

  /** Writes raw text, in one write (never fragmented), to every connected client. */
  sendRaw(text: string): void {
    this.broadcast({ raw: text });
  }

  /** Closes every client connection (the server keeps listening). */
  dropConnections(): void {
    for (const c of this.conns) c.destroy();
  }

  /** Resolves with the `nth` (1-based, default 1) `command` received since start, at once if it already arrived. */
  waitForCommand(command: string, nth = 1): Promise<ReceivedCommand> {
    const seen = this.received.filter((r) => r.command === command);
    if (seen.length >= nth) return Promise.resolve(seen[nth - 1]!);
    return new Promise((resolve) => this.commandWaiters.push({ command, nth, resolve }));
  }

  get connected(): number {
    return this.conns.size;
  }

  async close(): Promise<void> {
    this.dropConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    if (this.tmpDir) rmSync(this.tmpDir, { recursive: true, force: true });
  }

  // --- internals -----------------------------------------------------------------------------

  private eventMessage(e: FakeEventSpec): Record<string, unknown> {
    const now = Date.now();
    return { timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 }, event: e.event, ...(e.data ? { data: e.data } : {}) };
  }

  private broadcast(msg: object | { raw: string }): void {
    for (const send of this.senders.values()) void send(msg);
  }

  private async write(conn: net.Socket, text: string): Promise<void> {
    const frag = this.opts.fragmentBytes;
    if (!frag) {
      conn.write(text);
      return;
    }
    const bytes = Buffer.from(text);
    for (let i = 0; i < bytes.length; i += frag) {
      if (conn.destroyed) return;
      conn.write(bytes.subarray(i, i + frag));
      await sleep(1);
    }
  }

  private onConnection(conn: net.Socket): void {
    this.connectionCount++;
    this.conns.add(conn);
    conn.on('close', () => {
      this.conns.delete(conn);
      this.senders.delete(conn);
    });
    conn.on('error', () => undefined);
    let negotiated = false;
    let buf = '';
    // Writes to one connection are serialized so delayed/fragmented output stays ordered.
    let chain: Promise<void> = Promise.resolve();
    const send = (msg: object | { raw: string } | null): Promise<void> =>
      (chain = chain.then(() => {
        if (msg === null || conn.destroyed) return;
        if ('raw' in msg && typeof msg.raw === 'string') {
          conn.write(msg.raw);
          return;
        }
        return this.write(conn, JSON.stringify(msg) + '\r\n');
      }));
    this.senders.set(conn, send);
    const greet = async (): Promise<void> => {
      if (this.opts.noGreeting) return;
      if (this.opts.greetingDelayMs) await sleep(this.opts.greetingDelayMs);
      await send(this.opts.greeting ?? loadQmpFixture('greeting'));
    };
    void greet();
    conn.setEncoding('utf8');
    conn.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) !== -1) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line) as Record<string, unknown>;
        } catch {
          void send({ error: { class: 'GenericError', desc: 'JSON parse error, invalid literal' } });
          continue;
        }
        const command = String(msg.execute);
        const args = msg.arguments as Record<string, unknown> | undefined;
        const id = msg.id;
        const rec: ReceivedCommand = { command, ...(args ? { args } : {}), id, at: Date.now() - this.started };
        this.received.push(rec);
        const count = this.received.filter((r) => r.command === command).length;
        this.commandWaiters = this.commandWaiters.filter((w) => {
          if (w.command !== command || w.nth !== count) return true;
          w.resolve(rec);
          return false;
        });
        if (!negotiated && command !== 'qmp_capabilities') {
          void send({ id, error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" } });
          continue;
        }
        if (command === 'qmp_capabilities') negotiated = true;
        void this.handle(conn, command, args, id, send);
      }
    });
  }

  private async handle(
    conn: net.Socket,
    command: string,
    args: Record<string, unknown> | undefined,
    id: unknown,
    send: (m: object | null) => Promise<void>,
  ): Promise<void> {
    const handler = this.handlers.get(command);
    const reply: FakeReply = handler
      ? await handler(args, { server: this, command, id, conn })
      : { error: { class: 'CommandNotFound', desc: `The command ${command} has not been found` } };
    if (reply.delayMs) await sleep(reply.delayMs);
    if (conn.destroyed) return;
    for (const e of reply.eventsBefore ?? []) await send(this.eventMessage(e));
    if (reply.drop) {
      await send(null); // let queued writes out first
      conn.destroy();
      return;
    }
    if (reply.noReply) return;
    await send(reply.error ? { id, error: reply.error } : { return: reply.return ?? {}, id });
    for (const e of reply.eventsAfter ?? []) await send(this.eventMessage(e));
    if (reply.closeAfter) conn.end();
  }

  private installDefaultHandlers(): void {
    const fixed = (name: string): FakeHandler => () => fixtureReply(name);
    this.handlers.set('qmp_capabilities', () => ({ return: {} }));
    this.handlers.set('query-status', () => {
      const rec = fixtureReply(this.status === 'running' ? 'query-status-running' : this.status === 'paused' ? 'query-status-paused' : 'query-status-prelaunch');
      if (this.status === 'shutdown') return { return: { status: 'shutdown', singlestep: false, running: false } };
      return rec;
    });
    this.handlers.set('cont', () => {
      this.status = 'running';
      return { return: {}, eventsBefore: [{ event: 'RESUME' }] };
    });
    this.handlers.set('stop', () => {
      this.status = 'paused';
      return { return: {}, eventsBefore: [{ event: 'STOP' }] };
    });
    this.handlers.set('system_powerdown', () => ({ return: {}, eventsAfter: [{ event: 'POWERDOWN' }] }));
    this.handlers.set('system_reset', () => ({ return: {}, eventsAfter: [{ event: 'RESET', data: { guest: false, reason: 'host-qmp-system-reset' } }] }));
    this.handlers.set('quit', () => {
      this.status = 'shutdown';
      return { return: {}, eventsBefore: [{ event: 'SHUTDOWN', data: { guest: false, reason: 'host-qmp-quit' } }], closeAfter: true };
    });
    for (const name of ['query-version', 'query-cpus-fast', 'query-kvm', 'query-block', 'query-hotpluggable-cpus', 'query-memory-size-summary', 'query-memory-devices', 'query-jobs']) {
      this.handlers.set(name, fixed(name));
    }
    this.handlers.set('query-balloon', fixed('error-query-balloon-no-device'));
    this.handlers.set('human-monitor-command', (args) =>
      args?.['command-line'] === 'info version' ? fixtureReply('human-monitor-command-info-version') : { return: '' },
    );
    this.handlers.set('device_del', (args) => ({ error: { class: 'DeviceNotFound', desc: `Device '${String(args?.id)}' not found` } }));
  }
}
