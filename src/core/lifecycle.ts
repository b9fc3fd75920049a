// The instance lifecycle as a pure state machine: which user actions are allowed in which
// state, and what state an action moves through. Services ask `checkAction` before touching
// the world, so a request that makes no sense now gets a named error and changes nothing.
import { HfError } from './errors.js';
import type { InstanceState } from './model/instance.js';

export const ACTIONS = ['start', 'stop', 'kill', 'restart', 'pause', 'resume', 'delete', 'update'] as const;
export type Action = (typeof ACTIONS)[number];

interface Rule {
  from: readonly InstanceState[];
  /** The state while the action runs. */
  during?: InstanceState;
  /** The state when it succeeded. */
  to?: InstanceState;
}

const RULES: Record<Action, Rule> = {
  start: { from: ['stopped', 'crashed', 'error'], during: 'starting', to: 'running' },
  stop: { from: ['running', 'paused', 'starting', 'stopping'], during: 'stopping', to: 'stopped' },
  kill: { from: ['running', 'paused', 'starting', 'stopping'], during: 'stopping', to: 'stopped' },
  restart: { from: ['running', 'paused'], during: 'stopping', to: 'running' },
  pause: { from: ['running'], to: 'paused' },
  resume: { from: ['paused'], to: 'running' },
  delete: { from: ['stopped', 'crashed', 'error'] },
  update: { from: ['stopped', 'crashed', 'error', 'running', 'paused'] },
};


/** Throws a named error when `action` is not allowed in `state`; otherwise returns the rule. */
export function checkAction(name: string, state: InstanceState, action: Action): { during?: InstanceState; to?: InstanceState } {
  const rule = RULES[action];
  if (rule.from.includes(state)) return { during: rule.during, to: rule.to };
  if (action === 'start' && (state === 'running' || state === 'paused' || state === 'starting')) {
    throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance "${name}" is already ${state}`);
  }
  if (action === 'delete' && isActive(state)) {
    throw new HfError('HF_ERR_INSTANCE_RUNNING', `instance "${name}" is ${state}: stop it first or delete with --force`);
  }
  if ((action === 'stop' || action === 'kill' || action === 'pause' || action === 'restart') && !isActive(state)) {
    throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', `instance "${name}" is ${state}, not running`);
  }
  throw new HfError('HF_ERR_INVALID_STATE', `cannot ${action} instance "${name}" while it is ${state}`);
}

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
