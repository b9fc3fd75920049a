// Live resource changes of a running VM over QMP: reads what QEMU has now (never what an earlier
// daemon did: a re-attached daemon sees the same thing), asks the pure planner
// (core/live-plan.ts) what to do, and runs the steps:
//   - memory: object-add memory-backend-ram + device_add pc-dimm (rolled back on failure), then
//     `balloon` to the exact target and a short wait for the guest to get there;
//   - vCPUs: device_add of the CPU type at a free slot from query-hotpluggable-cpus; device_del
//     of the highest slots, then a wait until QEMU reports the slot empty (the guest must eject
//     it through ACPI; a guest that does not within the timeout leaves the field pending). Under
//     TCG the planner never unplugs (see core/live-plan.ts for the QEMU 7.2 crash behind that).
// Balloon statistics: `guest-stats-polling-interval` on the balloon device makes the guest
// driver report its memory counters; `guest-stats` reads the latest ones.
import { HfError, isHfError } from '../../core/errors.js';
import {
  compareCpuSlots,
  planLiveChange,
  type BalloonGuestStats,
  type BalloonStatus,
  type CpuSlot,
  type LiveDimm,
  type LivePlan,
  type LiveStep,
  type LiveVmState,
  type VmLiveInfo,
} from '../../core/live-plan.js';
import type { InstanceConfig } from '../../core/model/instance.js';
import { formatMiB } from '../../core/units.js';
import type { LiveChangeResult } from '../driver.js';
import { Qmp, type QmpClient, type QmpMemorySizeSummary } from './qmp/index.js';

const MiB = 1024 * 1024;
/** How often the guest reports balloon statistics (seconds). */
export const GUEST_STATS_INTERVAL_S = 2;
/** Statistics older than this are not used to judge the guest's minimum. */
const STATS_FRESH_S = 30;

export interface LiveOptions {
  /** How long a vCPU unplug may take before the field turns pending. Default 15 s. */
  cpuUnplugTimeoutMs?: number;
  /** How long to wait for the balloon to reach its target before answering. Default 10 s. */
  balloonWaitMs?: number;
  /** How long a shrink refused on the last guest report waits for the next one. Default 2 polling intervals + 1 s. */
  statsWaitMs?: number;
}

interface QomVirtioStatus {
  status?: { statuses?: string[] };
}

interface QomGuestStats {
  stats: Record<string, number>;
  'last-update': number;
}

interface QomMachineMemory {
  size: number;
  slots?: number;
  'max-size'?: number;
}

/** QEMU reports "not available" as 2^64-1 (which JSON turns into ~1.8e19). */
function validStat(v: number | undefined): v is number {
  return typeof v === 'number' && Number.isFinite(v) && v >= 0 && v < 2 ** 63;
}

function qmpClass(e: unknown): string | undefined {
  if (!isHfError(e, 'HF_ERR_QMP_COMMAND')) return undefined;
  const c = e.details?.class;
  return typeof c === 'string' ? c : undefined;
}

interface BalloonProbe {
  status: BalloonStatus;
  actualMiB?: number;
  /** QOM path of the balloon's virtio backend (for qom-get/qom-set). */
  path?: string;
}

/** Whether the VM has a balloon and whether the guest driver drives it. */
async function probeBalloon(qmp: Qmp): Promise<BalloonProbe> {
  let actual: number;
  try {
    actual = (await qmp.queryBalloon()).actual;
  } catch (e) {
    // "No balloon device has been activated": no virtio-balloon device in this VM.
    if (qmpClass(e) === 'DeviceNotActive') return { status: 'absent' };
    throw e;
  }
  const probe: BalloonProbe = { status: 'active', actualMiB: Math.round(actual / MiB), path: '/machine/peripheral/balloon0' };
  // The device exists; whether the guest driver set it up (DRIVER_OK) is in its virtio status.
  try {
    const devices = await qmp.client.run<Array<{ name: string; path: string }>>('x-query-virtio');
    const dev = devices.find((d) => d.name === 'virtio-balloon');
    if (dev) {
      probe.path = dev.path;
      const st = await qmp.client.run<QomVirtioStatus>('x-query-virtio-status', { path: dev.path });
      const ok = (st.status?.statuses ?? []).some((s) => s.startsWith('VIRTIO_CONFIG_S_DRIVER_OK'));
      if (!ok) probe.status = 'inactive';
    }
  } catch (e) {
    // QEMU without the (experimental) x-query-virtio: judge by whether the guest ever reported statistics.
    if (qmpClass(e) !== 'CommandNotFound') throw e;
    const stats = await readGuestStats(qmp.client, probe.path as string).catch(() => undefined);
    if (stats && stats['last-update'] === 0 && (await pollingInterval(qmp.client, probe.path as string)) > 0) probe.status = 'inactive';
  }
  return probe;
}

