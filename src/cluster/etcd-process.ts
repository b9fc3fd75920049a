// The host's etcd member under supervision, and the cluster-membership helpers on the etcd3 client.
//
// etcd runs as the daemon's child in a process group of its own (a terminal's Ctrl-C reaches the
// daemon, which stops etcd in order), its stdout and stderr appended to a log file, its pid in
// `<dataDir>.pid`. It is not tied to the daemon's life: if the daemon dies, the member keeps
// serving the other hosts' quorum until the next daemon starts. That daemon does not adopt it (it
// could not learn its exit as a parent does): it finds it by the pid file and its command line
// (`--data-dir=DIR`), stops it with SIGTERM and starts its own. etcd is back within seconds from
// its data directory; guests are not affected. It is spawned directly, as dnsmasq is, not through
// util/spawner.ts: a parent learns the exit at once, and a start is too rare for the fork's cost.
//
// A start resolves once the member answers a TLS status call made with the host's certificate,
// and fails with HF_ERR_ETCD_START and the reason a person can act on: a port already in use, a
// damaged data directory, a missing binary, or etcd's own last words. An unexpected exit later
// is restarted with a growing delay (100 ms doubling to 5 s; back to 100 ms after 30 s up).
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { closeSync, createWriteStream, openSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { basename, dirname, join } from 'node:path';
import { Etcd3, type IMember, type IMemberAddResponse } from 'etcd3';
import { HfError } from '../core/errors.js';
import { which } from '../util/exec.js';
import { silentLogger, type Logger } from '../util/log.js';
import { isProcessAlive, waitForProcessExit } from '../util/proc.js';
import { etcdArgs, formatInitialCluster, type EtcdMemberConfig } from './etcd-args.js';
import type { HostPki } from './pki.js';

export interface EtcdSupervisorOptions {
  /** The host's CA, certificate and key: the health check presents them as a client would. */
  pki: HostPki;
  /** The etcd binary (default: `etcd` on PATH). */
  binary?: string;
  /** Where etcd's output is appended (default: etcd.log next to the data directory). */
  logFile?: string;
  /** Default `<dataDir>.pid`. */
  pidFile?: string;
  log?: Logger;
  /** How long a start may take until the member answers (default 60 s: a joining member catches up first). */
  startTimeoutMs?: number;
  /** SIGTERM, then SIGKILL after this long (default 5 s). */
  stopTimeoutMs?: number;
  /** First restart delay after an unexpected exit (default 100 ms); doubles up to maxRestartDelayMs. */
  restartDelayMs?: number;
  maxRestartDelayMs?: number;
  /** Up this long, a member's next crash starts the delays from the beginning again (default 30 s). */
  stableAfterMs?: number;
}

export interface EtcdExit {
  pid: number;
  code: number | null;
  signal: NodeJS.Signals | null;
  uptimeMs: number;
  /** True when stop() ended it. */
  expected: boolean;
}

export interface EtcdSupervisor {
  /** The process ended (expected or not). */
  on(event: 'exit', listener: (e: EtcdExit) => void): this;
  /** A restart after an unexpected exit answers again. */
  on(event: 'restarted', listener: (e: { pid: number; attempt: number }) => void): this;
  /** A restart failed; the next one is scheduled. */
  on(event: 'restart-failed', listener: (e: { error: HfError; attempt: number; nextDelayMs: number }) => void): this;
  once(event: 'exit', listener: (e: EtcdExit) => void): this;
  once(event: 'restarted', listener: (e: { pid: number; attempt: number }) => void): this;
  once(event: 'restart-failed', listener: (e: { error: HfError; attempt: number; nextDelayMs: number }) => void): this;
}

/** Keeps this host's etcd member running. */
export class EtcdSupervisor extends EventEmitter {
  readonly args: string[];
  readonly logFile: string;
  readonly pidFile: string;
  private readonly log: Logger;
  private child: ChildProcess | undefined;
  private startedAt = 0;
  private stopped = true;
  private failures = 0;
  private restartTimer: NodeJS.Timeout | undefined;
  /** The spawn under way (start or restart): stop() cuts its wait short and waits for it before it kills. */
  private spawning: Promise<void> | undefined;
  private spawnAbort: AbortController | undefined;

  constructor(
    readonly member: EtcdMemberConfig,
    private readonly opts: EtcdSupervisorOptions,
  ) {
    super();
    this.args = etcdArgs(member);
    this.logFile = opts.logFile ?? join(dirname(member.dataDir), 'etcd.log');
    this.pidFile = opts.pidFile ?? `${member.dataDir}.pid`;
    this.log = (opts.log ?? silentLogger).child({ etcd: member.name });
  }

  /** The running etcd's pid (undefined while none runs). */
  get pid(): number | undefined {
    const c = this.child;
    return c?.pid !== undefined && c.exitCode === null && c.signalCode === null ? c.pid : undefined;
  }

  /**
   * Starts the member (replacing one a previous daemon left running) and resolves once it
   * answers over TLS. Rejects with HF_ERR_ETCD_START; then nothing runs and nothing restarts.
   */
  async start(): Promise<void> {
    if (!this.stopped) return;
    this.stopped = false;
    try {
      await this.replaceStale();
      await this.spawnTracked();
    } catch (e) {
      this.stopped = true;
      throw e;
    }
  }

  /** Stops the member (SIGTERM, SIGKILL after stopTimeoutMs) and any restart. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    this.spawnAbort?.abort();
    await this.spawning?.catch(() => undefined);
    const child = this.child;
    if (child && child.exitCode === null && child.signalCode === null) {
      const gone = new Promise<void>((r) => child.once('exit', () => r()));
      signalGroup(child.pid!, 'SIGTERM');
      if (!(await within(gone, this.opts.stopTimeoutMs ?? 5000))) {
        this.log.warn('etcd did not stop on SIGTERM: killing it', { pid: child.pid });
        signalGroup(child.pid!, 'SIGKILL');
        await gone;
      }
    }
    await rm(this.pidFile, { force: true });
  }

  /** An etcd of this data directory left by an earlier daemon: stopped, so that ours can start. */
  private async replaceStale(): Promise<void> {
    const pid = Number((await readFile(this.pidFile, 'utf8').catch(() => '')).trim());
    if (!(pid > 0) || !isProcessAlive(pid)) return;
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (!argv.includes(`--data-dir=${this.member.dataDir}`) || !basename(argv[0] ?? '').startsWith('etcd')) return;
    this.log.info('stopping the etcd a previous daemon left running', { pid });
    const kill = (sig: NodeJS.Signals) => {
      try {
        process.kill(pid, sig);
      } catch {
        // gone already
      }
    };
    kill('SIGTERM');
    if (await waitForProcessExit(pid, undefined, this.opts.stopTimeoutMs ?? 5000)) return;
    kill('SIGKILL');
    if (!(await waitForProcessExit(pid, undefined, 10_000))) {
      throw new HfError('HF_ERR_ETCD_START', `the etcd a previous daemon left running (pid ${pid}) does not end: stop it and start again`);
    }
  }

  private spawnTracked(): Promise<void> {
    const p = this.spawnOnce();
    this.spawning = p;
    const clear = () => {
      if (this.spawning === p) this.spawning = undefined;
    };
    p.then(clear, clear);
    return p;
  }

  private async spawnOnce(): Promise<void> {
    const abort = new AbortController();
    this.spawnAbort = abort;
    try {
      await this.spawnChild(abort);
    } finally {
      abort.abort();
      if (this.spawnAbort === abort) this.spawnAbort = undefined;
    }
  }

  private async spawnChild(abort: AbortController): Promise<void> {
    const binary = await which(this.opts.binary ?? 'etcd');
    if (!binary) throw new HfError('HF_ERR_ETCD_START', `cannot start etcd: ${this.opts.binary ?? 'etcd'} is not installed (apt-get install etcd-server)`);
    await checkPortsFree(this.member);
    await mkdir(dirname(this.member.dataDir), { recursive: true, mode: 0o700 });
    await mkdir(dirname(this.logFile), { recursive: true, mode: 0o700 });
    const logStart = await stat(this.logFile).then((s) => s.size, () => 0);
    if (this.stopped) throw new HfError('HF_ERR_ETCD_START', `etcd ${this.member.name} was stopped during its start`);
    const fd = openSync(this.logFile, 'a', 0o600);
    let child: ChildProcess;
    try {
      child = spawn(binary, this.args, { detached: true, stdio: ['ignore', fd, fd], env: etcdEnv() });
    } finally {
      closeSync(fd);
    }
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('exit', (code, signal) => r({ code, signal })));
    const spawnError = new Promise<Error>((r) => child.once('error', r));
    if (child.pid === undefined) {
      const e = await spawnError;
      throw new HfError('HF_ERR_ETCD_START', `cannot start ${binary}: ${e.message}`, { cause: e });
    }
    this.child = child;
    this.startedAt = Date.now();
    await writeFile(this.pidFile, `${child.pid}\n`, { mode: 0o600 });

    const timeoutMs = this.opts.startTimeoutMs ?? 60_000;
    const first = await Promise.race([
      waitHealthy(this.member.clientUrls[0]!, this.opts.pki, timeoutMs, abort.signal).then((ok) => ({ kind: 'health' as const, ok })),
      exited.then((x) => ({ kind: 'exit' as const, x })),
      // stop() during the wait: no need to wait for an answer.
      new Promise<{ kind: 'health'; ok: boolean }>((r) => abort.signal.addEventListener('abort', () => r({ kind: 'health', ok: false }), { once: true })),
    ]);
    abort.abort();
    if (first.kind === 'exit') {
      if (this.child === child) this.child = undefined;
      const output = await readFrom(this.logFile, logStart);
      throw startFailure(this.member, first.x, output);
    }
    if (!first.ok || this.stopped) {
      // Silent past the deadline (or stopped meanwhile): end it, so nothing half-started remains.
      signalGroup(child.pid, 'SIGKILL');
      await exited;
      if (this.child === child) this.child = undefined;
      if (this.stopped) throw new HfError('HF_ERR_ETCD_START', `etcd ${this.member.name} was stopped during its start`);
      throw silentFailure(this.member, timeoutMs, await readFrom(this.logFile, logStart));
    }
    this.log.info('etcd is up', { pid: child.pid });
    void exited.then((x) => this.onExit(child, x));
  }

  private onExit(child: ChildProcess, x: { code: number | null; signal: NodeJS.Signals | null }): void {
    if (this.child === child) this.child = undefined;
    const uptimeMs = Date.now() - this.startedAt;
    this.emit('exit', { pid: child.pid!, code: x.code, signal: x.signal, uptimeMs, expected: this.stopped } satisfies EtcdExit);
    if (this.stopped) return;
    if (uptimeMs >= (this.opts.stableAfterMs ?? 30_000)) this.failures = 0;
    this.log.warn('etcd exited: restarting', { pid: child.pid, code: x.code, signal: x.signal, uptimeMs });
    this.scheduleRestart();
  }

  private scheduleRestart(): void {
    this.failures++;
    const attempt = this.failures;
    const delay = this.restartDelay(attempt);
    this.restartTimer = setTimeout(() => {
      this.restartTimer = undefined;
      if (this.stopped) return;
      this.spawnTracked().then(
        () => this.emit('restarted', { pid: this.pid ?? 0, attempt }),
        (e: unknown) => {
          if (this.stopped) return;
          const error = e instanceof HfError ? e : new HfError('HF_ERR_ETCD_START', `etcd ${this.member.name} did not restart: ${(e as Error).message}`, { cause: e });
          this.log.error('etcd restart failed', { error: error.message, attempt });
          this.emit('restart-failed', { error, attempt, nextDelayMs: this.restartDelay(attempt + 1) });
          this.scheduleRestart();
        },
      );
    }, delay);
  }

  private restartDelay(attempt: number): number {
    return Math.min(this.opts.maxRestartDelayMs ?? 5000, (this.opts.restartDelayMs ?? 100) * 2 ** Math.min(attempt - 1, 16));
  }
}

