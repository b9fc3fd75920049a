// Debian's podman and lxc, measured as bench/containers.ts measures hyperfold: create+start of a
// busybox container until its init runs (see that file's header for what the clock covers).
// Every tool gets what hyperfold's containers get: the daemon's own busybox image (the same
// rootfs, init /sbin/init = busybox init with a shell on the console), the same memory and CPU
// limits, no network, and its commands are started the way the daemon starts runc (through a
// small shell, `Spawner`, not by forking this Node process). The rootfs (lxc) or image (podman)
// is prepared before the clock starts, as the daemon prepares its spare root filesystems.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdtemp, readFile, readdir, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { hostCgroupLayout } from '../src/drivers/container/cgroups.js';
import { which } from '../src/util/exec.js';
import { Spawner } from '../src/util/spawner.js';

/** Host ids of the one user namespace block the podman and lxc containers with a user namespace share. */
const PEER_IDMAP_BASE = 1_800_000_000;
const PEER_IDMAP_SIZE = 65536;
const TOOL_TIMEOUT_MS = 60_000;

export interface PeerOptions {
  /** The daemon's busybox image rootfs (copied, never modified). */
  imageRootfs: string;
  memoryMiB: number;
  vcpus: number;
}

/** A table row: [measure, result, ratio / note]. */
export type Row = [string, string, string];

const oneLine = (s: string) => s.trim().split('\n').map((l) => l.trim()).filter(Boolean).join(' / ').replace(/\|/g, '\\|');
const errorText = (e: unknown) => oneLine(e instanceof Error ? e.message : String(e));

/** Runs an untimed helper command (inspection, cleanup); stdio piped, never a daemonizing command. */
function runSync(argv: string[]): { code: number; out: string } {
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: TOOL_TIMEOUT_MS });
  return { code: r.status ?? -1, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? r.error.message : ''}` };
}

/** Hard limit of this process for a /proc/self/limits row ("Max open files"); Infinity if unlimited. */
function hardLimit(row: string): number {
  const line = readFileSync('/proc/self/limits', 'utf8').split('\n').find((l) => l.startsWith(row));
  const hard = line?.slice(row.length).trim().split(/\s+/)[1];
  return hard === undefined || hard === 'unlimited' ? Infinity : Number(hard);
}

/** Waits until no live process has `tokens` in its command line (podman's conmon and cleanup, lxc's monitor). */
async function processesGone(tokens: string[], timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const pids = (await readdir('/proc')).filter((p) => /^\d+$/.test(p));
    let found = false;
    for (const p of pids) {
      const cmd = await readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => '');
      if (tokens.some((t) => cmd.includes(t))) {
        found = true;
        break;
      }
    }
    if (!found || Date.now() > deadline) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Adds `line` to an id file (/etc/subuid) unless present; returns whether it was added. */
async function addLine(file: string, line: string): Promise<boolean> {
  const text = await readFile(file, 'utf8').catch(() => '');
  if (text.split('\n').includes(line)) return false;
  await writeFile(file, `${text}${text && !text.endsWith('\n') ? '\n' : ''}${line}\n`);
  return true;
}

/** Removes a cgroup directory and its child cgroups (best effort: one with processes stays). */
async function rmdirCgroup(dir: string): Promise<void> {
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const e of entries) if (e.isDirectory()) await rmdirCgroup(join(dir, e.name));
  await rmdir(dir).catch(() => undefined);
}

async function removeLine(file: string, line: string): Promise<void> {
  const text = await readFile(file, 'utf8').catch(() => undefined);
  if (text === undefined) return;
  await writeFile(file, text.split('\n').filter((l) => l !== line).join('\n'));
}

/** One way of creating and starting a container with one tool. */
abstract class Variant {
  readonly times: number[] = [];
  /** Why measuring stopped (the exact error of the failed attempt), if it did. */
  error?: string;
  constructor(readonly key: string, readonly label: string) {}
  /** Untimed: what the tool needs before the clock starts. */
  abstract prepare(name: string): Promise<void>;
  /** Timed: create+start until init runs. */
  abstract start(name: string): Promise<void>;
  /** Untimed: throws unless the container's init (busybox init) is running. */
  abstract check(name: string): Promise<void>;
  /** Untimed: removes the container and waits for the tool's processes to be gone. */
  abstract remove(name: string): Promise<void>;
}

export class Peers {
  readonly variants: Variant[] = [];
  /** Rows for tools that are not installed or could not be set up. */
  readonly notes: Row[] = [];
  readonly spawner = new Spawner();
  readonly prefix = `hf-bench-${process.pid}-`;
  readonly cleanups: Array<() => Promise<void>> = [];

  constructor(readonly work: string) {}

  /** Runs a tool through the spawner (stdin /dev/null, output to `log`); throws with its output unless it exits 0. */
  async tool(argv: string[], log: string, what: string): Promise<void> {
    const label = `${basename(argv[0]!)} ${what}`.trim();
    const code = await this.spawner.run(argv, '/dev/null', log, TOOL_TIMEOUT_MS, label);
    if (code !== 0) {
      const out = await readFile(log, 'utf8').catch(() => '');
      throw new Error(`\`${label}\` exited ${code}: ${out.trim() || '(no output)'}`);
    }
  }

  /** One create+start with each variant still measuring; `record` false for the warm-up. */
  async measure(tag: string, record = true): Promise<void> {
    for (const v of this.variants) {
      if (v.error) continue;
      const name = `${this.prefix}${tag}-${v.key}`;
      let phase = 'prepare';
      let t0 = 0;
      try {
        await v.prepare(name);
        phase = 'start';
        t0 = performance.now();
        await v.start(name);
        const t = performance.now() - t0;
        phase = 'check';
        await v.check(name);
        if (record) v.times.push(t);
      } catch (e) {
        const when = phase === 'start' ? `failed after ${(performance.now() - t0).toFixed(1)} ms` : `${phase} failed`;
        v.error = `${tag === 'warm' ? 'first attempt' : `attempt ${tag}`} ${when}: ${errorText(e)}`;
      } finally {
        await v.remove(name).catch((e) => {
          v.error ??= `removing ${name} failed: ${errorText(e)}`;
        });
      }
    }
  }

  async cleanup(): Promise<void> {
    for (const c of this.cleanups.splice(0).reverse()) await c().catch((e) => console.error(`bench cleanup: ${errorText(e)}`));
    await rm(this.work, { recursive: true, force: true });
  }
}

