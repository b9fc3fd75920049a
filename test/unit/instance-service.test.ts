// The instance service and the REST API in-process (Fastify inject) over a fake driver and an
// in-memory SQLite store: state handling, operations, restart policy, reconcile, errors.
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EventBus } from '../../src/services/events.js';
import { OperationManager } from '../../src/services/operations.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import { HfError } from '../../src/core/errors.js';
import { FakeDriver } from '../helpers/fake-driver.js';
import { buildWorld, TEST_TOKEN, type TestWorld } from '../helpers/world.js';
import { silentLogger } from '../../src/util/log.js';
import { InstanceRecords } from '../../src/services/instances/records.js';
import { INTERRUPTED_START } from '../../src/services/instances/supervisor.js';
import { armFailpoints, failpoint, parseFailpoints } from '../../src/util/failpoint.js';

interface World extends TestWorld {
  driver: FakeDriver;
}

async function world(dir: string, store: SqliteStateStore, driver = new FakeDriver()): Promise<World> {
  return { ...(await buildWorld(dir, { store, drivers: [['vm', driver]] })), driver };
}

const call = (w: World, method: string, url: string, body?: unknown) => w.call(method, url, body);
const finish = (w: World, res: { json: Record<string, unknown> }) => w.finish(res);

describe('instance service over the API (fake driver)', () => {
  let dir: string;
  let kernel: string;
  let w: World;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not really a kernel');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    const sub = await mkdtemp(join(dir, 'w-'));
    w = await world(sub, SqliteStateStore.open(':memory:'));
  });

  const body = (name: string, extra: Record<string, unknown> = {}) => ({ name, boot: { kind: 'kernel', kernel }, ...extra });

  it('creates (201), then starts as an operation (202) that ends running', async () => {
    const c = await call(w, 'POST', '/api/v1/instances', body('a1'));
    assert.equal(c.status, 201);
    assert.equal((c.json.instance as Instance).state, 'stopped');
    const s = await call(w, 'POST', '/api/v1/instances/a1/start', {});
    assert.equal(s.status, 202);
    const op = await finish(w, s);
    assert.equal(op.status, 'success');
    assert.equal(op.type, 'instance.start');
    assert.deepEqual(op.target, { kind: 'instance', name: 'a1' });
    const got = await call(w, 'GET', '/api/v1/instances/a1');
    assert.equal((got.json.instance as Instance).state, 'running');
    assert.equal((got.json.instance as Instance).host, 'h1');
  });

  it('launch (start: true) answers 202 with the instance and the operation', async () => {
    const c = await call(w, 'POST', '/api/v1/instances', body('a2', { start: true }));
    assert.equal(c.status, 202);
    assert.equal((await finish(w, c)).status, 'success');
    assert.equal((await w.svc.get('a2')).state, 'running');
  });

  it('operation ?wait= returns the finished operation', async () => {
    const c = await call(w, 'POST', '/api/v1/instances', body('a3', { start: true }));
    const id = (c.json.operation as Operation).id;
    const r = await call(w, 'GET', `/api/v1/operations/${id}?wait=5`);
    assert.equal((r.json.operation as Operation).status, 'success');
    const list = await call(w, 'GET', '/api/v1/operations');
    assert.ok((list.json.operations as Operation[]).some((o) => o.id === id));
  });

  it('graceful stop powers the guest off; a guest that ignores it is forced after the timeout', async () => {
    await finish(w, await call(w, 'POST', '/api/v1/instances', body('g1', { start: true })));
    const op1 = await finish(w, await call(w, 'POST', '/api/v1/instances/g1/stop', {}));
    assert.equal(op1.status, 'success');
    assert.equal((await w.svc.get('g1')).state, 'stopped');
    assert.equal(op1.messages.length, 0);

    w.driver.powerOffOnShutdown = false;
    await finish(w, await call(w, 'POST', '/api/v1/instances/g1/start', {}));
    const op2 = await finish(w, await call(w, 'POST', '/api/v1/instances/g1/stop', { timeout: 0 }));
    assert.equal(op2.status, 'success');
    assert.match(op2.messages.map((m) => m.text).join(), /forcing/);
    assert.equal((await w.svc.get('g1')).state, 'stopped');
  });

  it('a failed start leaves the instance stopped with the reason, and the operation carries the code', async () => {
    await call(w, 'POST', '/api/v1/instances', body('f1'));
    w.driver.failStart = new HfError('HF_ERR_HYPERVISOR', 'QEMU exited during start: bad things');
    const op = await finish(w, await call(w, 'POST', '/api/v1/instances/f1/start', {}));
    assert.equal(op.status, 'failure');
    assert.equal(op.error?.code, 'HF_ERR_HYPERVISOR');
    const i = await w.svc.get('f1');
    assert.equal(i.state, 'stopped');
    assert.match(i.lastExit?.reason ?? '', /bad things/);
  });

  it('refuses to start beyond the overcommit limit', async () => {
    await finish(w, await call(w, 'POST', '/api/v1/instances', body('r1', { memory: '3G', start: true })));
    await call(w, 'POST', '/api/v1/instances', body('r2', { memory: '2G' }));
    const op = await finish(w, await call(w, 'POST', '/api/v1/instances/r2/start', {}));
    assert.equal(op.status, 'failure');
    assert.equal(op.error?.code, 'HF_ERR_INSUFFICIENT_RESOURCES');
    assert.equal((await w.svc.get('r2')).state, 'stopped');
  });

  it('a crash marks the instance crashed with an event; on-failure restarts it', async () => {
    const events: string[] = [];
    w.events.subscribe((e) => events.push(`${e.type}:${String(e.data.name ?? '')}:${String(e.data.state ?? '')}`));
    await finish(w, await call(w, 'POST', '/api/v1/instances', body('c1', { start: true })));
    w.driver.handles.get('c1')!.exit({ clean: false, reason: 'QEMU was killed by SIGKILL' });
    await waitFor(async () => (await w.svc.get('c1')).state === 'crashed');
    assert.ok(events.includes('instance.crashed:c1:'));

    await call(w, 'PATCH', '/api/v1/instances/c1', { restartPolicy: 'on-failure' });
    await finish(w, await call(w, 'POST', '/api/v1/instances/c1/start', {}));
    const startsBefore = w.driver.starts;
    w.driver.handles.get('c1')!.exit({ clean: false, reason: 'QEMU was killed by SIGKILL' });
    await waitFor(async () => w.driver.starts === startsBefore + 1 && (await w.svc.get('c1')).state === 'running', 5000);
    assert.equal((await w.svc.get('c1')).restartCount, 1);
  });

  it('a guest power-off with policy "never" is a clean stop, not a crash', async () => {
    await finish(w, await call(w, 'POST', '/api/v1/instances', body('p1', { start: true })));
    w.driver.handles.get('p1')!.exit({ clean: true, reason: 'QEMU shut down (guest-shutdown)' });
    await waitFor(async () => (await w.svc.get('p1')).state === 'stopped');
    assert.equal((await w.svc.get('p1')).lastExit?.clean, true);
  });

  it('update: stored at once when stopped, pending while running', async () => {
    await call(w, 'POST', '/api/v1/instances', body('u1'));
    const a = await call(w, 'PATCH', '/api/v1/instances/u1', { memory: '512M', vcpus: 2 });
    assert.equal(a.status, 200);
    assert.deepEqual((a.json.applied as string[]).sort(), ['memoryMiB', 'vcpus']);
    await finish(w, await call(w, 'POST', '/api/v1/instances/u1/start', {}));
    const b = await call(w, 'PATCH', '/api/v1/instances/u1', { memory: '1G' });
    assert.deepEqual(b.json.pending, ['memoryMiB']);
    assert.equal((b.json.instance as Instance).config.memoryMiB, 512);
    assert.equal((b.json.instance as Instance).pending.memoryMiB, 1024);
    await finish(w, await call(w, 'POST', '/api/v1/instances/u1/stop', {}));
    await finish(w, await call(w, 'POST', '/api/v1/instances/u1/start', {}));
    const i = await w.svc.get('u1');
    assert.equal(i.config.memoryMiB, 1024, 'pending change applied at the next start');
    assert.deepEqual(i.pending, {});
    const bad = await call(w, 'PATCH', '/api/v1/instances/u1', { memory: 'lots' });
    assert.equal(bad.status, 400);
    assert.equal((bad.json.error as { code: string }).code, 'HF_ERR_INVALID_SIZE');
  });

  it('delete: refused while running, --force stops then deletes', async () => {
    await finish(w, await call(w, 'POST', '/api/v1/instances', body('d1', { start: true })));
    const refused = await call(w, 'DELETE', '/api/v1/instances/d1');
    assert.equal(refused.status, 409);
    assert.equal((refused.json.error as { code: string }).code, 'HF_ERR_INSTANCE_RUNNING');
    const op = await finish(w, await call(w, 'DELETE', '/api/v1/instances/d1?force=true'));
    assert.equal(op.status, 'success');
    assert.equal((await call(w, 'GET', '/api/v1/instances/d1')).status, 404);
  });

  it('errors have one shape with stable codes', async () => {
    const cases: Array<[string, string, unknown, number, string]> = [
      ['GET', '/api/v1/instances/nope', undefined, 404, 'HF_ERR_INSTANCE_NOT_FOUND'],
      ['GET', '/api/v1/nothing-here', undefined, 404, 'HF_ERR_NOT_FOUND'],
      ['POST', '/api/v1/instances', { name: 'UPPER', boot: { kind: 'kernel', kernel } }, 400, 'HF_ERR_INVALID_NAME'],
      ['POST', '/api/v1/instances', { name: 'x1', boot: { kind: 'kernel', kernel }, memory: 'lots' }, 400, 'HF_ERR_INVALID_SIZE'],
      ['POST', '/api/v1/instances', { name: 'x1', boot: { kind: 'kernel', kernel }, vcpus: 0 }, 400, 'HF_ERR_VALIDATION'],
      ['POST', '/api/v1/instances', { name: 'x1', boot: { kind: 'kernel', kernel }, vcpus: 64 }, 422, 'HF_ERR_INSUFFICIENT_RESOURCES'],
      ['POST', '/api/v1/instances/nope/stop', {}, 404, 'HF_ERR_INSTANCE_NOT_FOUND'],
      ['GET', '/api/v1/operations/none', undefined, 404, 'HF_ERR_OPERATION_NOT_FOUND'],
    ];
    for (const [method, url, payload, status, code] of cases) {
      const r = await call(w, method, url, payload);
      assert.equal(r.status, status, `${method} ${url}`);
      const err = r.json.error as { code: string; message: string };
      assert.equal(err.code, code, `${method} ${url}: ${err.message}`);
      assert.ok(err.message.length > 0);
    }
    const noAuth = await w.app.inject({ method: 'GET', url: '/api/v1/instances' });
    assert.equal(noAuth.statusCode, 401);
    const badJson = await w.app.inject({ method: 'POST', url: '/api/v1/instances', payload: '{"name":', headers: { authorization: `Bearer ${TEST_TOKEN}`, 'content-type': 'application/json' } });
    assert.equal(badJson.statusCode, 400);
    assert.equal((JSON.parse(badJson.body) as { error: { code: string } }).error.code, 'HF_ERR_BAD_JSON');
  });

  it('reconcile after a daemon restart: re-attaches to live guests, marks lost ones crashed', async () => {
    for (const n of ['k1', 'k2']) await finish(w, await call(w, 'POST', '/api/v1/instances', body(n, { start: true })));
    const k2pid = (await w.svc.get('k2')).runtime!.pid;
    // "SIGKILL" the daemon: drop the service without stopping anything; k2's process dies meanwhile.
    await w.svc.close();
    w.driver.alive.delete(k2pid);
    const w2 = await world(w.dir, w.store, w.driver);
    const r = await w2.svc.reconcile({ hostBooted: false });
    assert.deepEqual(r.attached, ['k1']);
    assert.deepEqual(r.lost, ['k2']);
    assert.equal((await w2.svc.get('k1')).state, 'running');
    assert.equal((await w2.svc.get('k2')).state, 'crashed');
    // and k1 stays controllable through the new handle
    const op = await finish(w2, await call(w2, 'POST', '/api/v1/instances/k1/pause', {}));
    assert.equal(op.status, 'success');
    assert.equal((await w2.svc.get('k1')).state, 'paused');
  });

  it('operations left running by a dead daemon are marked failed', async () => {
    const op = await w.ops.start('test.hang', { kind: 'test', name: 'x' }, () => new Promise(() => undefined));
    const ops2 = new OperationManager(w.store, new EventBus('h1'), 'h1', silentLogger);
    await ops2.recover();
    const after = await ops2.get(op.id);
    assert.equal(after.status, 'failure');
    assert.match(after.error?.message ?? '', /daemon stopped/);
  });
});

