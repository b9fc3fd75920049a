import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { z } from 'zod';
import { isHfError } from '../../src/core/errors.js';
import { CachedCollection } from '../../src/state/cached-collection.js';
import { Collection } from '../../src/state/collection.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import type { ListResult, StateStore, WatchFailure } from '../../src/state/store.js';

const itemSchema = z.object({ name: z.string(), state: z.string() });
type Item = z.infer<typeof itemSchema>;
const item = (name: string, state = 'stopped'): Item => ({ name, state });

/** A store that counts reads and can run a hook right after a list read its snapshot. */
class ObservedStore implements StateStore {
  lists = 0;
  gets = 0;
  afterList: ((res: ListResult) => Promise<void>) | undefined;
  constructor(readonly inner: SqliteStateStore) {}
  get: StateStore['get'] = (k) => {
    this.gets++;
    return this.inner.get(k);
  };
  list = async <T = unknown>(p: string): Promise<ListResult<T>> => {
    this.lists++;
    const res = await this.inner.list<T>(p);
    const hook = this.afterList;
    this.afterList = undefined;
    if (hook) await hook(res);
    return res;
  };
  put: StateStore['put'] = (k, v, o) => this.inner.put(k, v, o);
  delete: StateStore['delete'] = (k) => this.inner.delete(k);
  txn: StateStore['txn'] = (c, o) => this.inner.txn(c, o);
  revision: StateStore['revision'] = () => this.inner.revision();
  watch: StateStore['watch'] = (p, cb, o) => this.inner.watch(p, cb, o);
  grant: StateStore['grant'] = (ttl) => this.inner.grant(ttl);
  keepAlive: StateStore['keepAlive'] = (id) => this.inner.keepAlive(id);
  revoke: StateStore['revoke'] = (id) => this.inner.revoke(id);
  timeToLive: StateStore['timeToLive'] = (id) => this.inner.timeToLive(id);
  close: StateStore['close'] = () => this.inner.close();
}

function setup(opts: { clock?: () => number } = {}): { inner: SqliteStateStore; store: ObservedStore; items: Collection<Item>; cache: CachedCollection<Item>; resyncs: WatchFailure[] } {
  const inner = SqliteStateStore.open(':memory:', { clock: opts.clock, sweepIntervalMs: 0 });
  const store = new ObservedStore(inner);
  const items = new Collection<Item>(store, '/items/', itemSchema, { onCorrupt: () => undefined });
  const resyncs: WatchFailure[] = [];
  const cache = new CachedCollection<Item>(items, { onResync: (f) => resyncs.push(f), retryMs: 5 });
  return { inner, store, items, cache, resyncs };
}

