// What this host is and can do: CPUs, memory, the accelerator verdict and software versions.
import { cpus, freemem, hostname, loadavg, release, totalmem, uptime } from 'node:os';
import { readFileSync } from 'node:fs';
import type { AccelVerdict, HostInfo } from '../core/model/host.js';
import type { HostCapacity, OvercommitPolicy } from '../core/resources.js';

let capacityCache: { at: number; value: HostCapacity } | undefined;

/**
 * CPUs and memory of this host. Asked at every create and start, and os.cpus() parses /proc for
 * every CPU (about half a millisecond): kept for 30 s, which still follows a CPU or memory hot-plug.
 */
export function hostCapacity(): HostCapacity {
  const now = Date.now();
  if (!capacityCache || now - capacityCache.at > 30_000) capacityCache = { at: now, value: { cpus: cpus().length, memoryMiB: Math.floor(totalmem() / 1024 / 1024) } };
  return { ...capacityCache.value };
}

export function bootId(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

export function describeHost(opts: {
  name: string;
  overcommit: OvercommitPolicy;
  verdict: AccelVerdict;
  version: string;
  startedAt: string;
  instances: HostInfo['instances'];
}): HostInfo {
  const c = cpus();
  return {
    name: opts.name,
    hostname: hostname(),
    kernel: release(),
    cpus: { count: c.length, model: c[0]?.model ?? 'unknown' },
    memory: { totalMiB: Math.floor(totalmem() / 1048576), freeMiB: Math.floor(freemem() / 1048576) },
    loadavg: loadavg(),
    uptimeSeconds: Math.floor(uptime()),
    overcommit: opts.overcommit,
    accelerator: {
      kvm: { usable: opts.verdict.kvm.usable, reason: opts.verdict.kvm.reason, probedAt: opts.verdict.kvm.probedAt },
      tcg: opts.verdict.tcg,
      default: opts.verdict.kvm.usable ? 'kvm' : 'tcg',
    },
    qemuVersion: opts.verdict.qemuVersion,
    daemon: { version: opts.version, pid: process.pid, startedAt: opts.startedAt, rssBytes: process.memoryUsage.rss() },
    instances: opts.instances,
  };
}
