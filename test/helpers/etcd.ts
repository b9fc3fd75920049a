// A real etcd for tests: one or three members on 127.0.0.1 (plain http), data on tmpfs, election
// timeouts raised for busy CI cores. Each member runs as this process's child under
// `setpriv --pdeathsig KILL`, so a test runner that dies takes its etcd with it. Test helper only:
// the daemon's etcd has a supervisor of its own.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';

export interface TestEtcd {
  /** Client URLs, `http://127.0.0.1:PORT`, one a member. */
  endpoints: string[];
  /** The data directory (one sub-directory a member). */
  dir: string;
  /** Stops member `i` (SIGTERM) and waits for it to exit. */
  stop(i: number): Promise<void>;
  /** Starts member `i` again on its ports and data, and waits until it serves. */
  start(i: number): Promise<void>;
  /** SIGKILLs member `i` and waits for it to exit. */
  kill(i: number): Promise<void>;
  /** Kills every member and removes the data. */
  destroy(): Promise<void>;
}

interface Member {
  name: string;
  client: number;
  peer: number;
  proc: ChildProcess | undefined;
  exited: Promise<void>;
  output: string;
}

const READY_MS = 30_000;
const PORT_ATTEMPTS = 5;

/** A port that was free a moment ago (etcd may still lose it to someone else: the caller retries). */
async function freePort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 40_000);
    const free = await new Promise<boolean>((resolve) => {
      const srv = createServer();
      srv.once('error', () => resolve(false));
      srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
    });
    if (free) return port;
  }
}

function url(port: number): string {
  return `http://127.0.0.1:${port}`;
}

export async function startTestEtcd(opts: { members?: 1 | 3 } = {}): Promise<TestEtcd> {
  const count = opts.members ?? 1;
  const dir = mkdtempSync(join('/dev/shm', 'hf-etcd-'));
  let members: Member[] = [];

  const spawnMember = (m: Member, cluster: string): void => {
    const proc = spawn(
      'setpriv',
      [
        '--pdeathsig',
        'KILL',
        'etcd',
        '--name',
        m.name,
        '--data-dir',
        join(dir, m.name),
        '--listen-client-urls',
        url(m.client),
        '--advertise-client-urls',
        url(m.client),
        '--listen-peer-urls',
        url(m.peer),
        '--initial-advertise-peer-urls',
        url(m.peer),
        '--initial-cluster',
        cluster,
        '--initial-cluster-state',
        'new',
        '--initial-cluster-token',
        `hf-test-${process.pid}`,
        '--heartbeat-interval',
        '200',
        '--election-timeout',
        '2000',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    m.proc = proc;
    m.output = '';
    const keep = (d: Buffer): void => {
      m.output = (m.output + d.toString()).slice(-20_000);
    };
    proc.stdout!.on('data', keep);
    proc.stderr!.on('data', keep);
    m.exited = new Promise((resolve) => proc.once('exit', () => resolve()));
  };

  /** Resolves once member `m` logged that it serves clients and answered a linearizable read. */
  const waitReady = async (m: Member): Promise<void> => {
    const proc = m.proc!;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`etcd ${m.name} not ready after ${READY_MS} ms:\n${m.output}`)), READY_MS);
      const check = (): void => {
        if (m.output.includes('ready to serve client requests')) done();
      };
      const exited = (): void => done(new Error(`etcd ${m.name} exited before it was ready:\n${m.output}`));
      const done = (err?: Error): void => {
        clearTimeout(timer);
        proc.stdout!.off('data', check);
        proc.stderr!.off('data', check);
        proc.off('exit', exited);
        if (err) reject(err);
        else resolve();
      };
      proc.stdout!.on('data', check);
      proc.stderr!.on('data', check);
      proc.once('exit', exited);
      check();
    });
    const client = new Etcd3({ hosts: url(m.client) });
    try {
      await client.get('/hf-test-etcd-ready').options({ deadline: Date.now() + READY_MS }).string();
    } finally {
      client.close();
    }
  };

  const killAll = async (): Promise<void> => {
    for (const m of members) m.proc?.kill('SIGKILL');
    await Promise.all(members.map((m) => m.exited));
  };

  for (let attempt = 1; ; attempt++) {
    members = [];
    for (let i = 0; i < count; i++) members.push({ name: `m${i}`, client: await freePort(), peer: await freePort(), proc: undefined, exited: Promise.resolve(), output: '' });
    const cluster = members.map((m) => `${m.name}=${url(m.peer)}`).join(',');
    for (const m of members) spawnMember(m, cluster);
    try {
      await Promise.all(members.map(waitReady));
      break;
    } catch (e) {
      await killAll();
      for (const m of members) rmSync(join(dir, m.name), { recursive: true, force: true });
      const clash = members.some((m) => m.output.includes('address already in use'));
      if (!clash || attempt >= PORT_ATTEMPTS) {
        rmSync(dir, { recursive: true, force: true });
        throw e;
      }
    }
  }

  const cluster = members.map((m) => `${m.name}=${url(m.peer)}`).join(',');
  const member = (i: number): Member => {
    const m = members[i];
    if (m === undefined) throw new Error(`no etcd member ${i}`);
    return m;
  };
  const signal = async (i: number, sig: NodeJS.Signals): Promise<void> => {
    const m = member(i);
    m.proc?.kill(sig);
    await m.exited;
    m.proc = undefined;
  };

  return {
    endpoints: members.map((m) => url(m.client)),
    dir,
    stop: (i) => signal(i, 'SIGTERM'),
    kill: (i) => signal(i, 'SIGKILL'),
    start: async (i) => {
      const m = member(i);
      if (m.proc !== undefined) throw new Error(`etcd member ${i} is running`);
      spawnMember(m, cluster);
      await waitReady(m);
    },
    destroy: async () => {
      await killAll();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