describe('CachedCollection', () => {
  test('lists once, then reads are local and follow other writers', async () => {
    const { inner, store, items, cache } = setup();
    await items.create('b', item('b'));
    await items.create('a', item('a'));
    await cache.start();
    const listsAfterStart = store.lists;
    const getsAfterStart = store.gets;
    assert.deepEqual((await cache.list()).map((v) => v.value.name), ['a', 'b']);
    assert.deepEqual(await cache.get('a'), { value: item('a'), revision: 2 });
    assert.equal(await cache.get('zz'), undefined);
    await inner.put('/items/c', item('c', 'running')); // another writer, straight to the store
    const c = await cache.waitFor('c', (v) => v?.state === 'running', 2_000);
    assert.deepEqual(c, { value: item('c', 'running'), revision: 3 });
    assert.equal(cache.revision, 3);
    assert.equal(store.lists, listsAfterStart, 'no list after the first');
    assert.equal(store.gets, getsAfterStart, 'no get of the store for a read');
    // Results are copies: mutating one does not change the cache.
    (await cache.get('a'))!.value.state = 'mutated';
    assert.equal((await cache.get('a'))?.value.state, 'stopped');
    await inner.close();
  });

  test('writes go through to the store and are readable from the cache as soon as they return', async () => {
    const { inner, cache } = setup();
    await cache.start();
    const created = await cache.create('a', item('a'));
    assert.deepEqual(await cache.get('a'), created);
    const updated = await cache.update('a', (cur) => ({ ...cur, state: 'running' }));
    assert.equal((await cache.get('a'))?.revision, updated.revision);
    assert.equal((await inner.get('/items/a'))?.modRevision, updated.revision);
    await cache.replace('a', item('a', 'paused'), updated.revision);
    assert.equal((await cache.get('a'))?.value.state, 'paused');
    await assert.rejects(cache.replace('a', item('a', 'x'), updated.revision), (e) => isHfError(e, 'HF_ERR_CONFLICT'));
    assert.equal(await cache.delete('a'), true);
    assert.equal(await cache.get('a'), undefined);
    assert.equal(await cache.delete('a'), false);
    await assert.rejects(cache.create('b/c', item('x')), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await inner.close();
  });

  test('waitFor: absent records, a deadline with HF_ERR_TIMEOUT, a throwing predicate', async () => {
    const { inner, items, cache } = setup();
    await items.create('a', item('a'));
    await cache.start();
    const gone = cache.waitFor('a', (v) => v === undefined, 2_000);
    await items.delete('a');
    assert.equal(await gone, undefined);
    await assert.rejects(cache.waitFor('a', (v) => v !== undefined, 30), (e) => isHfError(e, 'HF_ERR_TIMEOUT') && /\/items\/a/.test(e.message));
    const bad = cache.waitFor('b', (v) => {
      if (v !== undefined) throw new Error('predicate failed');
      return false;
    }, 2_000);
    await items.create('b', item('b'));
    await assert.rejects(bad, /predicate failed/);
    await inner.close();
  });

  test('a watch from a compacted revision makes the cache list again and catch up', async () => {
    const { inner, store, items, cache, resyncs } = setup();
    await items.create('a', item('a'));
    // Between the first list and its watch, others write and the history is compacted past
    // the list's revision: the watch from revision + 1 cannot start.
    store.afterList = async (res) => {
      await inner.put('/items/b', item('b'));
      await inner.delete('/items/a');
      await inner.compact(res.revision + 2);
    };
    await cache.start();
    await cache.waitFor('b', (v) => v !== undefined, 2_000);
    assert.equal(await cache.get('a'), undefined);
    assert.equal(resyncs.length, 1);
    assert.equal(resyncs[0]!.kind, 'compacted');
    assert.equal(store.lists, 2);
    // And it follows changes again after the relist.
    await inner.put('/items/c', item('c'));
    await cache.waitFor('c', (v) => v !== undefined, 2_000);
    assert.deepEqual((await cache.list()).map((v) => v.value.name), ['b', 'c']);
    await inner.close();
  });

  test('a corrupt row leaves the cache as it leaves list(); a lease expiry removes the record', async () => {
    const clock = { now: 1_000_000 };
    const { inner, items, cache } = setup({ clock: () => clock.now });
    await cache.start();
    const lease = await inner.grant(5);
    await cache.create('l', item('l'), { lease });
    await cache.create('x', item('x'));
    await inner.put('/items/x', { broken: true });
    await cache.waitFor('x', (v) => v === undefined, 2_000);
    clock.now += 5_000;
    await inner.sweep();
    await cache.waitFor('l', (v) => v === undefined, 2_000);
    assert.deepEqual(await cache.list(), []);
    assert.deepEqual(await items.list(), []);
    await inner.close();
  });

  test('closing the store fails pending waits and later reads', async () => {
    const { inner, cache, resyncs } = setup();
    await cache.start();
    const pending = cache.waitFor('a', (v) => v !== undefined, 5_000);
    await inner.close();
    await assert.rejects(pending, /closed/);
    await assert.rejects(cache.list(), /closed/);
    assert.equal(resyncs[0]?.kind, 'closed');
  });

  test('page: id order, after/limit/next, filter, JSON text that follows changes, order kept through inserts and deletes', async () => {
    const { inner, items, cache } = setup();
    for (const n of ['d', 'a', 'c', 'b', 'e']) await items.create(n, item(n, n === 'c' || n === 'e' ? 'running' : 'stopped'));
    await cache.start();
    const names = (p: { entries: { id: string }[] }) => p.entries.map((e) => e.id);
    assert.deepEqual(names(await cache.page()), ['a', 'b', 'c', 'd', 'e']);
    assert.equal((await cache.page()).next, undefined);
    const p1 = await cache.page({ limit: 2 });
    assert.deepEqual(names(p1), ['a', 'b']);
    assert.equal(p1.next, 'b');
    const p2 = await cache.page({ limit: 2, after: p1.next! });
    assert.deepEqual(names(p2), ['c', 'd']);
    const p3 = await cache.page({ limit: 2, after: p2.next! });
    assert.deepEqual(names(p3), ['e']);
    assert.equal(p3.next, undefined);
    // `after` need not be an id that exists.
    assert.deepEqual(names(await cache.page({ after: 'bb' })), ['c', 'd', 'e']);
    // A filter counts after filtering; no `next` when nothing it accepts follows.
    const running = (v: Readonly<Item>) => v.state === 'running';
    const r1 = await cache.page({ filter: running, limit: 1 });
    assert.deepEqual(names(r1), ['c']);
    assert.equal(r1.next, 'c');
    const r2 = await cache.page({ filter: running, limit: 1, after: 'c' });
    assert.deepEqual(names(r2), ['e']);
    assert.equal(r2.next, undefined);
    // The JSON text is the record's, and a change of the record changes it.
    const a = (await cache.page({ limit: 1 })).entries[0]!;
    assert.deepEqual(JSON.parse(a.json.toString()), item('a'));
    await inner.put('/items/a', item('a', 'paused'));
    await cache.waitFor('a', (v) => v?.state === 'paused', 2_000);
    assert.deepEqual(JSON.parse((await cache.page({ limit: 1 })).entries[0]!.json.toString()), item('a', 'paused'));
    // New and deleted ids change the order the pages follow.
    await cache.create('bb', item('bb'));
    await cache.delete('d');
    assert.deepEqual(names(await cache.page()), ['a', 'b', 'bb', 'c', 'e']);
    await inner.close();
  });
});
