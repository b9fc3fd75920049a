// The instance model, as three types (after Firecracker): the body of a create (everything the
// user may give, with defaults), the body of an update (everything optional), and the internal
// record that the state store keeps. Validation is pure: it returns a new value, changes nothing.
import { z } from 'zod';
import { parseMiB } from '../units.js';

export const NAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
export const NAME_RULE = 'lower-case letters, digits and "-", 1 to 63 characters, not starting or ending with "-"';

export const nameSchema = z
  .string()
  .regex(NAME_RE, { message: `invalid name: use ${NAME_RULE}` });

/** Memory given as "256M", "1G" or a number of MiB. Parsed into MiB. */
export const memorySchema = z
  .union([z.string(), z.number()])
  .transform((v, ctx) => {
    try {
      return parseMiB(v);
    } catch (e) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: (e as Error).message });
      return z.NEVER;
    }
  });

export const INSTANCE_TYPES = ['vm', 'container'] as const;
export type InstanceType = (typeof INSTANCE_TYPES)[number];

export const ACCELS = ['auto', 'kvm', 'tcg'] as const;
export type Accel = (typeof ACCELS)[number];

export const DEVICE_MODELS = ['virtio', 'emulated'] as const;
export type DeviceModel = (typeof DEVICE_MODELS)[number];

export const RESTART_POLICIES = ['never', 'on-failure', 'always'] as const;
export type RestartPolicy = (typeof RESTART_POLICIES)[number];

export const FIRMWARES = ['bios', 'uefi'] as const;
export type Firmware = (typeof FIRMWARES)[number];

export const DISK_BUSES = ['virtio', 'scsi', 'ide', 'ahci'] as const;
export type DiskBus = (typeof DISK_BUSES)[number];

export const INSTANCE_STATES = ['stopped', 'starting', 'running', 'paused', 'stopping', 'crashed', 'error'] as const;
export type InstanceState = (typeof INSTANCE_STATES)[number];

export const diskConfigSchema = z.object({
  name: nameSchema.describe('disk name, unique within the instance'),
  /** Absolute path of the disk or ISO file on the host. */
  path: z.string().min(1),
  format: z.enum(['qcow2', 'raw']).default('qcow2'),
  media: z.enum(['disk', 'cdrom']).default('disk'),
  /** Bus; absent means "follow the instance's device model". */
  bus: z.enum(DISK_BUSES).optional(),
  readonly: z.boolean().default(false),
  /** Storage volume reference (pool/name) when the disk lives in a pool. */
  volume: z.string().optional(),
});
export type DiskConfig = z.infer<typeof diskConfigSchema>;

export const nicConfigSchema = z.object({
  name: nameSchema,
  network: z.string().min(1),
  mac: z.string().regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, { message: 'mac must look like 52:54:00:12:34:56 (lower case)' }),
  ip: z.string().optional(),
  /** Host-side interface name (tap or veth), filled in by the network layer. */
  hostIface: z.string().optional(),
});
export type NicConfig = z.infer<typeof nicConfigSchema>;

export const bootConfigSchema = z.discriminatedUnion('kind', [
  z.object({
    kind: z.literal('kernel'),
    kernel: z.string().min(1),
    initrd: z.string().optional(),
    cmdline: z.string().default(''),
  }),
  z.object({ kind: z.literal('disk'), firmware: z.enum(FIRMWARES).default('bios') }),
  z.object({ kind: z.literal('cdrom'), firmware: z.enum(FIRMWARES).default('bios') }),
]);
export type BootConfig = z.infer<typeof bootConfigSchema>;

/** What a user asks for when creating an instance. */
export const createInstanceSchema = z
  .object({
    name: nameSchema,
    type: z.enum(INSTANCE_TYPES).default('vm'),
    image: z.string().optional().describe('image to create the instance from (e.g. "tiny")'),
    /** Whole vCPUs for a VM; a fraction of CPU time (e.g. 0.5) is allowed for a container. */
    vcpus: z.number().positive({ message: 'vcpus must be at least 1 (or a positive fraction for a container)' }).max(512).default(1),
    maxVcpus: z.number().int().min(1).max(512).optional(),
    memory: memorySchema.default('256M'),
    maxMemory: memorySchema.optional(),
    disks: z.array(diskConfigSchema.partial({ path: true, format: true, media: true, readonly: true }).extend({ size: z.string().optional() })).default([]),
    storage: nameSchema.optional().describe('VMs: the storage pool that keeps its disks (the root disk and new blank disks); default: its instance directory'),
    nics: z
      .array(
        z.object({
          network: z.string().min(1),
          name: nameSchema.optional(),
          mac: z.string().optional(),
          ip: z.string().optional(),
        }).strict(),
      )
      .default([])
      .describe('network interfaces: one per network to attach to'),
    boot: bootConfigSchema.optional(),
    privileged: z.boolean().default(false).describe('containers: run without a user namespace (root is host root)'),
    pidsLimit: z.number().int().min(1).optional().describe('containers: maximum number of processes'),
    accel: z.enum(ACCELS).default('auto'),
    devices: z.enum(DEVICE_MODELS).default('virtio'),
    restartPolicy: z.enum(RESTART_POLICIES).default('never'),
    autostart: z.boolean().default(false),
    start: z.boolean().default(false).describe('start the instance once created (what `launch` does)'),
    description: z.string().max(1024).default(''),
    target: z.string().min(1).max(253).optional().describe('the host to create it on (default: the one placement picks)'),
    group: nameSchema.optional().describe('placement group: its instances prefer different hosts'),
    spread: z.boolean().optional().describe('with a group: never on a host that already holds an instance of the group'),
  })
  .strict()
  .superRefine((v, ctx) => {
    if (v.spread && v.group === undefined) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['spread'], message: 'spread needs a group (give group as well)' });
    if (v.type === 'vm' && !Number.isInteger(v.vcpus)) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['vcpus'], message: 'vcpus of a VM must be a whole number' });
    if (v.memory < 16) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['memory'], message: `memory must be at least 16 MiB (got ${v.memory} MiB)` });
    if (v.maxVcpus !== undefined && v.maxVcpus < v.vcpus) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['maxVcpus'], message: 'maxVcpus must be at least vcpus' });
    if (v.maxMemory !== undefined && v.maxMemory < v.memory) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['maxMemory'], message: 'maxMemory must be at least memory' });
    v.disks.forEach((d, i) => {
      if (!d.path === !d.size) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['disks', i], message: `disk ${d.name}: give either a size (a new blank disk) or a path (an existing file)` });
    });
    if (!v.image && !v.boot && v.type === 'vm') ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['image'], message: 'give an image or a boot source' });
  });