// ---- podman ------------------------------------------------------------------------------------

interface Podman {
  bin: string;
  global: string[];
  image: string;
  create: string[];
}

class PodmanRun extends Variant {
  constructor(private readonly peers: Peers, private readonly p: Podman, key: string, label: string, private readonly extra: string[], private readonly split: boolean) {
    super(key, label);
  }
  /** Nothing per container: the image was imported at setup. */
  async prepare(): Promise<void> {}
  async start(name: string): Promise<void> {
    const args = [...this.extra, '--name', name, this.p.image, '/sbin/init'];
    const log = join(this.peers.work, `${name}.log`);
    if (this.split) {
      await this.peers.tool([this.p.bin, ...this.p.global, 'create', ...this.p.create, ...args], log, 'create');
      await this.peers.tool([this.p.bin, ...this.p.global, 'start', name], log, 'start');
    } else {
      await this.peers.tool([this.p.bin, ...this.p.global, 'run', '-d', ...this.p.create, ...args], log, 'run -d');
    }
  }
  async check(name: string): Promise<void> {
    const r = runSync([this.p.bin, ...this.p.global, 'inspect', '--format', '{{.State.Status}} {{.State.Pid}}', name]);
    const [status, pid] = r.out.trim().split(' ');
    const comm = pid && pid !== '0' ? readFileSync(`/proc/${pid}/comm`, 'utf8').trim() : '';
    if (r.code !== 0 || status !== 'running' || comm !== 'init') throw new Error(`not running its init after start: ${r.out.trim()} (comm "${comm}")`);
  }
  async remove(name: string): Promise<void> {
    const id = runSync([this.p.bin, ...this.p.global, 'inspect', '--format', '{{.Id}}', name]);
    if (id.code !== 0) return; // never created
    // `rm -f` can race conmon's own `podman container cleanup` ("device or resource busy"): retry.
    let r = runSync([this.p.bin, ...this.p.global, 'rm', '-f', '-t', '0', name]);
    for (let i = 0; r.code !== 0 && i < 5; i++) {
      await new Promise((res) => setTimeout(res, 200));
      if (runSync([this.p.bin, ...this.p.global, 'inspect', '--format', '{{.Id}}', name]).code !== 0) break;
      r = runSync([this.p.bin, ...this.p.global, 'rm', '-f', '-t', '0', name]);
    }
    if (r.code !== 0 && runSync([this.p.bin, ...this.p.global, 'inspect', name]).code === 0) throw new Error(`podman rm: ${r.out}`);
    await processesGone([id.out.trim(), name]);
  }
}

