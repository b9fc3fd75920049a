import { z } from 'zod';

export const OPERATION_STATUSES = ['running', 'success', 'failure'] as const;
export type OperationStatus = (typeof OPERATION_STATUSES)[number];

export const operationSchema = z.object({
  id: z.string(),
  /** What is being done, e.g. "instance.start", "image.build". */
  type: z.string(),
  /** What it is done to, e.g. { kind: "instance", name: "web1" }. */
  target: z.object({ kind: z.string(), name: z.string() }),
  host: z.string(),
  status: z.enum(OPERATION_STATUSES),
  progress: z.object({ percent: z.number().min(0).max(100), message: z.string() }),
  messages: z.array(z.object({ at: z.string(), text: z.string() })),
  error: z.object({ code: z.string(), message: z.string() }).optional(),
  result: z.unknown().optional(),
  createdAt: z.string(),
  updatedAt: z.string(),
  finishedAt: z.string().optional(),
});
export type Operation = z.infer<typeof operationSchema>;
