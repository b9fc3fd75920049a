// Container benchmarks (issue 4), each against a baseline measured in the same run:
//  1. create+start of a busybox container through the API until its init runs (the start
//     operation ends when `runc run --detach` has exec'd init), versus `runc run --detach` of a
//     prepared bundle with the same config.json (and versus the same plus preparing the rootfs
//     with cp -a + chown -R). Fairness: the baseline's bundle (rootfs copied and chowned to the
//     container's id block, config.json written, console FIFO made) is prepared before its clock
//     starts, as the daemon prepares its spare root filesystems before a create asks for one, and
//     runc is run exactly as the daemon runs it (same config.json and arguments, stdin the FIFO,
//     output to a log file, started from a small shell: `Runc.runDetached`). The earlier baseline
//     (spawnSync of runc from this Node process, stdio /dev/null) is kept as a row for comparison.
//     The measures are interleaved (ours, then the baselines, then podman and lxc, N times) so
//     that all see the same host load, and each starts with the daemon idle: the refill of the
//     spare pool after a create (a background copy) is awaited before the next measure, so it
//     neither slows the baselines nor hides in them. What the pool does not cover is reported
//     too: a daemon without spares (HYPERFOLD_CONTAINER_SPARES=0: copy + chown at create,
//     measured the same way) and back-to-back creates that outrun the refill.
//     Debian's podman and lxc are measured the same way when installed (bench/peers.ts; a row
//     says "not installed" otherwise, or the exact error of the attempt that failed): the same
//     busybox rootfs (the daemon's image), init /sbin/init with its console shell, memory and CPU
//     limits, no network, commands started from the same kind of small shell; each container is
//     removed, and its tool's processes gone, outside the clock. The clock covers:
//     - podman: `podman run -d` until it returns: podman's create+start in one command, which
//       returns once runc has started the container's init (the state is then `running`; that
//       and init's process are checked after the clock stops). The image is imported before
//       (from a tarball of the rootfs; podman's create of a container from it, an overlay
//       mount, is inside). Rows: as root without a user namespace (podman's default), with one
//       (`--uidmap`, as ours), and `podman create` + `podman start` as two commands.
//     - lxc: `lxc-create -t none` of a config naming a rootfs copied (and, unprivileged, chowned
//       to the id map) before the clock, `lxc-start -d` (returns once the container is RUNNING)
//       and `lxc-wait -s RUNNING`. Rows: privileged (lxc's default for root) and unprivileged.
//  2. N idle busybox containers (BENCH_CONTAINERS, default 500 as the issue asks): memory per
//     container (cgroup memory usage, and RSS of its processes) and the daemon's RSS before and
//     after.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdtemp, readFile, readdir, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Instance } from '../src/core/model/instance.js';
import type { Operation } from '../src/core/model/operation.js';
import { ContainerCgroup, containerCgroupPath, hostCgroupLayout, swapLimitSupported } from '../src/drivers/container/cgroups.js';
import { DEFAULT_RUNC_ROOT } from '../src/drivers/container/driver.js';
import { Runc } from '../src/drivers/container/runc.js';
import { buildOciSpec } from '../src/drivers/container/spec.js';
import { processRssBytes } from '../src/util/proc.js';
import { removeNetworkLeftovers, startTestDaemon, stopTestDaemon, type TestDaemon } from '../test/helpers/daemon.js';
import { peerRows, setupPeers, type Peers } from './peers.js';
import { median } from './stats.js';

const N_START = Number(process.env.BENCH_START_RUNS ?? 10);
const N_IDLE = Number(process.env.BENCH_CONTAINERS ?? 500);
/** Spares the daemon keeps per image (its default). */
const SPARES = 2;

const ms = (x: number) => `${x.toFixed(1)} ms`;
const mib = (b: number) => `${(b / 1048576).toFixed(2)} MiB`;

function sh(cmd: string, args: string[], detachedStdio = false): { status: number; ms: number; out: string } {
  const t0 = performance.now();
  // A detached container inherits runc's stdio: give it /dev/null, or we would wait on its pipes.
  const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: detachedStdio ? 'ignore' : 'pipe' });
  return { status: r.status ?? -1, ms: performance.now() - t0, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

function removeContainersOf(dir: string): void {
  const r = spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'list', '--format', 'json'], { encoding: 'utf8' });
  const list = (r.stdout.trim() && r.stdout.trim() !== 'null' ? JSON.parse(r.stdout) : []) as Array<{ id: string; bundle: string }>;
  for (const c of list) if (c.bundle.startsWith(dir)) spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', c.id]);
}

