// The instance records of the store, with what the service and the supervisor both need: named
// errors for a missing record, state changes that publish `instance.state`, and a wait for a
// state on the collection's watch.
import { HfError } from '../../core/errors.js';
import { isActive } from '../../core/lifecycle.js';
import { instanceSchema, nameSchema, type Instance, type InstanceState } from '../../core/model/instance.js';
import { Collection, type Versioned } from '../../state/collection.js';
import type { StateStore } from '../../state/store.js';
import type { EventBus } from '../events.js';

export class InstanceRecords {
  readonly collection: Collection<Instance>;

  constructor(store: StateStore, private readonly events: EventBus) {
    this.collection = new Collection<Instance>(store, '/instances/', instanceSchema);
  }

  async list(): Promise<Instance[]> {
    return (await this.collection.list()).map((v) => v.value);
  }

  /** The record; HF_ERR_INVALID_NAME / HF_ERR_INSTANCE_NOT_FOUND otherwise. */
  async load(name: string): Promise<Versioned<Instance>> {
    const parsed = nameSchema.safeParse(name);
    if (!parsed.success) throw new HfError('HF_ERR_INVALID_NAME', `"${name}" is not a valid instance name`);
    const v = await this.collection.get(name);
    if (!v) throw new HfError('HF_ERR_INSTANCE_NOT_FOUND', `instance "${name}" not found`);
    return v;
  }

  /** Compare-and-swap update that records `state` and publishes the change of state. */
  async setState(name: string, state: InstanceState, fn: (r: Instance) => Instance = (r) => r): Promise<Instance> {
    let prev: InstanceState | undefined;
    const v = await this.collection.update(name, (r) => {
      prev = r.state;
      return { ...fn(r), state, updatedAt: new Date().toISOString() };
    });
    // `prev` is from the attempt that was written (a retry overwrote the earlier ones).
    if (prev !== state) this.events.publish('instance.state', { name, state, previous: prev });
    return v.value;
  }

  /** vCPUs and memory committed by the active instances of `host`, other than `except`. */
  async committed(host: string, except: string): Promise<{ vcpus: number; memoryMiB: number }> {
    let vcpus = 0;
    let memoryMiB = 0;
    for (const i of await this.list()) {
      if (i.name === except || i.host !== host || !isActive(i.state)) continue;
      vcpus += i.config.vcpus;
      memoryMiB += i.config.memoryMiB;
    }
    return { vcpus, memoryMiB };
  }

  /**
   * Resolves with the record once it is in one of `states` (undefined once it is deleted);
   * HF_ERR_TIMEOUT after `timeoutMs`. Watches first, then reads: a change in between is not lost.
   */
  waitForState(name: string, states: InstanceState[], timeoutMs: number): Promise<Instance | undefined> {
    return new Promise((resolve, reject) => {
      let done = false;
      const finish = (settle: () => void) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        watch.cancel();
        settle();
      };
      const seen = (v: Instance | undefined) => {
        if (v === undefined) finish(() => resolve(undefined));
        else if (states.includes(v.state)) finish(() => resolve(v));
      };
      const watch = this.collection.watch((ev) => {
        if (ev.id === name) seen(ev.type === 'delete' ? undefined : ev.value);
      });
      const timer = setTimeout(
        () => finish(() => reject(new HfError('HF_ERR_TIMEOUT', `instance "${name}" did not become ${states.join(' or ')} within ${timeoutMs} ms`))),
        timeoutMs,
      );
      this.collection.get(name).then(
        (v) => seen(v?.value),
        (e: unknown) => finish(() => reject(e)),
      );
    });
  }
}
