// Turns zod failures into one clear HfError: which field, what is wrong.
import type { ZodType, ZodTypeDef } from 'zod';
import { HfError, type ErrorCode } from './errors.js';

const SIZE_FIELDS = new Set(['memory', 'maxMemory', 'size']);

export function parseInput<Out, In>(schema: ZodType<Out, ZodTypeDef, In>, input: unknown, what = 'request'): Out {
  const r = schema.safeParse(input);
  if (r.success) return r.data;
  const issues = r.error.issues.map((i) => ({ path: i.path.join('.'), message: i.message }));
  const first = r.error.issues[0];
  let code: ErrorCode = 'HF_ERR_VALIDATION';
  if (first?.path[0] === 'name') code = 'HF_ERR_INVALID_NAME';
  else if (first && SIZE_FIELDS.has(String(first.path.at(-1))) && /size|unit|MiB/.test(first.message)) code = 'HF_ERR_INVALID_SIZE';
  const text = issues.map((i) => (i.path ? `${i.path}: ${i.message}` : i.message)).join('; ');
  throw new HfError(code, `invalid ${what}: ${text}`, { details: { issues } });
}
