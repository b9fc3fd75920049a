// Placement: which host of a cluster a new instance goes to. Pure: the caller gives the hosts as
// they are now (a single host's own records, or the cluster's directory) and gets a decision that
// says why, host by host, so that `info` and an error can tell the user.
//
// The rules, in order: a host must be online, reach the storage pool that keeps the instance's
// disks (when the caller knows which hosts do), be able to run the type, be large enough for the
// instance alone and able to commit it under its overcommit policy; with `spread`, it must hold
// no instance of the group yet. Among the hosts that fit: fewer instances of the group first (when a group is
// given), then the least allocated after placing (the larger of the cpu and memory ratios to the
// host's commit limits), then the name, so that equal hosts always give the same answer.
import { HfError } from './errors.js';
import type { InstanceType } from './model/instance.js';
import { commitLimits, commitProblem, fitsHostProblem, type OvercommitPolicy, type ResourceProblem } from './resources.js';

export type PlacementHostState = 'online' | 'offline' | 'maintenance';

export interface PlacementHost {
  name: string;
  state: PlacementHostState;
  cpus: number;
  memoryMiB: number;
  overcommit: OvercommitPolicy;
  /** What the active instances of the host commit now. */
  committed: { vcpus: number; memoryMiB: number };
  /** Instances per placement group on this host (whatever their state). */
  groups: Record<string, number>;
  /** The instance types the host can run; absent means every type. */
  supports?: string[];
}

export interface PlacementRequest {
  name: string;
  type: InstanceType;
  vcpus: number;
  memoryMiB: number;
  /** Exactly this host, or an error saying why not. */
  target?: string;
  /** Placement group: instances of one group prefer different hosts. */
  group?: string;
  /** With a group: never a host that already holds an instance of the group. */
  spread?: boolean;
  /**
   * The instance is created without starting it. A host that cannot commit it now (but is large
   * enough for it alone) is then still eligible, after every host that can: a stopped instance
   * commits nothing, and its start is admitted again. A plain create on a full single host keeps
   * working as it did before placement existed.
   */
  createStopped?: boolean;
  /** The storage pool that keeps its disks (`storage`). */
  storage?: string;
  /** The hosts that can use that pool now (a shared pool's); absent: not known, every host. */
  storageHosts?: string[];
}

export interface PlacementVerdict {
  host: string;
  verdict: 'chosen' | 'fits' | 'skipped';
  why: string;
}

export interface PlacementDecision {
  host: string;
  /** One line a user reads in `info`. */
  reason: string;
  /** Every host: the chosen one first, then the others that fit in order of preference, then the skipped ones by name. */
  considered: PlacementVerdict[];
}

/** One host judged against the request. */
type Judged =
  | { host: PlacementHost; fits: false; kind: 'down' | 'storage' | 'unsupported' | 'resources' | 'spread'; why: string; problem?: ResourceProblem }
  | { host: PlacementHost; fits: true; why: string; ratio: number; usage: string; groupCount: number; overcommitted: boolean };

const pct = (r: number): string => (Number.isFinite(r) ? `${Math.round(r * 100)}%` : 'no room');

/** Ratios closer than this are equal (they come from sums of fractions: 0.1 + 0.2). */
const EPSILON = 1e-9;

function judge(req: PlacementRequest, h: PlacementHost): Judged {
  if (h.state !== 'online') return { host: h, fits: false, kind: 'down', why: h.state === 'maintenance' ? 'in maintenance' : 'offline' };
  if (req.storageHosts && !req.storageHosts.includes(h.name)) return { host: h, fits: false, kind: 'storage', why: `cannot use storage pool ${req.storage ?? '?'} (unavailable there)` };
  if (h.supports && !h.supports.includes(req.type)) return { host: h, fits: false, kind: 'unsupported', why: `cannot run ${req.type}s` };
  const r = { name: req.name, vcpus: req.vcpus, memoryMiB: req.memoryMiB };
  const capacity = { cpus: h.cpus, memoryMiB: h.memoryMiB };
  const tooBig = fitsHostProblem(r, capacity);
  if (tooBig) return { host: h, fits: false, kind: 'resources', why: tooBig.message, problem: tooBig };
  const full = commitProblem(r, h.committed, capacity, h.overcommit);
  if (full && !req.createStopped) return { host: h, fits: false, kind: 'resources', why: full.message, problem: full };
  const groupCount = req.group ? (h.groups[req.group] ?? 0) : 0;
  if (req.group && req.spread && groupCount > 0) {
    return { host: h, fits: false, kind: 'spread', why: `already holds ${groupCount} instance${groupCount === 1 ? '' : 's'} of group "${req.group}" (spread)` };
  }
  const limit = commitLimits(capacity, h.overcommit);
  const cpu = (h.committed.vcpus + req.vcpus) / limit.vcpus;
  const mem = (h.committed.memoryMiB + req.memoryMiB) / limit.memoryMiB;
  const usage = `cpu ${pct(cpu)}, memory ${pct(mem)} of its limits after placing`;
  const parts = [usage];
  if (req.group) parts.push(`${groupCount} of group "${req.group}" there`);
  if (full) parts.push(`cannot commit it now (${full.message}): it would be created stopped`);
  return { host: h, fits: true, why: parts.join('; '), ratio: Math.max(cpu, mem), usage, groupCount, overcommitted: full !== undefined };
}

