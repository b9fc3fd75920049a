// Network benchmarks (issue 5), each against a baseline measured in the same run:
//  1. TCP throughput between two busybox containers on the default network (veth → bridge →
//     host routing with proxy ARP and the nftables ruleset → veth), versus the same sender and
//     receiver over the host's loopback. Sender and receiver are small Node programs run in the
//     containers' network namespaces (`ip netns exec`); BENCH_NET_MIB MiB each (default 256).
//  2. Time to create a network through the API (bridge, addresses, dnsmasq up, ruleset
//     rebuilt, record written), versus creating and addressing a bare bridge with `ip`.
//  3. Time to hot-plug a NIC into a running container (reservation, veth pair, namespace,
//     ruleset, the operation's round trip), versus the bare `ip` commands for a veth pair moved
//     into a namespace.
//  4. TCP throughput between two tiny VMs on the default network (tap → bridge → host → tap),
//     virtio-net against e1000 (`devices: emulated`): busybox `dd | nc` in one guest to
//     `nc -l` in the other, timed by the guest's `time`, BENCH_VM_MIB MiB (default 32). Under TCG
//     both numbers mostly measure the CPU emulator: the ratio says what the paravirtual NIC saves.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Instance } from '../src/core/model/instance.js';
import type { Operation } from '../src/core/model/operation.js';
import { NetNames, tagFor } from '../src/network/names.js';
import { CLI, consoleRun, destroyDataDir, makeDataDir, startTestDaemon, waitForConsole, waitForLease, type TestDaemon } from '../test/helpers/daemon.js';
import { median } from './stats.js';

const MIB = Number(process.env.BENCH_NET_MIB ?? 256);
const RUNS = Number(process.env.BENCH_NET_RUNS ?? 5);
const VM_MIB = Number(process.env.BENCH_VM_MIB ?? 32);

const SINK = `
const net = require('node:net');
const [port, total] = [Number(process.argv[2]), Number(process.argv[3])];
const srv = net.createServer((s) => {
  let n = 0;
  s.on('data', (b) => { n += b.length; if (n >= total) { s.end('ok'); srv.close(); } });
});
srv.listen(port, '0.0.0.0', () => process.stdout.write('listening\\n'));
`;
const SOURCE = `
const net = require('node:net');
const [host, port, total] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const chunk = Buffer.alloc(1 << 20, 7);
const t0 = process.hrtime.bigint();
const s = net.connect(port, host, () => {
  let sent = 0;
  const pump = () => { while (sent < total) { sent += chunk.length; if (!s.write(chunk)) { s.once('drain', pump); return; } } };
  pump();
});
s.on('data', () => { process.stdout.write(String(Number(process.hrtime.bigint() - t0) / 1e6) + '\\n'); s.destroy(); });
s.on('error', (e) => { console.error(e.message); process.exit(1); });
`;


function sh(cmd: string, args: string[]): { status: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status ?? -1, out: r.stdout + r.stderr };
}

