// The state store's hot operations, timed one at a time on any StateStore: the cluster benchmark
// runs it on SQLite (the baseline) and on a three-member etcd. Each measure is the median of its
// samples, in milliseconds per operation:
//   put    unconditional put of a ~1 KB record (the `keys` records the list reads are made here)
//   get    get of one of them
//   txn    compare-and-swap update (compare modRevision, put), as Collection.update does
//   list   list of the `keys` records under one prefix
//   watch  delivery latency: put → the watch callback has the event
// Everything is written under a fresh random prefix and deleted at the end.
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import type { StateStore, WatchEvent } from '../src/state/store.js';
import { median } from './stats.js';

export interface StoreWorkloadOptions {
  /** Records written, and listed by the list measure. */
  keys: number;
  /** Samples of get, txn and watch (default 200); list gets a tenth of them, at least 5. */
  samples?: number;
}

/** A record shaped like an instance's (about 1 KB of JSON). */
function record(i: number, rev = 0): Record<string, unknown> {
  return {
    name: `bench-${i}`,
    type: i % 2 ? 'vm' : 'container',
    host: 'h1',
    rev,
    config: { cpus: 2, memory: '1G', image: 'debian-12', disks: [{ name: 'root', size: '10G', pool: 'default' }], nics: [{ name: 'eth0', network: 'default', mac: '52:54:00:12:34:56' }] },
    state: 'running',
    desired: 'running',
    runtime: { pid: 1000 + i, startTime: 123456789, qmp: `/var/lib/hyperfold/instances/bench-${i}/qmp.sock` },
    labels: Object.fromEntries(Array.from({ length: 12 }, (_, k) => [`label-${k}`, `value-${k}-${'x'.repeat(24)}`])),
  };
}

async function timed(n: number, op: (i: number) => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await op(i);
    out.push(performance.now() - t0);
  }
  return out;
}

export async function storeWorkload(store: StateStore, opts: StoreWorkloadOptions): Promise<Record<string, number>> {
  const keys = Math.max(1, Math.floor(opts.keys));
  const samples = Math.max(1, Math.floor(opts.samples ?? 200));
  const p = `/bench-${randomBytes(5).toString('hex')}/`;
  const key = (i: number) => `${p}r/${String(i).padStart(6, '0')}`;
  const modRevisions: number[] = [];
  const result: Record<string, number> = {};
  try {
    // Warm-up: connections, statement caches, JIT.
    for (let i = 0; i < 20; i++) await store.get(key(i % keys));

    result.put = median(await timed(keys, async (i) => (modRevisions[i] = await store.put(key(i), record(i)))));
    result.get = median(await timed(samples, (i) => store.get(key((i * 7919) % keys))));
    result.txn = median(
      await timed(samples, async (i) => {
        const k = (i * 7919) % keys;
        const r = await store.txn([{ key: key(k), modRevision: modRevisions[k] as number }], [{ type: 'put', key: key(k), value: record(k, i + 1) }]);
        if (!r.succeeded) throw new Error(`compare-and-swap of ${key(k)} failed: nobody else writes under ${p}`);
        modRevisions[k] = r.revision;
      }),
    );
    result.list = median(
      await timed(Math.max(5, Math.floor(samples / 10)), async () => {
        const { entries } = await store.list(`${p}r/`);
        if (entries.length !== keys) throw new Error(`list of ${p}r/ returned ${entries.length} entries, not ${keys}`);
      }),
    );
    result.watch = median(await watchLatency(store, `${p}w/`, samples));
  } finally {
    for (let i = 0; i < keys; i++) await store.delete(key(i));
    for (let i = 0; i < samples; i++) await store.delete(`${p}w/${i}`);
  }
  return result;
}

const WATCH_WAIT_MS = 10_000;

/** `p`, or a rejection naming `what` after WATCH_WAIT_MS. */
async function within<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`no watch event for ${what} after ${WATCH_WAIT_MS} ms`)), WATCH_WAIT_MS)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Per sample: the time from a put's start until the watch callback has its event. */
async function watchLatency(store: StateStore, prefix: string, samples: number): Promise<number[]> {
  let waiting: { key: string; resolve: () => void } | undefined;
  const failed: Error[] = [];
  const w = store.watch(
    prefix,
    (ev: WatchEvent) => {
      if (waiting !== undefined && ev.key === waiting.key) waiting.resolve();
    },
    { onError: (f) => failed.push(f.error) },
  );
  try {
    // The watch is live once it delivers a first event.
    const warm = new Promise<void>((resolve) => (waiting = { key: `${prefix}warm-up`, resolve }));
    await store.put(`${prefix}warm-up`, 0);
    await within(warm, `${prefix}warm-up`);
    await store.delete(`${prefix}warm-up`);
    return await timed(samples, async (i) => {
      if (failed.length > 0) throw failed[0];
      const k = `${prefix}${i}`;
      const seen = new Promise<void>((resolve) => (waiting = { key: k, resolve }));
      await store.put(k, record(i));
      await within(seen, k);
    });
  } finally {
    w.cancel();
  }
}