async function launch(d: TestDaemon, name: string): Promise<number> {
  const t0 = performance.now();
  // One round trip: the answer comes once the start finished (as `hyperfold launch` does).
  const { operation: done } = await d.api.request<{ operation: Operation }>('POST', '/api/v1/instances?wait=60', { name, type: 'container', image: 'busybox', memory: '32M', vcpus: 0.5, start: true });
  if (done.status !== 'success') throw new Error(`start of ${name} failed: ${done.error?.message}`);
  return performance.now() - t0;
}

/**
 * Waits until the daemon's spare pool for `image` holds `want` ready spares and nothing is being
 * prepared (it refills in the background after each create).
 */
async function poolSettled(dataDir: string, image: string, want: number, timeoutMs = 30_000): Promise<boolean> {
  const dir = join(dataDir, 'containers', 'spare', image);
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const names = await readdir(dir).catch(() => [] as string[]);
    const ready = names.filter((n) => /^[0-9]+$/.test(n) && existsSync(join(dir, n, 'rootfs')));
    if (!names.some((n) => n.endsWith('.tmp')) && ready.length >= want) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}

/** RSS of every process in a container's memory cgroup (v1) or unified cgroup (v2). */
async function containerRss(id: string): Promise<number> {
  const cg = new ContainerCgroup(hostCgroupLayout(), containerCgroupPath(id));
  const dir = cg.dir('memory') ?? cg.dir('pids');
  if (!dir) return 0;
  const procs = (await readFile(join(dir, 'cgroup.procs'), 'utf8').catch(() => '')).split('\n').filter(Boolean).map(Number);
  return procs.reduce((s, p) => s + (processRssBytes(p) ?? 0), 0);
}

