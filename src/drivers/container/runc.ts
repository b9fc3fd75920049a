// runc, the OCI runtime, as a typed command wrapper. Every container's state lives under one
// runc root (a tmpfs directory, like runc's own default) so `runc list` there shows only ours.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { HfError } from '../../core/errors.js';
import { run, which } from '../../util/exec.js';
import { Spawner, SpawnerUnavailable } from '../../util/spawner.js';
import type { OciResources } from './spec.js';

/** A container's stdio: stdin is `stdin` opened read-write (the console FIFO), stdout and stderr append to `out`. */
export interface ContainerStdio {
  stdin: string;
  out: string;
}

export interface RuncState {
  id: string;
  pid: number;
  status: 'created' | 'running' | 'paused' | 'stopped' | 'creating';
  bundle: string;
  created: string;
}

export class Runc {
  private resolved: string | undefined;
  /** Starts runc from a small process rather than by forking the daemon (see spawner.ts). */
  readonly spawner = new Spawner();

  constructor(readonly binary: string, readonly root: string) {}

  /** The absolute path of runc, or HF_ERR_MISSING_DEPENDENCY naming the package. */
  async path(): Promise<string> {
    if (this.resolved) return this.resolved;
    const found = (await which(this.binary)) ?? (this.binary.includes('/') ? undefined : await which(`/usr/sbin/${this.binary}`));
    if (!found) throw new HfError('HF_ERR_MISSING_DEPENDENCY', `runc ("${this.binary}") is not installed: run \`apt-get install -y runc\` to run containers`);
    this.resolved = found;
    return found;
  }

  private async exec(args: string[], opts: { input?: string; timeoutMs?: number; allowFailure?: boolean } = {}) {
    const bin = await this.path();
    return run(bin, ['--root', this.root, ...args], { errorCode: 'HF_ERR_HYPERVISOR', timeoutMs: opts.timeoutMs ?? 30_000, input: opts.input, allowFailure: opts.allowFailure });
  }

  /**
   * `runc run --detach`: creates and starts the container; resolves once its init has been
   * exec'd. The container's stdio are passed through (not held by runc).
   */
  async runDetached(id: string, bundle: string, pidFile: string, stdio: ContainerStdio, logFile: string, timeoutMs = 30_000): Promise<void> {
    await this.spawnWait(['run', '--detach', '--bundle', bundle, '--pid-file', pidFile, id], stdio, logFile, timeoutMs);
  }

  /** `runc create`: namespaces and cgroups exist, init waits; `start` lets it run. */
  async create(id: string, bundle: string, pidFile: string, stdio: ContainerStdio, logFile: string, timeoutMs = 30_000): Promise<void> {
    await this.spawnWait(['create', '--bundle', bundle, '--pid-file', pidFile, id], stdio, logFile, timeoutMs);
  }

  async start(id: string): Promise<void> {
    await this.exec(['start', id]);
  }

  /**
   * Runs runc with the container's stdio (runc passes them through to init and exits) and its
   * own messages in `logFile` (they must not mix with the console). Through the spawner when it
   * can, else spawned by the daemon itself.
   */
  private async spawnWait(args: string[], stdio: ContainerStdio, logFile: string, timeoutMs: number): Promise<void> {
    const bin = await this.path();
    truncateFile(logFile);
    const argv = [bin, '--root', this.root, '--log', logFile, '--log-format', 'json', ...args];
    const readErr = async () => cleanRuncError(await readFile(logFile, 'utf8').catch(() => ''));
    const label = `runc ${args[0]}`;
    let result: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    if (this.spawner.usable(argv, stdio.stdin, stdio.out)) {
      try {
        result = { code: await this.spawner.run(argv, stdio.stdin, stdio.out, timeoutMs, label), signal: null };
      } catch (e) {
        // runc never started (the shell is gone): start it ourselves.
        if (!(e instanceof SpawnerUnavailable)) throw e;
      }
    }
    result ??= await spawnDirect(argv, stdio, timeoutMs, label);
    if (result.code !== 0) throw new HfError('HF_ERR_HYPERVISOR', `runc ${args[0]} failed (${result.signal ?? `exit ${result.code}`}): ${await readErr()}`);
  }

  async state(id: string): Promise<RuncState | undefined> {
    const r = await this.exec(['state', id], { allowFailure: true });
    if (r.code !== 0) return undefined;
    return JSON.parse(r.stdout) as RuncState;
  }

  async kill(id: string, signal: string, all = false): Promise<void> {
    await this.exec(['kill', ...(all ? ['--all'] : []), id, signal.replace(/^SIG/, '')], { allowFailure: true });
  }

