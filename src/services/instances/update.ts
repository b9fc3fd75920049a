// Where the fields of an update go, decided once from the request and what applied live: the
// record write is compare-and-swap and may run its callback several times, so the callback only
// applies this plan and never accumulates anything itself.
import type { Instance, InstanceConfig, UpdateInstance } from '../../core/model/instance.js';

export interface UpdatePlan {
  /** Fields that are in effect now (stored in config). */
  applied: string[];
  /** Fields stored for the next start (the running instance could not take them live). */
  pending: string[];
  /** The new record from the current one; pure, so a retried write gets the same answer. */
  apply(r: Instance): Instance;
}

export function planUpdate(patch: UpdateInstance, next: Partial<InstanceConfig>, running: boolean, liveApplied: string[]): UpdatePlan {
  const applied: string[] = [];
  const pending: string[] = [];
  // Policies and metadata apply at once, whatever the state.
  if (patch.restartPolicy !== undefined) applied.push('restartPolicy');
  if (patch.autostart !== undefined) applied.push('autostart');
  if (patch.description !== undefined) applied.push('description');
  const toConfig: Partial<InstanceConfig> = {};
  const toPending: Partial<InstanceConfig> = {};
  for (const [k, v] of Object.entries(next) as Array<[keyof InstanceConfig, unknown]>) {
    if (running && !liveApplied.includes(k)) {
      (toPending as Record<string, unknown>)[k] = v;
      pending.push(k);
    } else {
      (toConfig as Record<string, unknown>)[k] = v;
      applied.push(k);
    }
  }
  const apply = (r: Instance): Instance => {
    const out: Instance = { ...r, config: { ...r.config, ...toConfig }, pending: { ...r.pending, ...toPending }, updatedAt: new Date().toISOString() };
    if (patch.restartPolicy !== undefined) out.config.restartPolicy = patch.restartPolicy;
    if (patch.autostart !== undefined) out.config.autostart = patch.autostart;
    if (patch.description !== undefined) out.description = patch.description;
    // A field now in effect no longer waits for the next start.
    for (const k of Object.keys(toConfig)) delete (out.pending as Record<string, unknown>)[k];
    return out;
  };
  return { applied, pending, apply };
}

/** The `fields` of a config (the values to go back to when a live change must be reverted). */
export function pickConfig(config: Partial<InstanceConfig>, fields: string[]): Partial<InstanceConfig> {
  const out: Record<string, unknown> = {};
  for (const f of fields) if (f in config) out[f] = (config as Record<string, unknown>)[f];
  return out as Partial<InstanceConfig>;
}
