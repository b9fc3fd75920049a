// Control groups for containers: which layout the host has (v1, hybrid or unified v2), where a
// container's cgroup lives, and reading its limits, usage and OOM counters straight from the
// cgroup files (cheaper than asking runc). runc itself creates and configures the cgroups.
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

/** v1: only v1 hierarchies; hybrid: v1 for controllers plus a v2 tree at /sys/fs/cgroup/unified; v2: unified. */
export type CgroupMode = 'v1' | 'hybrid' | 'v2';

export interface CgroupLayout {
  mode: CgroupMode;
  /** Mount point of each v1 controller (memory → /sys/fs/cgroup/memory); empty on v2. */
  v1: Record<string, string>;
  /** Mount point of the unified hierarchy (v2 mode: /sys/fs/cgroup). */
  unified?: string;
}

/**
 * Parses /proc/self/mountinfo into the cgroup layout (pure). Field 5 is the mount point; after
 * the " - " separator come the filesystem type, the source and the super options, which name
 * the v1 controllers.
 */
export function parseCgroupLayout(mountinfo: string): CgroupLayout {
  const v1: Record<string, string> = {};
  let unified: string | undefined;
  for (const line of mountinfo.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    const mountPoint = left[4];
    const fstype = right[0];
    if (!mountPoint) continue;
    if (fstype === 'cgroup2') {
      if (unified === undefined || mountPoint === '/sys/fs/cgroup') unified = mountPoint;
    } else if (fstype === 'cgroup') {
      const opts = (right[2] ?? '').split(',');
      for (const o of opts) {
        if (['rw', 'ro', 'relatime', 'nosuid', 'nodev', 'noexec'].includes(o) || o.startsWith('release_agent')) continue;
        if (o.startsWith('name=')) v1[o] = mountPoint;
        else v1[o] ??= mountPoint;
      }
    }
  }
  const hasV1Controllers = Object.keys(v1).some((k) => !k.startsWith('name='));
  if (hasV1Controllers) return { mode: unified ? 'hybrid' : 'v1', v1, unified };
  return { mode: 'v2', v1: {}, unified: unified ?? '/sys/fs/cgroup' };
}

let cached: CgroupLayout | undefined;

export function hostCgroupLayout(): CgroupLayout {
  if (!cached) cached = parseCgroupLayout(readFileSync('/proc/self/mountinfo', 'utf8'));
  return cached;
}

/** The cgroup path given to runc (relative to each hierarchy's root). */
export function containerCgroupPath(containerId: string): string {
  return `/hyperfold/${containerId}`;
}

export const CPU_PERIOD_US = 100_000;
/** The kernel refuses CFS quotas under 1 ms. */
export const MIN_CPU_QUOTA_US = 1_000;
export const MIN_CONTAINER_MEMORY_MIB = 16;

/** vCPUs (a fraction of CPU time is fine) → CFS quota per 100 ms period. */
export function cpuQuotaUs(vcpus: number): number {
  return Math.round(vcpus * CPU_PERIOD_US);
}

export interface CgroupUsage {
  memoryBytes?: number;
  memoryLimitBytes?: number;
  cpuQuotaUs?: number;
  cpuPeriodUs?: number;
  cpuUsageNs?: number;
  pids?: number;
  pidsLimit?: number | 'max';
  oomKills?: number;
  frozen?: boolean;
}

/** Reads a container's cgroup files. Missing files leave their field undefined. */
export class ContainerCgroup {
  constructor(private readonly layout: CgroupLayout, readonly path: string) {}

  /** The directory of this cgroup for a v1 controller, or the unified directory on v2. */
  dir(controller: string): string | undefined {
    if (this.layout.mode === 'v2') return join(this.layout.unified ?? '/sys/fs/cgroup', this.path);
    const mp = this.layout.v1[controller];
    return mp ? join(mp, this.path) : undefined;
  }

  private async read(controller: string, file: string): Promise<string | undefined> {
    const d = this.dir(controller);
    if (!d) return undefined;
    try {
      return (await readFile(join(d, file), 'utf8')).trim();
    } catch {
      return undefined;
    }
  }

  /** The kernel's count of processes the OOM killer killed in this cgroup. */
  async oomKills(): Promise<number | undefined> {
    const text = this.layout.mode === 'v2' ? await this.read('memory', 'memory.events') : await this.read('memory', 'memory.oom_control');
    if (text === undefined) return undefined;
    return keyed(text).oom_kill;
  }

  async frozen(): Promise<boolean | undefined> {
    if (this.layout.mode === 'v2') {
      const ev = await this.read('freezer', 'cgroup.events');
      return ev === undefined ? undefined : keyed(ev).frozen === 1;
    }
    const st = await this.read('freezer', 'freezer.state');
    return st === undefined ? undefined : st === 'FROZEN';
  }

  async usage(): Promise<CgroupUsage> {
    const u: CgroupUsage = {};
    const num = (s: string | undefined): number | undefined => (s === undefined || s === 'max' || s === '' ? undefined : Number(s));
    if (this.layout.mode === 'v2') {
      u.memoryBytes = num(await this.read('memory', 'memory.current'));
      u.memoryLimitBytes = num(await this.read('memory', 'memory.max'));
      const cpuMax = await this.read('cpu', 'cpu.max');
      if (cpuMax) {
        const [q, p] = cpuMax.split(' ');
        u.cpuQuotaUs = q === 'max' ? -1 : Number(q);
        u.cpuPeriodUs = Number(p);
      }
      const stat = await this.read('cpu', 'cpu.stat');
      if (stat) u.cpuUsageNs = (keyed(stat).usage_usec ?? 0) * 1000;
    } else {
      u.memoryBytes = num(await this.read('memory', 'memory.usage_in_bytes'));
      u.memoryLimitBytes = num(await this.read('memory', 'memory.limit_in_bytes'));
      u.cpuQuotaUs = num(await this.read('cpu', 'cpu.cfs_quota_us'));
      u.cpuPeriodUs = num(await this.read('cpu', 'cpu.cfs_period_us'));
      u.cpuUsageNs = num(await this.read('cpuacct', 'cpuacct.usage'));
    }
    u.pids = num(await this.read('pids', 'pids.current'));
    const pmax = await this.read('pids', 'pids.max');
    u.pidsLimit = pmax === 'max' ? 'max' : num(pmax);
    u.oomKills = await this.oomKills();
    u.frozen = await this.frozen();
    return u;
  }
}

/** "key value" lines → record of numbers. */
export function keyed(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split('\n')) {
    const [k, v] = line.trim().split(/\s+/);
    if (k && v !== undefined && /^-?\d+$/.test(v)) out[k] = Number(v);
  }
  return out;
}

/** Whether v1 swap accounting exists (memory.memsw.*): then runc may set a swap limit. */
export function swapLimitSupported(layout: CgroupLayout): boolean {
  try {
    if (layout.mode === 'v2') {
      // The root cgroup has no memory.swap.max: look at the daemon's own cgroup instead.
      const own = /^0::(.*)$/m.exec(readFileSync('/proc/self/cgroup', 'utf8'))?.[1] ?? '/';
      readFileSync(join(layout.unified ?? '/sys/fs/cgroup', own, 'memory.swap.max'));
      return true;
    }
    const mp = layout.v1.memory;
    if (!mp) return false;
    readFileSync(join(mp, 'memory.memsw.limit_in_bytes'));
    return true;
  } catch {
    return false;
  }
}
