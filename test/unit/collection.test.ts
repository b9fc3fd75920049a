import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { z } from 'zod';
import { HfError, isHfError } from '../../src/core/errors.js';
import { Collection, type CollectionEvent } from '../../src/state/collection.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import type { Compare, StateStore, TxnOp, TxnResult, WatchFailure } from '../../src/state/store.js';

const itemSchema = z.object({
  name: z.string(),
  count: z.number().int().nonnegative(),
  tags: z.array(z.string()).default([]),
});
type Item = z.infer<typeof itemSchema>;

const item = (name: string, count = 0): Item => ({ name, count, tags: [] });
const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

function setup(opts: { onCorrupt?: (key: string, err: HfError) => void } = {}): { store: SqliteStateStore; items: Collection<Item> } {
  const store = SqliteStateStore.open(':memory:');
  return { store, items: new Collection<Item>(store, '/items/', itemSchema, opts) };
}

/** A store whose txn() lets a test interfere between an update's read and its write. */
class InterferingStore implements StateStore {
  txnCalls = 0;
  constructor(
    private readonly inner: StateStore,
    private readonly beforeTxn: (call: number) => Promise<void>,
  ) {}
  get: StateStore['get'] = (k) => this.inner.get(k);
  list: StateStore['list'] = (p) => this.inner.list(p);
  put: StateStore['put'] = (k, v, o) => this.inner.put(k, v, o);
  delete = (k: string): Promise<boolean> => this.inner.delete(k);
  async txn(compares: Compare[], ops: TxnOp[]): Promise<TxnResult> {
    await this.beforeTxn(++this.txnCalls);
    return this.inner.txn(compares, ops);
  }
  revision = (): Promise<number> => this.inner.revision();
  watch: StateStore['watch'] = (p, cb, o) => this.inner.watch(p, cb, o);
  grant: StateStore['grant'] = (ttl) => this.inner.grant(ttl);
  keepAlive: StateStore['keepAlive'] = (id) => this.inner.keepAlive(id);
  revoke: StateStore['revoke'] = (id) => this.inner.revoke(id);
  timeToLive: StateStore['timeToLive'] = (id) => this.inner.timeToLive(id);
  close = (): Promise<void> => this.inner.close();
}

