// The StateStore contract as node:test tests: every store implementation (SQLite now, etcd
// next) calls storeContract() from its own test file. Nothing here may depend on one store's
// internals: each test works under a fresh random key prefix and with revisions relative to
// the store's revision when it starts (a shared etcd does not start at 0), and waits for watch
// events on a predicate with a deadline (a remote store delivers them over the network).
// Where a test needs to drive time or history, it uses an optional hook; without it, that test
// is skipped.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { isHfError } from '../../src/core/errors.js';
import type { StateStore, WatchEvent, WatchFailure } from '../../src/state/store.js';

export interface StoreContractHooks<S extends StateStore> {
  /** Makes `ms` of lease time pass for `store` and lets it act on expired leases. */
  advance?: (store: S, ms: number) => Promise<void>;
  /** Drops the store's change history before `revision` (etcd's Compact). */
  compact?: (store: S, revision: number) => Promise<void>;
}

const WAIT_MS = 5_000;

/** A fresh key prefix per test: tests never see each other's keys, even in a shared store. */
function uniquePrefix(): string {
  return `/contract-${randomBytes(6).toString('hex')}/`;
}

/** Resolves when `pred()` holds, checked on every `poke()`; rejects at the deadline. */
class Signal {
  private waiters: { pred: () => boolean; resolve: () => void }[] = [];

  poke(): void {
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred()) return true;
      w.resolve();
      return false;
    });
  }

  async until(pred: () => boolean, what: string, ms = WAIT_MS): Promise<void> {
    if (pred()) return;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        new Promise<void>((resolve) => this.waiters.push({ pred, resolve })),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }
}

/** A watch callback that records events and failures and lets a test wait for them. */
export function recorder<T = unknown>(): {
  events: WatchEvent<T>[];
  failures: WatchFailure[];
  cb: (ev: WatchEvent<T>) => void;
  onError: (f: WatchFailure) => void;
  summary: (prefix?: string) => string[];
  waitForEvents: (n: number) => Promise<void>;
  waitForKey: (key: string) => Promise<void>;
  waitForFailure: () => Promise<WatchFailure>;
} {
  const events: WatchEvent<T>[] = [];
  const failures: WatchFailure[] = [];
  const signal = new Signal();
  return {
    events,
    failures,
    cb: (ev) => {
      events.push(ev);
      signal.poke();
    },
    onError: (f) => {
      failures.push(f);
      signal.poke();
    },
    summary: (prefix = '') => events.map((e) => `${e.type} ${e.key.slice(prefix.length)}@${e.modRevision}`),
    waitForEvents: (n) => signal.until(() => events.length >= n, `${n} watch events (have ${events.length})`),
    waitForKey: (key) => signal.until(() => events.some((e) => e.key === key), `a watch event on ${key}`),
    waitForFailure: async () => {
      await signal.until(() => failures.length > 0, 'a watch failure');
      return failures[0] as WatchFailure;
    },
  };
}

