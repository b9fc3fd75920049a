// What the API tells about a host (`GET /api/v1/host`) and the accelerator verdict it includes.
// Types only: the host service fills them in, the QEMU driver probes the verdict, and the CLI
// reads them back, so they live here where every layer may import them.
import type { OvercommitPolicy } from '../resources.js';

/** Which accelerators QEMU can use on this host, from a functional probe (drivers/qemu/accel.ts). */
export interface AccelVerdict {
  kvm: { usable: boolean; reason: string; probedAt: string; durationMs: number };
  tcg: { usable: boolean; reason: string };
  qemuVersion?: string;
}

export interface HostInfo {
  name: string;
  hostname: string;
  kernel: string;
  cpus: { count: number; model: string };
  memory: { totalMiB: number; freeMiB: number };
  loadavg: number[];
  uptimeSeconds: number;
  overcommit: OvercommitPolicy;
  accelerator: {
    kvm: { usable: boolean; reason: string; probedAt?: string };
    tcg: { usable: boolean; reason: string };
    default: 'kvm' | 'tcg';
  };
  qemuVersion?: string;
  daemon: { version: string; pid: number; startedAt: string; rssBytes: number };
  instances: { total: number; running: number; committedVcpus: number; committedMemoryMiB: number };
}