/** Preference among the hosts that fit: negative when `a` comes first. */
function prefer(req: PlacementRequest, a: Judged & { fits: true }, b: Judged & { fits: true }): number {
  if (a.overcommitted !== b.overcommitted) return a.overcommitted ? 1 : -1;
  if (req.group && a.groupCount !== b.groupCount) return a.groupCount - b.groupCount;
  if (Math.abs(a.ratio - b.ratio) > EPSILON) return a.ratio - b.ratio;
  return a.host.name < b.host.name ? -1 : a.host.name > b.host.name ? 1 : 0;
}

const byName = (a: Judged, b: Judged): number => (a.host.name < b.host.name ? -1 : a.host.name > b.host.name ? 1 : 0);

function considered(chosen: Judged | undefined, judged: Judged[], fitting: Judged[]): PlacementVerdict[] {
  const out: PlacementVerdict[] = [];
  if (chosen) out.push({ host: chosen.host.name, verdict: 'chosen', why: chosen.why });
  for (const j of fitting) if (j !== chosen) out.push({ host: j.host.name, verdict: 'fits', why: j.why });
  for (const j of [...judged].sort(byName)) if (!j.fits && j !== chosen) out.push({ host: j.host.name, verdict: 'skipped', why: j.why });
  return out;
}

/** Picks the host for `req` among `hosts`, or throws an HfError saying why none can take it. */
export function place(req: PlacementRequest, hosts: PlacementHost[]): PlacementDecision {
  if (req.spread && !req.group) throw new HfError('HF_ERR_VALIDATION', `${req.name}: spread needs a placement group`);
  const judged = hosts.map((h) => judge(req, h));
  const fitting = judged.filter((j): j is Judged & { fits: true } => j.fits).sort((a, b) => prefer(req, a, b));
  const groupNote = req.group ? ` (group "${req.group}"${req.spread ? ', spread' : ''})` : '';

  if (req.target !== undefined) {
    const t = judged.find((j) => j.host.name === req.target);
    if (!t) {
      const names = hosts.map((h) => h.name).sort();
      throw new HfError('HF_ERR_HOST_NOT_FOUND', `${req.name}: no host named "${req.target}" (hosts: ${names.join(', ') || 'none'})`, {
        details: { target: req.target, hosts: names },
      });
    }
    if (!t.fits) {
      const list = considered(undefined, [t], []);
      const msg = `${req.name}: target host "${req.target}" ${t.kind === 'down' ? 'is ' : 'cannot take it: '}${t.why}`;
      if (t.kind === 'down') throw new HfError('HF_ERR_HOST_OFFLINE', msg, { details: { target: req.target, state: t.host.state } });
      if (t.kind === 'storage') throw new HfError('HF_ERR_POOL_UNAVAILABLE', msg, { details: { target: req.target, pool: req.storage } });
      if (t.kind === 'unsupported') throw new HfError('HF_ERR_UNSUPPORTED', msg, { details: { target: req.target, type: req.type } });
      if (t.kind === 'spread') throw new HfError('HF_ERR_CONFLICT', msg, { details: { target: req.target, group: req.group } });
      throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', msg, { details: { ...t.problem?.details, target: req.target, considered: list } });
    }
    // The target overrides every preference: the others are listed but not weighed.
    const rest = judged.filter((j) => j !== t).sort(byName);
    return {
      host: t.host.name,
      reason: `target host as asked${groupNote}: ${t.why}`,
      considered: [{ host: t.host.name, verdict: 'chosen', why: t.why }, ...rest.map((j) => ({ host: j.host.name, verdict: 'skipped' as const, why: 'not the target' }))],
    };
  }

  const best = fitting[0];
  if (!best) {
    const list = considered(undefined, judged, []);
    if (hosts.length === 0) throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `${req.name}: there is no host to place it on`, { details: { considered: list } });
    const up = judged.filter((j) => j.fits || j.kind !== 'down');
    if (up.length > 0 && up.every((j) => !j.fits && j.kind === 'storage')) {
      throw new HfError('HF_ERR_POOL_UNAVAILABLE', `${req.name}: no online host can use storage pool ${req.storage ?? '?'}: ${list.map((c) => `${c.host}: ${c.why}`).join('; ')}`, {
        details: { pool: req.storage, considered: list },
      });
    }
    const blockedBySpread = judged.filter((j) => !j.fits && j.kind === 'spread').map((j) => j.host.name);
    if (blockedBySpread.length > 0) {
      throw new HfError(
        'HF_ERR_INSUFFICIENT_RESOURCES',
        `${req.name}: every host that could take it already holds an instance of group "${req.group}" (spread asks for one per host): ${blockedBySpread.sort().join(', ')}`,
        { details: { group: req.group, considered: list } },
      );
    }
    throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `${req.name}: no host can take it: ${list.map((c) => `${c.host}: ${c.why}`).join('; ')}`, { details: { considered: list } });
  }

  let why: string;
  if (best.overcommitted) why = `no host can commit it now; created stopped where it fits alone and is least allocated (${best.usage})`;
  else if (fitting.length === 1) why = `the only host that fits (${best.usage})`;
  else why = `least allocated of ${fitting.length} hosts that fit (${best.usage})`;
  if (req.group && req.spread) why = `no other instance of group "${req.group}" there (spread); ${why}`;
  else if (req.group && fitting.length > 1) why = `fewest instances of group "${req.group}" (${best.groupCount}), then ${why}`;
  else if (req.group) why = `${why}; ${best.groupCount} other instance${best.groupCount === 1 ? '' : 's'} of group "${req.group}" there`;
  return { host: best.host.name, reason: why, considered: considered(best, judged, fitting) };
}