async function setupPodman(peers: Peers, opts: PeerOptions): Promise<void> {
  const bin = await which('podman');
  if (!bin) {
    peers.notes.push(['podman', 'not installed', 'skipped: apt-get install podman lxc']);
    return;
  }
  const version = runSync([bin, '--version']).out.trim().replace(/^podman version /, '');
  const runc = (await which('runc')) ?? 'runc';
  // runc: crun refuses this host's hybrid cgroup v1 layout. cgroupfs and no events: there is no
  // systemd or journald to talk to.
  const global = ['--runtime', runc, '--cgroup-manager', 'cgroupfs', '--events-backend', 'none'];
  const image = `localhost/hf-bench-busybox-${process.pid}`;
  // Podman as root asks for RLIMIT_NOFILE and RLIMIT_NPROC of 1048576, which only a process with
  // CAP_SYS_RESOURCE may set above its hard limit: ask for the limits podman itself runs with
  // (this process's hard RLIMIT_NOFILE, to which podman raises its own; RLIMIT_NPROC 32768, which
  // podman and conmon run with), as hyperfold's init inherits the daemon's.
  const nofile = Math.min(hardLimit('Max open files'), 1048576);
  const nproc = Math.min(hardLimit('Max processes'), 32768);
  const create = [
    '-i', // stdin kept open, as hyperfold's console FIFO: the console shell waits instead of respawning on end of file
    '--network', 'none',
    '--systemd=false', // busybox init is no systemd (an /sbin/init command would turn systemd mode on)
    '--pull', 'never',
    '--memory', `${opts.memoryMiB}m`,
    '--cpus', String(opts.vcpus),
    '--ulimit', `nofile=${nofile}:${nofile}`,
    '--ulimit', `nproc=${nproc}:${nproc}`,
  ];
  const p: Podman = { bin, global, image, create };
  const uidmap = ['--uidmap', `0:${PEER_IDMAP_BASE}:${PEER_IDMAP_SIZE}`, '--gidmap', `0:${PEER_IDMAP_BASE}:${PEER_IDMAP_SIZE}`];
  const variants = [
    new PodmanRun(peers, p, 'podman', `podman ${version}: \`podman run -d\` (create+start in one command; returns once runc has started init), as root without a user namespace (podman's default)`, [], false),
    new PodmanRun(peers, p, 'podman-userns', 'podman: the same with a user namespace (`--uidmap`/`--gidmap`, as hyperfold\'s containers)', uidmap, false),
    new PodmanRun(peers, p, 'podman-split', 'podman: `podman create` then `podman start` (two commands; no user namespace)', [], true),
  ];
  // The image: a tarball of the daemon's busybox rootfs, imported (no registry is reachable).
  const tar = join(peers.work, 'busybox.tar');
  const t = runSync(['tar', '-C', opts.imageRootfs, '-cf', tar, '.']);
  const imp = t.code === 0 ? runSync([bin, ...global, 'import', tar, image]) : t;
  peers.cleanups.push(async () => {
    const list = runSync([bin, ...global, 'ps', '-a', '--format', '{{.Names}}']);
    for (const n of list.out.split('\n').filter((n) => n.startsWith(peers.prefix))) runSync([bin, ...global, 'rm', '-f', '-t', '0', n]);
    if (runSync([bin, ...global, 'image', 'exists', image]).code === 0) {
      const r = runSync([bin, ...global, 'rmi', '-f', image]);
      if (r.code !== 0) throw new Error(`podman rmi ${image}: ${r.out}`);
    }
  });
  for (const v of variants) {
    if (imp.code !== 0) v.error = `image import failed: ${oneLine(imp.out)}`;
    peers.variants.push(v);
  }
}

// ---- lxc ---------------------------------------------------------------------------------------

interface Lxc {
  bin: (tool: string) => string;
  lxcpath: string;
}

