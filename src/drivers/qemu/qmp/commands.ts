// Typed QMP commands: one method per command Hyperfold uses, on top of QmpClient.run().
// Reply interfaces keep QEMU's wire names (kebab-case) so they match the QMP reference
// (https://www.qemu.org/docs/master/interop/qemu-qmp-ref.html) one to one; only the members we
// read are typed, QEMU may send more.
import { HfError, isHfError } from '../../../core/errors.js';
import type { QmpClient, QmpEvent, QmpRunOptions, QmpVersionTriple } from './client.js';

/** RunState from QEMU's run-state.json. */
export type QmpRunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo';

/** query-status. */
export interface QmpStatusInfo {
  status: QmpRunState;
  running: boolean;
  /** Deprecated in QEMU 8.1+, present in 7.2. */
  singlestep?: boolean;
}

/** query-version. */
export interface QmpVersionInfo {
  qemu: QmpVersionTriple;
  package: string;
}

/** query-kvm. */
export interface QmpKvmInfo {
  enabled: boolean;
  present: boolean;
}

/** CPU topology properties (query-cpus-fast `props`, query-hotpluggable-cpus). */
export interface QmpCpuInstanceProperties {
  'node-id'?: number;
  'socket-id'?: number;
  'die-id'?: number;
  'cluster-id'?: number;
  'core-id'?: number;
  'thread-id'?: number;
}

/** One entry of query-cpus-fast. */
export interface QmpCpuInfoFast {
  'cpu-index': number;
  'qom-path': string;
  /** Host thread id of the vCPU (useful for pinning). */
  'thread-id': number;
  target: string;
  props?: QmpCpuInstanceProperties;
}

/** One entry of query-hotpluggable-cpus. */
export interface QmpHotpluggableCpu {
  type: string;
  'vcpus-count': number;
  props: QmpCpuInstanceProperties;
  /** Present when the slot is populated. */
  'qom-path'?: string;
}

/** PCDIMMDeviceInfo (dimm, nvdimm). */
export interface QmpDimmDeviceInfo {
  id?: string;
  addr: number;
  size: number;
  slot: number;
  node: number;
  memdev: string;
  hotplugged: boolean;
  hotpluggable: boolean;
}

/** VirtioMEMDeviceInfo. */
export interface QmpVirtioMemDeviceInfo {
  id?: string;
  memaddr: number;
  'requested-size': number;
  size: number;
  'max-size': number;
  'block-size': number;
  node: number;
  memdev: string;
}

/** One entry of query-memory-devices. */
export type QmpMemoryDeviceInfo =
  | { type: 'dimm' | 'nvdimm'; data: QmpDimmDeviceInfo }
  | { type: 'virtio-mem'; data: QmpVirtioMemDeviceInfo }
  | { type: 'virtio-pmem' | 'sgx-epc' | (string & {}); data: Record<string, unknown> };

/** query-balloon. */
export interface QmpBalloonInfo {
  /** Current guest memory in bytes as seen by the balloon driver. */
  actual: number;
}

/** query-memory-size-summary. */
export interface QmpMemorySizeSummary {
  'base-memory': number;
  /** Hot-plugged memory (absent on machines without memory hotplug). */
  'plugged-memory'?: number;
}

/** BlockDeviceInfo: the medium inserted in a block backend (query-block `inserted`). */
export interface QmpBlockDeviceInfo {
  file: string;
  'node-name'?: string;
  ro: boolean;
  drv: string;
  'backing_file'?: string;
  'backing_file_depth': number;
  encrypted: boolean;
  'detect_zeroes': string;
  image: { filename: string; format: string; 'virtual-size': number; 'actual-size'?: number; 'dirty-flag'?: boolean };
  cache: { writeback: boolean; direct: boolean; 'no-flush': boolean };
}

/** One entry of query-block. */
export interface QmpBlockInfo {
  /** Legacy BlockBackend name ('' for -blockdev backends). */
  device: string;
  /** qdev id or QOM path of the attached device. */
  qdev?: string;
  type: string;
  removable: boolean;
  locked: boolean;
  'tray_open'?: boolean;
  'io-status'?: 'ok' | 'failed' | 'nospace';
  inserted?: QmpBlockDeviceInfo;
}

/** JobStatus from QEMU's job.json. */
export type QmpJobStatus = 'undefined' | 'created' | 'running' | 'paused' | 'ready' | 'standby' | 'waiting' | 'pending' | 'aborting' | 'concluded' | 'null';

/** One entry of query-jobs. */
export interface QmpJobInfo {
  id: string;
  type: string;
  status: QmpJobStatus;
  'current-progress': number;
  'total-progress': number;
  /** Set when the job failed (only meaningful once concluded). */
  error?: string;
}