/**
 * The daemon's environment without etcd's own variables: etcd reads ETCD_* as flags (and refuses
 * to start when one shadows a command-line flag), so only the command line configures it.
 */
function etcdEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ETCD_') && !k.startsWith('ETCDCTL_')));
}

/** An etcd3 client of `urls` that authenticates with the host's certificate. Close it after use. */
export function etcdClient(urls: string[], pki: HostPki, dialTimeoutMs = 3000): Etcd3 {
  return new Etcd3({
    hosts: urls,
    credentials: { rootCertificate: Buffer.from(pki.caPem), certChain: Buffer.from(pki.certPem), privateKey: Buffer.from(pki.keyPem) },
    dialTimeout: dialTimeoutMs,
  });
}

/**
 * Polls a status call on `url` until it answers (true) or the deadline passes (false). A new
 * client each try: a failed gRPC channel backs off for up to minutes, and the client's circuit
 * breaker would refuse calls for seconds after a few failures.
 */
async function waitHealthy(url: string, pki: HostPki, timeoutMs: number, signal: AbortSignal): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 50; !signal.aborted && Date.now() < deadline; delay = Math.min(delay * 2, 500)) {
    const perTry = Math.max(100, Math.min(3000, deadline - Date.now()));
    const client = etcdClient([url], pki, perTry);
    try {
      await client.maintenance.status({ deadline: Date.now() + perTry });
      return true;
    } catch {
      // not yet
    } finally {
      client.close();
    }
    await new Promise((r) => setTimeout(r, delay));
  }
  return false;
}

