// The live-change planner for virtual machines: pure logic, no I/O. Given the instance's
// configuration, the requested change and what QEMU reports about the running VM right now
// (boot memory, plugged DIMMs, free slots, balloon, CPU slots), it decides which steps bring the
// running guest to the new size, and which fields cannot change live and wait for the next boot.
//
// Rules (docs/live-resources.md is the user-facing version):
//  - memory up beyond what the VM has (boot memory + DIMMs): one pc-dimm of the difference rounded
//    up to DIMM_ALIGN_MIB (Linux onlines memory in 128 MiB blocks on x86), in a free slot, within
//    the ceiling QEMU was started with (`-m …,slots=,maxmem=`); the balloon trims what rounding
//    added. No ceiling, no free slot, or no room under it: pending.
//  - memory down, or up within what the VM has: the virtio balloon. No balloon device (devices =
//    emulated): pending. A balloon device the guest has not activated (no virtio_balloon driver):
//    an error naming the cause, since waiting for the next boot would not make the guest load it.
//    Shrinking below what the guest uses now (plus headroom), or below MIN_BALLOON_TARGET_MIB:
//    HF_ERR_VALIDATION.
//  - vCPUs up: device_add of the CPU type QEMU lists at the lowest free socket/core/thread;
//    beyond the slots QEMU has (`-smp …,maxcpus=`): pending.
//  - vCPUs down: device_del of the highest populated slots (never the boot CPU); the executor
//    waits for the guest to release them and turns the field pending when it does not. Under TCG
//    vCPUs are never unplugged live: with QEMU 7.2 a TCG vCPU unplug corrupts QEMU's heap and
//    the next CPU hot-plug kills the VM (double free / SIGSEGV, reproduced on Debian 12's
//    7.2+dfsg-7), so fewer vCPUs wait for the next boot there.
//  - boot-time settings (max memory, max vCPUs, accelerator, device model…): pending unless
//    unchanged.
import { HfError } from './errors.js';
import type { InstanceConfig } from './model/instance.js';
import { formatMiB } from './units.js';

/** Hot-plugged DIMMs are multiples of this (the x86 Linux memory block size). */
export const DIMM_ALIGN_MIB = 128;
/** Never balloon a guest below this. */
export const MIN_BALLOON_TARGET_MIB = 64;
/** A balloon shrink keeps this much above what the guest uses now. */
export const BALLOON_HEADROOM_MIB = 32;

export type BalloonStatus = 'active' | 'inactive' | 'absent';

/** One DIMM as query-memory-devices reports it. */
export interface LiveDimm {
  id?: string;
  memdev: string;
  slot: number;
  sizeMiB: number;
  hotplugged: boolean;
}

/** One CPU slot as query-hotpluggable-cpus reports it. */
export interface CpuSlot {
  /** QOM type to device_add (e.g. "max-x86_64-cpu"). */
  type: string;
  /** Topology properties (socket-id, core-id, thread-id, node-id…), passed to device_add as they are. */
  props: Record<string, number>;
  /** Set when the slot is populated. */
  qomPath?: string;
}

/** What QEMU reports about a running VM, as the planner needs it. */
export interface LiveVmState {
  bootMemoryMiB: number;
  /** The memory ceiling QEMU was started with (= boot memory when it has none). */
  maxMemoryMiB: number;
  /** DIMM slots QEMU was started with (0: no memory hot-plug). */
  memorySlots: number;
  dimms: LiveDimm[];
  balloon: {
    status: BalloonStatus;
    /** Guest memory the balloon leaves (query-balloon `actual`). */
    actualMiB?: number;
    /** MemAvailable the guest reported recently (fresh balloon statistics only). */
    guestAvailableMiB?: number;
  };
  cpuSlots: CpuSlot[];
  /** The accelerator QEMU runs with (query-kvm): vCPU unplug is only done under KVM. */
  accel: 'kvm' | 'tcg';
  /** Device and object ids in use (new ids must not collide). */
  takenIds: string[];
}

export type LiveStep =
  | { kind: 'dimm-add'; field: 'memoryMiB'; memdev: string; id: string; slot: number; sizeMiB: number }
  | { kind: 'balloon'; field: 'memoryMiB'; targetMiB: number }
  | { kind: 'cpu-add'; field: 'vcpus'; driver: string; id: string; props: Record<string, number> }
  | { kind: 'cpu-del'; field: 'vcpus'; qomPath: string; props: Record<string, number> };

export interface LivePlan {
  steps: LiveStep[];
  /** Fields that apply live once the steps succeed (including no-ops). */
  applied: string[];
  /** Fields stored for the next boot. */
  pending: string[];
  notes: string[];
}