describe('Collection: basics', () => {
  test('create / get / getOrThrow / list / delete', async () => {
    const { store, items } = setup();
    assert.equal(await items.get('a'), undefined);
    const a = await items.create('a', item('a', 1));
    assert.deepEqual(a, { value: item('a', 1), revision: 1 });
    await items.create('b', item('b', 2));
    assert.deepEqual(await items.get('a'), { value: item('a', 1), revision: 1 });
    assert.deepEqual((await items.getOrThrow('b', () => new HfError('HF_ERR_NOT_FOUND', 'x'))).value, item('b', 2));
    await assert.rejects(
      items.getOrThrow('zz', () => new HfError('HF_ERR_INSTANCE_NOT_FOUND', 'instance "zz" not found')),
      (e) => isHfError(e, 'HF_ERR_INSTANCE_NOT_FOUND'),
    );
    assert.deepEqual(
      (await items.list()).map((v) => [v.value.name, v.revision]),
      [
        ['a', 1],
        ['b', 2],
      ],
    );
    assert.equal(await items.delete('a'), true);
    assert.equal(await items.delete('a'), false);
    assert.deepEqual((await items.list()).map((v) => v.value.name), ['b']);
    await store.close();
  });

  test('create fails with HF_ERR_ALREADY_EXISTS and leaves the record alone', async () => {
    const { store, items } = setup();
    await items.create('a', item('a', 1));
    await assert.rejects(items.create('a', item('a', 99)), (e) => isHfError(e, 'HF_ERR_ALREADY_EXISTS') && /\/items\/a/.test(e.message));
    assert.equal((await items.get('a'))?.value.count, 1);
    assert.equal(await store.revision(), 1);
    await store.close();
  });

  test('list stays inside the prefix and ignores nested namespaces', async () => {
    const { store, items } = setup();
    await items.create('a', item('a'));
    await store.put('/itemsx/b', item('b')); // neighbour prefix
    await store.put('/items', item('c')); // the prefix without its slash
    await store.put('/items/a/sub/1', { other: 'shape' }); // someone else's nested namespace
    assert.deepEqual((await items.list()).map((v) => v.value.name), ['a']);
    await store.close();
  });

  test('invalid ids and prefixes are refused', async () => {
    const { store, items } = setup();
    await assert.rejects(items.get(''), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await assert.rejects(items.create('a/b', item('x')), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    assert.throws(() => new Collection<Item>(store, '/items', itemSchema), (e) => isHfError(e, 'HF_ERR_INTERNAL'));
    assert.throws(() => new Collection<Item>(store, 'items/', itemSchema), (e) => isHfError(e, 'HF_ERR_INTERNAL'));
    await store.close();
  });

  test('values are checked with the schema before they are written', async () => {
    const { store, items } = setup();
    await assert.rejects(items.create('bad', { name: 'bad', count: -1, tags: [] }), (e) => isHfError(e, 'HF_ERR_VALIDATION') && /\/items\/bad/.test(e.message));
    assert.equal(await store.get('/items/bad'), undefined);
    // The parsed output is what gets stored (defaults applied).
    const created = await items.create('d', { name: 'd', count: 0 } as Item);
    assert.deepEqual(created.value.tags, []);
    assert.deepEqual((await store.get('/items/d'))?.value, { name: 'd', count: 0, tags: [] });
    await store.close();
  });
});

describe('Collection: conditional writes', () => {
  test('update applies fn and bumps the revision', async () => {
    const { store, items } = setup();
    await items.create('a', item('a', 1));
    await store.put('/other', 1);
    const v = await items.update('a', (cur) => ({ ...cur, count: cur.count + 1 }));
    assert.deepEqual(v, { value: item('a', 2), revision: 3 });
    assert.deepEqual(await items.get('a'), v);
    await store.close();
  });

  test('update retries when a conflicting write lands between read and write (inside fn)', async () => {
    const { store, items } = setup();
    await items.create('a', item('a', 1));
    let calls = 0;
    let interference: Promise<number> | undefined;
    const v = await items.update('a', (cur) => {
      calls++;
      // First attempt: another writer changes the record after we read it. (SqliteStateStore
      // applies a write synchronously when called, so it lands before our conditional write.)
      if (calls === 1) interference = store.put('/items/a', item('a', 100));
      return { ...cur, count: cur.count + 1 };
    });
    await interference;
    assert.equal(calls, 2);
    assert.equal(v.value.count, 101, 'the retry saw the other write');
    assert.equal((await items.get('a'))?.value.count, 101);
    await store.close();
  });

  test('update retries when another writer gets in before the conditional write', async () => {
    const inner = SqliteStateStore.open(':memory:');
    const store = new InterferingStore(inner, async (call) => {
      if (call === 2) await inner.put('/items/a', item('a', 50)); // call 1 is the create
    });
    const items = new Collection<Item>(store, '/items/', itemSchema);
    await items.create('a', item('a', 1));
    const seen: number[] = [];
    const v = await items.update('a', (cur) => {
      seen.push(cur.count);
      return { ...cur, count: cur.count + 1 };
    });
    assert.deepEqual(seen, [1, 50]);
    assert.equal(v.value.count, 51);
    await inner.close();
  });

  test('concurrent updates of one record all land (none lost)', async () => {
    const { store, items } = setup();
    await items.create('n', item('n', 0));
    let fnCalls = 0;
    await Promise.all(
      Array.from({ length: 10 }, () =>
        items.update(
          'n',
          (cur) => {
            fnCalls++;
            return { ...cur, count: cur.count + 1 };
          },
          { retries: 20 },
        ),
      ),
    );
    assert.equal((await items.get('n'))?.value.count, 10);
    assert.ok(fnCalls > 10, `conflicts happened and were retried (${fnCalls} fn calls)`);
    await store.close();
  });

  test('update gives up with HF_ERR_CONFLICT after the retries', async () => {
    const inner = SqliteStateStore.open(':memory:');
    let n = 0;
    const store = new InterferingStore(inner, async () => {
      await inner.put('/items/a', item('a', ++n)); // always interferes
    });
    await new Collection<Item>(inner, '/items/', itemSchema).create('a', item('a', 0));
    const contended = new Collection<Item>(store, '/items/', itemSchema);
    let calls = 0;
    await assert.rejects(
      contended.update('a', (cur) => (calls++, cur), { retries: 3 }),
      (e) => isHfError(e, 'HF_ERR_CONFLICT') && e.details?.attempts === 4 && /\/items\/a/.test(e.message),
    );
    assert.equal(calls, 4);
    await inner.close();
  });

  test('update throws what fn throws and writes nothing; missing record: not found', async () => {
    const { store, items } = setup();
    await items.create('a', item('a', 1));
    const boom = new HfError('HF_ERR_INVALID_STATE', 'nope');
    await assert.rejects(
      items.update('a', () => {
        throw boom;
      }),
      (e) => e === boom,
    );
    await assert.rejects(
      items.update('a', () => ({ name: 'a', count: -5, tags: [] })),
      (e) => isHfError(e, 'HF_ERR_VALIDATION'),
    );
    assert.deepEqual(await items.get('a'), { value: item('a', 1), revision: 1 });
    await assert.rejects(items.update('zz', (c) => c), (e) => isHfError(e, 'HF_ERR_NOT_FOUND') && /\/items\/zz/.test(e.message));
    await assert.rejects(
      items.update('zz', (c) => c, { notFound: () => new HfError('HF_ERR_INSTANCE_NOT_FOUND', 'gone') }),
      (e) => isHfError(e, 'HF_ERR_INSTANCE_NOT_FOUND'),
    );
    await store.close();
  });

  test('replace with the expected revision; stale: HF_ERR_CONFLICT; gone: HF_ERR_NOT_FOUND; 0: create', async () => {
    const { store, items } = setup();
    const a = await items.create('a', item('a', 1));
    const b = await items.replace('a', item('a', 2), a.revision);
    assert.deepEqual(b, { value: item('a', 2), revision: 2 });
    await assert.rejects(
      items.replace('a', item('a', 3), a.revision),
      (e) => isHfError(e, 'HF_ERR_CONFLICT') && e.details?.revision === 2 && e.details?.expectedRevision === 1,
    );
    assert.equal((await items.get('a'))?.value.count, 2);
    await assert.rejects(items.replace('zz', item('zz'), 5), (e) => isHfError(e, 'HF_ERR_NOT_FOUND'));
    assert.equal((await items.replace('new', item('new'), 0)).revision, 3);
    await assert.rejects(items.replace('new', item('new'), 0), (e) => isHfError(e, 'HF_ERR_CONFLICT'));
    await store.close();
  });

  test('delete with an expected revision', async () => {
    const { store, items } = setup();
    const a = await items.create('a', item('a', 1));
    await items.update('a', (c) => ({ ...c, count: 2 }));
    await assert.rejects(items.delete('a', a.revision), (e) => isHfError(e, 'HF_ERR_CONFLICT'));
    assert.ok(await items.get('a'));
    const cur = await items.getOrThrow('a', () => new HfError('HF_ERR_NOT_FOUND', 'x'));
    assert.equal(await items.delete('a', cur.revision), true);
    assert.equal(await items.delete('a', cur.revision), false);
    assert.equal(await items.get('a'), undefined);
    await store.close();
  });
});

describe('Collection: corrupt rows', () => {
  test('get throws HF_ERR_INTERNAL naming the key; list skips the row and reports it', async () => {
    const reported: Array<[string, HfError]> = [];
    const { store, items } = setup({ onCorrupt: (key, err) => reported.push([key, err]) });
    await items.create('good', item('good', 1));
    await store.put('/items/bad', { name: 'bad', count: 'many' });
    await store.put('/items/worse', 'not even an object');
    await assert.rejects(
      items.get('bad'),
      (e) => isHfError(e, 'HF_ERR_INTERNAL') && e.message.includes('/items/bad') && e.details?.key === '/items/bad',
    );
    await assert.rejects(items.update('bad', (c) => c), (e) => isHfError(e, 'HF_ERR_INTERNAL'));
    assert.deepEqual((await items.list()).map((v) => v.value.name), ['good']);
    assert.deepEqual(reported.map(([k]) => k), ['/items/bad', '/items/worse']);
    assert.ok(reported.every(([k, e]) => isHfError(e, 'HF_ERR_INTERNAL') && e.message.includes(k)));
    // A corrupt row can still be deleted, and replaced by whoever knows its revision.
    assert.equal(await items.delete('worse'), true);
    const raw = await store.get('/items/bad');
    await items.replace('bad', item('bad', 3), raw!.modRevision);
    assert.equal((await items.get('bad'))?.value.count, 3);
    await store.close();
  });

  test('a throwing onCorrupt does not break list', async () => {
    const { store, items } = setup({
      onCorrupt: () => {
        throw new Error('reporter down');
      },
    });
    await items.create('good', item('good'));
    await store.put('/items/bad', 42);
    assert.deepEqual((await items.list()).map((v) => v.value.name), ['good']);
    await store.close();
  });
});

describe('Collection: watch', () => {
  test('typed events with ids; corrupt puts skipped and reported; deletes always delivered', async () => {
    const reported: string[] = [];
    const { store, items } = setup({ onCorrupt: (key) => reported.push(key) });
    const events: CollectionEvent<Item>[] = [];
    items.watch((ev) => events.push(ev));
    await items.create('a', item('a', 1));
    await store.put('/items/bad', { nope: true });
    await store.put('/itemsx/b', item('b'));
    await store.put('/items/a/nested', item('n'));
    await items.update('a', (c) => ({ ...c, count: 2 }));
    await items.delete('a');
    await store.delete('/items/bad');
    await settle();
    assert.deepEqual(
      events.map((e) => [e.type, e.id, e.value?.count, e.revision]),
      [
        ['put', 'a', 1, 1],
        ['put', 'a', 2, 5],
        ['delete', 'a', 2, 6],
        ['delete', 'bad', undefined, 7],
      ],
    );
    assert.deepEqual(reported, ['/items/bad', '/items/bad']);
    await store.close();
  });

  test('watch from a revision replays the collection history', async () => {
    const { store, items } = setup();
    await items.create('a', item('a', 1));
    const mark = await store.revision();
    await items.create('b', item('b', 1));
    await items.update('a', (c) => ({ ...c, count: 9 }));
    const events: CollectionEvent<Item>[] = [];
    const w = items.watch((ev) => events.push(ev), { fromRevision: mark + 1 });
    await settle();
    w.cancel();
    assert.deepEqual(events.map((e) => `${e.type} ${e.id}=${e.value?.count}@${e.revision}`), ['put b=1@2', 'put a=9@3']);
    await store.close();
  });
});

describe('Collection: store contract pieces', () => {
  test('listAt gives ids and the revision read at; list() keeps its old shape', async () => {
    const { store, items } = setup();
    await items.create('b', item('b'));
    await items.create('a', item('a'));
    await store.put('/elsewhere', 1);
    const at = await items.listAt();
    assert.equal(at.revision, 3);
    assert.deepEqual(at.items.map((v) => [v.id, v.revision]), [['a', 2], ['b', 1]]);
    assert.deepEqual(await items.list(), [{ value: item('a'), revision: 2 }, { value: item('b'), revision: 1 }]);
    await store.close();
  });

  test('update keeps a record on its lease; remove tells the revision of the delete', async () => {
    const { store, items } = setup();
    const lease = await store.grant(60);
    await items.create('a', item('a'), { lease });
    await items.update('a', (c) => ({ ...c, count: 1 }));
    assert.equal((await store.get('/items/a'))?.lease, lease);
    await store.revoke(lease);
    assert.equal(await items.get('a'), undefined);
    await items.create('b', item('b'));
    const before = await store.revision();
    assert.equal(await items.remove('b'), before + 1);
    assert.equal(await items.remove('b'), undefined);
    await store.close();
  });

  test('a watch from a compacted revision reports it to onError', async () => {
    const { store, items } = setup();
    for (let i = 0; i < 4; i++) await items.create(`i${i}`, item(`i${i}`));
    await store.compact(3);
    const failure = await new Promise<WatchFailure>((resolve) => {
      items.watch(() => assert.fail('no event expected'), { fromRevision: 1, onError: resolve });
    });
    assert.ok(failure.kind === 'compacted' && failure.compactRevision === 3);
    await store.close();
  });
});
