// EtcdStateStore against a real etcd: the StateStore contract on a single member, then what only
// a remote store has to get right: watches that survive a restart, calls that fail fast and
// availability that follows etcd while it is down, a three-member cluster that loses a member,
// and namespaces that keep stores apart.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import { setTimeout as delay } from 'node:timers/promises';
import { Etcd3 } from 'etcd3';
import { isHfError } from '../../src/core/errors.js';
import { EtcdStateStore, type EtcdStoreOptions } from '../../src/state/etcd-store.js';
import { startTestEtcd, type TestEtcd } from '../helpers/etcd.js';
import { recorder, storeContract } from '../helpers/store-contract.js';

const SETTLE_MS = 30_000;

let etcd: TestEtcd;
before(async () => {
  etcd = await startTestEtcd();
});
after(async () => {
  await etcd?.destroy();
});

const uniquePrefix = (): string => `/t-${randomBytes(5).toString('hex')}/`;

function open(t: { after(fn: () => Promise<void>): void }, opts: Partial<EtcdStoreOptions> = {}): Promise<EtcdStateStore> {
  return EtcdStateStore.open({ endpoints: etcd.endpoints, prefix: '/hf-test/', ...opts }).then((s) => {
    t.after(() => s.close());
    return s;
  });
}

/** Resolves when the store reports etcd available again (its probe notices), at the latest after SETTLE_MS. */
function availableAgain(s: EtcdStateStore): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`etcd not available again after ${SETTLE_MS} ms`));
    }, SETTLE_MS);
    const off = s.onAvailability((up) => {
      if (!up) return;
      clearTimeout(timer);
      off();
      resolve();
    });
    if (s.isAvailable()) {
      clearTimeout(timer);
      off();
      resolve();
    }
  });
}

/**
 * Runs `fn` until it does not fail with HF_ERR_CLUSTER_UNAVAILABLE (an election after a member
 * was killed), waiting for the store's probe to see etcd answer between attempts.
 */
async function settled<R>(s: EtcdStateStore, fn: () => Promise<R>): Promise<R> {
  const deadline = Date.now() + SETTLE_MS;
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      if (!isHfError(e, 'HF_ERR_CLUSTER_UNAVAILABLE') || Date.now() > deadline) throw e;
      await availableAgain(s);
    }
  }
}

// The contract under a namespace; leases run on real time (etcd's own clock).
storeContract('EtcdStateStore', () => EtcdStateStore.open({ endpoints: etcd.endpoints, prefix: '/hf-contract/' }), {
  compact: (s, revision) => s.compact(revision),
  // etcd's lease clock cannot be moved, so time really passes; one second more per step keeps the
  // contract's expiry checks clear of etcd's 500 ms expiry sweep on a busy machine.
  advance: (_s, ms) => delay(ms + 1_000),
});

