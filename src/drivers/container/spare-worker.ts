// The worker thread that prepares spare root filesystems (see spares.ts, spare-pool.ts). Its file
// calls are synchronous, so they run on this thread and not in the daemon's libuv pool, and the
// thread runs at a background priority (nice is per thread on Linux) so that a start in flight gets
// the CPU first. When a create waits for the spare being prepared, the daemon raises a flag in
// shared memory and the thread goes back to normal priority until the job is done.
import { setPriority } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import { prepareSpare, type SpareJob } from './rootfs.js';

export interface SpareWorkerData {
  /** Int32 flag: 1 while a create waits for a spare. */
  urgent: SharedArrayBuffer;
  /** nice value of the thread while nobody waits. */
  nice: number;
}

export type SpareWorkerRequest = { id: number; job: SpareJob };
export type SpareWorkerReply = { id: number; ok: true } | { id: number; ok: false; error: string };

const data = workerData as SpareWorkerData;
const urgent = new Int32Array(data.urgent);
let current = 0;

function renice(n: number): void {
  if (n === current) return;
  try {
    // pid 0: the calling thread.
    setPriority(0, n);
    current = n;
  } catch {
    // not permitted (raising priority needs CAP_SYS_NICE): stay as we are
  }
}

renice(data.nice);

parentPort?.on('message', (msg: SpareWorkerRequest) => {
  const tick = () => renice(Atomics.load(urgent, 0) === 1 ? 0 : data.nice);
  tick();
  prepareSpare(msg.job, tick).then(
    () => parentPort?.postMessage({ id: msg.id, ok: true } satisfies SpareWorkerReply),
    (e: unknown) => parentPort?.postMessage({ id: msg.id, ok: false, error: e instanceof Error ? e.message : String(e) } satisfies SpareWorkerReply),
  );
});
