// A cluster sandbox for integration tests: scripts/cluster-sandbox.sh (N hosts, each a network
// namespace with its own daemon, joined into one cluster) under a prefix and data directory of
// the test file's own, with an API client per host.
import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import assert from 'node:assert/strict';
import { ApiClient, ApiError } from '../../src/cli/client.js';
import { ensureTestImage } from './image.js';

const pexec = promisify(execFile);
const SCRIPT = fileURLToPath(new URL('../../../scripts/cluster-sandbox.sh', import.meta.url));

export interface SandboxHost {
  name: string;
  url: string;
  token: string;
  dataDir: string;
  /** Over TCP with the admin token, from outside the host's namespace (the way another machine would). */
  api: ApiClient;
}

export class Sandbox {
  readonly hosts = new Map<string, SandboxHost>();

  private constructor(
    readonly env: NodeJS.ProcessEnv,
    readonly dir: string,
  ) {}

  /** `prefix`: up to 5 letters, unique per test file; `net`: three octets, e.g. '10.213.7'. */
  static async up(n: number, opts: { prefix: string; net: string; ttl: number }): Promise<Sandbox> {
    const dir = `/dev/shm/hf-${opts.prefix}-${process.pid}`;
    const env = { ...process.env, HYPERFOLD_SANDBOX_DIR: dir, HYPERFOLD_SANDBOX_PREFIX: opts.prefix, HYPERFOLD_SANDBOX_NET: opts.net, HYPERFOLD_SANDBOX_IMAGE: await ensureTestImage() };
    // Sandboxes left by earlier runs of this file (killed, or failed half-way) go first.
    for (const old of readdirSync('/dev/shm').filter((d) => d.startsWith(`hf-${opts.prefix}-`))) {
      const pid = Number(old.slice(`hf-${opts.prefix}-`.length));
      if (pid !== process.pid && !existsSync(`/proc/${pid}`)) await new Sandbox({ ...env, HYPERFOLD_SANDBOX_DIR: `/dev/shm/${old}` }, `/dev/shm/${old}`).script('down').catch(() => undefined);
    }
    const sb = new Sandbox(env, dir);
    await sb.script('down').catch(() => undefined);
    try {
      await sb.parse(await sb.script('up', String(n), '--ttl', String(opts.ttl)));
    } catch (e) {
      await sb.script('down').catch(() => undefined);
      throw e;
    }
    return sb;
  }

  async script(...args: string[]): Promise<string> {
    try {
      const { stdout } = await pexec('bash', [SCRIPT, ...args], { env: this.env, timeout: 300_000, maxBuffer: 16 * 1024 * 1024 });
      return stdout;
    } catch (e) {
      const x = e as { stdout?: string; stderr?: string; message: string };
      throw new Error(`cluster-sandbox.sh ${args.join(' ')} failed: ${x.message}\n${x.stdout ?? ''}\n${x.stderr ?? ''}`);
    }
  }

  private async parse(out: string): Promise<void> {
    for (const line of out.split('\n')) {
      const m = /^(h\d+) url=(\S+) token=(\S+) data=(\S+) pid=(\d+)/.exec(line);
      if (!m) continue;
      this.hosts.set(m[1]!, { name: m[1]!, url: m[2]!, token: m[3]!, dataDir: m[4]!, api: new ApiClient({ url: m[2]!, token: m[3]! }) });
    }
  }

  host(name: string): SandboxHost {
    const h = this.hosts.get(name);
    if (!h) throw new Error(`no sandbox host ${name}`);
    return h;
  }

  /** A host's daemon pid now. */
  async pid(name: string): Promise<number> {
    return Number((await this.script('pid', name)).trim());
  }

  /** Starts a host's daemon again (after a kill). */
  async start(name: string): Promise<void> {
    await this.parse(await this.script('start', name));
  }

  /** Cuts a host off the others (its link to the switch down), or connects it again. */
  async link(name: string, up: boolean): Promise<void> {
    await this.script(up ? 'mend' : 'cut', name);
  }

  /** One more host with a daemon, in no cluster yet. */
  async add(name: string): Promise<SandboxHost> {
    await this.parse(await this.script('add', name));
    return this.host(name);
  }

  /** The CLI against a host (through its unix socket), as a user on that host would run it. */
  async cli(name: string, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    try {
      const { stdout, stderr } = await pexec('bash', [SCRIPT, 'cli', name, ...args], { env: this.env, timeout: 120_000 });
      return { code: 0, stdout, stderr };
    } catch (e) {
      const x = e as { code?: number; stdout?: string; stderr?: string };
      return { code: typeof x.code === 'number' ? x.code : 1, stdout: x.stdout ?? '', stderr: x.stderr ?? '' };
    }
  }

  /**
   * Runs a command in the mount namespace of a host's daemon (`ip netns exec` gives each host one
   * of its own): a mount made there is seen by that host only, as a share mounted on one machine.
   */
  async inMounts(name: string, ...argv: string[]): Promise<string> {
    const { stdout } = await pexec('nsenter', ['-t', String(await this.pid(name)), '-m', '--', ...argv], { timeout: 30_000 });
    return stdout;
  }

  async down(): Promise<void> {
    await this.script('down');
  }
}

/** Asserts that `p` fails with an API error of this code (and a message matching `re`). */
export async function rejectsCode(p: Promise<unknown>, code: string, re?: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof ApiError, String(e));
    assert.equal(e.code, code, e.message);
    if (re) assert.match(e.message, re);
    return true;
  });
}

/** Resolves with `fn`'s first defined answer (errors count as "not yet"); fails after `timeoutMs` naming `what`. */
export async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms${last ? ` (last error: ${(last as Error).message})` : ''}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