describe('EtcdStateStore: etcd only', () => {
  test('a watch survives an etcd restart: every change exactly once, in order', async (t) => {
    const s = await open(t);
    const other = await open(t); // a second client writes too
    const p = uniquePrefix();
    const r0 = await s.revision();
    const w = recorder();
    s.watch(p, w.cb, { fromRevision: r0 + 1, onError: w.onError });
    for (let i = 0; i < 5; i++) await s.put(`${p}before/${i}`, i);
    await w.waitForEvents(5);

    await etcd.stop(0);
    await etcd.start(0);
    // Written as soon as etcd serves again, most likely before the watch has reconnected.
    for (let i = 0; i < 5; i++) await settled(other, () => other.put(`${p}after/${i}`, i));
    await settled(s, () => s.delete(`${p}before/0`));
    await w.waitForEvents(11);

    const expected = [...[0, 1, 2, 3, 4].map((i) => `put before/${i}@${r0 + 1 + i}`), ...[0, 1, 2, 3, 4].map((i) => `put after/${i}@${r0 + 6 + i}`), `delete before/0@${r0 + 11}`];
    assert.deepEqual(w.summary(p), expected);
    assert.equal(w.events[10]!.value, 0, 'a delete carries the last value');
    assert.deepEqual(w.failures, []);
    // Nothing more arrives late (a repeat would): a sentinel is the next and last event.
    await s.put(`${p}sentinel`, 1);
    await w.waitForKey(`${p}sentinel`);
    assert.equal(w.events.length, 12);
  });

  test('while etcd is down calls fail fast with HF_ERR_CLUSTER_UNAVAILABLE; availability follows etcd', async (t) => {
    const s = await open(t, { callTimeoutMs: 2_000, probeIntervalMs: 250 });
    const p = uniquePrefix();
    const seen: boolean[] = [];
    s.onAvailability((up) => seen.push(up));
    await s.put(`${p}x`, 1);
    assert.equal(s.isAvailable(), true);

    await etcd.kill(0);
    for (const call of [() => s.put(`${p}x`, 2), () => s.get(`${p}x`), () => s.txn([], [{ type: 'delete', key: `${p}x` }]), () => s.list(p)]) {
      const started = Date.now();
      await assert.rejects(call(), (e) => isHfError(e, 'HF_ERR_CLUSTER_UNAVAILABLE') && e.message.includes(etcd.endpoints[0]!));
      const took = Date.now() - started;
      assert.ok(took < 3_000, `a call failed after ${took} ms`);
    }
    assert.equal(s.isAvailable(), false);

    await etcd.start(0);
    await availableAgain(s); // the probe notices: nobody calls
    assert.deepEqual(seen, [false, true]);
    assert.equal((await s.get(`${p}x`))?.value, 1, 'the failed writes changed nothing');
    await s.put(`${p}x`, 3);
    assert.equal((await s.get(`${p}x`))?.value, 3);
  });

  test('open() names the endpoints when etcd does not answer', async () => {
    await assert.rejects(EtcdStateStore.open({ endpoints: ['http://127.0.0.1:1'], dialTimeoutMs: 1_000 }), (e) => isHfError(e, 'HF_ERR_CLUSTER_UNAVAILABLE') && e.message.includes('http://127.0.0.1:1'));
    await assert.rejects(EtcdStateStore.open({ endpoints: ['https://127.0.0.1:1'] }), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
  });

  test('prefixes keep stores apart on one etcd', async (t) => {
    const a = await open(t, { prefix: '/hf-iso' });
    const b = await open(t, { prefix: '/hf-iso-b/' });
    const p = uniquePrefix();
    const wa = recorder();
    const wb = recorder();
    a.watch('', wa.cb, { onError: wa.onError });
    b.watch('', wb.cb, { onError: wb.onError });
    const lease = await a.grant(30);
    await a.put(`${p}k`, 'a', { lease });
    await b.put(`${p}k`, 'b', { lease });
    await b.put(`${p}only-b`, 'b');
    assert.equal((await a.get(`${p}k`))?.value, 'a');
    assert.equal((await b.get(`${p}k`))?.value, 'b');
    assert.equal(await a.get(`${p}only-b`), undefined);
    assert.deepEqual((await a.list('')).entries.map((e) => e.key), [`${p}k`]);
    assert.deepEqual((await b.list(p)).entries.map((e) => e.key), [`${p}k`, `${p}only-b`]);
    assert.deepEqual((await a.timeToLive(lease))?.keys, [`${p}k`]);
    await a.put(`${p}end`, 1);
    await b.put(`${p}end`, 1);
    await wa.waitForKey(`${p}end`);
    await wb.waitForKey(`${p}end`);
    assert.deepEqual(wa.summary().map((l) => l.split('@')[0]), [`put ${p}k`, `put ${p}end`]);
    assert.deepEqual(wb.summary().map((l) => l.split('@')[0]), [`put ${p}k`, `put ${p}only-b`, `put ${p}end`]);
    // In etcd itself: the keys under each namespace, one slash between it and the key.
    const raw = new Etcd3({ hosts: etcd.endpoints });
    t.after(() => raw.close());
    assert.deepEqual(await raw.getAll().prefix(`/hf-iso/`).keys(), [`/hf-iso${p}end`, `/hf-iso${p}k`]);
    assert.equal(await raw.get(`/hf-iso-b${p}only-b`).string(), '"b"');
    await assert.rejects(a.put('no-slash', 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await a.revoke(lease);
    assert.equal(await b.get(`${p}k`), undefined, 'the lease took its key in the other namespace too');
  });
});

describe('EtcdStateStore: a three-member cluster', () => {
  let cluster: TestEtcd;
  // The etcd3 pool picks a random member per call; in this order every call and stream goes to
  // the last endpoint first, so killing that member is sure to hit them.
  const pool = createRequire(import.meta.url)('etcd3/lib/connection-pool.js') as { ConnectionPool: { deterministicOrder: boolean } };
  before(async () => {
    cluster = await startTestEtcd({ members: 3 });
    pool.ConnectionPool.deterministicOrder = true;
  });
  after(async () => {
    pool.ConnectionPool.deterministicOrder = false;
    await cluster?.destroy();
  });

  test('one member killed: get, put, txn and watch go on; two killed: calls fail within the deadline', async (t) => {
    const s = await EtcdStateStore.open({ endpoints: cluster.endpoints, callTimeoutMs: 2_500, probeIntervalMs: 250 });
    t.after(() => s.close());
    const p = uniquePrefix();
    const r0 = await s.revision();
    const ws = Array.from({ length: 3 }, () => recorder());
    for (const w of ws) s.watch(p, w.cb, { fromRevision: r0 + 1, onError: w.onError });
    await s.put(`${p}a`, 1);
    for (const w of ws) await w.waitForEvents(1);

    await cluster.kill(2);
    const put = await settled(s, () => s.put(`${p}b`, 2));
    assert.equal((await settled(s, () => s.get(`${p}a`)))?.value, 1);
    const a = (await s.get(`${p}a`))!;
    assert.deepEqual(await s.txn([{ key: `${p}a`, modRevision: a.modRevision }], [{ type: 'put', key: `${p}a`, value: 'cas' }]), { succeeded: true, revision: put + 1 });
    assert.equal((await s.txn([{ key: `${p}a`, modRevision: a.modRevision }], [{ type: 'put', key: `${p}a`, value: 'stale' }])).succeeded, false);
    await s.put(`${p}end`, 1);
    for (const w of ws) {
      await w.waitForKey(`${p}end`);
      assert.deepEqual(w.summary(p), [`put a@${r0 + 1}`, `put b@${put}`, `put a@${put + 1}`, `put end@${put + 2}`]);
      assert.deepEqual(w.failures, []);
    }

    // Without a quorum the last member cannot answer: every call ends at its deadline.
    await cluster.kill(1);
    for (const call of [() => s.put(`${p}x`, 1), () => s.get(`${p}a`)]) {
      const started = Date.now();
      await assert.rejects(call(), (e) => isHfError(e, 'HF_ERR_CLUSTER_UNAVAILABLE'));
      const took = Date.now() - started;
      assert.ok(took < 4_000, `a call failed after ${took} ms`);
    }
    assert.equal(s.isAvailable(), false);
    await Promise.all([cluster.start(1), cluster.start(2)]);
    await availableAgain(s);
    assert.equal((await s.get(`${p}a`))?.value, 'cas');
  });
});
