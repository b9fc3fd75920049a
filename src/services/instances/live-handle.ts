// The running instance's handle, for an action the lifecycle table allowed live
// (`InstanceService.allowed(...).live`). The table already answered from the capabilities the
// driver (or handle) declares; this only turns a declared capability whose method the handle does
// not have into a named error instead of a TypeError (a driver bug), and a record that says
// running while no handle is supervised (the process just ended) into "not running".
import { HfError } from '../../core/errors.js';
import type { Instance } from '../../core/model/instance.js';
import type { InstanceHandle } from '../../drivers/driver.js';

/** The optional methods of a handle (what a capability promises). */
export type HandleMethod = {
  [K in keyof InstanceHandle]-?: undefined extends InstanceHandle[K] ? (NonNullable<InstanceHandle[K]> extends (...args: never[]) => unknown ? K : never) : never;
}[keyof InstanceHandle];

export type HandleWith<K extends HandleMethod> = InstanceHandle & Required<Pick<InstanceHandle, K>>;

export function liveHandle<K extends HandleMethod>(inst: Pick<Instance, 'name' | 'type' | 'state'>, handle: InstanceHandle | undefined, ...methods: K[]): HandleWith<K> {
  if (!handle) throw new HfError('HF_ERR_INSTANCE_NOT_RUNNING', `instance "${inst.name}" is not running (its process has ended)`, { details: { state: inst.state } });
  const missing = methods.filter((m) => typeof handle[m] !== 'function');
  if (missing.length) {
    throw new HfError('HF_ERR_UNSUPPORTED', `the ${inst.type} driver's handle for "${inst.name}" has no ${missing.join(', ')}, though its capabilities allow this while ${inst.state}`, {
      details: { missing },
    });
  }
  return handle as HandleWith<K>;
}