/** Fails when a listen URL's address is taken (or is not one of this host's), before etcd tries. */
async function checkPortsFree(member: EtcdMemberConfig): Promise<void> {
  const urls = [...(member.listenClientUrls ?? member.clientUrls), ...(member.listenPeerUrls ?? member.peerUrls)];
  for (const u of urls) {
    const { hostname, port } = new URL(u);
    const host = hostname.replace(/^\[|\]$/g, '');
    const err = await new Promise<NodeJS.ErrnoException | undefined>((resolve) => {
      const srv = createServer();
      srv.once('error', (e) => resolve(e));
      srv.listen({ host, port: Number(port), exclusive: true }, () => srv.close(() => resolve(undefined)));
    });
    if (!err) continue;
    if (err.code === 'EADDRINUSE') {
      throw new HfError('HF_ERR_ETCD_START', `cannot start etcd ${member.name}: port ${port} on ${host} (${u}) is already in use by another program`, { cause: err });
    }
    throw new HfError('HF_ERR_ETCD_START', `cannot start etcd ${member.name}: cannot listen on ${u}: ${err.message}`, { cause: err });
  }
}

/** What etcd says when its data directory is damaged (or belongs to another cluster's member). */
const DAMAGE = [
  /failed to find database snapshot file/,
  /corrupt/i,
  /crc mismatch/,
  /has already been bootstrapped/,
  /failed to recover v3 backend/,
  /failed to open database|invalid database|file size too small/,
  /wal: (file not found|slice bounds|unexpected EOF|max entry size)/,
  /failed to (read|open) WAL|walpb: |raftpb: /,
  /cluster ID mismatch/,
];

