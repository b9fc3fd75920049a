import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import { SqliteStateStore, prefixUpperBound, type SqliteStateStoreOptions } from '../../src/state/sqlite-store.js';
import type { WatchEvent } from '../../src/state/store.js';

function mem(opts: SqliteStateStoreOptions = {}): SqliteStateStore {
  return SqliteStateStore.open(':memory:', opts);
}

function tmp(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'hf-sqlite-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Lets queued microtasks and immediates run (watch delivery is asynchronous). */
const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

function collect<T = unknown>(): { events: WatchEvent<T>[]; cb: (ev: WatchEvent<T>) => void; summary: () => string[] } {
  const events: WatchEvent<T>[] = [];
  return {
    events,
    cb: (ev) => events.push(ev),
    summary: () => events.map((e) => `${e.type} ${e.key}@${e.modRevision}`),
  };
}

describe('SqliteStateStore: basic operations', () => {
  test('get / put / delete', async () => {
    const s = mem();
    assert.equal(await s.get('/a/x'), undefined);
    assert.equal(await s.revision(), 0);
    const r1 = await s.put('/a/x', { n: 1, tags: ['x'] });
    assert.equal(r1, 1);
    const e = await s.get<{ n: number; tags: string[] }>('/a/x');
    assert.deepEqual(e, { key: '/a/x', value: { n: 1, tags: ['x'] }, createRevision: 1, modRevision: 1, version: 1 });
    assert.equal(await s.delete('/a/x'), true);
    assert.equal(await s.get('/a/x'), undefined);
    assert.equal(await s.revision(), 2);
    // Deleting a missing key changes nothing, not even the revision (like etcd).
    assert.equal(await s.delete('/a/x'), false);
    assert.equal(await s.revision(), 2);
    await s.close();
  });

  test('values round-trip as JSON (null, strings, numbers, nested) and reads are fresh copies', async () => {
    const s = mem();
    const vals: unknown[] = [null, 'str', 0, -1.5, true, [], {}, { a: { b: [1, { c: 'd' }] } }];
    for (const [i, v] of vals.entries()) await s.put(`/v/${i}`, v);
    for (const [i, v] of vals.entries()) assert.deepEqual((await s.get(`/v/${i}`))?.value, v);
    const a = await s.get<{ a: { b: unknown[] } }>('/v/7');
    a!.value.a.b.push('mutated');
    assert.deepEqual((await s.get('/v/7'))?.value, { a: { b: [1, { c: 'd' }] } });
    // An own "__proto__" key stays data (also when copied out of the cache), never a prototype.
    await s.put('/v/proto', JSON.parse('{"__proto__": {"polluted": true}, "ok": 1}'));
    for (let i = 0; i < 2; i++) {
      const v = (await s.get<Record<string, unknown>>('/v/proto'))!.value;
      assert.equal(Object.getPrototypeOf(v), Object.prototype);
      assert.deepEqual(Object.keys(v), ['__proto__', 'ok']);
      assert.equal((v as { polluted?: boolean }).polluted, undefined);
    }
    await s.close();
  });

  test('rejects values that are not JSON and invalid keys', async () => {
    const s = mem();
    await assert.rejects(s.put('/k', undefined), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await assert.rejects(s.put('/k', () => 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await assert.rejects(s.put('/k', 10n), (e) => isHfError(e, 'HF_ERR_VALIDATION') && /\/k/.test(e.message));
    const circular: Record<string, unknown> = {};
    circular.self = circular;
    await assert.rejects(s.put('/k', circular), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await assert.rejects(s.put('', 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await assert.rejects(s.put('/bad\ud800', 1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    assert.equal(await s.revision(), 0);
    await s.close();
  });

  test('revisions increase; createRevision / modRevision / version semantics', async () => {
    const s = mem();
    const r1 = await s.put('/k/a', 1);
    const r2 = await s.put('/k/b', 1);
    const r3 = await s.put('/k/a', 2);
    const r4 = await s.put('/k/a', 2); // same value: still a change
    assert.deepEqual([r1, r2, r3, r4], [1, 2, 3, 4]);
    assert.deepEqual(await s.get('/k/a'), { key: '/k/a', value: 2, createRevision: 1, modRevision: 4, version: 3 });
    assert.deepEqual(await s.get('/k/b'), { key: '/k/b', value: 1, createRevision: 2, modRevision: 2, version: 1 });
    // Delete and re-create: a new life, version starts again at 1.
    await s.delete('/k/a');
    const r6 = await s.put('/k/a', 'again');
    assert.equal(r6, 6);
    assert.deepEqual(await s.get('/k/a'), { key: '/k/a', value: 'again', createRevision: 6, modRevision: 6, version: 1 });
    assert.equal(await s.revision(), 6);
    await s.close();
  });

  test('a closed store refuses calls with an HfError', async () => {
    const s = mem();
    await s.close();
    await s.close(); // idempotent
    await assert.rejects(s.get('/x'), (e) => isHfError(e, 'HF_ERR_INTERNAL') && /closed/.test(e.message));
    await assert.rejects(s.put('/x', 1), (e) => isHfError(e, 'HF_ERR_INTERNAL'));
    assert.throws(() => s.watch('/', () => undefined), (e) => isHfError(e, 'HF_ERR_INTERNAL'));
  });
});

describe('SqliteStateStore: list', () => {
  test('prefix boundaries: "/a/" matches neither "/a" nor "/ab"; sorted by key', async () => {
    const s = mem();
    for (const k of ['/ab', '/a', '/a/', '/a/z', '/a/b/c', '/a/a', '/a0', '/b/x', '/a.', '/']) await s.put(k, k);
    assert.deepEqual((await s.list('/a/')).map((e) => e.key), ['/a/', '/a/a', '/a/b/c', '/a/z']);
    assert.deepEqual((await s.list('/a')).map((e) => e.key), ['/a', '/a.', '/a/', '/a/a', '/a/b/c', '/a/z', '/a0', '/ab']);
    assert.deepEqual((await s.list('/a/b/')).map((e) => e.key), ['/a/b/c']);
    assert.deepEqual((await s.list('/none/')).map((e) => e.key), []);
    assert.equal((await s.list('')).length, 10);
    assert.deepEqual((await s.list('/')).map((e) => e.key)[0], '/');
    await s.close();
  });

  test('LIKE wildcards in the prefix are literal', async () => {
    const s = mem();
    for (const k of ['/p%/1', '/px/1', '/p_/1', '/py/1', '/p\\/1']) await s.put(k, 1);
    assert.deepEqual((await s.list('/p%/')).map((e) => e.key), ['/p%/1']);
    assert.deepEqual((await s.list('/p_/')).map((e) => e.key), ['/p_/1']);
    assert.deepEqual((await s.list('/p\\/')).map((e) => e.key), ['/p\\/1']);
    await s.close();
  });

  test('non-ASCII keys, including characters above U+FFFF, stay inside their prefix', async () => {
    const s = mem();
    const keys = ['/u/\u00e9', '/u/\uffff', '/u/\u{1F600}', '/u/\u{10FFFF}', '/u/\u{10FFFF}x', '/u0', '/v/\u{1F600}'];
    for (const k of keys) await s.put(k, k);
    assert.deepEqual((await s.list('/u/')).map((e) => e.key), ['/u/\u00e9', '/u/\uffff', '/u/\u{1F600}', '/u/\u{10FFFF}', '/u/\u{10FFFF}x']);
    assert.deepEqual((await s.list('/u/\u{10FFFF}')).map((e) => e.key), ['/u/\u{10FFFF}', '/u/\u{10FFFF}x']);
    await s.close();
  });

  test('cached reads: fresh copies, never stale, also with a second connection writing the file', async (t) => {
    const file = join(tmp(t), 'state.db');
    const a = SqliteStateStore.open(file, { cacheBytes: 1024 }); // room for about 40 of the 100 values
    const b = SqliteStateStore.open(file);
    for (let i = 0; i < 100; i++) await a.put(`/c/${String(i).padStart(3, '0')}`, { i, tags: ['t'] });
    const first = await a.list<{ i: number; tags: string[] }>('/c/'); // cold: range scan (> 32 misses)
    const second = await a.list<{ i: number; tags: string[] }>('/c/'); // partly cached
    assert.deepEqual(second, first);
    second[0]!.value.tags.push('mutated');
    second[99]!.value.tags.push('mutated');
    (await a.get<{ tags: string[] }>('/c/099'))!.value.tags.push('mutated');
    const third = await a.list<{ i: number; tags: string[] }>('/c/');
    assert.deepEqual(third, first, 'callers mutating results do not affect later reads');

    // Another connection changes a few rows (one by one: < 32 misses) and many rows (range scan).
    await b.put('/c/000', { i: -1, tags: [] });
    await b.delete('/c/050');
    await b.put('/c/100', { i: 100, tags: [] });
    let now = await a.list<{ i: number }>('/c/');
    assert.equal(now.length, 100);
    assert.deepEqual(now[0], { key: '/c/000', value: { i: -1, tags: [] }, createRevision: 1, modRevision: 101, version: 2 });
    assert.ok(!now.some((e) => e.key === '/c/050'));
    assert.equal(now[99]!.value.i, 100);
    await b.txn([], Array.from({ length: 60 }, (_, i) => ({ type: 'put' as const, key: `/c/${String(i).padStart(3, '0')}`, value: { i: i * 10 } })));
    now = await a.list<{ i: number }>('/c/');
    assert.deepEqual(now.slice(0, 3).map((e) => e.value.i), [0, 10, 20]);
    assert.equal((await a.get<{ i: number }>('/c/059'))?.value.i, 590);
    await a.close();
    await b.close();
  });

  test('prefixUpperBound increments the last code point', () => {
    assert.equal(prefixUpperBound('/a/'), '/a0');
    assert.equal(prefixUpperBound(''), undefined);
    assert.equal(prefixUpperBound('/\ud7ff'), '/\ue000');
    assert.equal(prefixUpperBound('/\uffff'), '/\u{10000}');
    assert.equal(prefixUpperBound('/x\u{10FFFF}'), '/y');
    assert.equal(prefixUpperBound('\u{10FFFF}'), undefined);
  });
});

describe('SqliteStateStore: txn', () => {
  test('all compares hold: every op applied at one new revision', async () => {
    const s = mem();
    await s.put('/t/a', 'a1'); // rev 1
    await s.put('/t/b', 'b1'); // rev 2
    const res = await s.txn(
      [
        { key: '/t/a', modRevision: 1 },
        { key: '/t/new', modRevision: 0 },
      ],
      [
        { type: 'put', key: '/t/a', value: 'a2' },
        { type: 'put', key: '/t/new', value: 'n1' },
        { type: 'delete', key: '/t/b' },
      ],
    );
    assert.deepEqual(res, { succeeded: true, revision: 3 });
    assert.deepEqual(await s.get('/t/a'), { key: '/t/a', value: 'a2', createRevision: 1, modRevision: 3, version: 2 });
    assert.deepEqual(await s.get('/t/new'), { key: '/t/new', value: 'n1', createRevision: 3, modRevision: 3, version: 1 });
    assert.equal(await s.get('/t/b'), undefined);
    await s.close();
  });

  test('a failing compare applies nothing and leaves the revision', async () => {
    const s = mem();
    await s.put('/t/a', 'a1');
    await s.put('/t/b', 'b1');
    const res = await s.txn(
      [
        { key: '/t/a', modRevision: 1 }, // holds
        { key: '/t/b', modRevision: 1 }, // does not: b is at 2
      ],
      [
        { type: 'put', key: '/t/a', value: 'changed' },
        { type: 'delete', key: '/t/b' },
        { type: 'put', key: '/t/c', value: 'c' },
      ],
    );
    assert.deepEqual(res, { succeeded: false, revision: 2 });
    assert.equal((await s.get('/t/a'))?.value, 'a1');
    assert.equal((await s.get('/t/b'))?.value, 'b1');
    assert.equal(await s.get('/t/c'), undefined);
    assert.equal(await s.revision(), 2);
    await s.close();
  });

  test('CAS create-if-absent with modRevision 0', async () => {
    const s = mem();
    const create = (v: string) => s.txn([{ key: '/lock', modRevision: 0 }], [{ type: 'put', key: '/lock', value: v }]);
    assert.deepEqual(await create('first'), { succeeded: true, revision: 1 });
    assert.deepEqual(await create('second'), { succeeded: false, revision: 1 });
    assert.equal((await s.get('/lock'))?.value, 'first');
    // A compare on a missing key with a non-zero revision fails.
    assert.equal((await s.txn([{ key: '/missing', modRevision: 1 }], [{ type: 'put', key: '/x', value: 1 }])).succeeded, false);
    await s.close();
  });

  test('a txn that changes nothing does not bump the revision; duplicate keys are rejected', async () => {
    const s = mem();
    await s.put('/a', 1);
    assert.deepEqual(await s.txn([{ key: '/a', modRevision: 1 }], []), { succeeded: true, revision: 1 });
    assert.deepEqual(await s.txn([], [{ type: 'delete', key: '/nope' }]), { succeeded: true, revision: 1 });
    await assert.rejects(
      s.txn([], [
        { type: 'put', key: '/a', value: 2 },
        { type: 'delete', key: '/a' },
      ]),
      (e) => isHfError(e, 'HF_ERR_VALIDATION'),
    );
    await assert.rejects(s.txn([], [{ type: 'put', key: '/b', value: undefined }]), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    assert.equal(await s.revision(), 1);
    await s.close();
  });
});

describe('SqliteStateStore: watch', () => {
  test('delivers changes under the prefix, in revision order, after the write returns', async () => {
    const s = mem();
    const w = collect();
    let inWrite = false;
    let calledDuringWrite = false;
    s.watch('/w/', (ev) => {
      if (inWrite) calledDuringWrite = true;
      w.cb(ev);
    });
    inWrite = true;
    const p = s.put('/w/a', 1);
    inWrite = false;
    await p;
    await s.put('/other/x', 1);
    await s.put('/wx', 1); // outside '/w/'
    await s.txn([], [
      { type: 'put', key: '/w/b', value: 2 },
      { type: 'put', key: '/w/c', value: 3 },
    ]);
    await s.delete('/w/a');
    await s.delete('/w/missing');
    await settle();
    assert.equal(calledDuringWrite, false);
    assert.deepEqual(w.summary(), ['put /w/a@1', 'put /w/b@4', 'put /w/c@4', 'delete /w/a@5']);
    assert.deepEqual(w.events[0]!.value, 1);
    assert.deepEqual(w.events[3]!.value, 1, 'a delete carries the last value');
    await s.close();
  });

  test('fromRevision replays history then continues live, without gap or duplicate', async () => {
    const s = mem();
    for (let i = 1; i <= 5; i++) await s.put(`/r/${i}`, i); // revs 1..5
    await s.delete('/r/1'); // rev 6
    const w = collect();
    s.watch('/r/', w.cb, 3);
    await s.put('/r/7', 7); // rev 7, written before the replay is delivered
    await settle();
    await s.put('/r/8', 8);
    await settle();
    assert.deepEqual(w.summary(), ['put /r/4@4', 'put /r/5@5', 'delete /r/1@6', 'put /r/7@7', 'put /r/8@8']);
    assert.equal(w.events[2]!.value, 1);

    // From revision 0: the whole (uncompacted) history.
    const all = collect();
    s.watch('/r/', all.cb, 0);
    await settle();
    assert.deepEqual(all.events.map((e) => e.modRevision), [1, 2, 3, 4, 5, 6, 7, 8]);

    // From a future revision: only later changes.
    const fut = collect();
    s.watch('/r/', fut.cb, 9);
    await s.put('/r/9', 9);
    await s.put('/r/10', 10);
    await settle();
    assert.deepEqual(fut.summary(), ['put /r/10@10']);
    await s.close();
  });

  test('cancel stops delivery, including already-queued events', async () => {
    const s = mem();
    const w = collect();
    const h = s.watch('/c/', w.cb);
    const p = s.put('/c/1', 1); // committed and queued for delivery
    h.cancel();
    await p;
    await s.put('/c/2', 2);
    await settle();
    assert.deepEqual(w.events, []);
    await s.close();
  });

  test('watching from a compacted revision throws HF_ERR_CONFLICT "revision compacted"', async () => {
    const s = mem({ historyLimit: 5 });
    for (let i = 1; i <= 20; i++) await s.put(`/h/${i % 3}`, i);
    assert.equal(await s.compactRevision(), 15);
    assert.throws(
      () => s.watch('/h/', () => undefined, 0),
      (e) => isHfError(e, 'HF_ERR_CONFLICT') && /revision compacted/.test(e.message),
    );
    assert.throws(() => s.watch('/h/', () => undefined, 14), (e) => isHfError(e, 'HF_ERR_CONFLICT'));
    const w = collect();
    s.watch('/h/', w.cb, 15);
    await settle();
    assert.deepEqual(w.events.map((e) => e.modRevision), [16, 17, 18, 19, 20]);
    assert.throws(() => s.watch('/h/', () => undefined, -1), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await s.close();
  });

  test('a throwing watcher neither breaks the store nor other watchers', async () => {
    const errors: string[] = [];
    const s = mem({ onWatcherError: (err, ev) => errors.push(`${ev.key}: ${(err as Error).message}`) });
    const good = collect();
    s.watch('/x/', () => {
      throw new Error('boom');
    });
    s.watch('/x/', async () => {
      throw new Error('async boom');
    });
    let seen = 0;
    s.watch('/x/', () => {
      seen++;
      if (seen === 1) throw new Error('only the first');
    });
    s.watch('/x/', good.cb);
    await s.put('/x/1', 1);
    await s.put('/x/2', 2);
    await settle();
    assert.deepEqual(good.summary(), ['put /x/1@1', 'put /x/2@2']);
    assert.equal(seen, 2, 'a watcher keeps receiving after it threw');
    assert.deepEqual(errors.sort(), ['/x/1: async boom', '/x/1: boom', '/x/1: only the first', '/x/2: async boom', '/x/2: boom']);
    assert.equal((await s.get('/x/2'))?.value, 2);
    await s.close();
  });

  test('a watcher may write to the store: its own events arrive later, in order, not re-entrantly', async () => {
    const s = mem();
    const order: string[] = [];
    let depth = 0;
    s.watch('/q/', (ev) => {
      depth++;
      assert.equal(depth, 1);
      order.push(`${ev.key}@${ev.modRevision}`);
      if (ev.key === '/q/a') void s.put('/q/b', 'from watcher');
      depth--;
    });
    await s.put('/q/a', 1);
    await settle();
    await settle();
    assert.deepEqual(order, ['/q/a@1', '/q/b@2']);
    await s.close();
  });

  test('each watcher gets its own copy of the value', async () => {
    const s = mem();
    const seen: unknown[] = [];
    s.watch('/m/', (ev) => {
      (ev.value as { n: number }).n = 99;
    });
    s.watch('/m/', (ev) => seen.push(ev.value));
    await s.put('/m/1', { n: 1 });
    await settle();
    assert.deepEqual(seen, [{ n: 1 }]);
    await s.close();
  });
});

describe('SqliteStateStore: files', () => {
  test('durable across close and reopen, with revisions and history', async (t) => {
    const dir = tmp(t);
    const file = join(dir, 'state.db');
    const a = SqliteStateStore.open(file);
    assert.equal(a.path, file);
    await a.put('/d/1', { v: 1 });
    await a.put('/d/2', { v: 2 });
    await a.put('/d/1', { v: 3 });
    await a.delete('/d/2');
    await a.close();

    const b = SqliteStateStore.open(file);
    assert.equal(await b.revision(), 4);
    assert.deepEqual(await b.list('/d/'), [{ key: '/d/1', value: { v: 3 }, createRevision: 1, modRevision: 3, version: 2 }]);
    const w = collect();
    b.watch('/d/', w.cb, 1);
    await settle();
    assert.deepEqual(w.summary(), ['put /d/2@2', 'put /d/1@3', 'delete /d/2@4']);
    assert.equal(await b.put('/d/3', 3), 5);
    assert.equal(b.path, file);
    await b.close();
  });

  test('committed writes survive SIGKILL of the writing process', async (t) => {
    const dir = tmp(t);
    const file = join(dir, 'state.db');
    const mod = new URL('../../src/state/sqlite-store.js', import.meta.url).href;
    const script = `
      const { SqliteStateStore } = await import(${JSON.stringify(mod)});
      const s = SqliteStateStore.open(${JSON.stringify(file)});
      for (let i = 1; i <= 50; i++) await s.put('/k/' + i, { i });
      await s.txn([{ key: '/k/1', modRevision: 1 }], [{ type: 'delete', key: '/k/1' }]);
      process.kill(process.pid, 'SIGKILL');
    `;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    assert.equal(r.signal, 'SIGKILL', r.stderr);
    const s = SqliteStateStore.open(file);
    assert.equal(await s.revision(), 51);
    const keys = (await s.list('/k/')).map((e) => e.key);
    assert.equal(keys.length, 49);
    assert.ok(!keys.includes('/k/1'));
    assert.deepEqual((await s.get('/k/50'))?.value, { i: 50 });
    await s.close();
  });

  test('HF_ERR_DATA_DIR naming the path: missing directory, parent is a file, not a database', async (t) => {
    const dir = tmp(t);
    const missing = join(dir, 'nope', 'state.db');
    assert.throws(
      () => SqliteStateStore.open(missing),
      (e) => isHfError(e, 'HF_ERR_DATA_DIR') && e.message.includes(join(dir, 'nope')) && /does not exist/.test(e.message),
    );
    const plain = join(dir, 'plain');
    writeFileSync(plain, 'x');
    assert.throws(
      () => SqliteStateStore.open(join(plain, 'state.db')),
      (e) => isHfError(e, 'HF_ERR_DATA_DIR') && e.message.includes(plain) && /not a directory/.test(e.message),
    );
    const garbage = join(dir, 'garbage.db');
    writeFileSync(garbage, 'this is not an sqlite database, not at all, definitely not'.repeat(100));
    assert.throws(() => SqliteStateStore.open(garbage), (e) => isHfError(e, 'HF_ERR_DATA_DIR') && e.message.includes(garbage));
    assert.throws(() => SqliteStateStore.open(dir), (e) => isHfError(e, 'HF_ERR_DATA_DIR') && /not a regular file/.test(e.message));
  });

  test('HF_ERR_DATA_DIR for a directory that is not writable', async (t) => {
    const dir = tmp(t);
    chmodSync(dir, 0o755);
    const ro = join(dir, 'ro');
    mkdirSync(ro, { mode: 0o555 });
    try {
      if (process.getuid?.() !== 0) {
        assert.throws(
          () => SqliteStateStore.open(join(ro, 'state.db')),
          (e) => isHfError(e, 'HF_ERR_DATA_DIR') && e.message.includes(ro) && /not writable/.test(e.message),
        );
        return;
      }
      // Root ignores directory permissions: check it as an unprivileged user in a child process.
      const mod = new URL('../../src/state/sqlite-store.js', import.meta.url).href;
      const script = `import(${JSON.stringify(mod)}).then((m) => { try { m.SqliteStateStore.open(${JSON.stringify(join(ro, 'state.db'))}); console.log('OPENED'); } catch (e) { console.log(e.code + ' ' + e.message); } }, (e) => console.log('NOIMPORT ' + e.message))`;
      const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
      if (r.stdout.startsWith('NOIMPORT')) {
        // The checkout itself is not readable by an unprivileged user (e.g. under /root).
        t.skip(`cannot run as an unprivileged user here: ${r.stdout.trim()}`);
        return;
      }
      assert.match(r.stdout, /^HF_ERR_DATA_DIR .*not writable/m);
      assert.ok(r.stdout.includes(ro), r.stdout);
    } finally {
      chmodSync(ro, 0o755);
    }
  });

  test('timing: list of 1,000 entries of ~2 KB JSON (reported, not asserted)', async (t) => {
    const dir = tmp(t);
    const s = SqliteStateStore.open(join(dir, 'state.db'));
    const big = (i: number) => ({
      name: `instance-${i}`,
      type: 'vm',
      state: 'running',
      config: { vcpus: 2, memoryMiB: 2048, devices: Array.from({ length: 12 }, (_, d) => ({ name: `disk${d}`, type: 'disk', pool: 'default', path: `/var/lib/hyperfold/disks/instance-${i}-${d}.qcow2`, sizeBytes: 10_737_418_240 })) },
      description: 'x'.repeat(200),
    });
    const sample = JSON.stringify(big(0)).length;
    const ops = Array.from({ length: 1000 }, (_, i) => ({ type: 'put' as const, key: `/instances/i${String(i).padStart(4, '0')}`, value: big(i) }));
    let t0 = performance.now();
    await s.txn([], ops);
    const insertMs = performance.now() - t0;
    t0 = performance.now();
    for (let i = 0; i < 200; i++) await s.put(`/instances/i${String(i).padStart(4, '0')}`, big(i));
    const putMs = (performance.now() - t0) / 200;
    await s.close();

    // Cold: a freshly opened store has nothing cached, so every value is parsed.
    const cold = SqliteStateStore.open(join(dir, 'state.db'));
    t0 = performance.now();
    assert.equal((await cold.list('/instances/')).length, 1000);
    const coldMs = performance.now() - t0;
    const uncached = SqliteStateStore.open(join(dir, 'state.db'), { cacheBytes: 0 });
    const stats = async (store: SqliteStateStore, n: number): Promise<string> => {
      for (let i = 0; i < 3; i++) await store.list('/instances/'); // warm up
      // Wall time, and CPU time of this process (less disturbed by other load on the machine).
      const times: number[] = [];
      const cpu: number[] = [];
      for (let i = 0; i < n; i++) {
        const c1 = process.cpuUsage();
        const t1 = performance.now();
        const all = await store.list('/instances/');
        times.push(performance.now() - t1);
        const c = process.cpuUsage(c1);
        cpu.push((c.user + c.system) / 1000);
        assert.equal(all.length, 1000);
      }
      const q = (xs: number[], f: number) => [...xs].sort((a, b) => a - b)[Math.min(n - 1, Math.floor(f * n))]!.toFixed(2);
      return `wall median ${q(times, 0.5)} ms (min ${q(times, 0)}, p90 ${q(times, 0.9)}, max ${q(times, 1)}); cpu median ${q(cpu, 0.5)} ms`;
    };
    t.diagnostic(`value size ${sample} B JSON; insert 1000 in one txn ${insertMs.toFixed(1)} ms; single put ${putMs.toFixed(3)} ms`);
    t.diagnostic(`list 1000 cached (warm): ${await stats(cold, 50)}`);
    t.diagnostic(`list 1000 first after open (cold): ${coldMs.toFixed(2)} ms`);
    t.diagnostic(`list 1000 with cache disabled: ${await stats(uncached, 20)}`);
    await cold.close();
    await uncached.close();
  });
});
