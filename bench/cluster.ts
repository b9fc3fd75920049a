// Cluster benchmarks (issue 10), each against a baseline measured in the same run:
//  1. The store contract workload (get, put, compare-and-swap txn, list of 1,000 keys, watch
//     delivery) on SQLite and on a three-member etcd on this machine: each median and the ratio.
//  2. `GET /api/v1/instances` with 10,000 instances over three hosts, asked of a fourth member
//     that holds none of them (p50/p99 of 200), against the same list on a single host (SQLite):
//     the whole list, and its first page of 500 (`?limit=500`).
//  3. Forwarding: a lifecycle call (PATCH of the description) and `GET /instances/NAME` on h2's
//     instance asked of h2 and of h1 (forwarded), alternated; and h1's call on its own instance
//     (median of 100 each).
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { ApiClient } from '../src/cli/client.js';
import { SqliteStateStore } from '../src/state/sqlite-store.js';
import { EtcdStateStore } from '../src/state/etcd-store.js';
import { readHostPki } from '../src/cluster/pki.js';
import { ETCD_PREFIX } from '../src/cluster/config.js';
import type { Instance } from '../src/core/model/instance.js';
import { destroyDataDir, makeDataDir, startTestDaemon, stopTestDaemon } from '../test/helpers/daemon.js';
import { startTestEtcd } from '../test/helpers/etcd.js';
import { Sandbox } from '../test/helpers/sandbox.js';
import { storeWorkload } from './store-workload.js';
import { median, pct } from './stats.js';

const INSTANCES = Number(process.env.BENCH_CLUSTER_INSTANCES ?? 10_000);
const f = (n: number) => n.toFixed(2);

async function timeIt(n: number, fn: () => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await fn();
    out.push(performance.now() - t);
  }
  return out;
}

function record(name: string, host: string, template: Instance): Instance {
  return { ...template, id: randomUUID(), name, host, state: 'stopped', desired: 'stopped' };
}

async function storeRows(): Promise<string[]> {
  const sqlite = SqliteStateStore.open(':memory:');
  const etcd = await startTestEtcd({ members: 3 });
  const store = await EtcdStateStore.open({ endpoints: etcd.endpoints });
  try {
    const a = await storeWorkload(sqlite, { keys: 1000 });
    const b = await storeWorkload(store, { keys: 1000 });
    return (Object.keys(a) as (keyof typeof a)[]).map((k) => `| store ${k} (median) | ${f(a[k])} ms | ${f(b[k])} ms | ${(b[k] / a[k]).toFixed(1)}× |`);
  } finally {
    await store.close();
    await sqlite.close();
    await etcd.destroy();
  }
}

/** The whole list, and the first page of 500 (what a UI or a paging client asks for). */
async function listTimes(api: { request: (m: string, p: string) => Promise<unknown> }): Promise<{ full: number[]; page: number[] }> {
  await api.request('GET', '/api/v1/instances');
  const full = await timeIt(200, () => api.request('GET', '/api/v1/instances'));
  const page = await timeIt(200, () => api.request('GET', '/api/v1/instances?limit=500'));
  return { full, page };
}

async function singleHostList(template: Instance): Promise<{ full: number[]; page: number[] }> {
  const dir = await makeDataDir();
  const store = SqliteStateStore.open(`${dir}/state.db`);
  for (let i = 0; i < INSTANCES; i++) await store.put(`/instances/b${i}`, record(`b${i}`, 'solo', template));
  await store.close();
  const d = await startTestDaemon(dir);
  try {
    return await listTimes(d.http);
  } finally {
    await stopTestDaemon(d, 'SIGKILL');
    await destroyDataDir(dir, d);
  }
}