async function waitFor(pred: () => Promise<boolean>, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('instance service: updates, convergence, failpoints', () => {
  let dir: string;
  let kernel: string;
  let w: World;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not really a kernel');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    w = await world(await mkdtemp(join(dir, 'w-')), SqliteStateStore.open(':memory:'));
  });

  const body = (name: string, extra: Record<string, unknown> = {}) => ({ name, boot: { kind: 'kernel', kernel }, ...extra });

  /** Makes the store's conditional writes of `key` fail: `times` of them (another writer got in), or all. */
  function interfere(store: SqliteStateStore, key: string, mode: { times: number } | 'always'): { failed: number } {
    const seen = { failed: 0 };
    const txn = store.txn.bind(store);
    store.txn = async (compares, ops) => {
      if (compares.some((c) => c.key === key) && (mode === 'always' || seen.failed < mode.times)) {
        seen.failed++;
        // Another writer: the record changes under the update, so its compare-and-swap misses.
        const cur = await store.get(key);
        if (cur) await store.put(key, cur.value);
        if (mode === 'always') return { succeeded: false, revision: await store.revision() };
      }
      return txn(compares, ops);
    };
    return seen;
  }

  it('an update retried by compare-and-swap reports each field once', async () => {
    await call(w, 'POST', '/api/v1/instances', body('u2'));
    const seen = interfere(w.store, '/instances/u2', { times: 2 });
    const r = await call(w, 'PATCH', '/api/v1/instances/u2', { memory: '512M', vcpus: 2, description: 'x' });
    assert.equal(r.status, 200);
    assert.equal(seen.failed, 2, 'the write was retried');
    assert.deepEqual((r.json.applied as string[]).sort(), ['description', 'memoryMiB', 'vcpus']);
    assert.deepEqual(r.json.pending, []);
    assert.equal((await w.svc.get('u2')).config.memoryMiB, 512);
  });

  it('a live change whose record write fails is reverted in the guest', async () => {
    await finish(w, await call(w, 'POST', '/api/v1/instances', body('u3', { memory: '256M', maxMemory: '1G', start: true })));
    const calls: Array<Record<string, unknown>> = [];
    w.driver.handles.get('u3')!.applyLive = async (changes) => {
      calls.push({ ...changes });
      return { applied: Object.keys(changes), pending: [], notes: [] };
    };
    interfere(w.store, '/instances/u3', 'always');
    const r = await call(w, 'PATCH', '/api/v1/instances/u3', { memory: '512M' });
    assert.equal(r.status, 409);
    assert.equal((r.json.error as { code: string }).code, 'HF_ERR_CONFLICT');
    assert.deepEqual(calls, [{ memoryMiB: 512 }, { memoryMiB: 256 }], 'applied, then reverted');
    assert.equal((await w.svc.get('u3')).config.memoryMiB, 256);
  });

  it('reconcile starts again an instance whose start the daemon died in, without calling it a crash', async () => {
    await call(w, 'POST', '/api/v1/instances', body('i1'));
    // What a daemon killed between recording `starting` and `running` leaves.
    await w.svc.patch('i1', (r) => ({ ...r, state: 'starting', desired: 'running' }));
    await w.svc.close();
    const w2 = await world(w.dir, w.store, w.driver);
    const crashed: string[] = [];
    w2.events.subscribe((e) => e.type === 'instance.crashed' && crashed.push(String(e.data.name)));
    const r = await w2.svc.reconcile({ hostBooted: false });
    assert.deepEqual(r.resumed, ['i1']);
    assert.deepEqual(r.lost, []);
    await waitFor(async () => (await w2.svc.get('i1')).state === 'running');
    const now = await w2.svc.get('i1');
    assert.equal(now.state, 'running');
    assert.equal(now.desired, 'running');
    assert.equal(now.lastExit?.reason, INTERRUPTED_START);
    assert.equal(now.restartCount, 0, 'no restart counted');
    assert.deepEqual(crashed, []);
  });

  it('reconcile removes the directory of a create that never wrote its record', async () => {
    await mkdir(join(w.dir, 'instances', 'ghost'), { recursive: true });
    await writeFile(join(w.dir, 'instances', 'ghost', 'root.qcow2'), '');
    await call(w, 'POST', '/api/v1/instances', body('real'));
    const r = await w.svc.reconcile({ hostBooted: false });
    assert.deepEqual(r.orphans, ['ghost']);
    assert.equal(existsSync(join(w.dir, 'instances', 'ghost')), false);
    assert.equal(existsSync(join(w.dir, 'instances', 'real')), true);
  });

  it('a stop fails loudly when the exit is never recorded', async () => {
    const records = new InstanceRecords(w.store, w.events);
    await call(w, 'POST', '/api/v1/instances', body('s1'));
    await assert.rejects(records.waitForState('s1', ['running'], 50), (e: HfError) => e.code === 'HF_ERR_TIMEOUT');
    const waiting = records.waitForState('s1', ['running'], 5000);
    await records.setState('s1', 'running');
    assert.equal((await waiting)?.state, 'running');
  });

  it('failpoints: parsed strictly, and an armed "error" one throws', () => {
    assert.deepEqual([...parseFailpoints(' launch.after-spawn=kill,launch.after-record=error ')], [['launch.after-spawn', 'kill'], ['launch.after-record', 'error']]);
    assert.throws(() => parseFailpoints('launch.nowhere=kill'), (e: HfError) => e.code === 'HF_ERR_VALIDATION');
    assert.throws(() => parseFailpoints('launch.after-spawn=explode'), (e: HfError) => e.code === 'HF_ERR_VALIDATION');
    armFailpoints('launch.before-record=error');
    try {
      assert.throws(() => failpoint('launch.before-record'), (e: HfError) => e.code === 'HF_ERR_INTERNAL');
      assert.doesNotThrow(() => failpoint('launch.after-spawn'));
    } finally {
      armFailpoints('');
    }
  });
});
