// The instance lifecycle as a pure state machine: one closed table says, for every user action
// and every instance state, whether the action is allowed, and which driver capability it needs
// there (the way Firecracker's pre-boot/post-boot controllers give every action its place).
// Services ask `checkAllowed` before touching the world, so a request that makes no sense now
// gets a named error and changes nothing; no service keeps a state list of its own.
import { HfError, type ErrorCode } from './errors.js';
import { INSTANCE_STATES, type InstanceState, type InstanceType } from './model/instance.js';

export const ACTIONS = [
  'start', 'stop', 'kill', 'restart', 'pause', 'resume', 'delete',
  /** A config change (PATCH). */
  'update',
  'console', 'exec',
  'attach-disk', 'detach-disk', 'resize-disk', 'attach-nic', 'detach-nic',
  /** Disk-only snapshot. */
  'snapshot',
  'snapshot-memory', 'revert', 'delete-snapshot',
  'copy', 'publish', 'export',
  /** To another host: live for a running instance, cold for a stopped one. */
  'move',
] as const;
export type Action = (typeof ACTIONS)[number];

/** The actions that change whether the instance runs (`InstanceService.action`). */
export type LifecycleAction = Extract<Action, 'start' | 'stop' | 'kill' | 'restart' | 'pause' | 'resume'>;

/**
 * What a driver (or one running instance's handle) can do. Each driver declares its set next to
 * itself (drivers/qemu/capabilities.ts, drivers/container/capabilities.ts).
 */
export const CAPABILITIES = [
  /** The instance has block disks (VM images, volumes); a container has a root filesystem instead. */
  'disks',
  'console',
  'exec',
  /** vCPU / memory / cgroup limits change on a running instance. */
  'live-resources',
  'hotplug-disk',
  'hotplug-nic',
  'resize-disk-live',
  /** Disk-only snapshots (and their deletion) while running or paused. */
  'snapshot-live',
  'snapshot-memory',
  /** Snapshots of a stopped instance. */
  'snapshot-offline',
  /** Revert while running (load a memory snapshot, or restart around a disk revert). */
  'revert-live',
  /** Copy while running (a container is frozen meanwhile). */
  'copy-live',
  'migrate-live',
] as const;
export type Capability = (typeof CAPABILITIES)[number];

type Refusal = 'running' | 'not-running' | 'invalid';

/** One cell of the table: what `action` does in one state. */
type Cell =
  | { kind: 'allow' }
  /** Allowed when the capability is there; without it, refused (`otherwise`, or unsupported). */
  | { kind: 'needs'; cap: Capability; otherwise?: Refusal }
  /** Allowed; applies live with the capability, is kept for the next start without it. */
  | { kind: 'prefers'; cap: Capability }
  | { kind: 'refuse'; why: Refusal };

interface Rule {
  /** What the action needs in every state (what the instance type can do at all). */
  always?: Capability;
  /** The state while the action runs / when it succeeded (lifecycle actions). */
  during?: InstanceState;
  to?: InstanceState;
  /** In the order of INSTANCE_STATES: stopped, starting, running, paused, stopping, crashed, error. */
  cells: readonly [Cell, Cell, Cell, Cell, Cell, Cell, Cell];
}

const OK: Cell = { kind: 'allow' };
const RUN: Cell = { kind: 'refuse', why: 'running' };
const OFF: Cell = { kind: 'refuse', why: 'not-running' };
const BAD: Cell = { kind: 'refuse', why: 'invalid' };
const needs = (cap: Capability, otherwise?: Refusal): Cell => (otherwise ? { kind: 'needs', cap, otherwise } : { kind: 'needs', cap });
const prefers = (cap: Capability): Cell => ({ kind: 'prefers', cap });

