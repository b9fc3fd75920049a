// Failpoints: named places in multi-step work where a test makes the daemon fail on purpose, to
// prove that what a failure leaves behind converges. Armed by HYPERFOLD_FAILPOINTS, e.g.
// `launch.after-spawn=kill` (the daemon SIGKILLs itself there, as a crash or an OOM kill would)
// or `launch.after-spawn=error` (the step throws, as a failing command would). Unarmed, a
// failpoint costs one Map lookup.
import { HfError } from '../core/errors.js';

export type FailAction = 'kill' | 'error';

/** Where the daemon can be made to fail (see the callers). */
export const FAILPOINTS = ['launch.before-record', 'launch.after-record', 'launch.after-spawn', 'launch.before-running'] as const;
export type FailpointName = (typeof FAILPOINTS)[number];

/** Parses `name=action[,name=action…]`; unknown names or actions are an error (a typo must not silently arm nothing). */
export function parseFailpoints(spec: string): Map<FailpointName, FailAction> {
  const out = new Map<FailpointName, FailAction>();
  for (const part of spec.split(',').map((s) => s.trim()).filter(Boolean)) {
    const [name, action = 'kill'] = part.split('=').map((s) => s.trim());
    if (!(FAILPOINTS as readonly string[]).includes(name ?? '')) throw new HfError('HF_ERR_VALIDATION', `unknown failpoint "${name}" (known: ${FAILPOINTS.join(', ')})`);
    if (action !== 'kill' && action !== 'error') throw new HfError('HF_ERR_VALIDATION', `failpoint ${name}: unknown action "${action}" (kill or error)`);
    out.set(name as FailpointName, action);
  }
  return out;
}

let armed: Map<FailpointName, FailAction> = parseFailpoints(process.env.HYPERFOLD_FAILPOINTS ?? '');

/** Replaces the armed failpoints (tests in one process; the daemon reads the environment). */
export function armFailpoints(spec: string): void {
  armed = parseFailpoints(spec);
}

/** Fails here if `name` is armed: SIGKILLs this process, or throws HF_ERR_INTERNAL. */
export function failpoint(name: FailpointName): void {
  const action = armed.get(name);
  if (!action) return;
  if (action === 'kill') {
    // Nothing after this line runs: no finally, no exit handler (what a real crash leaves).
    process.kill(process.pid, 'SIGKILL');
  }
  throw new HfError('HF_ERR_INTERNAL', `failpoint ${name} reached`);
}
