// The CLI's API client: the root-only unix socket in the data directory when it is reachable,
// otherwise TCP with the bearer token (HYPERFOLD_URL / HYPERFOLD_TOKEN or --url / --token).
import http from 'node:http';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import WebSocket from 'ws';
import { DEFAULT_DATA_DIR, DEFAULT_LISTEN } from '../core/defaults.js';
import { isFinished, type Operation } from '../core/model/operation.js';

export interface ClientOptions {
  url?: string;
  token?: string;
  dataDir?: string;
  /** Told when an answer is marked stale (a cluster member that cannot reach the store served it from its cache). */
  onStale?: () => void;
}

export class ApiError extends Error {
  constructor(readonly status: number, readonly code: string, message: string, readonly details?: unknown) {
    super(message);
  }
}

export class ApiClient {
  private readonly socketPath: string | undefined;
  private readonly base: URL | undefined;
  private readonly token: string | undefined;
  private readonly onStale: (() => void) | undefined;

  constructor(opts: ClientOptions = {}) {
    this.onStale = opts.onStale;
    const url = opts.url ?? process.env.HYPERFOLD_URL;
    const dataDir = opts.dataDir ?? process.env.HYPERFOLD_DATA ?? DEFAULT_DATA_DIR;
    const sock = join(dataDir, 'hyperfold.sock');
    if (!url && existsSync(sock)) {
      this.socketPath = sock;
    } else {
      this.base = new URL(url ?? `http://${DEFAULT_LISTEN}`);
      this.token = opts.token ?? process.env.HYPERFOLD_TOKEN ?? readToken(dataDir);
    }
  }

  get target(): string {
    return this.socketPath ? `unix:${this.socketPath}` : this.base!.toString();
  }

  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const { status, text, contentType } = await this.raw(method, path, body);
    const data: unknown = contentType.includes('json') && text ? JSON.parse(text) : text;
    if (status >= 400) {
      const err = (data as { error?: { code?: string; message?: string; details?: unknown } })?.error;
      throw new ApiError(status, err?.code ?? `HTTP_${status}`, err?.message ?? String(text), err?.details);
    }
    return data as T;
  }

  raw(method: string, path: string, body?: unknown): Promise<{ status: number; text: string; contentType: string }> {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const headers: Record<string, string> = {};
    if (payload !== undefined) headers['content-type'] = 'application/json';
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    const opts: http.RequestOptions = this.socketPath
      ? { socketPath: this.socketPath, path, method, headers }
      : { host: this.base!.hostname.replace(/^\[|\]$/g, ''), port: this.base!.port || 80, path, method, headers };
    return new Promise((resolve, reject) => {
      const req = http.request(opts, (res) => {
        if (res.headers['x-hyperfold-stale'] === 'true') this.onStale?.();
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text, contentType: String(res.headers['content-type'] ?? '') }));
      });
      req.on('error', (e: NodeJS.ErrnoException) => {
        if (e.code === 'ECONNREFUSED' || e.code === 'ENOENT') {
          reject(new ApiError(0, 'HF_ERR_DAEMON_UNREACHABLE', `cannot reach the hyperfold daemon at ${this.target}: is it running? (start it with \`npm start\` or \`hyperfold serve\`)`));
        } else reject(e);
      });
      if (payload !== undefined) req.end(payload);
      else req.end();
    });
  }

  /** Waits for an operation, calling `onUpdate` as it progresses. */
  async waitOperation(id: string, onUpdate?: (op: Operation) => void): Promise<Operation> {
    for (;;) {
      const { operation } = await this.request<{ operation: Operation }>('GET', `/api/v1/operations/${id}?wait=1`);
      onUpdate?.(operation);
      if (isFinished(operation)) return operation;
    }
  }

  websocket(path: string): WebSocket {
    if (this.socketPath) return new WebSocket(`ws+unix://${this.socketPath}:${path}`);
    const u = new URL(path, this.base);
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    return new WebSocket(u, { headers: this.token ? { authorization: `Bearer ${this.token}` } : {} });
  }
}

function readToken(dataDir: string): string | undefined {
  try {
    return readFileSync(join(dataDir, 'admin.token'), 'utf8').trim();
  } catch {
    return undefined;
  }
}