// prettier-ignore
const TABLE: Record<Action, Rule> = {
  //                        stopped                  starting running                        paused                          stopping crashed                  error
  start:             { during: 'starting', to: 'running',
                       cells: [OK,                      RUN,     RUN,                           RUN,                            BAD,     OK,                      OK] },
  stop:              { during: 'stopping', to: 'stopped',
                       cells: [OFF,                     OK,      OK,                            OK,                             OK,      OFF,                     OFF] },
  kill:              { during: 'stopping', to: 'stopped',
                       cells: [OFF,                     OK,      OK,                            OK,                             OK,      OFF,                     OFF] },
  restart:           { during: 'stopping', to: 'running',
                       cells: [OFF,                     BAD,     OK,                            OK,                             BAD,     OFF,                     OFF] },
  pause:             { to: 'paused',
                       cells: [OFF,                     BAD,     OK,                            BAD,                            BAD,     OFF,                     OFF] },
  resume:            { to: 'running',
                       cells: [OFF,                     BAD,     BAD,                           OK,                             BAD,     OFF,                     OFF] },
  delete:            { cells: [OK,                      RUN,     RUN,                           RUN,                            RUN,     OK,                      OK] },
  update:            { cells: [OK,                      BAD,     prefers('live-resources'),     prefers('live-resources'),      BAD,     OK,                      OK] },
  console:           { always: 'console',
                       cells: [OFF,                     BAD,     OK,                            OK,                             BAD,     OFF,                     OFF] },
  exec:              { always: 'exec',
                       cells: [OFF,                     BAD,     OK,                            BAD,                            BAD,     OFF,                     OFF] },
  'attach-disk':     { always: 'disks',
                       cells: [OK,                      BAD,     needs('hotplug-disk'),         needs('hotplug-disk'),          BAD,     OK,                      OK] },
  'detach-disk':     { always: 'disks',
                       cells: [OK,                      BAD,     needs('hotplug-disk'),         needs('hotplug-disk'),          BAD,     OK,                      OK] },
  'resize-disk':     { always: 'disks',
                       cells: [OK,                      BAD,     needs('resize-disk-live'),     needs('resize-disk-live'),      BAD,     OK,                      OK] },
  'attach-nic':      { cells: [OK,                      BAD,     needs('hotplug-nic'),          needs('hotplug-nic'),           BAD,     OK,                      OK] },
  'detach-nic':      { cells: [OK,                      BAD,     needs('hotplug-nic'),          needs('hotplug-nic'),           BAD,     OK,                      OK] },
  snapshot:          { cells: [needs('snapshot-offline'), BAD,   needs('snapshot-live'),        needs('snapshot-live'),         BAD,     needs('snapshot-offline'), needs('snapshot-offline')] },
  'snapshot-memory': { always: 'snapshot-memory',
                       cells: [OFF,                     BAD,     OK,                            OK,                             BAD,     OFF,                     OFF] },
  revert:            { cells: [needs('snapshot-offline'), BAD,   needs('revert-live', 'running'), needs('revert-live', 'running'), BAD,   needs('snapshot-offline'), needs('snapshot-offline')] },
  'delete-snapshot': { cells: [needs('snapshot-offline'), BAD,   needs('snapshot-live'),        needs('snapshot-live'),         BAD,     needs('snapshot-offline'), needs('snapshot-offline')] },
  copy:              { cells: [OK,                      BAD,     needs('copy-live', 'running'), needs('copy-live', 'running'),  BAD,     OK,                      OK] },
  publish:           { always: 'disks',
                       cells: [OK,                      RUN,     RUN,                           RUN,                            RUN,     OK,                      OK] },
  export:            { always: 'disks',
                       cells: [OK,                      RUN,     RUN,                           RUN,                            RUN,     OK,                      OK] },
  move:              { cells: [OK,                      BAD,     needs('migrate-live'),         needs('migrate-live'),          BAD,     OK,                      OK] },
};

/** What `checkAllowed` answers when the action may go ahead. */
export interface Allowed {
  action: Action;
  state: InstanceState;
  /**
   * The action works on the running instance through its handle (hot-plug, live snapshot, live
   * change). false for an `update` of a running instance whose driver applies changes only at
   * the next start (they are kept as pending).
   */
  live: boolean;
  /** The capability this cell relied on, if any. */
  capability?: Capability;
  during?: InstanceState;
  to?: InstanceState;
}

/**
 * Whether `action` is allowed for `inst` in its current state with the driver capabilities
 * `caps`. Returns the rule, or throws HF_ERR_INSTANCE_RUNNING, HF_ERR_INSTANCE_NOT_RUNNING,
 * HF_ERR_INVALID_STATE or HF_ERR_UNSUPPORTED (whose details name the missing capability).
 */