class LxcStart extends Variant {
  constructor(private readonly peers: Peers, private readonly lxc: Lxc, private readonly opts: PeerOptions, key: string, label: string, private readonly unprivileged: boolean) {
    super(key, label);
  }
  private dir = (name: string) => join(this.peers.work, name);
  /** A copy of the image rootfs (chowned to the id map if unprivileged) and the config, as lxc-create's input. */
  async prepare(name: string): Promise<void> {
    const rootfs = join(this.dir(name), 'rootfs');
    for (const argv of [['mkdir', '-p', this.dir(name)], ['cp', '-a', this.opts.imageRootfs, rootfs], ...(this.unprivileged ? [['chown', '-R', '-h', `${PEER_IDMAP_BASE}:${PEER_IDMAP_BASE}`, rootfs]] : [])]) {
      const r = runSync(argv);
      if (r.code !== 0) throw new Error(`${argv[0]}: ${r.out}`);
    }
    const cg = hostCgroupLayout().mode === 'v2'
      ? [`lxc.cgroup2.memory.max = ${this.opts.memoryMiB * 1048576}`, `lxc.cgroup2.cpu.max = ${Math.round(this.opts.vcpus * 100_000)} 100000`]
      : [`lxc.cgroup.memory.limit_in_bytes = ${this.opts.memoryMiB * 1048576}`, `lxc.cgroup.cpu.cfs_quota_us = ${Math.round(this.opts.vcpus * 100_000)}`, 'lxc.cgroup.cpu.cfs_period_us = 100000'];
    const conf = [
      // What the lxc busybox template writes, with the image's rootfs instead of the template's.
      `lxc.uts.name = ${name}`,
      `lxc.rootfs.path = dir:${rootfs}`,
      'lxc.include = /usr/share/lxc/config/common.conf',
      ...(this.unprivileged ? ['lxc.include = /usr/share/lxc/config/userns.conf', `lxc.idmap = u 0 ${PEER_IDMAP_BASE} ${PEER_IDMAP_SIZE}`, `lxc.idmap = g 0 ${PEER_IDMAP_BASE} ${PEER_IDMAP_SIZE}`] : []),
      'lxc.net.0.type = empty',
      'lxc.autodev = 1',
      'lxc.mount.auto = cgroup:mixed proc:mixed sys:ro',
      'lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0',
      'lxc.mount.entry = mqueue dev/mqueue mqueue defaults,optional,create=dir 0 0',
      'lxc.signal.halt = SIGUSR1',
      'lxc.init.cmd = /sbin/init',
      ...cg,
    ];
    await writeFile(join(this.dir(name), 'config'), conf.join('\n') + '\n');
  }
  async start(name: string): Promise<void> {
    const log = join(this.dir(name), 'lxc.log');
    await this.peers.tool([this.lxc.bin('lxc-create'), '-n', name, '-t', 'none', '-f', join(this.dir(name), 'config')], log, '');
    await this.peers.tool([this.lxc.bin('lxc-start'), '-n', name, '-d'], log, '-d');
    await this.peers.tool([this.lxc.bin('lxc-wait'), '-n', name, '-s', 'RUNNING', '-t', String(TOOL_TIMEOUT_MS / 1000)], log, '-s RUNNING');
  }
  async check(name: string): Promise<void> {
    const r = runSync([this.lxc.bin('lxc-info'), '-n', name, '-s', '-p']);
    const state = /State:\s*(\S+)/.exec(r.out)?.[1];
    const pid = /PID:\s*(\d+)/.exec(r.out)?.[1];
    const comm = pid ? readFileSync(`/proc/${pid}/comm`, 'utf8').trim() : '';
    if (r.code !== 0 || state !== 'RUNNING' || comm !== 'init') throw new Error(`not running its init after start: ${oneLine(r.out)} (comm "${comm}")`);
  }
  async remove(name: string): Promise<void> {
    if (existsSync(join(this.lxc.lxcpath, name))) {
      runSync([this.lxc.bin('lxc-stop'), '-n', name, '-k']);
      const r = runSync([this.lxc.bin('lxc-destroy'), '-n', name]);
      if (r.code !== 0) throw new Error(`lxc-destroy: ${r.out}`);
    }
    await processesGone([name]);
    await rm(this.dir(name), { recursive: true, force: true });
  }
}