/** Fields that only QEMU's command line sets: they change at the next boot. */
const BOOT_TIME_FIELDS: Record<string, string> = {
  maxMemoryMiB: 'the memory ceiling is fixed when QEMU starts (-m maxmem)',
  maxVcpus: 'the vCPU ceiling is fixed when QEMU starts (-smp maxcpus)',
  accel: 'the accelerator is chosen when QEMU starts',
  devices: 'the device model (machine type, balloon, disk and NIC models) is chosen when QEMU starts',
  boot: 'the boot source is read when QEMU starts',
  disks: 'disks are attached at start (use the disk commands for hot-plug)',
  nics: 'NICs are attached at start (use the network commands for hot-plug)',
};
/** Container-only fields: stored, no effect on a VM. */
const CONTAINER_FIELDS = new Set(['pidsLimit', 'privileged', 'netns']);

const roundUp = (n: number, step: number): number => Math.ceil(n / step) * step;

export function balloonInactiveError(targetMiB: number): HfError {
  return new HfError(
    'HF_ERR_UNSUPPORTED',
    `cannot set memory to ${formatMiB(targetMiB)} live: the guest has not activated its virtio balloon driver (virtio_balloon module not loaded?); load it in the guest, or stop the VM and change memory then`,
    { details: { cause: 'balloon-driver-inactive', device: 'balloon0', requestedMiB: targetMiB } },
  );
}

/** Total memory of the running VM: boot memory plus DIMMs. */
export function totalMemoryMiB(s: Pick<LiveVmState, 'bootMemoryMiB' | 'dimms'>): number {
  return s.bootMemoryMiB + s.dimms.reduce((a, d) => a + d.sizeMiB, 0);
}

/** Memory the guest has now: the balloon's `actual` when it is active, else the total. */
export function currentMemoryMiB(s: LiveVmState): number {
  const total = totalMemoryMiB(s);
  return s.balloon.status === 'active' && s.balloon.actualMiB !== undefined ? s.balloon.actualMiB : total;
}

/** The least memory a live shrink may leave the guest (what it uses now plus headroom). */
export function guestMinimumMiB(s: LiveVmState): number {
  const actual = currentMemoryMiB(s);
  const used = s.balloon.guestAvailableMiB !== undefined ? Math.max(0, actual - s.balloon.guestAvailableMiB) : 0;
  return Math.max(MIN_BALLOON_TARGET_MIB, used > 0 ? used + BALLOON_HEADROOM_MIB : 0);
}

function uniqueId(base: string, taken: Set<string>): string {
  let id = base;
  for (let i = 2; taken.has(id); i++) id = `${base}-${i}`;
  taken.add(id);
  return id;
}