export function checkAllowed(inst: { name: string; type: InstanceType; state: InstanceState }, action: Action, caps: ReadonlySet<Capability>): Allowed {
  const rule = TABLE[action];
  const { name, state } = inst;
  if (rule.always && !caps.has(rule.always)) throw unsupported(inst, action, rule.always, false);
  const cell = rule.cells[INSTANCE_STATES.indexOf(state)]!;
  const base = { action, state, during: rule.during, to: rule.to };
  const active = isActive(state);
  switch (cell.kind) {
    case 'allow':
      return { ...base, live: active, ...(rule.always ? { capability: rule.always } : {}) };
    case 'prefers':
      return caps.has(cell.cap) ? { ...base, live: true, capability: cell.cap } : { ...base, live: false };
    case 'needs':
      if (caps.has(cell.cap)) return { ...base, live: active, capability: cell.cap };
      if (cell.otherwise) throw refusal(name, state, action, cell.otherwise);
      // Name the way out when the same action works on a stopped instance.
      throw unsupported(inst, action, cell.cap, active && rule.cells[0]!.kind !== 'refuse');
    case 'refuse':
      throw refusal(name, state, action, cell.why);
  }
}

function unsupported(inst: { name: string; type: InstanceType; state: InstanceState }, action: Action, cap: Capability, stopFirst: boolean): HfError {
  const when = isActive(inst.state) ? ` while it is ${inst.state}` : '';
  const hint = stopFirst ? `: stop it first` : '';
  return new HfError('HF_ERR_UNSUPPORTED', `cannot ${action} ${inst.type} "${inst.name}"${when}: the ${inst.type} driver lacks the "${cap}" capability${hint}`, {
    details: { action, state: inst.state, capability: cap },
  });
}

/** What to do instead, for refusals whose reason is not obvious from the action alone. */
const WHEN_RUNNING: Partial<Record<Action, string>> = {
  delete: 'stop it first or delete with --force',
  revert: 'stop it before reverting to a snapshot',
  copy: "stop it before copying (a running guest's disks are not consistent)",
  export: "stop it before exporting (a running guest's disk is not consistent)",
  publish: 'stop it before publishing',
};
const WHEN_NOT_RUNNING: Partial<Record<Action, string>> = {
  'snapshot-memory': "a memory snapshot saves a running instance's RAM (take a disk-only one instead)",
  exec: 'start it before running commands in it',
};

function refusal(name: string, state: InstanceState, action: Action, why: Refusal): HfError {
  const code: ErrorCode = why === 'running' ? 'HF_ERR_INSTANCE_RUNNING' : why === 'not-running' ? 'HF_ERR_INSTANCE_NOT_RUNNING' : 'HF_ERR_INVALID_STATE';
  const details = { action, state };
  if (why === 'running') {
    const msg =
      action === 'start' ? `instance "${name}" is already ${state}`
      : action === 'delete' ? `instance "${name}" is ${state}: ${WHEN_RUNNING.delete}`
      : `cannot ${action} instance "${name}" while it is ${state}: ${WHEN_RUNNING[action] ?? 'stop it first'}`;
    return new HfError(code, msg, { details });
  }
  if (why === 'not-running') {
    const hint = WHEN_NOT_RUNNING[action];
    return new HfError(code, `instance "${name}" is ${state}, not running${hint ? `: ${hint}` : ''}`, { details });
  }
  return new HfError(code, `cannot ${action} instance "${name}" while it is ${state}`, { details });
}

/** Every capability (tests). */
export const ALL_CAPABILITIES: ReadonlySet<Capability> = new Set(CAPABILITIES);

/** States in which a hypervisor process exists (or is being created or torn down). */
export function isActive(state: InstanceState): boolean {
  return state === 'running' || state === 'paused' || state === 'starting' || state === 'stopping';
}

export type ExitDecision = { state: InstanceState; restart: boolean };

/**
 * What happens when an instance process ends: `stopped` when the exit was clean (guest power-off
 * or a stop we asked for), `crashed` otherwise; and whether the restart policy restarts it.
 * `requestedStop` is true when the user asked for the stop (then no policy restarts it).
 */
export function decideOnExit(opts: {
  clean: boolean;
  requestedStop: boolean;
  policy: 'never' | 'on-failure' | 'always';
  restartCount: number;
  maxRestarts?: number;
}): ExitDecision {
  const state: InstanceState = opts.clean ? 'stopped' : 'crashed';
  if (opts.requestedStop) return { state, restart: false };
  const max = opts.maxRestarts ?? 10;
  if (opts.restartCount >= max) return { state, restart: false };
  const restart = opts.policy === 'always' || (opts.policy === 'on-failure' && !opts.clean);
  return { state, restart };
}

/** Back-off before the Nth automatic restart: 0.5 s doubling up to 30 s. */
export function restartBackoffMs(restartCount: number): number {
  return Math.min(30_000, 500 * 2 ** Math.max(0, restartCount));
}