/** What a damaged-directory error adds: how to get the member back. */
const RESTORE_HINT =
  'Restore it from a backup (`hyperfold cluster backup` makes one; `etcdctl snapshot restore` rebuilds the directory), ' +
  'or, while the other members keep a quorum, remove this member from the cluster, move the directory aside and join again.';

/** The HfError of an etcd that exited during its start, from its exit and what it logged. */
export function startFailure(member: Pick<EtcdMemberConfig, 'name' | 'dataDir'>, x: { code: number | null; signal: string | null }, output: string): HfError {
  const how = x.signal ? `killed by ${x.signal}` : `exit ${x.code}`;
  const inUse = /listen tcp ([^\s"]*?):(\d+): bind: address already in use/.exec(output);
  if (inUse || /address already in use/.test(output)) {
    const where = inUse ? `port ${inUse[2]} on ${inUse[1]}` : 'one of its ports';
    return new HfError('HF_ERR_ETCD_START', `cannot start etcd ${member.name}: ${where} is already in use by another program (${how})`);
  }
  // Only what etcd reported as the failure: an info line may mention a repaired tail of the WAL.
  const failures = messages(output).filter((m) => !['debug', 'info', 'warn'].includes(m.level));
  const damaged = failures.find((m) => DAMAGE.some((re) => re.test(m.text)));
  if (damaged) {
    return new HfError('HF_ERR_ETCD_START', `damaged data directory ${member.dataDir}: ${damaged.text}. etcd ${member.name} cannot start from it (${how}). ${RESTORE_HINT}`, {
      details: { dataDir: member.dataDir },
    });
  }
  return new HfError('HF_ERR_ETCD_START', `etcd ${member.name} exited during its start (${how}): ${lastLines(output)}`);
}

/**
 * The HfError of an etcd that runs but never answered. A write-ahead log that etcd had to cut
 * short ("repaired WAL") is the likely cause when it did: the member lost records it had
 * acknowledged and waits for a cluster state it no longer has.
 */
export function silentFailure(member: Pick<EtcdMemberConfig, 'name' | 'dataDir' | 'clientUrls'>, timeoutMs: number, output: string): HfError {
  const all = messages(output);
  const repaired = all.find((m) => /^repaired WAL/.test(m.text)) ?? all.find((m) => /^repairing/.test(m.text));
  if (repaired) {
    return new HfError(
      'HF_ERR_ETCD_START',
      `damaged data directory ${member.dataDir}: etcd cut its write-ahead log short (${repaired.text}) and then did not become ready ` +
        `within ${Math.round(timeoutMs / 1000)} s. ${RESTORE_HINT}`,
      { details: { dataDir: member.dataDir } },
    );
  }
  return new HfError(
    'HF_ERR_ETCD_START',
    `etcd ${member.name} did not answer on ${member.clientUrls[0]} within ${Math.round(timeoutMs / 1000)} s ` +
      `(a member that cannot reach a quorum of its cluster waits for it): ${lastLines(output)}`,
  );
}

/**
 * The messages of etcd's log output: zap JSON lines give their level and "msg" (with "error" when
 * there is one); other lines (Go's panic output, gRPC's own logger) come as they are, level ''.
 */
function messages(output: string): Array<{ level: string; text: string }> {
  const out: Array<{ level: string; text: string }> = [];
  for (const line of output.split('\n')) {
    const t = line.trim();
    if (!t) continue;
    try {
      const j = JSON.parse(t) as Record<string, unknown>;
      out.push({ level: String(j.level ?? ''), text: [j.msg, j.error].filter((v) => typeof v === 'string' && v).join(': ') });
    } catch {
      out.push({ level: '', text: t });
    }
  }
  return out;
}

/** etcd's last words: its error-level messages when it logged any (not Go's stack traces), else its last lines. */
function lastLines(output: string, n = 3): string {
  const all = messages(output);
  const errors = all.filter((m) => ['error', 'dpanic', 'panic', 'fatal'].includes(m.level));
  const m = errors.length ? errors : all;
  return m.length ? m.slice(-n).map((x) => x.text).join(' | ') : '(no output)';
}

/** The part of a file after `offset` (what this run of etcd wrote), at most its last 64 KiB. */
async function readFrom(file: string, offset: number): Promise<string> {
  try {
    const fh = await open(file, 'r');
    try {
      const size = (await fh.stat()).size;
      const start = Math.max(offset, size - 65_536);
      const buf = Buffer.alloc(Math.max(0, size - start));
      await fh.read(buf, 0, buf.length, start);
      return buf.toString('utf8');
    } finally {
      await fh.close();
    }
  } catch {
    return '';
  }
}

/** Signals etcd's process group (it leads one: spawned detached), or the process if that fails. */
function signalGroup(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pid, sig);
  } catch {
    try {
      process.kill(pid, sig);
    } catch {
      // gone
    }
  }
}