/** device_add: `driver` plus the device's properties. */
export interface QmpDeviceAddArgs {
  driver: string;
  id?: string;
  bus?: string;
  [prop: string]: unknown;
}

/** blockdev-add: BlockdevOptions (driver-specific members). */
export interface QmpBlockdevAddArgs {
  driver: string;
  'node-name'?: string;
  [opt: string]: unknown;
}

/** object-add: `qom-type`, `id` and the object's properties. */
export interface QmpObjectAddArgs {
  'qom-type': string;
  id: string;
  [prop: string]: unknown;
}

export interface QmpSnapshotSaveArgs {
  jobId: string;
  tag: string;
  /** Block node that stores the VM state. */
  vmstate: string;
  /** Block nodes to snapshot (must include `vmstate`). */
  devices: string[];
}
export type QmpSnapshotLoadArgs = QmpSnapshotSaveArgs;
export interface QmpSnapshotDeleteArgs {
  jobId: string;
  tag: string;
  devices: string[];
}

/** Typed wrapper around a QmpClient. */
export class Qmp {
  constructor(readonly client: QmpClient) {}

  // --- run state --------------------------------------------------------------------------

  queryStatus(opts?: QmpRunOptions): Promise<QmpStatusInfo> {
    return this.client.run<QmpStatusInfo>('query-status', undefined, opts);
  }

  /** Starts / resumes vCPUs (emits RESUME). */
  async cont(opts?: QmpRunOptions): Promise<void> {
    await this.client.run('cont', undefined, opts);
  }

  /** Pauses vCPUs (emits STOP). */
  async stop(opts?: QmpRunOptions): Promise<void> {
    await this.client.run('stop', undefined, opts);
  }

  /** ACPI power button; the guest decides what to do (emits POWERDOWN). */
  async systemPowerdown(opts?: QmpRunOptions): Promise<void> {
    await this.client.run('system_powerdown', undefined, opts);
  }

  /** Hard reset (emits RESET). */
  async systemReset(opts?: QmpRunOptions): Promise<void> {
    await this.client.run('system_reset', undefined, opts);
  }

  /**
   * Makes QEMU exit. QEMU may close the socket before (or instead of) replying, so a
   * disconnect counts as success.
   */
  async quit(opts?: QmpRunOptions): Promise<void> {
    try {
      await this.client.run('quit', undefined, opts);
    } catch (e) {
      if (!isHfError(e, 'HF_ERR_QMP_DISCONNECTED')) throw e;
    }
  }

  // --- information ------------------------------------------------------------------------

  queryVersion(opts?: QmpRunOptions): Promise<QmpVersionInfo> {
    return this.client.run<QmpVersionInfo>('query-version', undefined, opts);
  }

  queryKvm(opts?: QmpRunOptions): Promise<QmpKvmInfo> {
    return this.client.run<QmpKvmInfo>('query-kvm', undefined, opts);
  }

  queryCpusFast(opts?: QmpRunOptions): Promise<QmpCpuInfoFast[]> {
    return this.client.run<QmpCpuInfoFast[]>('query-cpus-fast', undefined, opts);
  }

  queryHotpluggableCpus(opts?: QmpRunOptions): Promise<QmpHotpluggableCpu[]> {
    return this.client.run<QmpHotpluggableCpu[]>('query-hotpluggable-cpus', undefined, opts);
  }

  queryMemoryDevices(opts?: QmpRunOptions): Promise<QmpMemoryDeviceInfo[]> {
    return this.client.run<QmpMemoryDeviceInfo[]>('query-memory-devices', undefined, opts);
  }

  queryMemorySizeSummary(opts?: QmpRunOptions): Promise<QmpMemorySizeSummary> {
    return this.client.run<QmpMemorySizeSummary>('query-memory-size-summary', undefined, opts);
  }

  queryBlock(opts?: QmpRunOptions): Promise<QmpBlockInfo[]> {
    return this.client.run<QmpBlockInfo[]>('query-block', undefined, opts);
  }

  // --- balloon ----------------------------------------------------------------------------

  /** Fails with HF_ERR_QMP_COMMAND class DeviceNotActive when the VM has no balloon device. */
  queryBalloon(opts?: QmpRunOptions): Promise<QmpBalloonInfo> {
    return this.client.run<QmpBalloonInfo>('query-balloon', undefined, opts);
  }

  /** Asks the guest balloon driver to make the guest's memory `bytes` (emits BALLOON_CHANGE). */
  async balloon(bytes: number, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('balloon', { value: bytes }, opts);
  }

  // --- devices ----------------------------------------------------------------------------

  async deviceAdd(args: QmpDeviceAddArgs, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('device_add', args, opts);
  }

  /**
   * Requests unplug. For most devices this only starts it: the guest must cooperate, and
   * DEVICE_DELETED is emitted when it is done (see deviceDelAndWait).
   */
  async deviceDel(id: string, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('device_del', { id }, opts);
  }

