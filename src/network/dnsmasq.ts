// dnsmasq, one per managed network: DHCP (static reservations only: every NIC has its address
// reserved by Hyperfold) and DNS (instance names under the network's domain). This file holds
// the pure parts (argv, hosts file, lease file) and the supervisor that keeps one dnsmasq alive.
//
// dnsmasq runs in the foreground as the daemon's child, under `setpriv --pdeathsig KILL`, so it
// ends with the daemon however the daemon ends (even SIGKILL); the next daemon restarts it from
// the same files (leases survive in the lease file). If it dies underneath, the supervisor
// restarts it with a growing delay.
import { spawn, type ChildProcess } from 'node:child_process';
import { openSync, closeSync } from 'node:fs';
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError } from '../core/errors.js';
import type { Logger } from '../util/log.js';
import { isProcessAlive, waitForProcessExit } from '../util/proc.js';
import { formatIpv4, formatMask, parseCidr } from './cidr.js';
import type { IpReservation, Lease, Network } from './model.js';

export interface DnsmasqFiles {
  dir: string;
  pidFile: string;
  leaseFile: string;
  hostsFile: string;
  logFile: string;
}

export function dnsmasqFiles(dir: string): DnsmasqFiles {
  return {
    dir,
    pidFile: join(dir, 'dnsmasq.pid'),
    leaseFile: join(dir, 'dnsmasq.leases'),
    hostsFile: join(dir, 'dnsmasq.hosts'),
    logFile: join(dir, 'dnsmasq.log'),
  };
}

export const LEASE_TIME = '1h';

/** The dnsmasq command line (without the binary) for a managed network. */
export function buildDnsmasqArgv(net: Pick<Network, 'name' | 'mode' | 'subnet' | 'gateway' | 'bridge' | 'domain' | 'mtu'>, files: DnsmasqFiles): string[] {
  if (net.mode === 'bridged' || !net.subnet || !net.gateway) {
    throw new HfError('HF_ERR_INTERNAL', `network ${net.name} is not managed by Hyperfold: it has no dnsmasq`);
  }
  const subnet = parseCidr(net.subnet);
  const args = [
    '--keep-in-foreground',
    '--conf-file=/dev/null',
    `--pid-file=${files.pidFile}`,
    '--bind-interfaces',
    `--interface=${net.bridge}`,
    '--except-interface=lo',
    `--listen-address=${net.gateway}`,
    '--strict-order',
    '--no-hosts',
    // Root: the data directory is readable by root only, and dnsmasq re-reads the hosts file
    // on SIGHUP; a uid change would also clear the parent-death signal.
    '--user=root',
    '--group=root',
    '--log-facility=-',
    `--dhcp-range=${formatIpv4(subnet.network)},static,${formatMask(subnet.prefix)},${LEASE_TIME}`,
    '--dhcp-no-override',
    '--dhcp-authoritative',
    `--dhcp-leasefile=${files.leaseFile}`,
    `--dhcp-hostsfile=${files.hostsFile}`,
    `--dhcp-option=option:dns-server,${net.gateway}`,
  ];
  // Option 26: guests on a network that spans hosts must not send frames the tunnel cannot carry.
  if (net.mtu !== undefined) args.push(`--dhcp-option=option:mtu,${net.mtu}`);
  if (net.domain) args.push(`--domain=${net.domain}`, `--local=/${net.domain}/`, '--expand-hosts');
  if (net.mode === 'nat') {
    args.push(`--dhcp-option=option:router,${net.gateway}`);
  } else {
    // Isolated: no default route and no upstream DNS; the host is the only other party.
    args.push('--dhcp-option=option:router', '--no-resolv');
  }
  return args;
}

