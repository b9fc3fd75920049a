// Runs a real daemon as a child process (so tests can SIGKILL it) on a fresh data directory.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import http from 'node:http';
import { after, before } from 'node:test';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ApiClient } from '../../src/cli/client.js';
import { NetNames, tagFor } from '../../src/network/names.js';
import { DEFAULT_OWNERS_DIR } from '../../src/services/network/service.js';
import type { Instance } from '../../src/core/model/instance.js';
import { isFinished, type Operation } from '../../src/core/model/operation.js';
import type { NicAddress } from '../../src/network/model.js';
import { installTestImage } from './image.js';

export const CLI = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

export interface TestDaemon {
  dataDir: string;
  url: string;
  token: string;
  proc: ChildProcess;
  api: ApiClient;
  /** API over TCP with the token (the unix socket needs none). */
  http: ApiClient;
  output(): string;
}

export async function makeDataDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'hf-test-'));
  await installTestImage(dir);
  return dir;
}

export async function startTestDaemon(dataDir: string, env: NodeJS.ProcessEnv = {}): Promise<TestDaemon> {
  const proc = spawn(process.execPath, [CLI, '--data-dir', dataDir, 'serve', '--listen', '127.0.0.1:0', '--no-build-image'], {
    env: { ...process.env, HYPERFOLD_STOP_TIMEOUT_MS: '20000', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon did not start:\n${out}`)), 20_000);
    const check = () => {
      const m = /API:\s+(http:\/\/\S+)\/api\/v1/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    };
    proc.stdout!.on('data', check);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`daemon exited (${code}):\n${out}`));
    });
  });
  const token = (await readFile(join(dataDir, 'admin.token'), 'utf8')).trim();
  return {
    dataDir,
    url,
    token,
    proc,
    api: new ApiClient({ dataDir }),
    http: new ApiClient({ url, token }),
    output: () => out,
  };
}

export async function stopTestDaemon(d: TestDaemon, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (d.proc.exitCode !== null || d.proc.signalCode !== null) return;
  const exited = new Promise((r) => d.proc.once('exit', r));
  d.proc.kill(signal);
  await exited;
}

/** Kills every guest of a data directory and removes it (test clean-up). */
export async function destroyDataDir(dataDir: string, d?: TestDaemon): Promise<void> {
  if (d && d.proc.exitCode === null && d.proc.signalCode === null) {
    try {
      const { instances } = await d.api.request<{ instances: Instance[] }>('GET', '/api/v1/instances');
      for (const i of instances) {
        const { operation } = await d.api.request<{ operation: Operation }>('DELETE', `/api/v1/instances/${i.name}?force=true`);
        await d.api.waitOperation(operation.id);
      }
    } catch {
      // fall through to the hard clean-up
    }
    await stopTestDaemon(d);
  }
  // Any QEMU still running from this data dir (e.g. after a SIGKILL test) is killed by pid.
  const { readdir } = await import('node:fs/promises');
  try {
    for (const name of await readdir(join(dataDir, 'instances'))) {
      const pid = Number(await readFile(join(dataDir, 'instances', name, 'qemu.pid'), 'utf8').catch(() => ''));
      if (pid > 0) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
    }
  } catch {
    // no instances dir
  }
  removeNetworkLeftovers(dataDir);
  await rm(dataDir, { recursive: true, force: true });
}

/**
 * What a stopped daemon's network leaves on the host (its default network's bridge, namespaces,
 * nftables tables, owner file; networks outlive the daemon so that guests keep their network):
 * the next daemon to start would collect it, as its data directory is gone; removed now instead,
 * so that the tests leave nothing behind. Only names with that data directory's tag.
 */
export function removeNetworkLeftovers(dataDir: string): void {
  const names = new NetNames(tagFor(dataDir));
  const quiet = (cmd: string, args: string[]) => spawnSync(cmd, args, { stdio: 'ignore' });
  const links = JSON.parse(spawnSync('ip', ['-j', 'link', 'show'], { encoding: 'utf8' }).stdout || '[]') as Array<{ ifname: string }>;
  for (const l of links) if (names.ownsLink(l.ifname)) quiet('ip', ['link', 'del', l.ifname]);
  for (const ns of spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.split('\n').map((l) => l.split(' ')[0] ?? '')) {
    if (ns && names.ownsNetns(ns)) quiet('ip', ['netns', 'del', ns]);
  }
  for (const family of ['inet', 'bridge']) quiet('nft', ['delete', 'table', family, names.table]);
  rmSync(join(DEFAULT_OWNERS_DIR, names.tag), { force: true });
}

export async function op(api: ApiClient, method: string, path: string, body?: unknown): Promise<Operation> {
  const res = await api.request<{ operation: Operation }>(method, path, body);
  return api.waitOperation(res.operation.id);
}

export async function getInstance(api: ApiClient, name: string): Promise<Instance> {
  return (await api.request<{ instance: Instance }>('GET', `/api/v1/instances/${name}`)).instance;
}

/** Polls the console log until `re` matches, or throws after `timeoutMs` with the log's tail. */
export async function waitForConsole(api: ApiClient, name: string, re: RegExp, timeoutMs = 90_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let text = '';
  while (Date.now() < deadline) {
    text = await api.request<string>('GET', `/api/v1/instances/${name}/console/log`);
    if (re.test(text)) return text;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`console of ${name} did not show ${re} within ${timeoutMs} ms; tail:\n${text.slice(-1500)}`);
}

export async function waitForState(api: ApiClient, name: string, state: string, timeoutMs = 30_000): Promise<Instance> {
  const deadline = Date.now() + timeoutMs;
  let inst: Instance | undefined;
  while (Date.now() < deadline) {
    inst = await getInstance(api, name);
    if (inst.state === state) return inst;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${name} did not reach ${state} within ${timeoutMs} ms (is ${inst?.state})`);
}

/**
 * A daemon for one describe() block: started in before(), torn down (guests killed, data dir
 * removed) in after(). Tests may replace `ctx.d` after restarting the daemon.
 */
export function useTestDaemon(env: NodeJS.ProcessEnv = {}): { dataDir: string; d: TestDaemon } {
  const ctx = {} as { dataDir: string; d: TestDaemon };
  before(async () => {
    ctx.dataDir = await makeDataDir();
    ctx.d = await startTestDaemon(ctx.dataDir, env);
  });
  after(async () => {
    if (ctx.dataDir) await destroyDataDir(ctx.dataDir, ctx.d);
  });
  return ctx;
}

/**
 * Every progress percent an operation reported, read back from the event stream's replay buffer
 * (`?since=0`) until its final event. Polling the operation cannot see this on a fast run: a
 * build from cache may finish between two polls.
 */
export function operationProgress(d: TestDaemon, id: string, timeoutMs = 10_000): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const percents: number[] = [];
    const req = http.get({ socketPath: join(d.dataDir, 'hyperfold.sock'), path: '/api/v1/events?since=0&types=operation' }, (res) => {
      let buf = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        buf += c;
        const lines = buf.split('\n');
        buf = lines.pop()!;
        for (const line of lines) {
          if (!line.startsWith('data: ')) continue;
          const ev = JSON.parse(line.slice(6)) as { data: { operation?: Operation } };
          const o = ev.data.operation;
          if (o?.id !== id) continue;
          percents.push(o.progress.percent);
          if (isFinished(o)) {
            clearTimeout(timer);
            req.destroy();
            resolve(percents);
          }
        }
      });
    });
    req.on('error', () => undefined);
    const timer = setTimeout(() => {
      req.destroy();
      reject(new Error(`no final event for operation ${id} within ${timeoutMs} ms (saw ${percents.join(',')})`));
    }, timeoutMs);
  });
}