async function pollingInterval(client: QmpClient, path: string): Promise<number> {
  return client.run<number>('qom-get', { path, property: 'guest-stats-polling-interval' });
}

function readGuestStats(client: QmpClient, path: string): Promise<QomGuestStats> {
  return client.run<QomGuestStats>('qom-get', { path, property: 'guest-stats' });
}

/** Sets the statistics polling interval on the balloon at `path` unless it is set already. */
async function ensurePolling(client: QmpClient, path: string): Promise<boolean> {
  try {
    if ((await pollingInterval(client, path)) !== GUEST_STATS_INTERVAL_S) {
      await client.run('qom-set', { path, property: 'guest-stats-polling-interval', value: GUEST_STATS_INTERVAL_S });
    }
    return true;
  } catch {
    return false;
  }
}

/**
 * Turns on balloon statistics (the guest driver then reports every GUEST_STATS_INTERVAL_S).
 * Harmless before the guest driver loads; does nothing on a VM without a balloon.
 */
export async function enableGuestStats(client: QmpClient): Promise<boolean> {
  const b = await probeBalloon(new Qmp(client)).catch(() => undefined);
  if (!b?.path || b.status === 'absent') return false;
  return ensurePolling(client, b.path);
}

function toStats(raw: QomGuestStats): BalloonGuestStats | undefined {
  if (!raw['last-update']) return undefined;
  const s = raw.stats;
  const mib = (k: string): number | undefined => (validStat(s[k]) ? Math.round((s[k] as number) / MiB) : undefined);
  const num = (k: string): number | undefined => (validStat(s[k]) ? (s[k] as number) : undefined);
  const out: BalloonGuestStats = { updatedAt: new Date(raw['last-update'] * 1000).toISOString() };
  const set = <K extends keyof BalloonGuestStats>(k: K, v: BalloonGuestStats[K] | undefined): void => {
    if (v !== undefined) out[k] = v;
  };
  set('totalMiB', mib('stat-total-memory'));
  set('freeMiB', mib('stat-free-memory'));
  set('availableMiB', mib('stat-available-memory'));
  set('diskCachesMiB', mib('stat-disk-caches'));
  set('swapInPages', num('stat-swap-in'));
  set('swapOutPages', num('stat-swap-out'));
  set('majorFaults', num('stat-major-faults'));
  set('minorFaults', num('stat-minor-faults'));
  return out;
}

interface Snapshot {
  state: LiveVmState;
  balloonPath?: string;
  stats?: BalloonGuestStats;
  cpusFast: Array<{ 'cpu-index': number; 'thread-id': number; 'qom-path': string }>;
}

/** Which parts of the VM to read (each costs QMP round trips, slow under TCG). */
interface Want {
  memory: boolean;
  cpus: boolean;
  /** query-cpus-fast (host thread ids, for `info`). */
  threads: boolean;
}
const ALL: Want = { memory: true, cpus: true, threads: true };

/**
 * What the planner and `info` need, read from QEMU now. Parts not wanted are left empty (the
 * planner only looks at the memory part for a memory change, at the CPU part for a vCPU change).
 */
