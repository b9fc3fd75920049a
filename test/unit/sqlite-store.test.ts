import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import Database from 'better-sqlite3';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import { SqliteStateStore, prefixUpperBound, type SqliteStateStoreOptions } from '../../src/state/sqlite-store.js';
import type { WatchEvent } from '../../src/state/store.js';
import { recorder, storeContract } from '../helpers/store-contract.js';

function mem(opts: SqliteStateStoreOptions = {}): SqliteStateStore {
  return SqliteStateStore.open(':memory:', opts);
}

/** Each contract store runs on a clock of its own that the advance hook moves. */
const clocks = new WeakMap<SqliteStateStore, { now: number }>();

storeContract(
  'SqliteStateStore',
  async () => {
    const clock = { now: Date.UTC(2030, 0, 1) };
    const s = mem({ clock: () => clock.now, sweepIntervalMs: 0 });
    clocks.set(s, clock);
    return s;
  },
  {
    advance: async (s, ms) => {
      (clocks.get(s) as { now: number }).now += ms;
      await s.sweep();
    },
    compact: (s, revision) => s.compact(revision),
  },
);

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

describe('SqliteStateStore: values and list', () => {
  test('an own "__proto__" key stays data, also when copied out of the cache', async () => {
    const s = mem();
    await s.put('/v/proto', JSON.parse('{"__proto__": {"polluted": true}, "ok": 1}'));
    for (let i = 0; i < 2; i++) {
      const v = (await s.get<Record<string, unknown>>('/v/proto'))!.value;
      assert.equal(Object.getPrototypeOf(v), Object.prototype);
      assert.deepEqual(Object.keys(v), ['__proto__', 'ok']);
      assert.equal((v as { polluted?: boolean }).polluted, undefined);
    }
    await s.close();
  });

  test('cached reads: fresh copies, never stale, also with a second connection writing the file', async (t) => {
    const file = join(tmp(t), 'state.db');
    const a = SqliteStateStore.open(file, { cacheBytes: 1024 }); // room for about 40 of the 100 values
    const b = SqliteStateStore.open(file);
    for (let i = 0; i < 100; i++) await a.put(`/c/${String(i).padStart(3, '0')}`, { i, tags: ['t'] });
    const first = (await a.list<{ i: number; tags: string[] }>('/c/')).entries; // cold: range scan (> 32 misses)
    const second = (await a.list<{ i: number; tags: string[] }>('/c/')).entries; // partly cached
    assert.deepEqual(second, first);
    second[0]!.value.tags.push('mutated');
    second[99]!.value.tags.push('mutated');
    (await a.get<{ tags: string[] }>('/c/099'))!.value.tags.push('mutated');
    const third = (await a.list<{ i: number; tags: string[] }>('/c/')).entries;
    assert.deepEqual(third, first, 'callers mutating results do not affect later reads');

    // Another connection changes a few rows (one by one: < 32 misses) and many rows (range scan).
    await b.put('/c/000', { i: -1, tags: [] });
    await b.delete('/c/050');
    await b.put('/c/100', { i: 100, tags: [] });
    let now = (await a.list<{ i: number }>('/c/')).entries;
    assert.equal(now.length, 100);
    assert.deepEqual(now[0], { key: '/c/000', value: { i: -1, tags: [] }, createRevision: 1, modRevision: 101, version: 2 });
    assert.ok(!now.some((e) => e.key === '/c/050'));
    assert.equal(now[99]!.value.i, 100);
    await b.txn([], Array.from({ length: 60 }, (_, i) => ({ type: 'put' as const, key: `/c/${String(i).padStart(3, '0')}`, value: { i: i * 10 } })));
    now = (await a.list<{ i: number }>('/c/')).entries;
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

describe('SqliteStateStore: watch', () => {
  test('the change log keeps the last historyLimit revisions; older watches end as compacted', async () => {
    const s = mem({ historyLimit: 5 });
    assert.equal(await s.compactRevision(), 0);
    for (let i = 1; i <= 20; i++) await s.put(`/h/${i % 3}`, i);
    assert.equal(await s.compactRevision(), 16);
    for (const from of [0, 15]) {
      const w = recorder();
      s.watch('/h/', w.cb, { fromRevision: from, onError: w.onError });
      const f = await w.waitForFailure();
      assert.ok(f.kind === 'compacted' && f.compactRevision === 16 && /revision compacted/.test(f.error.message), JSON.stringify(f));
    }
    const w = recorder();
    s.watch('/h/', w.cb, { fromRevision: 16 });
    await w.waitForEvents(5);
    assert.deepEqual(w.events.map((e) => e.modRevision), [16, 17, 18, 19, 20]);
    assert.throws(() => s.watch('/h/', () => undefined, { fromRevision: -1 }), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await assert.rejects(s.compact(21), (e) => isHfError(e, 'HF_ERR_VALIDATION'));
    await s.compact(3); // below the compact revision: nothing changes
    assert.equal(await s.compactRevision(), 16);
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
});

describe('SqliteStateStore: leases', () => {
  test('the sweeper timer ends expired leases with nobody calling the store', async () => {
    const clock = { now: 1_000_000 };
    const s = mem({ clock: () => clock.now, sweepIntervalMs: 5 });
    const id = await s.grant(2);
    await s.put('/l/a', 1, { lease: id });
    const w = recorder();
    s.watch('/l/', w.cb);
    clock.now += 2_000;
    await w.waitForEvents(1);
    assert.deepEqual(w.summary(), ['delete /l/a@2']);
    assert.equal(await s.revision(), 2);
    await s.close();
  });

  test('a lease expired while the store was closed is ended on the next call after reopening', async (t) => {
    const file = join(tmp(t), 'state.db');
    const clock = { now: 1_000_000 };
    const a = SqliteStateStore.open(file, { clock: () => clock.now, sweepIntervalMs: 0 });
    const id = await a.grant(5);
    await a.put('/l/a', 1, { lease: id });
    await a.put('/l/b', 2);
    await a.close();
    clock.now += 5_000;
    const b = SqliteStateStore.open(file, { clock: () => clock.now, sweepIntervalMs: 0 });
    assert.deepEqual((await b.list('/l/')).entries.map((e) => e.key), ['/l/b']);
    assert.equal(await b.timeToLive(id), undefined);
    await b.close();
  });
});

describe('SqliteStateStore: schema', () => {
  test('a version 1 file is migrated: entries kept, leases usable, compact revision in etcd terms', async (t) => {
    const file = join(tmp(t), 'state.db');
    const db = new Database(file);
    db.exec(`
      CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL, compact_revision INTEGER NOT NULL);
      INSERT INTO meta VALUES (1, 12, 9);
      CREATE TABLE kv (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL CHECK (json_valid(value)), create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL);
      CREATE INDEX kv_meta ON kv (key, create_rev, mod_rev, version);
      CREATE TABLE changes (rev INTEGER NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL, type TEXT NOT NULL, value TEXT, PRIMARY KEY (rev, seq));
      INSERT INTO kv VALUES ('/m/a', '{"n":1}', 3, 12, 4);
      INSERT INTO changes VALUES (10, 0, '/m/b', 'put', '1'), (11, 0, '/m/b', 'delete', '1'), (12, 0, '/m/a', 'put', '{"n":1}');
      PRAGMA user_version = 1;
    `);
    db.close();
    const s = SqliteStateStore.open(file);
    assert.deepEqual(await s.get('/m/a'), { key: '/m/a', value: { n: 1 }, createRevision: 3, modRevision: 12, version: 4 });
    assert.equal(await s.compactRevision(), 10, 'version 1 stored the newest dropped revision (9)');
    const w = recorder();
    s.watch('/m/', w.cb, { fromRevision: 10 });
    await w.waitForEvents(3);
    assert.deepEqual(w.summary(), ['put /m/b@10', 'delete /m/b@11', 'put /m/a@12']);
    const id = await s.grant(60);
    await s.put('/m/a', { n: 2 }, { lease: id });
    assert.equal((await s.get('/m/a'))?.lease, id);
    await s.close();
  });
});

describe('SqliteStateStore: close', () => {
  test('a closed store refuses calls with HF_ERR_INTERNAL naming it', async () => {
    const s = mem();
    await s.close();
    await s.close(); // idempotent
    await assert.rejects(s.get('/x'), (e) => isHfError(e, 'HF_ERR_INTERNAL') && /closed/.test(e.message));
    await assert.rejects(s.grant(5), (e) => isHfError(e, 'HF_ERR_INTERNAL'));
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
    assert.deepEqual(await b.list('/d/'), { entries: [{ key: '/d/1', value: { v: 3 }, createRevision: 1, modRevision: 3, version: 2 }], revision: 4 });
    const w = collect();
    b.watch('/d/', w.cb, { fromRevision: 2 });
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
    const keys = (await s.list('/k/')).entries.map((e) => e.key);
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
    assert.equal((await cold.list('/instances/')).entries.length, 1000);
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
        assert.equal(all.entries.length, 1000);
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
