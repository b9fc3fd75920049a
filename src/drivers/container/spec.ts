// The OCI runtime spec (config.json) of a system container, built from the instance record and
// the container's metadata (pure: no I/O). runc reads it at each start.
import { z } from 'zod';
import { HfError } from '../../core/errors.js';
import type { InstanceConfig } from '../../core/model/instance.js';
import { CPU_PERIOD_US, MIN_CONTAINER_MEMORY_MIB, MIN_CPU_QUOTA_US, cpuQuotaUs } from './cgroups.js';
import { defaultSeccompProfile, type OciSeccomp } from './seccomp.js';

/** Size of the id range each unprivileged container gets (uids and gids 0-65535 inside). */
export const IDMAP_SIZE = 65_536;

/** What the driver keeps about a container next to its root filesystem (`container.json`). */
export const containerMetaSchema = z.object({
  version: z.literal(1),
  /** PID 1 of the container. */
  init: z.array(z.string()).min(1),
  env: z.array(z.string()).default([]),
  cwd: z.string().default('/'),
  /** What asks init to shut down: SIGTERM for most inits, SIGPWR for sysvinit. */
  stopSignal: z.string().default('SIGTERM'),
  /** Host id range that root in the container maps to; absent for a privileged container. */
  idmap: z.object({ hostId: z.number().int().min(1), size: z.number().int().min(1) }).optional(),
  image: z.string().optional(),
});
export type ContainerMeta = z.infer<typeof containerMetaSchema>;

export const DEFAULT_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** Capabilities a system container keeps (bounding set). Dropped: module loading, clock, raw I/O, MAC policy, wake alarms, BPF, perf. */
export const CONTAINER_CAPS = [
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_DAC_READ_SEARCH', 'CAP_FOWNER', 'CAP_FSETID', 'CAP_KILL',
  'CAP_SETGID', 'CAP_SETUID', 'CAP_SETPCAP', 'CAP_LINUX_IMMUTABLE', 'CAP_NET_BIND_SERVICE',
  'CAP_NET_BROADCAST', 'CAP_NET_ADMIN', 'CAP_NET_RAW', 'CAP_IPC_LOCK', 'CAP_IPC_OWNER', 'CAP_SYS_CHROOT',
  'CAP_SYS_PTRACE', 'CAP_SYS_ADMIN', 'CAP_SYS_BOOT', 'CAP_SYS_NICE', 'CAP_SYS_RESOURCE', 'CAP_SYS_TTY_CONFIG',
  'CAP_MKNOD', 'CAP_LEASE', 'CAP_AUDIT_WRITE', 'CAP_SETFCAP', 'CAP_SYSLOG', 'CAP_CHECKPOINT_RESTORE',
] as const;

/** runc's own defaults: paths masked and made read-only inside /proc and /sys. */
export const MASKED_PATHS = [
  '/proc/acpi', '/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
  '/proc/timer_stats', '/proc/sched_debug', '/proc/scsi', '/sys/firmware', '/sys/devices/virtual/powercap',
];
export const READONLY_PATHS = ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'];

export interface OciMount {
  destination: string;
  type: string;
  source: string;
  options?: string[];
}

export interface OciSpec {
  ociVersion: string;
  process: {
    terminal: boolean;
    user: { uid: number; gid: number };
    args: string[];
    env: string[];
    cwd: string;
    capabilities: Record<'bounding' | 'effective' | 'permitted', string[]>;
    rlimits: Array<{ type: string; hard: number; soft: number }>;
    noNewPrivileges: boolean;
    oomScoreAdj?: number;
  };
  root: { path: string; readonly: boolean };
  hostname: string;
  mounts: OciMount[];
  linux: {
    uidMappings?: Array<{ containerID: number; hostID: number; size: number }>;
    gidMappings?: Array<{ containerID: number; hostID: number; size: number }>;
    namespaces: Array<{ type: string; path?: string }>;
    resources: OciResources;
    cgroupsPath: string;
    seccomp?: OciSeccomp;
    maskedPaths: string[];
    readonlyPaths: string[];
  };
  annotations?: Record<string, string>;
}

export interface OciResources {
  devices?: Array<{ allow: boolean; access: string; type?: string; major?: number; minor?: number }>;
  memory?: { limit: number; swap?: number };
  cpu?: { quota: number; period: number };
  pids?: { limit: number };
}