export async function run(): Promise<string> {
  const dataDir = await mkdtemp(join(tmpdir(), 'hf-bench-ct-'));
  const raw = await mkdtemp(join(tmpdir(), 'hf-bench-runc-'));
  // The unprivileged container root must be able to reach its bundle.
  await chmod(raw, 0o711);
  const dataDir0 = await mkdtemp(join(tmpdir(), 'hf-bench-ct0-'));
  let d: TestDaemon | undefined;
  let d0: TestDaemon | undefined;
  let peers: Peers | undefined;
  const rows: string[][] = [];
  try {
    // Idle containers commit little: let CPU and memory admission allow hundreds of them.
    const env = { HYPERFOLD_LOG_LEVEL: 'warn', HYPERFOLD_CPU_OVERCOMMIT: '1000', HYPERFOLD_MEMORY_OVERCOMMIT: '4' };
    d = await startTestDaemon(dataDir, { ...env, HYPERFOLD_CONTAINER_SPARES: String(SPARES) });
    // The same daemon without spares (its own id blocks, far from the other's).
    d0 = await startTestDaemon(dataDir0, { ...env, HYPERFOLD_CONTAINER_SPARES: '0', HYPERFOLD_IDMAP_BASE: '2000000000' });
    // Warm up: builds the busybox image and the page cache, and (first use) fills the pool.
    await launch(d, 'warm');
    await launch(d0, 'warm');
    const settled = await poolSettled(dataDir, 'busybox', SPARES);
    if (!settled) throw new Error('the spare pool did not fill within 30 s');

    // ---- 1. create+start until init runs --------------------------------------------------------
    // Baseline: the same bundle (rootfs + config.json of a container we made), started by runc alone.
    const warm = (await d.api.request<{ instance: Instance }>('GET', '/api/v1/instances/warm')).instance;
    const warmDir = join(dataDir, 'instances', 'warm');
    const imageRootfs = join(dataDir, 'images', 'busybox', 'rootfs');
    const meta = JSON.parse(await readFile(join(warmDir, 'container.json'), 'utf8'));
    const ours: number[] = [];
    const noSpares: number[] = [];
    const direct: number[] = [];
    const directSpawnSync: number[] = [];
    const directWithCopy: number[] = [];
    const runc = new Runc('runc', DEFAULT_RUNC_ROOT);
    // Podman and lxc, where installed: set up (image import, id ranges) and warmed up once.
    peers = await setupPeers({ imageRootfs, memoryMiB: warm.config.memoryMiB, vcpus: warm.config.vcpus });
    for (let i = 0; i < N_START; i++) {
      await poolSettled(dataDir, 'busybox', SPARES);
      ours.push(await launch(d, `s${i}`));
      // The pool refills after that create: let it finish before the next measures.
      await poolSettled(dataDir, 'busybox', SPARES);
      noSpares.push(await launch(d0, `s${i}`));
      for (const kind of ['prepared', 'spawnSync', 'copy'] as const) {
        const bundle = join(raw, `b${i}-${kind}`);
        const id = `hf-bench-${process.pid}-${i}-${kind}`;
        sh('mkdir', ['-p', bundle]);
        const spec = buildOciSpec({ hostname: 'raw', rootfs: join(bundle, 'rootfs'), config: warm.config, meta, cgroupsPath: `/hyperfold-bench/${id}`, swapLimit: swapLimitSupported(hostCgroupLayout()) });
        await writeFile(join(bundle, 'config.json'), JSON.stringify(spec));
        sh('mkfifo', ['-m', '600', join(bundle, 'console.in')]);
        let t = 0;
        const copy = () => {
          const c1 = sh('cp', ['-a', imageRootfs, join(bundle, 'rootfs')]);
          const c2 = sh('chown', ['-R', '-h', `${meta.idmap.hostId}:${meta.idmap.hostId}`, join(bundle, 'rootfs')]);
          return c1.ms + c2.ms;
        };
        // Prepared ahead, outside the clock (as a spare is), except for the `copy` variant.
        if (kind === 'copy') t += copy();
        else copy();
        if (kind === 'spawnSync') {
          // The earlier baseline: forked from this Node process, stdio /dev/null, no pid file.
          const r = sh('runc', ['--root', DEFAULT_RUNC_ROOT, '--log', join(bundle, 'runc.log'), 'run', '--detach', '--bundle', bundle, id], true);
          if (r.status !== 0) throw new Error(`runc run: ${await readFile(join(bundle, 'runc.log'), 'utf8').catch(() => '')}`);
          t += r.ms;
        } else {
          // As the daemon runs it: same arguments, console FIFO and log, started from a small shell.
          const t0 = performance.now();
          await runc.runDetached(id, bundle, join(bundle, 'init.pid'), { stdin: join(bundle, 'console.in'), out: join(bundle, 'console.log') }, join(bundle, 'runc.log'));
          t += performance.now() - t0;
        }
        ({ prepared: direct, spawnSync: directSpawnSync, copy: directWithCopy })[kind].push(t);
        sh('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', id]);
      }
      await peers.measure(String(i));
    }
    // Back-to-back creates: after the first SPARES, each waits for the spare being prepared.
    await poolSettled(dataDir, 'busybox', SPARES);
    const burst: number[] = [];
    for (let i = 0; i < N_START; i++) burst.push(await launch(d, `r${i}`));
    const base = median(direct);
    const ratio = (x: number) => `${(x / base).toFixed(2)}×`;
    rows.push(['create+start busybox until init runs: hyperfold (API, median)', ms(median(ours)), `${ratio(median(ours))} (target ≤ 1.2×)`]);
    rows.push(['baseline: `runc run --detach` of a prepared bundle (as the daemon runs it: same arguments and stdio, from a small shell)', ms(base), '1.00×']);
    rows.push(['the same, spawned with spawnSync from the benchmark (forks this Node process; stdio /dev/null, no pid file)', ms(median(directSpawnSync)), ratio(median(directSpawnSync))]);
    rows.push(['baseline: cp -a + chown -R of the rootfs, then `runc run --detach`', ms(median(directWithCopy)), ratio(median(directWithCopy))]);
    rows.push(['hyperfold without spares (HYPERFOLD_CONTAINER_SPARES=0: copy + chown at create)', ms(median(noSpares)), ratio(median(noSpares))]);
    rows.push([`hyperfold back-to-back, ${N_START} creates in a row (${SPARES} spares, then waits for the refill)`, ms(median(burst)), ratio(median(burst))]);
    rows.push(...peerRows(peers, median, ms, ratio));
    if (process.env.BENCH_DEBUG) console.error({ ours, noSpares, direct, directSpawnSync, directWithCopy, burst, peers: Object.fromEntries(peers.variants.map((v) => [v.key, v.error ?? v.times])) });
    await peers.cleanup();
    peers = undefined;

    // The daemon without spares has done its part.
    for (const n of ['warm', ...Array.from({ length: N_START }, (_, i) => `s${i}`)]) {
      await d0.api.waitOperation((await d0.api.request<{ operation: Operation }>('DELETE', `/api/v1/instances/${n}?force=true`)).operation.id);
    }
    await stopTestDaemon(d0);
    d0 = undefined;
    for (let i = 0; i < N_START; i++) await d.api.waitOperation((await d.api.request<{ operation: Operation }>('DELETE', `/api/v1/instances/r${i}?force=true`)).operation.id);

    // ---- 2. N idle containers ------------------------------------------------------------------
    for (let i = 0; i < N_START; i++) await d.api.waitOperation((await d.api.request<{ operation: Operation }>('DELETE', `/api/v1/instances/s${i}?force=true`)).operation.id);
    const rssBefore = processRssBytes(d.proc.pid!) ?? 0;
    const t0 = performance.now();
    for (let i = 0; i < N_IDLE; i++) await launch(d, `idle${i}`);
    const allMs = performance.now() - t0;
    await new Promise((r) => setTimeout(r, 2000));
    const { instances } = await d.api.request<{ instances: Instance[] }>('GET', '/api/v1/instances');
    const idle = instances.filter((i) => i.name.startsWith('idle') && i.state === 'running');
    let cgMem = 0;
    let rss = 0;
    for (const i of idle) {
      cgMem += (await new ContainerCgroup(hostCgroupLayout(), containerCgroupPath(i.id)).usage()).memoryBytes ?? 0;
      rss += await containerRss(i.id);
    }
    const rssAfter = processRssBytes(d.proc.pid!) ?? 0;
    const tList0 = performance.now();
    await d.api.request('GET', '/api/v1/instances');
    const listMs = performance.now() - tList0;
    rows.push([`${idle.length} idle busybox containers: started in`, `${(allMs / 1000).toFixed(1)} s`, `${ms(allMs / N_IDLE)} each`]);
    rows.push(['memory per container (cgroup usage: processes + page cache + kernel)', mib(cgMem / idle.length), '']);
    rows.push(['memory per container (RSS of its processes: init + console shell)', mib(rss / idle.length), '']);
    rows.push(['daemon RSS before → after', `${mib(rssBefore)} → ${mib(rssAfter)}`, `${mib((rssAfter - rssBefore) / idle.length)} per container`]);
    rows.push([`GET /api/v1/instances with ${instances.length} instances`, ms(listMs), '']);
    rows.push(['host processes per container kept by hyperfold (no shim)', String(0), '']);
  } finally {
    await peers?.cleanup();
    if (d0) {
      const { instances } = await d0.api.request<{ instances: Instance[] }>('GET', '/api/v1/instances').catch(() => ({ instances: [] as Instance[] }));
      for (const i of instances) await d0.api.request<{ operation: Operation }>('DELETE', `/api/v1/instances/${i.name}?force=true`).then((r) => d0!.api.waitOperation(r.operation.id)).catch(() => undefined);
      await stopTestDaemon(d0);
    }
    if (d) {
      const { instances } = await d.api.request<{ instances: Instance[] }>('GET', '/api/v1/instances').catch(() => ({ instances: [] as Instance[] }));
      for (const i of instances) await d.api.request<{ operation: Operation }>('DELETE', `/api/v1/instances/${i.name}?force=true`).then((r) => d!.api.waitOperation(r.operation.id)).catch(() => undefined);
      await stopTestDaemon(d);
    }
    removeContainersOf(dataDir);
    removeContainersOf(dataDir0);
    removeContainersOf(raw);
    for (const e of await readdir(DEFAULT_RUNC_ROOT).catch(() => [] as string[])) if (e.startsWith(`hf-bench-${process.pid}-`)) sh('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', e]);
    await rm(dataDir, { recursive: true, force: true });
    await rm(dataDir0, { recursive: true, force: true });
    removeNetworkLeftovers(dataDir);
    removeNetworkLeftovers(dataDir0);
    await rm(raw, { recursive: true, force: true });
    // The baseline's parent cgroup (runc removes only the containers' own).
    const layout = hostCgroupLayout();
    for (const mount of [...Object.values(layout.v1), ...(layout.unified ? [layout.unified] : [])]) await rmdir(join(mount, 'hyperfold-bench')).catch(() => undefined);
  }
  return ['| measure | result | ratio / note |', '|---|---|---|', ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

if (import.meta.url === `file://${process.argv[1]}`) console.log(await run());