async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([p.then(() => true), t]);
  } finally {
    clearTimeout(timer);
  }
}

// ---- membership and backup, on a connected client ----

export interface EtcdMemberInfo {
  /** The member id as etcd prints it (16 hex digits). */
  id: string;
  /** Empty until the member has started once. */
  name: string;
  peerUrls: string[];
  clientUrls: string[];
  started: boolean;
  isLearner: boolean;
}

function hexId(decimal: string): string {
  return BigInt(decimal).toString(16).padStart(16, '0');
}

function toInfo(m: IMember): EtcdMemberInfo {
  return { id: hexId(m.ID), name: m.name, peerUrls: m.peerURLs, clientUrls: m.clientURLs, started: m.name !== '', isLearner: !!m.isLearner };
}

export async function listMembers(client: Etcd3): Promise<EtcdMemberInfo[]> {
  const res = await client.cluster.memberList({});
  return res.members.map(toInfo);
}

/**
 * Adds a member `name` reachable at `peerUrl` and returns its id and the --initial-cluster the new
 * member must start with (state `existing`). Members added earlier that never started appear with
 * an empty name, as `etcdctl member add` writes them: etcd wants every member listed.
 *
 * etcd refuses a new voting member ("unhealthy cluster") until its leader has been connected to
 * every member for 5 s, so right after a join the next one waits: transient refusals are retried
 * up to `timeoutMs`.
 */
export async function addMember(client: Etcd3, name: string, peerUrl: string, timeoutMs = 60_000): Promise<{ id: string; initialCluster: string }> {
  const deadline = Date.now() + timeoutMs;
  const members = await transientRetried(() => listMembers(client), deadline, () => `cannot list the etcd members to add ${name}`);
  if (members.some((m) => m.name === name)) throw new HfError('HF_ERR_ALREADY_EXISTS', `the etcd cluster already has a member named ${name}`);
  const res: IMemberAddResponse = await transientRetried(
    () => client.cluster.memberAdd({ peerURLs: [peerUrl] }),
    deadline,
    () => `etcd refuses to add ${name}: its cluster is not healthy (a member is down or not connected to the leader for ${Math.round(timeoutMs / 1000)} s)`,
  );
  const id = res.member.ID;
  const all = res.members.map((m) => ({ name: m.ID === id ? name : m.name, peerUrls: m.peerURLs }));
  return { id: hexId(id), initialCluster: formatInitialCluster(all) };
}