function must(cmd: string, args: string[]): string {
  const r = sh(cmd, args);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.out}`);
  return r.out;
}

/** MiB/s from a sender in `fromNs` to a receiver in `toNs` (undefined = the host's namespace). */
async function throughput(dir: string, toNs: string | undefined, fromNs: string | undefined, host: string): Promise<number> {
  const port = 40000 + Math.floor(Math.random() * 20000);
  const total = MIB * 1048576;
  const wrap = (ns: string | undefined, args: string[]): [string, string[]] => (ns ? ['ip', ['netns', 'exec', ns, ...args]] : [args[0]!, args.slice(1)]);
  const [sc, sa] = wrap(toNs, [process.execPath, join(dir, 'sink.cjs'), String(port), String(total)]);
  const sink = spawn(sc, sa, { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    sink.stdout!.once('data', () => resolve());
    sink.once('exit', (c) => reject(new Error(`sink exited (${c})`)));
  });
  const [cc, ca] = wrap(fromNs, [process.execPath, join(dir, 'source.cjs'), host, String(port), String(total)]);
  const ms = Number(must(cc, ca).trim());
  sink.kill();
  return MIB / (ms / 1000);
}

async function op(d: TestDaemon, method: string, path: string, body?: unknown): Promise<Operation> {
  const r = await d.api.request<{ operation: Operation }>(method, path, body);
  const done = await d.api.waitOperation(r.operation.id);
  if (done.status !== 'success') throw new Error(`${method} ${path}: ${JSON.stringify(done.error)}`);
  return done;
}

/** busybox `time` output ("real\t0m 2.34s") in seconds. */
function realSeconds(out: string): number {
  const m = /real\s+(?:(\d+)m\s*)?([\d.]+)s/.exec(out);
  if (!m) throw new Error(`no timing in: ${out.slice(-500)}`);
  return Number(m[1] ?? 0) * 60 + Number(m[2]);
}

/** MiB/s from one tiny VM to another, both with `devices` NICs on the default network (median of 3). */
async function vmThroughput(d: TestDaemon, devices: 'virtio' | 'emulated'): Promise<number> {
  const [a, b] = [`vm-${devices}-a`, `vm-${devices}-b`];
  for (const name of [a, b]) {
    const r = await d.api.request<{ operation: Operation }>('POST', '/api/v1/instances?wait=120', { name, image: 'tiny', memory: '256M', accel: 'tcg', devices, nics: [{ network: 'default' }], start: true });
    if (r.operation.status !== 'success') throw new Error(`launch ${name}: ${JSON.stringify(r.operation.error)}`);
  }
  try {
    for (const name of [a, b]) await waitForConsole(d.api, name, /HYPERFOLD-GUEST-READY/, 120_000);
    const ipA = await waitForLease(d.api, a);
    await waitForLease(d.api, b);
    const rates: number[] = [];
    for (let i = 0; i < 4; i++) {
      await consoleRun(d.api, a, 'nc -l -p 5001 > /dev/null & true');
      await new Promise((r) => setTimeout(r, 300));
      const out = await consoleRun(d.api, b, `time sh -c 'dd if=/dev/zero bs=65536 count=${VM_MIB * 16} 2>/dev/null | nc ${ipA} 5001'`, 600_000);
      if (i > 0) rates.push(VM_MIB / realSeconds(out)); // the first run warms up
    }
    return median(rates);
  } finally {
    for (const name of [a, b]) await d.api.request('DELETE', `/api/v1/instances/${name}?force=true&wait=60`).catch(() => undefined);
  }
}

export async function run(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'hf-bench-net-'));
  await writeFile(join(dir, 'sink.cjs'), SINK);
  await writeFile(join(dir, 'source.cjs'), SOURCE);
  const dataDir = await makeDataDir();
  let d: TestDaemon | undefined;
  const probe = `hfz${Math.random().toString(36).slice(2, 7)}`;
  try {
    d = await startTestDaemon(dataDir);
    const names = new NetNames(tagFor(dataDir));
    const cli = (...args: string[]) => must(process.execPath, [CLI, '--data-dir', dataDir, ...args]);
    cli('launch', 'busybox', 'b1', '--container', '--network', 'default');
    cli('launch', 'busybox', 'b2', '--container', '--network', 'default');
    const b2 = (await d.api.request<{ instance: Instance }>('GET', '/api/v1/instances/b2')).instance;
    const b2ip = b2.config.nics[0]!.ip!;

    // 1. throughput (one warm-up each, then the median of 3)
    const veth: number[] = [];
    const lo: number[] = [];
    await throughput(dir, names.netns('b2'), names.netns('b1'), b2ip);
    await throughput(dir, undefined, undefined, '127.0.0.1');
    for (let i = 0; i < 3; i++) {
      veth.push(await throughput(dir, names.netns('b2'), names.netns('b1'), b2ip));
      lo.push(await throughput(dir, undefined, undefined, '127.0.0.1'));
    }

    // 2. network create
    const create: number[] = [];
    const rawBridge: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      let t0 = performance.now();
      await d.api.request('POST', '/api/v1/networks', { name: `bn${i}`, mode: 'isolated' });
      create.push(performance.now() - t0);
      t0 = performance.now();
      must('ip', ['link', 'add', probe, 'type', 'bridge']);
      must('ip', ['addr', 'add', '169.254.213.1/30', 'dev', probe]);
      must('ip', ['link', 'set', probe, 'up']);
      rawBridge.push(performance.now() - t0);
      must('ip', ['link', 'del', probe]);
    }
    for (let i = 1; i < RUNS; i++) await d.api.request('DELETE', `/api/v1/networks/bn${i}`);

    // 3. NIC hot-plug into a running container, and removal
    const attach: number[] = [];
    const detach: number[] = [];
    const rawVeth: number[] = [];
    const ns = `${probe}-ns`;
    must('ip', ['netns', 'add', ns]);
    try {
      for (let i = 0; i < RUNS; i++) {
        let t0 = performance.now();
        await op(d, 'POST', '/api/v1/instances/b1/nics', { network: 'bn0', name: 'eth1' });
        attach.push(performance.now() - t0);
        t0 = performance.now();
        await op(d, 'DELETE', '/api/v1/instances/b1/nics/eth1');
        detach.push(performance.now() - t0);
        t0 = performance.now();
        must('ip', ['link', 'add', `${probe}a`, 'type', 'veth', 'peer', 'name', `${probe}b`]);
        must('ip', ['link', 'set', `${probe}b`, 'netns', ns]);
        must('ip', ['-n', ns, 'link', 'set', `${probe}b`, 'name', 'eth1']);
        must('ip', ['-n', ns, 'addr', 'add', '169.254.213.2/30', 'dev', 'eth1']);
        must('ip', ['-n', ns, 'link', 'set', 'eth1', 'up']);
        must('ip', ['link', 'set', `${probe}a`, 'up']);
        rawVeth.push(performance.now() - t0);
        must('ip', ['link', 'del', `${probe}a`]);
      }
    } finally {
      sh('ip', ['netns', 'del', ns]);
    }

    // 4. VM → VM, virtio-net against e1000
    const virtio = await vmThroughput(d, 'virtio');
    const e1000 = await vmThroughput(d, 'emulated');

    const f1 = (x: number) => x.toFixed(1);
    const rows = [
      ['TCP throughput, container → container on one network (veth, bridge, nft)', `${f1(median(veth))} MiB/s`, 'host loopback, same programs', `${f1(median(lo))} MiB/s`, (median(veth) / median(lo)).toFixed(2)],
      ['create a network (API: bridge, dnsmasq, ruleset, record)', `${f1(median(create))} ms`, '`ip` bridge add + address + up', `${f1(median(rawBridge))} ms`, (median(create) / median(rawBridge)).toFixed(1)],
      ['hot-plug a NIC into a running container (operation)', `${f1(median(attach))} ms`, '`ip` veth pair into a namespace, addressed, up', `${f1(median(rawVeth))} ms`, (median(attach) / median(rawVeth)).toFixed(1)],
      ['hot-unplug that NIC (operation)', `${f1(median(detach))} ms`, '(same baseline)', `${f1(median(rawVeth))} ms`, (median(detach) / median(rawVeth)).toFixed(1)],
      [`TCP throughput, VM → VM on one network, virtio-net (TCG; ${VM_MIB} MiB, median of 3)`, `${f1(virtio)} MiB/s`, 'the same with e1000 NICs', `${f1(e1000)} MiB/s`, (virtio / e1000).toFixed(2)],
    ];
    return [
      `Throughput: ${MIB} MiB a run, median of 3 after a warm-up; timings: median of ${RUNS}. Ratio = measured / baseline.`,
      '',
      '| measured | value | baseline | baseline value | ratio |',
      '|---|---|---|---|---|',
      ...rows.map((r) => `| ${r.join(' | ')} |`),
    ].join('\n');
  } finally {
    sh('ip', ['link', 'del', probe]);
    sh('ip', ['link', 'del', `${probe}a`]);
    // Also removes the networks, which a daemon keeps up when it stops (guests may still use them).
    await destroyDataDir(dataDir, d);
    await rm(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(await run());
}