/** Orders CPU slots by topology (node, socket, die, cluster, core, thread). */
export function compareCpuSlots(a: CpuSlot, b: CpuSlot): number {
  for (const k of ['node-id', 'socket-id', 'die-id', 'cluster-id', 'core-id', 'thread-id']) {
    const d = (a.props[k] ?? 0) - (b.props[k] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

export function cpuDeviceId(props: Record<string, number>): string {
  return `cpu-s${props['socket-id'] ?? 0}-c${props['core-id'] ?? 0}-t${props['thread-id'] ?? 0}`;
}

interface FieldPlan {
  steps: LiveStep[];
  live: boolean;
  note?: string;
}

function planMemory(target: number, s: LiveVmState, taken: Set<string>): FieldPlan {
  const total = totalMemoryMiB(s);
  const current = currentMemoryMiB(s);
  const balloon = s.balloon.status;
  if (target === current) return { steps: [], live: true };

  if (target > total) {
    const grow = target - total;
    const atNextBoot = `${formatMiB(target)} applies at next boot`;
    if (s.maxMemoryMiB <= s.bootMemoryMiB || s.memorySlots === 0) {
      return { steps: [], live: false, note: `memory: the VM was started without a memory ceiling (max-memory), so it cannot grow live: ${atNextBoot} (set max-memory for live growth)` };
    }
    const room = s.maxMemoryMiB - total;
    if (grow > room) {
      return { steps: [], live: false, note: `memory: ${formatMiB(target)} is above the ceiling the VM was started with (${formatMiB(s.maxMemoryMiB)}): ${atNextBoot}` };
    }
    const used = new Set(s.dimms.map((d) => d.slot));
    let slot = 0;
    while (used.has(slot)) slot++;
    if (slot >= s.memorySlots) {
      return { steps: [], live: false, note: `memory: all ${s.memorySlots} DIMM slots are in use: ${atNextBoot}` };
    }
    const size = roundUp(grow, DIMM_ALIGN_MIB);
    if (size > room) {
      return {
        steps: [],
        live: false,
        note: `memory: hot-plugged memory comes in ${DIMM_ALIGN_MIB} MiB steps, and ${formatMiB(size)} more does not fit under the ceiling (${formatMiB(s.maxMemoryMiB)}): ${atNextBoot}`,
      };
    }
    const trim = size > grow || current < total;
    if (trim && balloon === 'absent') {
      return {
        steps: [],
        live: false,
        note: `memory: hot-plugged memory comes in ${DIMM_ALIGN_MIB} MiB steps and this VM has no balloon to trim the rest (devices=emulated): ${atNextBoot} (or ask for ${formatMiB(total + size)})`,
      };
    }
    if (trim && balloon === 'inactive') throw balloonInactiveError(target);
    const id = uniqueId(`dimm${slot}`, taken);
    const memdev = uniqueId(`mem-${id}`, taken);
    const steps: LiveStep[] = [{ kind: 'dimm-add', field: 'memoryMiB', memdev, id, slot, sizeMiB: size }];
    if (trim) steps.push({ kind: 'balloon', field: 'memoryMiB', targetMiB: target });
    return { steps, live: true };
  }

  // Within what the VM has: the balloon.
  if (balloon === 'absent') {
    return { steps: [], live: false, note: `memory: this VM has no balloon device (devices=emulated), so memory cannot shrink live: ${formatMiB(target)} applies at next boot` };
  }
  if (balloon === 'inactive') throw balloonInactiveError(target);
  if (target < current) {
    const min = guestMinimumMiB(s);
    if (target < min) {
      const used = s.balloon.guestAvailableMiB !== undefined ? current - s.balloon.guestAvailableMiB : undefined;
      throw new HfError(
        'HF_ERR_VALIDATION',
        `memory ${formatMiB(target)} is below the guest's minimum of ${formatMiB(min)}${used !== undefined ? ` (it uses about ${formatMiB(used)} now, plus ${BALLOON_HEADROOM_MIB} MiB headroom)` : ''}: shrinking further would make the guest run out of memory`,
        { details: { requestedMiB: target, minimumMiB: min, ...(used !== undefined ? { guestUsedMiB: used } : {}) } },
      );
    }
  }
  return { steps: [{ kind: 'balloon', field: 'memoryMiB', targetMiB: target }], live: true };
}

function planCpus(target: number, s: LiveVmState, taken: Set<string>): FieldPlan {
  const slots = [...s.cpuSlots].sort(compareCpuSlots);
  const present = slots.filter((c) => c.qomPath !== undefined);
  if (target === present.length) return { steps: [], live: true };
  if (target > slots.length) {
    return {
      steps: [],
      live: false,
      note:
        slots.length <= present.length
          ? `vcpus: the VM was started without room for more vCPUs (max-cpus ${slots.length}): ${target} vCPUs apply at next boot`
          : `vcpus: ${target} is above the ${slots.length} vCPU slots the VM was started with (max-cpus): applies at next boot`,
    };
  }
  if (target > present.length) {
    const free = slots.filter((c) => c.qomPath === undefined).slice(0, target - present.length);
    return {
      steps: free.map((c) => ({ kind: 'cpu-add', field: 'vcpus', driver: c.type, id: uniqueId(cpuDeviceId(c.props), taken), props: { ...c.props } })),
      live: true,
    };
  }
  if (target < 1) throw new HfError('HF_ERR_VALIDATION', 'a VM needs at least 1 vCPU');
  if (s.accel === 'tcg') {
    return {
      steps: [],
      live: false,
      note: `vcpus: vCPUs are not unplugged live under TCG (QEMU 7.2 corrupts its state on a TCG vCPU unplug and a later hot-plug crashes the VM): ${target} vCPUs apply at next boot`,
    };
  }
  // Remove from the top; the first slot holds the boot CPU, which x86 cannot unplug.
  const removable = present.slice(1).reverse().slice(0, present.length - target);
  return {
    steps: removable.map((c) => ({ kind: 'cpu-del', field: 'vcpus', qomPath: c.qomPath as string, props: { ...c.props } })),
    live: true,
  };
}

/**
 * Plans a live change. Throws HfError for requests that must be refused (below the guest's
 * minimum, a balloon the guest has not activated); everything else is either a step list or a
 * pending field with a note saying why.
 */
export function planLiveChange(current: InstanceConfig, changes: Partial<InstanceConfig>, s: LiveVmState): LivePlan {
  const plan: LivePlan = { steps: [], applied: [], pending: [], notes: [] };
  const taken = new Set(s.takenIds);
  const add = (field: string, fp: FieldPlan): void => {
    plan.steps.push(...fp.steps);
    (fp.live ? plan.applied : plan.pending).push(field);
    if (fp.note) plan.notes.push(fp.note);
  };
  for (const [field, value] of Object.entries(changes)) {
    if (value === undefined) continue;
    if (field === 'memoryMiB') add(field, planMemory(value as number, s, taken));
    else if (field === 'vcpus') {
      const n = value as number;
      if (!Number.isInteger(n)) throw new HfError('HF_ERR_VALIDATION', 'vcpus of a VM must be a whole number');
      add(field, planCpus(n, s, taken));
    } else if (CONTAINER_FIELDS.has(field)) {
      add(field, { steps: [], live: true, note: `${field} has no effect on a VM` });
    } else if (JSON.stringify((current as Record<string, unknown>)[field]) === JSON.stringify(value)) {
      add(field, { steps: [], live: true });
    } else {
      add(field, { steps: [], live: false, note: `${field}: ${BOOT_TIME_FIELDS[field] ?? 'cannot change while the VM runs'}: applies at next boot` });
    }
  }
  return plan;
}

// ---- live information (what `info` shows) ------------------------------------------------------

/** Guest memory statistics reported through the balloon (absent values were not reported). */
export interface BalloonGuestStats {
  totalMiB?: number;
  freeMiB?: number;
  availableMiB?: number;
  diskCachesMiB?: number;
  swapInPages?: number;
  swapOutPages?: number;
  majorFaults?: number;
  minorFaults?: number;
  /** When the guest last reported (ISO time). */
  updatedAt: string;
}

/** `live` of GET /api/v1/instances/:name for a VM. Read from QEMU on every call, never cached. */
export interface VmLiveInfo {
  kind: 'qemu';
  memory: {
    bootMiB: number;
    pluggedMiB: number;
    totalMiB: number;
    maxMiB: number;
    slots: number;
    dimms: LiveDimm[];
  };
  balloon: {
    status: BalloonStatus;
    actualMiB?: number;
    stats?: BalloonGuestStats;
  };
  vcpus: {
    present: number;
    max: number;
    /** Hot-plugged CPU device ids (absent for CPUs from the command line). */
    hotplugged: string[];
    /** Host thread id per present vCPU, by cpu-index. */
    threadIds: number[];
  };
}

export function isVmLiveInfo(x: unknown): x is VmLiveInfo {
  return typeof x === 'object' && x !== null && (x as { kind?: unknown }).kind === 'qemu';
}

/** Human lines for `hyperfold info`. */
export function formatVmLiveInfo(l: VmLiveInfo, now = Date.now()): string[] {
  const m = l.memory;
  const lines: string[] = [];
  const ceiling = m.maxMiB > m.bootMiB ? `; max ${formatMiB(m.maxMiB)}, ${m.slots - m.dimms.length} of ${m.slots} DIMM slots free` : '; no memory hot-plug';
  lines.push(`  Memory:       ${formatMiB(m.totalMiB)} (boot ${formatMiB(m.bootMiB)}${m.dimms.length ? ` + ${m.dimms.length} DIMM${m.dimms.length > 1 ? 's' : ''} ${formatMiB(m.pluggedMiB)}` : ''}${ceiling})`);
  for (const d of m.dimms) lines.push(`    DIMM ${d.id ?? '(no id)'}: ${formatMiB(d.sizeMiB)} in slot ${d.slot}${d.hotplugged ? ', hot-plugged' : ''}`);
  const b = l.balloon;
  if (b.status === 'absent') lines.push('  Balloon:      none (no balloon device)');
  else if (b.status === 'inactive') lines.push(`  Balloon:      inactive: the guest has not loaded its virtio_balloon driver${b.actualMiB !== undefined ? ` (actual ${formatMiB(b.actualMiB)})` : ''}`);
  else {
    let line = `  Balloon:      actual ${b.actualMiB !== undefined ? formatMiB(b.actualMiB) : '?'}`;
    const st = b.stats;
    if (st) {
      const parts: string[] = [];
      if (st.totalMiB !== undefined) parts.push(`total ${formatMiB(st.totalMiB)}`);
      if (st.freeMiB !== undefined) parts.push(`free ${formatMiB(st.freeMiB)}`);
      if (st.availableMiB !== undefined) parts.push(`available ${formatMiB(st.availableMiB)}`);
      if (st.diskCachesMiB !== undefined) parts.push(`caches ${formatMiB(st.diskCachesMiB)}`);
      if (st.majorFaults !== undefined) parts.push(`major faults ${st.majorFaults}`);
      if (st.swapInPages !== undefined || st.swapOutPages !== undefined) parts.push(`swap in/out ${st.swapInPages ?? 0}/${st.swapOutPages ?? 0} pages`);
      const age = Math.max(0, Math.round((now - Date.parse(st.updatedAt)) / 1000));
      line += `; guest reports ${parts.join(', ')} (${age} s ago)`;
    } else line += '; no guest statistics yet';
    lines.push(line);
  }
  const v = l.vcpus;
  lines.push(`  vCPUs:        ${v.present} present of ${v.max}${v.hotplugged.length ? ` (hot-plugged: ${v.hotplugged.join(', ')})` : ''}`);
  return lines;
}