  async pause(id: string): Promise<void> {
    await this.exec(['pause', id]);
  }

  async resume(id: string): Promise<void> {
    await this.exec(['resume', id]);
  }

  /** Removes runc's state and the container's cgroups (force: kill first if it still runs). */
  async delete(id: string, force = true): Promise<void> {
    await this.exec(['delete', ...(force ? ['--force'] : []), id], { allowFailure: true });
  }

  /** Applies new cgroup limits to a live container. */
  async update(id: string, resources: OciResources): Promise<void> {
    await this.exec(['update', '--resources', '-', id], { input: JSON.stringify(resources) });
  }

  async list(): Promise<RuncState[]> {
    const r = await this.exec(['list', '--format', 'json'], { allowFailure: true });
    if (r.code !== 0 || !r.stdout.trim() || r.stdout.trim() === 'null') return [];
    return JSON.parse(r.stdout) as RuncState[];
  }

  /** `runc exec` of a process described as an OCI process spec (read from a file). */
  async spawnExec(id: string, processFile: string, stdio: 'pipe'): Promise<ChildProcess> {
    const bin = await this.path();
    return spawn(bin, ['--root', this.root, 'exec', '--process', processFile, id], { stdio });
  }

  /**
   * `runc exec` of a process with `terminal: true`. runc then wants a terminal of its own (it puts
   * it in raw mode and copies between it and the container's pty, and follows its size on
   * SIGWINCH), so it runs under `script` (util-linux), which gives it one and copies it to our
   * pipes. The shell between them sets that terminal's size and raw mode, writes runc's pid to
   * `pidFile` (for resizes) and execs runc. Output comes on stdout only (a terminal has one stream).
   */
  async spawnExecTty(id: string, processFile: string, pidFile: string, size: { cols: number; rows: number }): Promise<ChildProcess> {
    const bin = await this.path();
    const script = await which('script');
    if (!script) throw new HfError('HF_ERR_MISSING_DEPENDENCY', 'script (util-linux) is not installed: run `apt-get install -y bsdutils` for exec with a terminal');
    const inner = `stty rows ${size.rows} cols ${size.cols} raw -echo && echo $$ >${shq(pidFile)} && exec ${[bin, '--root', this.root, 'exec', '--process', processFile, id].map(shq).join(' ')}`;
    return spawn(script, ['--quiet', '--flush', '--return', '--command', inner, '/dev/null'], { stdio: 'pipe', env: { ...process.env, SHELL: '/bin/sh' } });
  }
}

/** runc logs logrus lines, as JSON ({"level","msg"}) or text (level=error msg="…"): keep the error messages. */
export function cleanRuncError(out: string): string {
  const msgs: string[] = [];
  for (const line of out.split('\n')) {
    const t = line.trim();
    if (!t) continue;
    if (t.startsWith('{')) {
      try {
        const j = JSON.parse(t) as { level?: string; msg?: string };
        if (j.msg && (j.level === 'error' || j.level === 'fatal')) msgs.push(j.msg);
        continue;
      } catch {
        // not JSON: fall through
      }
    }
    const m = /level=(?:error|fatal) msg="((?:[^"\\]|\\.)*)"/.exec(t);
    if (m) msgs.push(m[1]!.replace(/\\"/g, '"'));
  }
  const text = msgs.length ? msgs.join('; ') : out.trim();
  return text.slice(-1500) || '(no output)';
}

function truncateFile(file: string): void {
  writeFileSync(file, '', { mode: 0o600 });
}

/** Spawns `argv` from the daemon, with the container's stdio as file descriptors. */
async function spawnDirect(argv: string[], stdio: ContainerStdio, timeoutMs: number, label: string): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const inFd = openSync(stdio.stdin, 'r+');
  let outFd: number;
  try {
    outFd = openSync(stdio.out, 'a', 0o600);
  } catch (e) {
    closeSync(inFd);
    throw e;
  }
  try {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: [inFd, outFd, outFd] });
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new HfError('HF_ERR_TIMEOUT', `${label} did not finish within ${timeoutMs} ms`));
      }, timeoutMs);
      child.once('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(e.code === 'ENOENT' ? new HfError('HF_ERR_MISSING_DEPENDENCY', 'runc is not installed: apt-get install -y runc') : new HfError('HF_ERR_HYPERVISOR', `runc: ${e.message}`));
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        resolve({ code, signal });
      });
    });
  } finally {
    closeSync(inFd);
    closeSync(outFd);
  }
}

/** Quotes one word for sh. */
function shq(word: string): string {
  return `'${word.replace(/'/g, `'\\''`)}'`;
}
