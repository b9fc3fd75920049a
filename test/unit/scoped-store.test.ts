import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { isHfError } from '../../src/core/errors.js';
import { ScopedStore } from '../../src/state/scoped-store.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { recorder, storeContract } from '../helpers/store-contract.js';

/** The inner store and its clock behind each contract store (the hooks drive them). */
const inners = new WeakMap<ScopedStore, { inner: SqliteStateStore; clock: { now: number } }>();

function scopedContract(name: string, prefixes: string[]): void {
  storeContract(
    name,
    async () => {
      const clock = { now: Date.UTC(2030, 0, 1) };
      const inner = SqliteStateStore.open(':memory:', { clock: () => clock.now, sweepIntervalMs: 0 });
      const s = new ScopedStore(inner, { scope: '/local/h1', prefixes });
      inners.set(s, { inner, clock });
      return s;
    },
    {
      advance: async (s, ms) => {
        const { inner, clock } = inners.get(s)!;
        clock.now += ms;
        await inner.sweep();
      },
      compact: (s, revision) => inners.get(s)!.inner.compact(revision),
    },
  );
}

// Every key the contract uses (/contract-<random>/...) is mapped into the host's area...
scopedContract('ScopedStore(SqliteStateStore), keys mapped', ['/contract-']);
// ...and none is: the view passes them through untouched.
scopedContract('ScopedStore(SqliteStateStore), keys passed through', ['/volumes/', '/images/']);

describe('ScopedStore: the mapping', () => {
  const make = () => {
    const inner = SqliteStateStore.open(':memory:');
    return { inner, s: new ScopedStore(inner, { scope: '/local/h1', prefixes: ['/storage-pools/', '/volumes/', '/images/'] }) };
  };

  test('the inner store holds mapped keys under the scope and others as they are', async () => {
    const { inner, s } = make();
    await s.put('/volumes/p/v', { size: 1 });
    await s.put('/instances/a', { name: 'a' });
    await s.txn([{ key: '/images/i', exists: false }], [{ type: 'put', key: '/images/i', value: 'img' }]);
    assert.deepEqual((await inner.list('')).entries.map((e) => e.key), ['/instances/a', '/local/h1/images/i', '/local/h1/volumes/p/v']);
    assert.equal((await s.get('/volumes/p/v'))?.key, '/volumes/p/v');
    assert.deepEqual((await s.get('/volumes/p/v'))?.value, { size: 1 });
    assert.deepEqual((await s.list('/volumes/')).entries.map((e) => e.key), ['/volumes/p/v']);
    assert.deepEqual((await s.list('/volumes/p/')).entries.map((e) => e.key), ['/volumes/p/v']);
    assert.deepEqual((await s.list('/instances/')).entries.map((e) => e.key), ['/instances/a']);
    // A compare on a mapped key looks at the mapped entry.
    const v = (await s.get('/volumes/p/v'))!;
    assert.equal((await s.txn([{ key: '/volumes/p/v', modRevision: v.modRevision }], [{ type: 'delete', key: '/volumes/p/v' }])).succeeded, true);
    assert.equal(await inner.get('/local/h1/volumes/p/v'), undefined);
    await s.close();
    assert.deepEqual((await inner.get('/instances/a'))?.value, { name: 'a' }, 'closing the view leaves the inner store open');
    await inner.close();
  });

  test('watches and lease keys come back with the caller\'s keys', async () => {
    const { inner, s } = make();
    const vols = recorder();
    const shared = recorder();
    s.watch('/volumes/', vols.cb, { onError: vols.onError });
    s.watch('/instances/', shared.cb, { onError: shared.onError });
    const lease = await s.grant(30);
    await s.put('/volumes/p/b', 1, { lease });
    await s.put('/instances/x', 1, { lease });
    await s.put('/volumes/p/a', 1, { lease });
    await inner.put('/local/h2/volumes/p/a', 'another host');
    await vols.waitForEvents(2);
    await shared.waitForEvents(1);
    assert.deepEqual(vols.summary().map((l) => l.split('@')[0]), ['put /volumes/p/b', 'put /volumes/p/a']);
    assert.deepEqual(shared.summary().map((l) => l.split('@')[0]), ['put /instances/x']);
    assert.deepEqual((await s.timeToLive(lease))?.keys, ['/instances/x', '/volumes/p/a', '/volumes/p/b']);
    await s.close();
    assert.equal((await vols.waitForFailure()).kind, 'closed');
    await inner.close();
  });

  test('a prefix spanning mapped and shared keys is refused; keys inside the scope are refused', async () => {
    const { inner, s } = make();
    for (const p of ['', '/', '/vol', '/storage']) {
      await assert.rejects(s.list(p), (e) => isHfError(e, 'HF_ERR_INTERNAL') && e.message.includes('spans'), p);
      assert.throws(() => s.watch(p, () => undefined), (e) => isHfError(e, 'HF_ERR_INTERNAL'), p);
    }
    await assert.rejects(s.put('/local/h1/volumes/p/v', 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    // Another host's area is an ordinary key range: readable as it is.
    await inner.put('/local/h2/volumes/p/v', 2);
    assert.deepEqual((await s.list('/local/h2/')).entries.map((e) => e.key), ['/local/h2/volumes/p/v']);
    assert.throws(() => new ScopedStore(inner, { scope: '/local/h1/', prefixes: ['/volumes/'] }), (e) => isHfError(e, 'HF_ERR_INTERNAL'));
    await inner.close();
  });

  test('two hosts\' views of one store keep their volumes apart', async () => {
    const inner = SqliteStateStore.open(':memory:');
    const h1 = new ScopedStore(inner, { scope: '/local/h1', prefixes: ['/volumes/'] });
    const h2 = new ScopedStore(inner, { scope: '/local/h2', prefixes: ['/volumes/'] });
    await h1.put('/volumes/p/v', 'one');
    await h2.put('/volumes/p/v', 'two');
    await h1.put('/instances/shared', 1);
    assert.equal((await h1.get('/volumes/p/v'))?.value, 'one');
    assert.equal((await h2.get('/volumes/p/v'))?.value, 'two');
    assert.equal((await h2.get('/instances/shared'))?.value, 1);
    await inner.close();
  });
});
