// The driver interface: the narrow seam between the platform and a virtualization backend.
// QEMU (drivers/qemu) implements it for virtual machines; runc (drivers/container) for system
// containers. Services never reach past it.
import type { Capability } from '../core/lifecycle.js';
import type { ImageRecord } from '../core/model/image.js';
import type { CreateInstance, DiskConfig, Instance, InstanceConfig, InstanceType, NicConfig, RuntimeInfo } from '../core/model/instance.js';
import type { UndoStack } from '../util/undo.js';

/** Files a driver may use for one instance: all under the instance's own directory. */
export interface InstancePaths {
  /** The instance's directory (created by the service before start). */
  dir: string;
  /** Bounded log of the serial console / container console output. */
  consoleLog: string;
  /** Where new disks go when a storage pool keeps them (`storage`); absent: `dir`. */
  disksDir?: string;
}

/** How an instance process ended, as the driver saw it. */
export interface ExitInfo {
  /** true when the guest powered off or we stopped it; false on a crash or kill from outside. */
  clean: boolean;
  reason: string;
  /** Exit status when the driver is the direct parent and knows it. */
  exitCode?: number | null;
  signal?: string | null;
}

export type ObservedState = 'running' | 'paused' | 'stopped';

/** A bidirectional console stream (serial console of a VM, console of a container). */
export interface ConsoleAttachment {
  write(data: Buffer | string): void;
  onData(cb: (data: Buffer) => void): void;
  onClose(cb: () => void): void;
  close(): void;
}

/** A live instance process the daemon supervises. */
export interface InstanceHandle {
  readonly runtime: RuntimeInfo;
  /** Asks the hypervisor what state the guest is in (QMP query-status, runc state). */
  observe(): Promise<ObservedState>;
  /** Graceful stop: ACPI power-down / SIGTERM to init. Resolves when the request is sent. */
  requestShutdown(): Promise<void>;
  /** Forced stop. Resolves once the process is gone. */
  kill(): Promise<void>;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Resolves once the process is gone (however it ended). */
  readonly exited: Promise<ExitInfo>;
  attachConsole(): Promise<ConsoleAttachment>;
  /** Releases daemon-side resources (sockets, timers) without touching the guest. */
  detach(): void;
  /**
   * What this running instance can do when it is less than its driver's set (a VM started
   * without a balloon device…); absent: the driver's `capabilities`.
   */
  readonly capabilities?: ReadonlySet<Capability>;

  // ---- optional capabilities: a handle without one makes the service answer HF_ERR_UNSUPPORTED ----

  /**
   * Applies resource changes to the running instance (memory, vCPUs, cgroup limits). Returns the
   * fields that applied live; the service stores the rest as pending for the next start.
   */
  applyLive?(changes: Partial<InstanceConfig>, current: InstanceConfig): Promise<LiveChangeResult>;
  /** Live details for `info` (balloon statistics, hot-plugged devices, cgroup usage…). */
  liveInfo?(): Promise<Record<string, unknown>>;
  /** Runs a command inside the instance (containers). */
  exec?(argv: string[], opts: ExecOptions): Promise<ExecSession>;
  /** Hot-plugs a disk into the running instance / removes it. */
  attachDisk?(disk: DiskConfig): Promise<void>;
  detachDisk?(diskName: string): Promise<void>;
  /** Grows a disk of the running instance (block_resize). */
  resizeDisk?(diskName: string, sizeBytes: number): Promise<void>;
  /**
   * Internal snapshots of a running instance (storage): disk-only (all disks at one instant),
   * with memory (RAM + device state saved into `vmstateDisk`'s image), revert of a memory
   * snapshot, and delete. Disk names are the instance's DiskConfig names.
   */
  snapshotDisks?(tag: string, diskNames: string[]): Promise<void>;
  saveSnapshot?(tag: string, vmstateDisk: string, diskNames: string[], progress?: (percent: number) => void): Promise<void>;
  loadSnapshot?(tag: string, vmstateDisk: string, diskNames: string[], progress?: (percent: number) => void): Promise<void>;
  deleteSnapshot?(tag: string, diskNames: string[]): Promise<void>;
  /**
   * Hot-plugs a NIC into the running instance / removes it. The network layer has made the host
   * side (a VM's tap named in `nic.hostIface`; a container's veth pair, whose peer `plug.peer`
   * the driver moves into the instance and configures there).
   */
  attachNic?(nic: NicConfig, plug?: NicPlug): Promise<void>;
  detachNic?(nicName: string): Promise<void>;
}

