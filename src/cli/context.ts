// What every CLI command module gets: the program to add verbs to, an API client, output
// helpers and the operation follower (progress bar, failure → non-zero exit).
import type { Command } from 'commander';
import type { Operation } from '../core/model/operation.js';
import { ApiClient, ApiError } from './client.js';
import { ProgressView } from './format.js';

export interface CliContext {
  program: Command;
  client(): ApiClient;
  print(data: unknown, format: string | undefined, human: () => string): void;
  follow(op: Operation, opts?: { wait?: boolean }): Promise<Operation>;
}

export function createContext(program: Command): CliContext {
  let warnedStale = false;
  const onStale = (): void => {
    if (warnedStale) return;
    warnedStale = true;
    console.error('warning: this host cannot reach the cluster store now: what it shows may be out of date, and changes are refused');
  };
  const client = (): ApiClient => {
    const o = program.opts<{ url?: string; token?: string; dataDir?: string }>();
    return new ApiClient({ url: o.url, token: o.token, dataDir: o.dataDir, onStale });
  };
  const print = (data: unknown, format: string | undefined, human: () => string): void => {
    if (format === 'json') console.log(JSON.stringify(data, null, 2));
    else console.log(human());
  };
  /** Follows an operation to its end with a progress bar; fails the command if it failed. */
  const follow = async (op: Operation, opts: { wait?: boolean } = {}): Promise<Operation> => {
    if (opts.wait === false) {
      console.log(`operation ${op.id} (${op.type}) started`);
      return op;
    }
    if (op.status === 'success') return op;
    const view = new ProgressView();
    const spin = setInterval(() => view.update(op), 120);
    try {
      const done = await client().waitOperation(op.id, (o) => {
        op = o;
        view.update(o);
      });
      if (done.status === 'failure' || done.status === 'cancelled') throw new ApiError(0, done.error?.code ?? 'HF_ERR_INTERNAL', done.error?.message ?? `operation ${done.status}`);
      return done;
    } finally {
      clearInterval(spin);
      view.done();
    }
  };
  return { program, client, print, follow };
}
