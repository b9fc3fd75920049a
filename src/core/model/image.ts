// An image: what instances are created from (a VM boot source and disk template, or a
// container root filesystem).
import { z } from 'zod';
import { bootConfigSchema, nameSchema } from './instance.js';

export const imageRecordSchema = z.object({
  name: nameSchema,
  type: z.enum(['vm', 'container']),
  description: z.string(),
  /** builtin: made by a builder on this host; import: from a file; publish: from an instance. */
  source: z.enum(['builtin', 'import', 'publish']),
  /** VMs: how instances made from this image boot (kernel paths are absolute). */
  boot: bootConfigSchema.optional(),
  /** VMs: the disk template that instances get a linked clone (qcow2 overlay) or a copy of. */
  disk: z.object({ path: z.string(), format: z.enum(['qcow2', 'raw']) }).optional(),
  /** Containers: the root filesystem (a directory tree or a tarball). */
  rootfs: z.object({ path: z.string(), format: z.enum(['dir', 'tar']) }).optional(),
  /** Defaults an instance made from it starts with (e.g. from an OVF). */
  defaults: z.object({ vcpus: z.number().optional(), memoryMiB: z.number().optional() }).default({}),
  sizeBytes: z.number(),
  sha256: z.record(z.string(), z.string()).default({}),
  createdAt: z.string(),
  details: z.record(z.string(), z.unknown()).default({}),
});
export type ImageRecord = z.infer<typeof imageRecordSchema>;