/** The dhcp-hostsfile: one "mac,ip,hostname" line a reserved NIC. */
export function buildHostsFile(reservations: IpReservation[]): string {
  const sorted = [...reservations].sort((a, b) => a.instance.localeCompare(b.instance) || a.nic.localeCompare(b.nic));
  const seen = new Set<string>();
  const lines: string[] = [];
  for (const r of sorted) {
    // The instance's first NIC on the network gets its name; others get instance-nic.
    const host = seen.has(r.instance) ? `${r.instance}-${r.nic}` : r.instance;
    seen.add(r.instance);
    lines.push(`${r.mac},${r.ip},${host}`);
  }
  return lines.length ? lines.join('\n') + '\n' : '';
}

/** Parses a dnsmasq lease file ("expiry mac ip hostname clientid" lines; IPv6 "duid" lines skipped). */
export function parseLeases(text: string): Lease[] {
  const out: Lease[] = [];
  for (const line of text.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f.length < 4 || f[0] === 'duid') continue;
    const expires = Number(f[0]);
    const mac = f[1]!.toLowerCase();
    const ip = f[2]!;
    if (!Number.isFinite(expires) || !/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/.test(mac) || !/^\d+\.\d+\.\d+\.\d+$/.test(ip)) continue;
    const lease: Lease = { expires, mac, ip };
    if (f[3] && f[3] !== '*') lease.hostname = f[3];
    out.push(lease);
  }
  return out;
}

/** The lease file without the leases of `macs` (used when an instance is deleted). */
export function dropLeases(text: string, macs: ReadonlySet<string>): string {
  return text
    .split('\n')
    .filter((line) => {
      const f = line.trim().split(/\s+/);
      return !(f.length >= 3 && f[0] !== 'duid' && macs.has((f[1] ?? '').toLowerCase()));
    })
    .join('\n');
}

/** Current leases: expired ones (expiry in the past, 0 = never expires) are left out. */
export function activeLeases(leases: Lease[], nowSeconds: number): Lease[] {
  return leases.filter((l) => l.expires === 0 || l.expires > nowSeconds);
}

export async function readLeases(files: DnsmasqFiles): Promise<Lease[]> {
  try {
    return parseLeases(await readFile(files.leaseFile, 'utf8'));
  } catch {
    return [];
  }
}

/** Writes a file atomically (temp file + rename) so dnsmasq never reads half of it. */
export async function writeAtomic(path: string, content: string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, content, { mode: 0o600 });
  await rename(tmp, path);
}

export interface DnsmasqOptions {
  binary?: string;
  log: Logger;
  /** Wraps the command in `setpriv --pdeathsig KILL` (default when setpriv exists). */
  setpriv?: string | undefined;
  /** First restart delay after an unexpected exit; doubles up to 5 s. */
  restartDelayMs?: number;
  onRestart?: (network: string, pid: number) => void;
}

/** Keeps one dnsmasq running for one network. */
export class DnsmasqSupervisor {
  private child: ChildProcess | undefined;
  private stopped = true;
  private failures = 0;
  private restartTimer: NodeJS.Timeout | undefined;
  private exitWaiters: Array<() => void> = [];

  constructor(
    readonly network: string,
    private argv: string[],
    readonly files: DnsmasqFiles,
    private readonly opts: DnsmasqOptions,
  ) {}

  get pid(): number | undefined {
    return this.child?.pid !== undefined && this.child.exitCode === null && this.child.signalCode === null ? this.child.pid : undefined;
  }

  /** Starts dnsmasq (killing a stale one from an earlier daemon first) and waits until it runs. */
  async start(argv?: string[]): Promise<void> {
    if (argv) this.argv = argv;
    this.stopped = false;
    await killStale(this.files.pidFile);
    await this.spawnOnce();
  }