/**
 * What passes in a moment around a membership change: etcd refusing a new member until its
 * leader has been connected to every member for 5 s ("unhealthy cluster"), no leader while a
 * member just added has not started yet, a member that refused a connection a moment ago (the
 * store's client skips it for a second), the client's circuit breaker.
 */
const TRANSIENT = /unhealthy cluster|circuit breaker is open|failed a moment ago|no leader|UNAVAILABLE|ECONNREFUSED/i;

/** Runs `fn` again after a transient refusal (backing off up to 2 s) until `deadline`; then HF_ERR_CLUSTER_UNAVAILABLE with `why`. */
async function transientRetried<T>(fn: () => Promise<T>, deadline: number, why: () => string): Promise<T> {
  for (let delay = 250; ; delay = Math.min(delay * 2, 2000)) {
    try {
      return await fn();
    } catch (e) {
      if (!TRANSIENT.test((e as Error).message)) throw e;
      if (Date.now() + delay > deadline) throw new HfError('HF_ERR_CLUSTER_UNAVAILABLE', `${why()}: ${(e as Error).message}`, { cause: e });
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}

/** Removes a member by name or id (hex as listMembers gives it, or decimal). */
export async function removeMember(client: Etcd3, nameOrId: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const members = await transientRetried(() => listMembers(client), deadline, () => `cannot list the etcd members to remove ${nameOrId}`);
  const want = nameOrId.toLowerCase();
  const m =
    members.find((x) => x.name === nameOrId) ??
    members.find((x) => x.id === want.padStart(16, '0')) ??
    members.find((x) => /^\d+$/.test(nameOrId) && x.id === hexId(nameOrId));
  if (!m) throw new HfError('HF_ERR_HOST_NOT_FOUND', `no etcd member named or numbered ${nameOrId} (members: ${members.map((x) => x.name || x.id).join(', ')})`);
  await transientRetried(() => client.cluster.memberRemove({ ID: BigInt(`0x${m.id}`).toString() }), deadline, () => `etcd refuses to remove ${nameOrId}`);
}

/**
 * Saves a snapshot of the whole key space (the backend database) to `file`: streamed to a
 * temporary file next to it, checked against the SHA-256 etcd appends to the stream, then renamed.
 * Returns its size, and the revision it holds when etcd says (3.5 on; 3.4 sends no header).
 */
export async function snapshot(client: Etcd3, file: string): Promise<{ bytes: number; revision?: string }> {
  const tmp = `${file}.part-${process.pid}`;
  const stream = await client.maintenance.snapshot();
  // The response is a Node readable underneath (gRPC's): paused while the file catches up.
  const readable = stream as unknown as { pause(): void; resume(): void; destroy?(): void };
  const out = createWriteStream(tmp, { mode: 0o600 });
  out.on('drain', () => readable.resume());
  const hash = createHash('sha256');
  // The last 32 bytes of the stream are the SHA-256 of everything before them: hold them back.
  let tail = Buffer.alloc(0);
  let bytes = 0;
  let revision: string | undefined;
  try {
    await new Promise<void>((resolve, reject) => {
      out.once('error', reject);
      stream.on('data', (d) => {
        if (revision === undefined && d.header?.revision) revision = d.header.revision;
        bytes += d.blob.length;
        const all = Buffer.concat([tail, d.blob]);
        const body = all.subarray(0, Math.max(0, all.length - 32));
        tail = all.subarray(body.length);
        hash.update(body);
        if (!out.write(body)) readable.pause();
      });
      stream.on('error', reject);
      stream.on('end', () => resolve());
    });
    if (tail.length !== 32 || !hash.digest().equals(tail)) {
      throw new HfError('HF_ERR_CLUSTER_UNAVAILABLE', `the etcd snapshot stream ended early or is damaged (${bytes} bytes): try again`);
    }
    // etcdctl keeps the checksum in the file too: `etcdctl snapshot restore` checks it.
    await new Promise<void>((resolve, reject) => out.end(tail, () => resolve()).once('error', reject));
    await syncFile(tmp);
    await rename(tmp, file);
    return revision === undefined ? { bytes } : { bytes, revision };
  } catch (e) {
    readable.destroy?.();
    out.destroy();
    await rm(tmp, { force: true });
    throw e;
  }
}

async function syncFile(path: string): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