async function snapshot(client: QmpClient, want: Want = ALL): Promise<Snapshot> {
  const qmp = new Qmp(client);
  const none = <T>(v: T): Promise<T> => Promise.resolve(v);
  const [summary, machineMem, devices, hotCpus, cpusFast, balloon, objects, kvm] = await Promise.all([
    want.memory ? qmp.queryMemorySizeSummary() : none<QmpMemorySizeSummary>({ 'base-memory': 0 }),
    want.memory ? client.run<QomMachineMemory>('qom-get', { path: '/machine', property: 'memory' }).catch(() => undefined) : none(undefined),
    want.memory ? qmp.queryMemoryDevices() : none([]),
    want.cpus ? qmp.queryHotpluggableCpus() : none([]),
    want.threads ? qmp.queryCpusFast() : none([]),
    want.memory ? probeBalloon(qmp) : none<BalloonProbe>({ status: 'absent' }),
    want.memory ? client.run<Array<{ name: string; type: string }>>('qom-list', { path: '/objects' }).catch(() => [] as Array<{ name: string; type: string }>) : none([]),
    want.cpus ? qmp.queryKvm() : none({ enabled: false, present: false }),
  ]);
  const bootMiB = Math.round(summary['base-memory'] / MiB);
  const dimms: LiveDimm[] = [];
  for (const d of devices) {
    if (d.type !== 'dimm') continue;
    const data = d.data as { id?: string; memdev: string; slot: number; size: number; hotplugged: boolean };
    dimms.push({ ...(data.id !== undefined ? { id: data.id } : {}), memdev: data.memdev.replace(/^\/objects\//, ''), slot: data.slot, sizeMiB: Math.round(data.size / MiB), hotplugged: data.hotplugged });
  }
  dimms.sort((a, b) => a.slot - b.slot);
  const maxMiB = machineMem?.['max-size'] ? Math.round(machineMem['max-size'] / MiB) : bootMiB + Math.round((summary['plugged-memory'] ?? 0) / MiB);
  const slots = machineMem?.slots ?? 0;
  const cpuSlots: CpuSlot[] = hotCpus.map((c) => {
    const props: Record<string, number> = {};
    for (const [k, v] of Object.entries(c.props)) if (typeof v === 'number') props[k] = v;
    return { type: c.type, props, ...(c['qom-path'] !== undefined ? { qomPath: c['qom-path'] } : {}) };
  });
  let stats: BalloonGuestStats | undefined;
  if (balloon.path && balloon.status !== 'absent') {
    const raw = await readGuestStats(client, balloon.path).catch(() => undefined);
    if (raw) stats = toStats(raw);
  }
  const fresh = stats && Date.now() - Date.parse(stats.updatedAt) < STATS_FRESH_S * 1000;
  const taken = [
    ...objects.map((o) => o.name),
    ...dimms.flatMap((d) => [d.memdev, ...(d.id ? [d.id] : [])]),
    ...cpuSlots.flatMap((c) => (c.qomPath?.startsWith('/machine/peripheral/') ? [c.qomPath.slice('/machine/peripheral/'.length)] : [])),
  ];
  const state: LiveVmState = {
    bootMemoryMiB: bootMiB,
    maxMemoryMiB: Math.max(maxMiB, bootMiB),
    memorySlots: slots,
    dimms,
    balloon: {
      status: balloon.status,
      ...(balloon.actualMiB !== undefined ? { actualMiB: balloon.actualMiB } : {}),
      ...(fresh && stats?.availableMiB !== undefined ? { guestAvailableMiB: stats.availableMiB } : {}),
    },
    cpuSlots,
    accel: kvm.enabled ? 'kvm' : 'tcg',
    takenIds: taken,
  };
  return { state, ...(balloon.path ? { balloonPath: balloon.path } : {}), ...(stats ? { stats } : {}), cpusFast };
}

/** Waits for a guest statistics report newer than `since` (undefined if none comes in time). */
async function nextGuestStats(client: QmpClient, path: string, since: string, timeoutMs: number): Promise<BalloonGuestStats | undefined> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const raw = await readGuestStats(client, path).catch(() => undefined);
    const stats = raw ? toStats(raw) : undefined;
    if (stats && Date.parse(stats.updatedAt) > Date.parse(since)) return stats;
    if (Date.now() >= deadline) return undefined;
    await sleep(200);
  }
}

/** Reads the live state of the VM (for the planner and tests). */
export async function readLiveVmState(client: QmpClient): Promise<LiveVmState> {
  return (await snapshot(client)).state;
}

/** `live` for GET /api/v1/instances/:name: read from QEMU on every call. */
export async function readLiveInfo(client: QmpClient): Promise<VmLiveInfo> {
  const snap = await snapshot(client);
  const s = snap.state;
  const pluggedMiB = s.dimms.reduce((a, d) => a + d.sizeMiB, 0);
  // Statistics may have been switched off (a VM started by an older daemon): switch them on.
  if (snap.balloonPath && s.balloon.status !== 'absent' && !snap.stats) await ensurePolling(client, snap.balloonPath);
  return {
    kind: 'qemu',
    memory: { bootMiB: s.bootMemoryMiB, pluggedMiB, totalMiB: s.bootMemoryMiB + pluggedMiB, maxMiB: s.maxMemoryMiB, slots: s.memorySlots, dimms: s.dimms },
    balloon: {
      status: s.balloon.status,
      ...(s.balloon.actualMiB !== undefined ? { actualMiB: s.balloon.actualMiB } : {}),
      ...(snap.stats ? { stats: snap.stats } : {}),
    },
    vcpus: {
      present: s.cpuSlots.filter((c) => c.qomPath !== undefined).length,
      max: s.cpuSlots.length,
      hotplugged: s.cpuSlots
        .filter((c) => c.qomPath?.startsWith('/machine/peripheral/'))
        .sort(compareCpuSlots)
        .map((c) => (c.qomPath as string).slice('/machine/peripheral/'.length)),
      threadIds: [...snap.cpusFast].sort((a, b) => a['cpu-index'] - b['cpu-index']).map((c) => c['thread-id']),
    },
  };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const secs = (ms: number): string => `${ms < 10_000 ? (ms / 1000).toFixed(1) : Math.round(ms / 1000)} s`;

function describe(e: unknown): string {
  if (isHfError(e, 'HF_ERR_QMP_COMMAND') && typeof e.details?.desc === 'string') return e.details.desc;
  return e instanceof Error ? e.message : String(e);
}

/** Sets the balloon target and waits (bounded) for the guest to get there. */
async function runBalloon(qmp: Qmp, targetMiB: number, waitMs: number): Promise<string | undefined> {
  try {
    await qmp.balloon(targetMiB * MiB);
  } catch (e) {
    if (qmpClass(e) === 'DeviceNotActive') {
      throw new HfError('HF_ERR_UNSUPPORTED', `cannot balloon the VM: ${describe(e)} (no virtio balloon device)`, { cause: e, details: { cause: 'no-balloon-device' } });
    }
    throw e;
  }
  const deadline = Date.now() + waitMs;
  let actual = -1;
  for (;;) {
    actual = Math.round((await qmp.queryBalloon()).actual / MiB);
    if (Math.abs(actual - targetMiB) <= 1) return undefined;
    if (Date.now() >= deadline) break;
    await sleep(100);
  }
  return `memory: the guest is still adjusting its balloon (${formatMiB(actual)} of target ${formatMiB(targetMiB)} after ${secs(waitMs)}); it continues in the background`;
}

async function addDimm(qmp: Qmp, step: Extract<LiveStep, { kind: 'dimm-add' }>): Promise<void> {
  await qmp.objectAdd({ 'qom-type': 'memory-backend-ram', id: step.memdev, size: step.sizeMiB * MiB });
  try {
    await qmp.deviceAdd({ driver: 'pc-dimm', id: step.id, memdev: step.memdev, slot: step.slot });
  } catch (e) {
    await qmp.objectDel(step.memdev).catch(() => undefined);
    throw e;
  }
}

function sameSlot(a: Record<string, number>, b: Record<string, number>): boolean {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
  for (const k of keys) if ((a[k] ?? 0) !== (b[k] ?? 0)) return false;
  return true;
}

/** device_del of a vCPU, then waits until QEMU reports its slot empty. Returns false on timeout. */
async function removeCpu(qmp: Qmp, step: Extract<LiveStep, { kind: 'cpu-del' }>, timeoutMs: number): Promise<boolean> {
  // device_del accepts a QOM path, so CPUs from the command line (no id) can go too.
  await qmp.deviceDel(step.qomPath);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const slots = await qmp.queryHotpluggableCpus();
    const slot = slots.find((s) => sameSlot(s.props as Record<string, number>, step.props));
    if (!slot || slot['qom-path'] === undefined) return true;
    if (Date.now() >= deadline) return false;
    await sleep(200);
  }
}

/**
 * Applies `changes` to the running VM. Refusals (HfError) are thrown before anything changes;
 * a step that fails once others succeeded turns its field pending, with the reason in `notes`.
 */
export async function applyLiveChanges(client: QmpClient, changes: Partial<InstanceConfig>, current: InstanceConfig, opts: LiveOptions = {}): Promise<LiveChangeResult> {
  const qmp = new Qmp(client);
  const snap = await snapshot(client, { memory: changes.memoryMiB !== undefined, cpus: changes.vcpus !== undefined, threads: false });
  let plan: LivePlan;
  try {
    plan = planLiveChange(current, changes, snap.state);
  } catch (e) {
    // Refused as below the guest's minimum: the last report may predate memory the guest onlined
    // since (it then looks fuller than it is). Judge again by the next report.
    if (!(isHfError(e, 'HF_ERR_VALIDATION') && e.details?.minimumMiB !== undefined && snap.balloonPath && snap.stats)) throw e;
    const fresh = await nextGuestStats(client, snap.balloonPath, snap.stats.updatedAt, opts.statsWaitMs ?? (GUEST_STATS_INTERVAL_S * 2 + 1) * 1000);
    if (fresh?.availableMiB === undefined) throw e;
    snap.state.balloon.guestAvailableMiB = fresh.availableMiB;
    plan = planLiveChange(current, changes, snap.state);
  }
  const applied = [...plan.applied];
  const pending = [...plan.pending];
  const notes = [...plan.notes];
  const demote = (field: string, note: string): void => {
    const i = applied.indexOf(field);
    if (i >= 0) applied.splice(i, 1);
    if (!pending.includes(field)) pending.push(field);
    notes.push(note);
  };
  const failed = new Set<string>();
  let changed = false;
  // Memory before vCPUs; within memory, the DIMM before the balloon that trims it.
  const order = (s: LiveStep): number => (s.kind === 'dimm-add' ? 0 : s.kind === 'balloon' ? 1 : s.kind === 'cpu-add' ? 2 : 3);
  const steps = [...plan.steps].sort((a, b) => order(a) - order(b));
  let cpuAdded = 0;
  let cpuRemoved = 0;
  const cpuAdds = steps.filter((s) => s.kind === 'cpu-add').length;
  const cpuDels = steps.filter((s) => s.kind === 'cpu-del').length;
  for (const step of steps) {
    if (failed.has(step.field)) continue;
    try {
      switch (step.kind) {
        case 'dimm-add':
          await addDimm(qmp, step);
          break;
        case 'balloon': {
          const note = await runBalloon(qmp, step.targetMiB, opts.balloonWaitMs ?? 10_000);
          if (note) notes.push(note);
          break;
        }
        case 'cpu-add':
          await qmp.deviceAdd({ driver: step.driver, id: step.id, ...step.props });
          cpuAdded++;
          break;
        case 'cpu-del': {
          const timeoutMs = opts.cpuUnplugTimeoutMs ?? 15_000;
          if (!(await removeCpu(qmp, step, timeoutMs))) {
            failed.add('vcpus');
            demote(
              'vcpus',
              `vcpus: the guest did not release vCPU ${step.qomPath} within ${secs(timeoutMs)} (${cpuRemoved} of ${cpuDels} removed); the new count applies at next boot`,
            );
            continue;
          }
          cpuRemoved++;
          break;
        }
      }
      changed = true;
    } catch (e) {
      // A refusal before anything changed is the answer to the request.
      if (!changed && isHfError(e) && e.code !== 'HF_ERR_QMP_COMMAND') throw e;
      if (!changed && isHfError(e, 'HF_ERR_QMP_COMMAND')) {
        throw new HfError('HF_ERR_HYPERVISOR', `live change failed (${step.kind}): ${describe(e)}`, { cause: e, details: { step: step.kind, ...(e.details ?? {}) } });
      }
      failed.add(step.field);
      const what =
        step.kind === 'dimm-add'
          ? `hot-plugging a ${formatMiB(step.sizeMiB)} DIMM failed`
          : step.kind === 'balloon'
            ? `ballooning to ${formatMiB(step.targetMiB)} failed`
            : step.kind === 'cpu-add'
              ? `hot-plugging vCPU ${step.id} failed (${cpuAdded} of ${cpuAdds} added)`
              : `unplugging vCPU ${step.qomPath} failed`;
      demote(step.field, `${step.field === 'memoryMiB' ? 'memory' : 'vcpus'}: ${what}: ${describe(e)}; applies at next boot`);
    }
  }
  return { applied, pending, notes };
}
