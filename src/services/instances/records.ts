// The instance records of the store, with what the service and the supervisor both need: named
// errors for a missing record, state changes that publish `instance.state`, and a wait for a
// state. The records are read from a local copy kept current by a watch (CachedCollection), so
// listing, admission and waits stay local reads when the store is remote; writes go through to
// the store (compare-and-swap) and return once the copy has seen them.
import { HfError } from '../../core/errors.js';
import { isActive } from '../../core/lifecycle.js';
import { instanceSchema, nameSchema, type Instance, type InstanceState } from '../../core/model/instance.js';
import { CachedCollection, type PageEntry, type PageOptions } from '../../state/cached-collection.js';
import { Collection, type Versioned } from '../../state/collection.js';
import type { StateStore } from '../../state/store.js';
import type { EventBus } from '../events.js';

export class InstanceRecords {
  readonly collection: CachedCollection<Instance>;

  constructor(store: StateStore, private readonly events: EventBus) {
    this.collection = new CachedCollection(new Collection<Instance>(store, '/instances/', instanceSchema));
  }

  /** Stops following the store (daemon shutdown); waits still pending fail. */
  close(): void {
    this.collection.close();
  }

  async list(): Promise<Instance[]> {
    return (await this.collection.list()).map((v) => v.value);
  }

  /** A page of records in name order with their JSON text, uncopied (see CachedCollection.page). */
  page(opts: PageOptions<Instance>): Promise<{ entries: PageEntry<Instance>[]; next?: string }> {
    return this.collection.page(opts);
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
   * HF_ERR_TIMEOUT after `timeoutMs`. Driven by the watch that keeps the local copy current.
   */
  async waitForState(name: string, states: InstanceState[], timeoutMs: number): Promise<Instance | undefined> {
    const v = await this.collection.waitFor(name, (r) => r === undefined || states.includes(r.state), timeoutMs);
    return v?.value;
  }
}