async function setupLxc(peers: Peers, opts: PeerOptions): Promise<void> {
  const tools = ['lxc-create', 'lxc-start', 'lxc-wait', 'lxc-info', 'lxc-stop', 'lxc-destroy', 'lxc-ls', 'lxc-config'];
  const found = new Map<string, string>();
  for (const t of tools) {
    const p = await which(t);
    if (p) found.set(t, p);
  }
  if (found.size < tools.length) {
    peers.notes.push(['lxc', 'not installed', `skipped (no ${tools.filter((t) => !found.has(t)).join(', ')}): apt-get install podman lxc`]);
    return;
  }
  const bin = (t: string) => found.get(t)!;
  const version = runSync([bin('lxc-start'), '--version']).out.trim();
  const lxcpath = runSync([bin('lxc-config'), 'lxc.lxcpath']).out.trim() || '/var/lib/lxc';
  const lxc: Lxc = { bin, lxcpath };
  peers.cleanups.push(async () => {
    const list = runSync([bin('lxc-ls'), '-1']);
    for (const n of list.out.split('\n').map((s) => s.trim()).filter((n) => n.startsWith(peers.prefix))) {
      runSync([bin('lxc-stop'), '-n', n, '-k']);
      const r = runSync([bin('lxc-destroy'), '-n', n]);
      if (r.code !== 0) throw new Error(`lxc-destroy ${n}: ${r.out}`);
    }
  });
  // As root, lxc maps ids with newuidmap when it is installed (uidmap), which insists that root owns
  // the range in /etc/subuid and /etc/subgid (Debian's documented setup for unprivileged root
  // containers): the range is added for the run and removed afterwards.
  const idLine = `root:${PEER_IDMAP_BASE}:${PEER_IDMAP_SIZE}`;
  let idError: string | undefined;
  for (const f of ['/etc/subuid', '/etc/subgid']) {
    try {
      if (await addLine(f, idLine)) peers.cleanups.push(() => removeLine(f, idLine));
    } catch (e) {
      idError = `cannot add ${idLine} to ${f}: ${errorText(e)}`;
    }
  }
  peers.variants.push(new LxcStart(peers, lxc, opts, 'lxc', `lxc ${version}: \`lxc-create -t none\` of a prepared rootfs + \`lxc-start -d\` + \`lxc-wait -s RUNNING\`, privileged (root without a user namespace, lxc's default for root)`, false));
  const unpriv = new LxcStart(peers, lxc, opts, 'lxc-userns', 'lxc: the same unprivileged (`lxc.idmap`, rootfs chowned to the map beforehand, as hyperfold\'s spares)', true);
  if (idError) unpriv.error = idError;
  peers.variants.push(unpriv);
}

/**
 * Sets up podman and lxc (what is installed), runs each variant once untimed (warm-up: image
 * layers, page cache; a failure there is reported as the variant's error) and returns them.
 */
export async function setupPeers(opts: PeerOptions): Promise<Peers> {
  const work = await mkdtemp(join(tmpdir(), 'hf-bench-peers-'));
  // An unprivileged container's root must be able to reach its rootfs.
  await chmod(work, 0o711);
  const peers = new Peers(work);
  // The parent cgroups podman (cgroupfs manager) and lxc leave behind, in every hierarchy: removed
  // at the end (the last clean-up) if this run made them.
  const layout = hostCgroupLayout();
  const roots = [...new Set([...Object.values(layout.v1), ...(layout.unified ? [layout.unified] : [])])];
  const madeHere = roots.flatMap((r) => ['libpod_parent', 'lxc.pivot'].map((n) => join(r, n))).filter((d) => !existsSync(d));
  peers.cleanups.push(async () => {
    for (const d of madeHere) await rmdirCgroup(d);
  });
  try {
    await setupPodman(peers, opts);
    await setupLxc(peers, opts);
    await peers.measure('warm', false);
  } catch (e) {
    await peers.cleanup();
    throw e;
  }
  return peers;
}

/** The table rows: median and ratio to the baseline, or why there is none. */
export function peerRows(peers: Peers, median: (xs: number[]) => number, ms: (x: number) => string, ratio: (x: number) => string): Row[] {
  const rows: Row[] = [];
  for (const v of peers.variants) {
    if (v.error) rows.push([v.label, v.times.length ? `failed (${v.times.length} runs done, median ${ms(median(v.times))})` : 'failed', v.error]);
    else rows.push([v.label, ms(median(v.times)), ratio(median(v.times))]);
  }
  return [...rows, ...peers.notes];
}