export async function run(): Promise<string> {
  const rows = ['| measurement | baseline | cluster | ratio |', '|---|---|---|---|'];
  rows.push(...(await storeRows()));

  const sb = await Sandbox.up(4, { prefix: 'hfbc', net: '10.213.42', ttl: 10 });
  try {
    const h1 = sb.host('h1');
    // A template record made the normal way, then 10,000 copies over h1..h3 written straight into etcd.
    const made = await h1.api.request<{ instance: Instance }>('POST', '/api/v1/instances', { name: 'tmpl', image: 'tiny', memory: '64M' });
    const template = made.instance;
    const pki = (await readHostPki(`${h1.dataDir}/cluster/pki`))!;
    const etcd = await EtcdStateStore.open({ endpoints: ['https://10.213.42.1:2379'], tls: { ca: pki.caPem, cert: pki.certPem, key: pki.keyPem }, prefix: ETCD_PREFIX });
    for (let i = 0; i < INSTANCES; i += 100) {
      await Promise.all(Array.from({ length: Math.min(100, INSTANCES - i) }, (_, j) => etcd.put(`/instances/c${i + j}`, record(`c${i + j}`, `h${((i + j) % 3) + 1}`, template))));
    }
    await etcd.close();
    const h4 = sb.host('h4');
    const cluster = await listTimes(h4.api);
    const solo = await singleHostList(template);
    for (const [what, a, b] of [
      ['whole list', solo.full, cluster.full],
      ['first page of 500', solo.page, cluster.page],
    ] as const) {
      rows.push(`| GET /instances, ${INSTANCES} instances, ${what}: p50 | ${f(median(a))} ms (one host) | ${f(median(b))} ms (3 hosts, asked of a 4th) | ${(median(b) / median(a)).toFixed(2)}× |`);
      rows.push(`| GET /instances, ${INSTANCES} instances, ${what}: p99 (target < 50 ms) | ${f(pct(a, 99))} ms | ${f(pct(b, 99))} ms | ${(pct(b, 99) / pct(a, 99)).toFixed(2)}× |`);
    }

    // Forwarding: the same call on h2's instance, asked of h2 itself and of h1 (which forwards it
    // to h2), alternated so that both see the same load; and, as the issue words it, h1's call on
    // an instance of its own against the same call on h2's.
    await h1.api.request('POST', '/api/v1/instances', { name: 'local1', image: 'tiny', memory: '64M', target: 'h1' });
    await h1.api.request('POST', '/api/v1/instances', { name: 'remote1', image: 'tiny', memory: '64M', target: 'h2' });
    const h2api: ApiClient = sb.host('h2').api;
    const h1api: ApiClient = h1.api;
    const patch = (api: ApiClient, n: string) => api.request('PATCH', `/api/v1/instances/${n}`, { description: `d${Math.random()}` });
    const get = (api: ApiClient, n: string) => api.request('GET', `/api/v1/instances/${n}`);
    for (const [what, call] of [
      ['PATCH description', patch],
      ['GET instance', get],
    ] as const) {
      for (let i = 0; i < 10; i++) await Promise.all([call(h1api, 'local1'), call(h1api, 'remote1'), call(h2api, 'remote1')]);
      const local: number[] = [];
      const direct: number[] = [];
      const forwarded: number[] = [];
      for (let i = 0; i < 100; i++) {
        local.push(...(await timeIt(1, () => call(h1api, 'local1'))));
        direct.push(...(await timeIt(1, () => call(h2api, 'remote1'))));
        forwarded.push(...(await timeIt(1, () => call(h1api, 'remote1'))));
      }
      rows.push(`| ${what} on h2's instance: asked of h2 vs of h1, forwarded (median; target ≤ +5 ms) | ${f(median(direct))} ms | ${f(median(forwarded))} ms | +${f(median(forwarded) - median(direct))} ms |`);
      rows.push(`| ${what}: h1's own instance vs h2's through h1 (median) | ${f(median(local))} ms | ${f(median(forwarded))} ms | +${f(median(forwarded) - median(local))} ms |`);
    }
  } finally {
    await sb.down();
  }
  return rows.join('\n');
}