export function storeContract<S extends StateStore>(name: string, make: () => Promise<S>, hooks: StoreContractHooks<S> = {}): void {
  /** A fresh store and prefix; the store is closed after the test. */
  const setup = async (t: { after(fn: () => Promise<void>): void }): Promise<{ s: S; p: string; r0: number }> => {
    const s = await make();
    t.after(() => s.close());
    return { s, p: uniquePrefix(), r0: await s.revision() };
  };

  describe(`${name}: StateStore contract: keys and revisions`, () => {
    test('get / put / delete; a delete of a missing key changes nothing', async (t) => {
      const { s, p, r0 } = await setup(t);
      assert.equal(await s.get(`${p}x`), undefined);
      assert.equal(await s.put(`${p}x`, { n: 1, tags: ['x'] }), r0 + 1);
      assert.deepEqual(await s.get(`${p}x`), { key: `${p}x`, value: { n: 1, tags: ['x'] }, createRevision: r0 + 1, modRevision: r0 + 1, version: 1 });
      assert.equal(await s.delete(`${p}x`), true);
      assert.equal(await s.get(`${p}x`), undefined);
      assert.equal(await s.revision(), r0 + 2);
      assert.equal(await s.delete(`${p}x`), false);
      assert.equal(await s.revision(), r0 + 2);
    });

    test('createRevision / modRevision / version; delete and re-create starts a new life', async (t) => {
      const { s, p, r0 } = await setup(t);
      await s.put(`${p}a`, 1);
      await s.put(`${p}b`, 1);
      await s.put(`${p}a`, 2);
      await s.put(`${p}a`, 2); // same value: still a change
      assert.deepEqual(await s.get(`${p}a`), { key: `${p}a`, value: 2, createRevision: r0 + 1, modRevision: r0 + 4, version: 3 });
      await s.delete(`${p}a`);
      await s.put(`${p}a`, 'again');
      assert.deepEqual(await s.get(`${p}a`), { key: `${p}a`, value: 'again', createRevision: r0 + 6, modRevision: r0 + 6, version: 1 });
    });

    test('values round-trip as JSON and reads are fresh copies', async (t) => {
      const { s, p } = await setup(t);
      const vals: unknown[] = [null, 'str', 0, -1.5, true, [], {}, { a: { b: [1, { c: 'd' }] } }];
      for (const [i, v] of vals.entries()) await s.put(`${p}${i}`, v);
      for (const [i, v] of vals.entries()) assert.deepEqual((await s.get(`${p}${i}`))?.value, v);
      (await s.get<{ a: { b: unknown[] } }>(`${p}7`))!.value.a.b.push('mutated');
      (await s.list<{ a: { b: unknown[] } }>(p)).entries[7]!.value.a.b.push('mutated');
      assert.deepEqual((await s.get(`${p}7`))?.value, { a: { b: [1, { c: 'd' }] } });
    });

    test('values that are not JSON and invalid keys are refused with HF_ERR_VALIDATION', async (t) => {
      const { s, p, r0 } = await setup(t);
      await assert.rejects(s.put(`${p}k`, undefined), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
      await assert.rejects(s.put(`${p}k`, () => 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
      await assert.rejects(s.put(`${p}k`, 10n), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
      await assert.rejects(s.put('', 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
      await assert.rejects(s.put(`${p}bad\ud800`, 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
      assert.equal(await s.revision(), r0);
    });
  });

  describe(`${name}: StateStore contract: list`, () => {
    test('prefix boundaries, key order, and the revision the list was read at', async (t) => {
      const { s, p, r0 } = await setup(t);
      for (const k of ['ab', 'a', 'a/', 'a/z', 'a/b/c', 'a/a', 'a0', 'b/x', 'a.']) await s.put(p + k, k);
      const keys = async (sub: string): Promise<string[]> => (await s.list(p + sub)).entries.map((e) => e.key.slice(p.length));
      assert.deepEqual(await keys('a/'), ['a/', 'a/a', 'a/b/c', 'a/z']);
      assert.deepEqual(await keys('a'), ['a', 'a.', 'a/', 'a/a', 'a/b/c', 'a/z', 'a0', 'ab']);
      assert.deepEqual(await keys('none/'), []);
      assert.equal((await s.list(p)).revision, r0 + 9);
      // A write elsewhere moves the revision a list reports, even when its entries did not change.
      await s.put(`${uniquePrefix()}other`, 1);
      assert.deepEqual(await s.list(`${p}none/`), { entries: [], revision: r0 + 10 });
    });

    test('wildcard characters in a prefix are literal; non-ASCII keys stay in their prefix', async (t) => {
      const { s, p } = await setup(t);
      for (const k of ['p%/1', 'px/1', 'p_/1', 'py/1', 'p\\/1', 'u/\u00e9', 'u/\u{1F600}', 'u/\u{10FFFF}x', 'u0']) await s.put(p + k, 1);
      const keys = async (sub: string): Promise<string[]> => (await s.list(p + sub)).entries.map((e) => e.key.slice(p.length));
      assert.deepEqual(await keys('p%/'), ['p%/1']);
      assert.deepEqual(await keys('p_/'), ['p_/1']);
      assert.deepEqual(await keys('p\\/'), ['p\\/1']);
      assert.deepEqual(await keys('u/'), ['u/\u00e9', 'u/\u{1F600}', 'u/\u{10FFFF}x']);
    });
  });

  describe(`${name}: StateStore contract: txn`, () => {
    test('all compares hold: every op applied at one new revision', async (t) => {
      const { s, p, r0 } = await setup(t);
      await s.put(`${p}a`, 'a1');
      await s.put(`${p}b`, 'b1');
      const res = await s.txn(
        [
          { key: `${p}a`, modRevision: r0 + 1 },
          { key: `${p}new`, modRevision: 0 },
        ],
        [
          { type: 'put', key: `${p}a`, value: 'a2' },
          { type: 'put', key: `${p}new`, value: 'n1' },
          { type: 'delete', key: `${p}b` },
        ],
      );
      assert.deepEqual(res, { succeeded: true, revision: r0 + 3 });
      assert.deepEqual(await s.get(`${p}a`), { key: `${p}a`, value: 'a2', createRevision: r0 + 1, modRevision: r0 + 3, version: 2 });
      assert.equal((await s.get(`${p}new`))?.modRevision, r0 + 3);
      assert.equal(await s.get(`${p}b`), undefined);
    });

    test('one failing compare applies nothing and leaves the revision', async (t) => {
      const { s, p, r0 } = await setup(t);
      await s.put(`${p}a`, 'a1');
      await s.put(`${p}b`, 'b1');
      const res = await s.txn(
        [
          { key: `${p}a`, modRevision: r0 + 1 },
          { key: `${p}b`, modRevision: r0 + 1 }, // b is at r0 + 2
        ],
        [
          { type: 'put', key: `${p}a`, value: 'changed' },
          { type: 'delete', key: `${p}b` },
          { type: 'put', key: `${p}c`, value: 'c' },
        ],
      );
      assert.deepEqual(res, { succeeded: false, revision: r0 + 2 });
      assert.equal((await s.get(`${p}a`))?.value, 'a1');
      assert.equal((await s.get(`${p}b`))?.value, 'b1');
      assert.equal(await s.get(`${p}c`), undefined);
      assert.equal(await s.revision(), r0 + 2);
    });

    test('compares on existence, version, createRevision and value', async (t) => {
      const { s, p } = await setup(t);
      const k = `${p}k`;
      const put = (cmp: Parameters<S['txn']>[0][number]): Promise<boolean> => s.txn([cmp], [{ type: 'put', key: `${p}out`, value: 1 }]).then((r) => r.succeeded);
      assert.equal(await put({ key: k, exists: false }), true);
      assert.equal(await put({ key: k, exists: true }), false);
      assert.equal(await put({ key: k, version: 0 }), true, 'a missing key has version 0');
      assert.equal(await put({ key: k, value: null }), false, 'a value compare never holds for a missing key');
      const created = await s.put(k, { a: 1, b: [2] });
      await s.put(k, { a: 1, b: [3] });
      assert.equal(await put({ key: k, exists: true }), true);
      assert.equal(await put({ key: k, version: 2 }), true);
      assert.equal(await put({ key: k, version: 1 }), false);
      assert.equal(await put({ key: k, createRevision: created }), true);
      assert.equal(await put({ key: k, createRevision: created + 1 }), false);
      assert.equal(await put({ key: k, value: { a: 1, b: [3] } }), true);
      assert.equal(await put({ key: k, value: { a: 1, b: [2] } }), false);
      await assert.rejects(s.txn([{ key: k, version: -1 }], []), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    });

    test('create-if-absent; a txn that changes nothing keeps the revision; a key twice is refused', async (t) => {
      const { s, p, r0 } = await setup(t);
      const create = (v: string) => s.txn([{ key: `${p}lock`, modRevision: 0 }], [{ type: 'put', key: `${p}lock`, value: v }]);
      assert.deepEqual(await create('first'), { succeeded: true, revision: r0 + 1 });
      assert.deepEqual(await create('second'), { succeeded: false, revision: r0 + 1 });
      assert.equal((await s.get(`${p}lock`))?.value, 'first');
      assert.deepEqual(await s.txn([], [{ type: 'delete', key: `${p}nope` }]), { succeeded: true, revision: r0 + 1 });
      await assert.rejects(
        s.txn([], [
          { type: 'put', key: `${p}a`, value: 2 },
          { type: 'delete', key: `${p}a` },
        ]),
        (e) => isHfError(e, 'HF_ERR_VALIDATION'),
      );
      assert.equal(await s.revision(), r0 + 1);
    });
  });

  describe(`${name}: StateStore contract: watch`, () => {
    test('changes under the prefix, in revision order, with the last value on a delete', async (t) => {
      const { s, p, r0 } = await setup(t);
      const w = recorder();
      s.watch(p, w.cb, { onError: w.onError });
      await s.put(`${p}a`, 1);
      await s.put(`${uniquePrefix()}x`, 1);
      await s.put(p.slice(0, -1) + 'x', 1); // a neighbour of the prefix
      await s.txn([], [
        { type: 'put', key: `${p}b`, value: 2 },
        { type: 'put', key: `${p}c`, value: 3 },
      ]);
      await s.delete(`${p}a`);
      await w.waitForEvents(4);
      assert.deepEqual(w.summary(p), [`put a@${r0 + 1}`, `put b@${r0 + 4}`, `put c@${r0 + 4}`, `delete a@${r0 + 5}`]);
      assert.equal(w.events[3]!.value, 1);
      assert.deepEqual(w.failures, []);
    });

    test('start revision is inclusive: list at R then watch from R + 1 misses nothing and repeats nothing', async (t) => {
      const { s, p, r0 } = await setup(t);
      for (let i = 1; i <= 3; i++) await s.put(`${p}${i}`, i);
      const { entries, revision } = await s.list(p);
      assert.equal(entries.length, 3);
      assert.equal(revision, r0 + 3);
      await s.put(`${p}4`, 4); // between the list and the watch: must not be missed
      const w = recorder();
      s.watch(p, w.cb, { fromRevision: revision + 1, onError: w.onError });
      await s.delete(`${p}1`);
      await s.put(`${p}end`, 'sentinel');
      await w.waitForKey(`${p}end`);
      assert.deepEqual(w.summary(p), [`put 4@${r0 + 4}`, `delete 1@${r0 + 5}`, `put end@${r0 + 6}`]);

      // From a past revision: that revision itself is the first one delivered.
      const past = recorder();
      s.watch(p, past.cb, { fromRevision: r0 + 2 });
      await past.waitForKey(`${p}end`);
      assert.deepEqual(past.events.map((e) => e.modRevision), [r0 + 2, r0 + 3, r0 + 4, r0 + 5, r0 + 6]);
    });

    test('cancel stops delivery, including events already committed', async (t) => {
      const { s, p } = await setup(t);
      const w = recorder();
      const h = s.watch(p, w.cb);
      const other = recorder();
      s.watch(p, other.cb);
      const put = s.put(`${p}1`, 1);
      h.cancel();
      await put;
      await s.put(`${p}2`, 2);
      await other.waitForEvents(2);
      assert.deepEqual(w.events, []);
    });

    test('many watchers each get every event, each with its own copy of the value', async (t) => {
      const { s, p } = await setup(t);
      const ws = Array.from({ length: 40 }, () => recorder<{ n: number }>());
      for (const w of ws) s.watch<{ n: number }>(p, (ev) => {
        w.cb(ev);
        ev.value!.n = 99; // must not leak into the other watchers' copies
      });
      for (let i = 0; i < 5; i++) await s.put(`${p}${i}`, { n: i });
      for (const w of ws) await w.waitForEvents(5);
      for (const w of ws) assert.deepEqual(w.events.map((e) => e.key.slice(p.length)), ['0', '1', '2', '3', '4']);
      const fresh = recorder<{ n: number }>();
      s.watch<{ n: number }>(p, fresh.cb);
      await s.put(`${p}x`, { n: 7 });
      await fresh.waitForEvents(1);
      assert.equal(fresh.events[0]!.value!.n, 7);
    });

    test('a watcher that writes gets its own event later, in order, not re-entrantly', async (t) => {
      const { s, p, r0 } = await setup(t);
      const order: string[] = [];
      let depth = 0;
      let reentered = false;
      const w = recorder();
      s.watch(p, (ev) => {
        depth++;
        if (depth > 1) reentered = true;
        order.push(`${ev.key.slice(p.length)}@${ev.modRevision}`);
        if (ev.key === `${p}a`) void s.put(`${p}b`, 'from watcher');
        depth--;
        w.cb(ev);
      });
      await s.put(`${p}a`, 1);
      await w.waitForEvents(2);
      assert.equal(reentered, false);
      assert.deepEqual(order, [`a@${r0 + 1}`, `b@${r0 + 2}`]);
    });

    test('a watch from a compacted revision ends with the compacted failure, not a throw', async (t) => {
      if (hooks.compact === undefined) return t.skip('no compact hook for this store');
      const { s, p, r0 } = await setup(t);
      for (let i = 1; i <= 6; i++) await s.put(`${p}${i % 2}`, i);
      await hooks.compact(s, r0 + 4);
      const w = recorder();
      s.watch(p, w.cb, { fromRevision: r0 + 2, onError: w.onError });
      const f = await w.waitForFailure();
      assert.equal(f.kind, 'compacted');
      assert.ok(f.kind === 'compacted' && f.compactRevision === r0 + 4, JSON.stringify(f));
      assert.ok(isHfError(f.error, 'HF_ERR_STATE_COMPACTED'));
      // From the compact revision itself, everything since is still there.
      const ok = recorder();
      s.watch(p, ok.cb, { fromRevision: r0 + 4, onError: ok.onError });
      await ok.waitForEvents(3);
      assert.deepEqual(ok.events.map((e) => e.modRevision), [r0 + 4, r0 + 5, r0 + 6]);
      assert.deepEqual(w.events, []);
      assert.deepEqual(ok.failures, []);
    });

    test('closing the store ends active watches with the closed failure; calls after close fail', async () => {
      const s = await make();
      const p = uniquePrefix();
      const w = recorder();
      s.watch(p, w.cb, { onError: w.onError });
      await s.close();
      assert.equal((await w.waitForFailure()).kind, 'closed');
      await assert.rejects(s.get(`${p}x`));
      await assert.rejects(s.put(`${p}x`, 1));
      const late = recorder();
      s.watch(p, late.cb, { onError: late.onError });
      assert.equal((await late.waitForFailure()).kind, 'closed');
    });
  });

  describe(`${name}: StateStore contract: leases`, () => {
    test('grant, attach, timeToLive; revoke deletes the keys and watchers see the deletes', async (t) => {
      const { s, p } = await setup(t);
      const id = await s.grant(30);
      assert.equal(typeof id, 'string');
      await s.put(`${p}a`, 1, { lease: id });
      await s.txn([], [{ type: 'put', key: `${p}b`, value: 2, lease: id }]);
      await s.put(`${p}c`, 3, { lease: id });
      await s.put(`${p}c`, 4); // a put without a lease detaches the key (as etcd)
      assert.equal((await s.get(`${p}a`))?.lease, id);
      assert.equal((await s.get(`${p}c`))?.lease, undefined);
      const ttl = await s.timeToLive(id);
      assert.ok(ttl !== undefined && ttl.grantedTtl === 30 && ttl.ttl > 0 && ttl.ttl <= 30, JSON.stringify(ttl));
      assert.deepEqual(ttl.keys, [`${p}a`, `${p}b`]);

      const w = recorder();
      s.watch(p, w.cb);
      const before = await s.revision();
      await s.revoke(id);
      await w.waitForEvents(2);
      assert.deepEqual(w.events.map((e) => [e.type, e.key.slice(p.length), e.value]), [
        ['delete', 'a', 1],
        ['delete', 'b', 2],
      ]);
      assert.ok(w.events.every((e) => e.modRevision > before));
      assert.deepEqual((await s.list(p)).entries.map((e) => e.key.slice(p.length)), ['c']);
      assert.equal(await s.timeToLive(id), undefined);
      await assert.rejects(s.revoke(id), (e) => isHfError(e, 'HF_ERR_LEASE_NOT_FOUND'));
      await assert.rejects(s.keepAlive(id), (e) => isHfError(e, 'HF_ERR_LEASE_NOT_FOUND'));
      await assert.rejects(s.put(`${p}d`, 1, { lease: id }), (e) => isHfError(e, 'HF_ERR_LEASE_NOT_FOUND'));
      assert.equal(await s.get(`${p}d`), undefined);
    });

    test('unknown leases and bad TTLs are named errors', async (t) => {
      const { s, p } = await setup(t);
      await assert.rejects(s.keepAlive('123456789'), (e) => isHfError(e, 'HF_ERR_LEASE_NOT_FOUND'));
      await assert.rejects(s.keepAlive('not-a-lease'), (e) => isHfError(e, 'HF_ERR_LEASE_NOT_FOUND'));
      await assert.rejects(s.txn([], [{ type: 'put', key: `${p}x`, value: 1, lease: '123456789' }]), (e) => isHfError(e, 'HF_ERR_LEASE_NOT_FOUND'));
      assert.equal(await s.timeToLive('123456789'), undefined);
      await assert.rejects(s.grant(0), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
      await assert.rejects(s.grant(1.5), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    });

    test('an expired lease takes its keys with it; keepAlive renews for the full TTL', async (t) => {
      if (hooks.advance === undefined) return t.skip('no advance hook for this store');
      const { s, p } = await setup(t);
      const id = await s.grant(10);
      const other = await s.grant(60);
      await s.put(`${p}mine`, 'm', { lease: id });
      await s.put(`${p}theirs`, 't', { lease: other });
      await s.put(`${p}plain`, 'p');
      const w = recorder();
      s.watch(p, w.cb);
      await hooks.advance(s, 6_000);
      assert.equal(await s.keepAlive(id), 10);
      await hooks.advance(s, 6_000); // 12 s after the grant, 6 s after the renewal
      assert.equal((await s.get(`${p}mine`))?.value, 'm');
      await hooks.advance(s, 5_000);
      assert.equal(await s.get(`${p}mine`), undefined);
      assert.deepEqual((await s.list(p)).entries.map((e) => e.key.slice(p.length)), ['plain', 'theirs']);
      await w.waitForEvents(1);
      assert.deepEqual(w.summary(p).map((l) => l.split('@')[0]), ['delete mine']);
      await assert.rejects(s.keepAlive(id), (e) => isHfError(e, 'HF_ERR_LEASE_NOT_FOUND'));
      assert.equal(await s.timeToLive(id), undefined);
      assert.ok(((await s.timeToLive(other))?.ttl ?? 0) > 0);
    });
  });
}
