// Extension points of the instance lifecycle. Areas that attach host resources to instances
// (networks: taps, veths, DHCP reservations; storage: volumes) register an extension instead of
// reaching into the instance service. Hooks run in registration order; `undo` unwinds what a
// hook did when a later step fails.
import type { CreateInstance, Instance } from '../core/model/instance.js';
import type { UndoStack } from '../util/undo.js';

export interface InstanceExtension {
  readonly name: string;
  /**
   * At create, before the driver provisions: the directory the new instance's disks go in when
   * an area keeps them elsewhere than the instance directory (a storage pool: `storage`), made
   * here with its removal on `undo`; undefined leaves them in the instance directory.
   */
  disksDir?(req: CreateInstance, undo: UndoStack): Promise<string | undefined>;
  /** At create, before the record is written: fill in or validate the config (e.g. NICs). */
  onCreate?(req: CreateInstance, inst: Instance, undo: UndoStack): Promise<Instance>;
  /** Before the driver starts the instance: prepare host resources (e.g. create taps). */
  beforeStart?(inst: Instance, undo: UndoStack): Promise<Instance>;
  /** After the instance process ended (stop, crash, kill): release per-run host resources. */
  afterStop?(inst: Instance): Promise<void>;
  /** Before the record is deleted: release everything the instance held. */
  onDelete?(inst: Instance): Promise<void>;
}