export type CreateInstanceRequest = z.input<typeof createInstanceSchema>;
export type CreateInstance = z.output<typeof createInstanceSchema>;

/** What a user may change on an existing instance: everything optional. */
export const updateInstanceSchema = z
  .object({
    vcpus: z.number().positive({ message: 'vcpus must be positive' }).max(512),
    maxVcpus: z.number().int().min(1).max(512),
    memory: memorySchema,
    pidsLimit: z.number().int().min(1),
    maxMemory: memorySchema,
    accel: z.enum(ACCELS),
    devices: z.enum(DEVICE_MODELS),
    restartPolicy: z.enum(RESTART_POLICIES),
    autostart: z.boolean(),
    description: z.string().max(1024),
  })
  .partial()
  .strict();
export type UpdateInstanceRequest = z.input<typeof updateInstanceSchema>;
export type UpdateInstance = z.output<typeof updateInstanceSchema>;

export const instanceConfigSchema = z.object({
  vcpus: z.number().positive(),
  maxVcpus: z.number().int().min(1).optional(),
  memoryMiB: z.number().int().min(16),
  maxMemoryMiB: z.number().int().optional(),
  disks: z.array(diskConfigSchema),
  nics: z.array(nicConfigSchema),
  boot: bootConfigSchema,
  accel: z.enum(ACCELS),
  devices: z.enum(DEVICE_MODELS),
  restartPolicy: z.enum(RESTART_POLICIES),
  autostart: z.boolean(),
  /** Containers: no user namespace. */
  privileged: z.boolean().optional(),
  /** Containers: process limit. */
  pidsLimit: z.number().int().optional(),
  /**
   * Containers: path of a network namespace prepared by the network layer (in its beforeStart
   * hook) that the container joins; absent means a fresh namespace with loopback only.
   */
  netns: z.string().optional(),
});
export type InstanceConfig = z.infer<typeof instanceConfigSchema>;

/** What the driver reports about a running instance; kept so a restarted daemon can re-attach. */
export const runtimeInfoSchema = z.object({
  pid: z.number().int(),
  /** Process start time (clock ticks since boot, /proc/PID/stat field 22): guards against PID reuse. */
  pidStartTime: z.number().int(),
  accel: z.enum(['kvm', 'tcg']).optional(),
  startedAt: z.string(),
  /** Driver-specific details (QMP socket path, container id, …). */
  details: z.record(z.string(), z.unknown()).default({}),
});
export type RuntimeInfo = z.infer<typeof runtimeInfoSchema>;

export const instanceSchema = z.object({
  id: z.string(),
  name: nameSchema,
  type: z.enum(INSTANCE_TYPES),
  /** The host this instance lives on: nothing may assume there is only one. */
  host: z.string(),
  project: z.string().default('default'),
  image: z.string().optional(),
  /** The storage pool that keeps its disks (absent: its instance directory on its host). */
  storage: z.string().optional(),
  description: z.string().default(''),
  config: instanceConfigSchema,
  /** Changes stored now that apply at the next start. */
  pending: instanceConfigSchema.partial().default({}),
  state: z.enum(INSTANCE_STATES),
  /** What the user last asked for: the reconciler and restart policy converge towards it. */
  desired: z.enum(['running', 'stopped', 'paused']),
  runtime: runtimeInfoSchema.optional(),
  lastExit: z
    .object({ at: z.string(), reason: z.string(), clean: z.boolean() })
    .optional(),
  restartCount: z.number().int().default(0),
  /** How the instance was placed (absent on records older than placement, and when nothing was asked or said). */
  placement: z
    .object({ group: z.string().optional(), spread: z.boolean().optional(), reason: z.string().optional() })
    .optional(),
  createdAt: z.string(),
  updatedAt: z.string(),
});
export type Instance = z.infer<typeof instanceSchema>;