  /** device_del, then waits for DEVICE_DELETED for that id (HF_ERR_QMP_TIMEOUT if the guest ignores it). */
  async deviceDelAndWait(id: string, waitMs: number, opts?: QmpRunOptions): Promise<void> {
    const ac = new AbortController();
    const deleted = this.client.waitForEvent('DEVICE_DELETED', (e) => e.data.device === id, waitMs, { signal: ac.signal });
    deleted.catch(() => undefined);
    try {
      await this.deviceDel(id, opts);
    } catch (e) {
      ac.abort();
      throw e;
    }
    await deleted;
  }

  // --- block ------------------------------------------------------------------------------

  async blockdevAdd(args: QmpBlockdevAddArgs, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('blockdev-add', args, opts);
  }

  async blockdevDel(nodeName: string, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('blockdev-del', { 'node-name': nodeName }, opts);
  }

  /** Grows (or shrinks) the image behind a block node to `size` bytes. */
  async blockResize(nodeName: string, size: number, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('block_resize', { 'node-name': nodeName, size }, opts);
  }

  // --- QOM objects ------------------------------------------------------------------------

  async objectAdd(args: QmpObjectAddArgs, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('object-add', args, opts);
  }

  async objectDel(id: string, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('object-del', { id }, opts);
  }

  // --- HMP passthrough --------------------------------------------------------------------

  /** Runs a human monitor command and returns its text output. */
  humanMonitorCommand(commandLine: string, opts?: QmpRunOptions): Promise<string> {
    return this.client.run<string>('human-monitor-command', { 'command-line': commandLine }, opts);
  }

  // --- jobs and internal snapshots --------------------------------------------------------

  queryJobs(opts?: QmpRunOptions): Promise<QmpJobInfo[]> {
    return this.client.run<QmpJobInfo[]>('query-jobs', undefined, opts);
  }

  /** Removes a concluded job from query-jobs. */
  async jobDismiss(id: string, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('job-dismiss', { id }, opts);
  }

  /** Starts a snapshot-save job; finish it with waitForJob(jobId). */
  async snapshotSave(args: QmpSnapshotSaveArgs, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('snapshot-save', { 'job-id': args.jobId, tag: args.tag, vmstate: args.vmstate, devices: args.devices }, opts);
  }

  /** Starts a snapshot-load job; finish it with waitForJob(jobId). */
  async snapshotLoad(args: QmpSnapshotLoadArgs, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('snapshot-load', { 'job-id': args.jobId, tag: args.tag, vmstate: args.vmstate, devices: args.devices }, opts);
  }

  /** Starts a snapshot-delete job; finish it with waitForJob(jobId). */
  async snapshotDelete(args: QmpSnapshotDeleteArgs, opts?: QmpRunOptions): Promise<void> {
    await this.client.run('snapshot-delete', { 'job-id': args.jobId, tag: args.tag, devices: args.devices }, opts);
  }

  /**
   * Waits until job `jobId` is concluded, dismisses it and returns its final info; throws
   * HF_ERR_QMP_COMMAND (details.class 'JobFailed', desc = the job's error) when it failed,
   * HF_ERR_QMP_TIMEOUT after `timeoutMs`. Race-free whether the job already ended or not:
   * it subscribes to JOB_STATUS_CHANGE before looking at query-jobs.
   */
  async waitForJob(jobId: string, timeoutMs: number): Promise<QmpJobInfo> {
    const ac = new AbortController();
    const concluded = this.client.waitForEvent(
      'JOB_STATUS_CHANGE',
      (e: QmpEvent) => e.data.id === jobId && e.data.status === 'concluded',
      timeoutMs,
      { signal: ac.signal },
    );
    concluded.catch(() => undefined);
    const notFound = (): HfError =>
      new HfError('HF_ERR_QMP_COMMAND', `QMP job ${jobId} not found`, { details: { command: 'query-jobs', class: 'DeviceNotFound', desc: `job ${jobId} not found`, jobId } });
    let job: QmpJobInfo | undefined;
    try {
      job = (await this.queryJobs()).find((j) => j.id === jobId);
      if (!job) throw notFound();
      if (job.status !== 'concluded') {
        await concluded;
        job = (await this.queryJobs()).find((j) => j.id === jobId);
        if (!job) throw notFound();
      }
    } finally {
      ac.abort();
    }
    await this.jobDismiss(jobId);
    if (job.error !== undefined) {
      throw new HfError('HF_ERR_QMP_COMMAND', `QMP job ${jobId} (${job.type}) failed: ${job.error}`, {
        details: { command: job.type, class: 'JobFailed', desc: job.error, jobId },
      });
    }
    return job;
  }
}