/** What the network layer prepared for a NIC hot-plug, beyond the NIC's config. */
export interface NicPlug {
  /** A host interface to move into the instance and rename to the NIC's name (a container's veth peer). */
  peer?: string | undefined;
  /** a.b.c.d/n to configure inside (containers get their reserved address statically). */
  address?: string | undefined;
  /** Default route through this address, unless the instance has one already. */
  gateway?: string | undefined;
}

export interface LiveChangeResult {
  applied: string[];
  pending: string[];
  /** Human-readable notes (why a field could not apply live). */
  notes: string[];
}

export interface ExecOptions {
  tty: boolean;
  env?: Record<string, string>;
  cwd?: string;
  /** Terminal size for tty sessions. */
  cols?: number;
  rows?: number;
}

export interface ExecSession {
  stdin(data: Buffer | string): void;
  closeStdin(): void;
  onStdout(cb: (b: Buffer) => void): void;
  onStderr(cb: (b: Buffer) => void): void;
  /** Resolves with the exit code (or 128+signal). */
  readonly exit: Promise<number>;
  kill(signal?: NodeJS.Signals): void;
  resize?(cols: number, rows: number): void;
}

/** A disk as a create request gives it: `size` for a new blank disk, or `path` of an existing file. */
export type DiskRequest = CreateInstance['disks'][number];

export interface StartContext {
  paths: InstancePaths;
  /**
   * The caller's undo stack: a driver registers the undo of every step that changed the world
   * (a spawned hypervisor…), so a failure after the driver returned (recording the start) still
   * takes it back. Without one the driver unwinds its own steps when it fails.
   */
  undo?: UndoStack;
  /** Progress callback for long starts (percent 0-100, message). */
  progress?: (percent: number, message: string) => void;
  /** The kernel's OOM killer killed processes of this instance (containers: cgroup oom_kill counter). */
  onOom?: (info: { kills: number; total: number }) => void;
}

export interface InstanceDriver {
  readonly type: InstanceType;
  /** What instances of this driver can do: the lifecycle table (core/lifecycle.ts) checks it. */
  readonly capabilities: ReadonlySet<Capability>;
  /**
   * At create, after the instance directory exists: prepare what the instance needs from its
   * image (a container's root filesystem, a VM's disks…) and the request's disks (VMs: a size
   * makes a blank disk, a path names an existing file). The service removes the directory if
   * create fails.
   */
  provision?(instance: Instance, image: ImageRecord | undefined, paths: InstancePaths, progress?: (percent: number, message: string) => void, disks?: DiskRequest[]): Promise<Instance>;
  /** Checks that this host can run the instance (binary present, accelerator usable…). */
  check(instance: Instance): Promise<void>;
  /** Starts the instance and resolves once the hypervisor reports it running. */
  start(instance: Instance, ctx: StartContext): Promise<InstanceHandle>;
  /**
   * Re-attaches to an instance started by an earlier daemon. Resolves to null when the process
   * is gone (the caller then decides between stopped and crashed from `instance.runtime`).
   */
  attach(instance: Instance, ctx: StartContext): Promise<InstanceHandle | null>;
  /** Removes runtime leftovers (sockets, pid files) after the instance stopped. */
  cleanup(instance: Instance, paths: InstancePaths): Promise<void>;

  // ---- optional capabilities: a driver without one makes the service answer HF_ERR_UNSUPPORTED ----

  /**
   * Snapshots of what the driver keeps outside disk images (a container's root filesystem and
   * definition), for the shared SnapshotService. The caller holds the instance's lock and freezes
   * a running instance meanwhile; nothing is left when it fails. `stateful`: it was running.
   */
  createRootfsSnapshot?(instance: Instance, paths: InstancePaths, tag: string, opts: { stateful: boolean }): Promise<void>;
  /** Puts a snapshot back (instance stopped; the caller holds its lock); returns the definition saved with it. */
  revertRootfsSnapshot?(instance: Instance, paths: InstancePaths, tag: string): Promise<InstanceConfig>;
  /** Removes a snapshot; one already gone is not an error. */
  deleteRootfsSnapshot?(instance: Instance, paths: InstancePaths, tag: string): Promise<void>;
  /**
   * Copies, for the shared copy path: the next `provision` of `dstName` fills the new instance
   * from `src` (its root filesystem, in an id range of its own, and what came from its image)
   * instead of from an image. The caller holds src's lock, with src stopped or frozen, and calls
   * the returned release once the create is over, whatever its outcome.
   */
  prepareCopy?(src: Instance, srcPaths: InstancePaths, dstName: string): Promise<() => void>;
  /** What the driver keeps about an instance in its files (container: id map, init, snapshots), for `info`. */
  describe?(instance: Instance, paths: InstancePaths): Promise<Record<string, unknown>>;
}