  private async spawnOnce(): Promise<void> {
    const bin = this.opts.binary ?? 'dnsmasq';
    const [cmd, args] = this.opts.setpriv ? [this.opts.setpriv, ['--pdeathsig', 'KILL', bin, ...this.argv]] : [bin, this.argv];
    const logFd = openSync(this.files.logFile, 'a', 0o600);
    let child: ChildProcess;
    try {
      child = spawn(cmd, args, { stdio: ['ignore', logFd, logFd] });
    } finally {
      closeSync(logFd);
    }
    this.child = child;
    const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
    // dnsmasq binds its sockets and writes its pid file before serving: wait for the pid file.
    // Polled often at first (it is there within a few milliseconds), less so later; 2 s at most.
    const ready = (async () => {
      const deadline = Date.now() + 2000;
      for (let delay = 1; Date.now() < deadline; delay = Math.min(delay * 2, 20)) {
        const pid = Number((await readFile(this.files.pidFile, 'utf8').catch(() => '')).trim());
        if (pid > 0 && pid === child.pid) return true;
        await sleep(delay);
      }
      return false;
    })();
    const first = await Promise.race([
      ready.then((ok) => ({ kind: 'ready' as const, ok })),
      exited.then((x) => ({ kind: 'exit' as const, x })),
      spawnError.then((e) => ({ kind: 'error' as const, e })),
    ]);
    if (first.kind === 'error') {
      this.child = undefined;
      const enoent = (first.e as NodeJS.ErrnoException).code === 'ENOENT';
      throw new HfError(enoent ? 'HF_ERR_MISSING_DEPENDENCY' : 'HF_ERR_INTERNAL', enoent ? 'dnsmasq is not installed: run `apt-get install -y dnsmasq-base`' : `cannot start dnsmasq: ${first.e.message}`);
    }
    if (first.kind === 'exit') {
      this.child = undefined;
      const tail = (await readFile(this.files.logFile, 'utf8').catch(() => '')).trim().split('\n').slice(-3).join(' | ');
      throw new HfError('HF_ERR_INTERNAL', `dnsmasq for network ${this.network} exited at start (${first.x.signal ?? `exit ${first.x.code}`}): ${tail}`);
    }
    if (!first.ok) {
      child.kill('SIGKILL');
      throw new HfError('HF_ERR_TIMEOUT', `dnsmasq for network ${this.network} did not come up within 2 s`);
    }
    this.failures = 0;
    void exited.then((x) => this.onExit(child, x));
  }

  private onExit(child: ChildProcess, x: { code: number | null; signal: string | null }): void {
    if (this.child === child) this.child = undefined;
    const waiters = this.exitWaiters;
    this.exitWaiters = [];
    for (const w of waiters) w();
    if (this.stopped) return;
    this.failures++;
    const delay = Math.min(5000, (this.opts.restartDelayMs ?? 200) * 2 ** Math.min(this.failures - 1, 5));
    this.opts.log.warn('dnsmasq exited: restarting', { network: this.network, code: x.code, signal: x.signal, delayMs: delay });
    this.restartTimer = setTimeout(() => {
      this.restartTimer = undefined;
      if (this.stopped) return;
      this.spawnOnce().then(
        () => this.opts.onRestart?.(this.network, this.pid ?? 0),
        (e) => {
          this.opts.log.error('dnsmasq restart failed', { network: this.network, error: (e as Error).message });
          if (!this.stopped) this.onExit(child, { code: null, signal: null });
        },
      );
    }, delay);
    this.restartTimer.unref();
  }

  /** Re-reads the hosts file (new or removed reservations). */
  reload(): void {
    this.child?.kill('SIGHUP');
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise<void>((r) => this.exitWaiters.push(r));
    child.kill('SIGTERM');
    const ok = await Promise.race([gone.then(() => true), sleep(3000).then(() => false)]);
    if (!ok) {
      child.kill('SIGKILL');
      await gone;
    }
  }
}

/** A dnsmasq left by an earlier daemon (its pid file, and its command line naming that file): killed. */
async function killStale(pidFile: string): Promise<void> {
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (!(pid > 0) || !isProcessAlive(pid)) return;
  const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  if (!cmdline.includes(`--pid-file=${pidFile}`)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  await waitForProcessExit(pid, undefined, 3000);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