let consoleSeq = 0;

/**
 * Runs a shell command on an instance's console (websocket; the tiny image's shell, a container's
 * `sh -i`) and returns what the command printed, without the echo of the typed line or carriage
 * returns.
 */
export async function consoleRun(api: ApiClient, name: string, cmd: string, timeoutMs = 60_000): Promise<string> {
  const tag = `HF${process.pid}x${++consoleSeq}`;
  const ws = api.websocket(`/api/v1/instances/${name}/console`);
  let got = '';
  try {
    return await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${name}: no answer to "${cmd}"; got:\n${got.slice(-1500)}`)), timeoutMs);
      // The markers are split on the command line so that the echo of the command does not match.
      ws.on('open', () => ws.send(`echo ${tag}-BEGIN''; ${cmd}; echo ${tag}-END''\n`));
      ws.on('message', (b: Buffer) => {
        got += b.toString();
        const m = new RegExp(`${tag}-BEGIN\\r?\\n([\\s\\S]*?)${tag}-END`).exec(got);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]!.replace(/\r/g, ''));
        }
      });
      ws.on('error', reject);
    });
  } finally {
    ws.close();
  }
}

/** The address a VM's NIC got from dnsmasq (its lease), waiting for it. */
export async function waitForLease(api: ApiClient, instance: string, nic = 'eth0', timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let last: NicAddress[] = [];
  while (Date.now() < deadline) {
    last = (await api.request<{ addresses: NicAddress[] }>('GET', `/api/v1/addresses?instance=${instance}`)).addresses;
    const a = last.find((x) => x.nic === nic && x.source === 'lease');
    if (a?.ip) return a.ip;
    await new Promise((r) => setTimeout(r, 500));
  }
  throw new Error(`${instance}/${nic} got no DHCP lease: ${JSON.stringify(last)}`);
}
