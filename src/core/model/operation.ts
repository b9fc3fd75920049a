import { z } from 'zod';

/**
 * queued: waiting for what it needs (the instance's lock) and not started; running; then one of
 * success, failure, cancelled (a user cancelled it: a queued one never ran, a running one stopped).
 */
export const OPERATION_STATUSES = ['queued', 'running', 'success', 'failure', 'cancelled'] as const;
export type OperationStatus = (typeof OPERATION_STATUSES)[number];

/** Whether an operation has ended (it will not change any more). */
export function isFinished(op: { status: OperationStatus }): boolean {
  return op.status === 'success' || op.status === 'failure' || op.status === 'cancelled';
}

export const operationSchema = z.object({
  id: z.string(),
  /** What is being done, e.g. "instance.start", "image.build". */
  type: z.string(),
  /** What it is done to, e.g. { kind: "instance", name: "web1" }. */
  target: z.object({ kind: z.string(), name: z.string() }),
  host: z.string(),
  status: z.enum(OPERATION_STATUSES),
  /** Whether a running operation stops when cancelled (a queued one always can be cancelled). */
  cancellable: z.boolean().optional(),
  progress: z.object({ percent: z.number().min(0).max(100), message: z.string() }),
  messages: z.array(z.object({ at: z.string(), text: z.string() })),
  error: z.object({ code: z.string(), message: z.string() }).optional(),
  result: z.unknown().optional(),
  createdAt: z.string(),
  updatedAt: z.string(),
  finishedAt: z.string().optional(),
});
export type Operation = z.infer<typeof operationSchema>;