/** Refuses limits the kernel would refuse (or that make no sense) with a named error. */
export function checkContainerLimits(config: Pick<InstanceConfig, 'vcpus' | 'memoryMiB' | 'pidsLimit'>): void {
  if (!(config.vcpus > 0) || cpuQuotaUs(config.vcpus) < MIN_CPU_QUOTA_US) {
    throw new HfError('HF_ERR_VALIDATION', `cpus ${config.vcpus} is below the minimum CPU quota of ${MIN_CPU_QUOTA_US / CPU_PERIOD_US} (1 ms per 100 ms period)`);
  }
  if (config.memoryMiB < MIN_CONTAINER_MEMORY_MIB) {
    throw new HfError('HF_ERR_VALIDATION', `memory ${config.memoryMiB} MiB is below the minimum of ${MIN_CONTAINER_MEMORY_MIB} MiB for a container`);
  }
  if (config.pidsLimit !== undefined && config.pidsLimit < 1) throw new HfError('HF_ERR_VALIDATION', `pidsLimit must be at least 1`);
}

/** The cgroup resources for a config (also what `runc update` gets for live changes). */
export function containerResources(config: Pick<InstanceConfig, 'vcpus' | 'memoryMiB' | 'pidsLimit'>, opts: { swapLimit: boolean }): OciResources {
  checkContainerLimits(config);
  const limit = config.memoryMiB * 1024 * 1024;
  const r: OciResources = {
    memory: opts.swapLimit ? { limit, swap: limit } : { limit },
    cpu: { quota: cpuQuotaUs(config.vcpus), period: CPU_PERIOD_US },
  };
  if (config.pidsLimit !== undefined) r.pids = { limit: config.pidsLimit };
  return r;
}

export interface SpecInput {
  hostname: string;
  /** Root filesystem, absolute or relative to the bundle. */
  rootfs: string;
  config: InstanceConfig;
  meta: ContainerMeta;
  cgroupsPath: string;
  swapLimit: boolean;
  /** Create a cgroup namespace (all cgroup v2 hosts and v1 kernels ≥ 4.6). */
  cgroupNamespace?: boolean;
}

export function buildOciSpec(input: SpecInput): OciSpec {
  const { config, meta } = input;
  const privileged = config.privileged === true;
  if (!privileged && !meta.idmap) throw new HfError('HF_ERR_INTERNAL', 'an unprivileged container needs an id map');
  const caps = [...CONTAINER_CAPS];
  const env = mergeEnv([DEFAULT_PATH, 'TERM=xterm', 'container=hyperfold', `HOSTNAME=${input.hostname}`], meta.env);
  // Always a fresh network namespace, owned by the container's user namespace (joining one owned
  // by the host's would forbid mounting /sys). The driver moves the interfaces the network layer
  // prepared (config.netns) into it between `runc create` and `runc start`.
  const namespaces: Array<{ type: string; path?: string }> = [{ type: 'pid' }, { type: 'network' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }];
  if (input.cgroupNamespace !== false) namespaces.push({ type: 'cgroup' });
  if (!privileged) namespaces.push({ type: 'user' });
  const resources: OciResources = {
    // Deny every device; runc adds its safe default set (null, zero, full, random, urandom, tty, pts, ptmx).
    devices: [{ allow: false, access: 'rwm' }],
    ...containerResources(config, { swapLimit: input.swapLimit }),
  };
  const spec: OciSpec = {
    ociVersion: '1.0.2',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: meta.init,
      env,
      cwd: meta.cwd || '/',
      capabilities: { bounding: caps, effective: caps, permitted: caps },
      // No rlimits: init inherits the daemon's (a user namespace cannot raise a hard limit anyway).
      rlimits: [],
      noNewPrivileges: false,
      oomScoreAdj: 0,
    },
    root: { path: input.rootfs, readonly: false },
    hostname: input.hostname,
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'] },
      { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
      { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
      { destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: ['nosuid', 'noexec', 'nodev', 'relatime', 'ro'] },
      { destination: '/run', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=755', 'size=65536k'] },
    ],
    linux: {
      namespaces,
      resources,
      cgroupsPath: input.cgroupsPath,
      seccomp: defaultSeccompProfile(),
      maskedPaths: MASKED_PATHS,
      readonlyPaths: READONLY_PATHS,
    },
    annotations: { 'org.hyperfold.privileged': String(privileged) },
  };
  if (!privileged && meta.idmap) {
    const m = [{ containerID: 0, hostID: meta.idmap.hostId, size: meta.idmap.size }];
    spec.linux.uidMappings = m;
    spec.linux.gidMappings = m;
  }
  return spec;
}

/** Later entries override earlier ones with the same variable name. */
export function mergeEnv(base: string[], extra: string[]): string[] {
  const out = new Map<string, string>();
  for (const e of [...base, ...extra]) {
    const i = e.indexOf('=');
    if (i <= 0) continue;
    out.set(e.slice(0, i), e);
  }
  return [...out.values()];
}
