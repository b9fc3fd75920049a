// Queued operations, cancel and the busy policy: the keyed mutex on its own, the operation
// manager on its own, then the instance service and the API (Fastify inject, fake driver).
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HfError } from '../../src/core/errors.js';
import type { Operation } from '../../src/core/model/operation.js';
import { EventBus } from '../../src/services/events.js';
import { OperationManager } from '../../src/services/operations.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { silentLogger } from '../../src/util/log.js';
import { KeyedMutex } from '../../src/util/mutex.js';
import { FakeDriver } from '../helpers/fake-driver.js';
import { buildWorld, type TestWorld } from '../helpers/world.js';

const isCode = (code: string) => (e: unknown) => e instanceof HfError && e.code === code;

/** A promise the test resolves by hand: holds a lock or a piece of work open. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

async function waitFor(pred: () => boolean | Promise<boolean>, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setImmediate(r));
  }
}

describe('keyed mutex', () => {
  it('a waiter that gives up leaves the queue working, in order', async () => {
    const m = new KeyedMutex();
    const g = gate();
    const order: string[] = [];
    const first = m.run('k', 'first', async () => {
      await g.promise;
      order.push('first');
    });
    const ac = new AbortController();
    let queuedBehind = '';
    const second = m.run('k', 'second', async () => void order.push('second'), { signal: ac.signal, onQueued: (h) => (queuedBehind = h) });
    const third = m.run('k', 'third', async () => void order.push('third'));
    assert.equal(queuedBehind, 'first');
    ac.abort(new HfError('HF_ERR_CANCELLED', 'gave up'));
    await assert.rejects(second, isCode('HF_ERR_CANCELLED'));
    g.open();
    await Promise.all([first, third]);
    assert.deepEqual(order, ['first', 'third']);
    assert.equal(m.busy('k'), false);
  });

  it('a bounded wait answers HF_ERR_BUSY naming the holder', async () => {
    const m = new KeyedMutex();
    const g = gate();
    const holder = m.run('k', 'start (operation 42)', () => g.promise);
    await assert.rejects(
      m.run('k', 'update', async () => 'ran', { timeoutMs: 20, label: 'instance "k"' }),
      (e: unknown) => isCode('HF_ERR_BUSY')(e) && /instance "k" is busy \(start \(operation 42\) in progress\)/.test((e as Error).message) && (e as HfError).details?.busyWith === 'start (operation 42)',
    );
    g.open();
    await holder;
    assert.equal(await m.run('k', 'update', async () => 'ran', { timeoutMs: 20 }), 'ran');
  });
});

describe('operation manager: cancel', () => {
  let ops: OperationManager;
  let store: SqliteStateStore;
  beforeEach(async () => {
    store = SqliteStateStore.open(':memory:');
    ops = new OperationManager(store, new EventBus('h1'), 'h1', silentLogger);
    await ops.recover();
  });

  it('a running cancellable operation gets the signal and ends cancelled', async () => {
    const op = await ops.start('test.wait', { kind: 'test', name: 'x' }, (ctx) => new Promise((_, reject) => ctx.signal.addEventListener('abort', () => reject(new Error('stopped early')))), { cancellable: true });
    const asked = await ops.cancel(op.id);
    assert.equal(asked.status === 'running' || asked.status === 'cancelled', true);
    const done = await ops.wait(op.id, 3000);
    assert.equal(done.status, 'cancelled');
    assert.equal(done.error?.code, 'HF_ERR_CANCELLED');
    assert.equal((await ops.get(op.id)).status, 'cancelled', 'persisted');
  });

  it('work that finishes in spite of a cancel request ends in success', async () => {
    const g = gate();
    const op = await ops.start('test.finish', { kind: 'test', name: 'x' }, async () => {
      await g.promise;
      return 'done anyway';
    }, { cancellable: true });
    await ops.cancel(op.id);
    g.open();
    const done = await ops.wait(op.id, 3000);
    assert.equal(done.status, 'success');
    assert.equal(done.result, 'done anyway');
  });

  it('running work that cannot stop half-way answers HF_ERR_NOT_CANCELLABLE and goes on', async () => {
    const g = gate();
    const op = await ops.start('test.hold', { kind: 'test', name: 'x' }, () => g.promise);
    await assert.rejects(ops.cancel(op.id), isCode('HF_ERR_NOT_CANCELLABLE'));
    g.open();
    assert.equal((await ops.wait(op.id, 3000)).status, 'success');
  });

  it('a finished operation answers HF_ERR_OPERATION_FINISHED', async () => {
    const op = await ops.start('test.quick', { kind: 'test', name: 'x' }, async () => 1);
    assert.equal((await ops.wait(op.id, 3000)).status, 'success');
    await assert.rejects(ops.cancel(op.id), isCode('HF_ERR_OPERATION_FINISHED'));
    await assert.rejects(ops.cancel('nope'), isCode('HF_ERR_OPERATION_NOT_FOUND'));
  });

  it('after a daemon death queued operations are cancelled (they never ran), running ones failed', async () => {
    const q = await ops.start('test.queued', { kind: 'test', name: 'x' }, () => new Promise(() => undefined), { queued: true });
    const r = await ops.start('test.running', { kind: 'test', name: 'y' }, () => new Promise(() => undefined));
    const ops2 = new OperationManager(store, new EventBus('h1'), 'h1', silentLogger);
    await ops2.recover();
    const q2 = await ops2.get(q.id);
    assert.equal(q2.status, 'cancelled');
    assert.match(q2.error?.message ?? '', /before this operation ran/);
    assert.equal((await ops2.get(r.id)).status, 'failure');
  });
});

describe('instance operations: queued, cancel, busy (API, fake driver)', () => {
  let dir: string;
  let kernel: string;
  let w: TestWorld & { driver: FakeDriver };
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not really a kernel');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    const driver = new FakeDriver();
    w = { ...(await buildWorld(await mkdtemp(join(dir, 'w-')), { drivers: [['vm', driver]], busyWaitMs: 50 })), driver };
  });
  const running = async (name: string) => {
    const op = await w.finish(await w.call('POST', '/api/v1/instances', { name, boot: { kind: 'kernel', kernel }, start: true }));
    assert.equal(op.status, 'success');
  };

  it('an action on a busy instance is queued; cancelling it means it never runs', async () => {
    await running('q1');
    const statuses: string[] = [];
    const hold = gate();
    const holding = w.svc.withInstance('q1', 'test hold', () => hold.promise);
    const s = await w.call('POST', '/api/v1/instances/q1/stop', { force: true });
    assert.equal(s.status, 202);
    const op = s.json.operation as Operation;
    assert.equal(op.status, 'queued');
    w.events.subscribe((e) => {
      const o = e.data.operation as Operation | undefined;
      if (o?.id === op.id) statuses.push(o.status);
    });
    const c = await w.call('DELETE', `/api/v1/operations/${op.id}`);
    assert.equal(c.status, 200);
    assert.equal((c.json.operation as Operation).status, 'cancelled');
    assert.equal((c.json.operation as Operation).error?.code, 'HF_ERR_CANCELLED');
    assert.deepEqual(statuses, ['cancelled']);
    hold.open();
    await holding;
    assert.equal((await w.svc.get('q1')).state, 'running', 'the stop never ran');
    assert.equal(w.driver.handles.get('q1')!.state, 'running');
  });

  it('a queued action says queued until it has the lock, then runs', async () => {
    await running('q2');
    const statuses: string[] = [];
    const hold = gate();
    const holding = w.svc.withInstance('q2', 'test hold', () => hold.promise);
    const s = await w.call('POST', '/api/v1/instances/q2/pause', {});
    const op = s.json.operation as Operation;
    assert.equal(op.status, 'queued');
    w.events.subscribe((e) => {
      const o = e.data.operation as Operation | undefined;
      if (o?.id === op.id) statuses.push(o.status);
    });
    hold.open();
    await holding;
    assert.equal((await w.ops.wait(op.id, 3000)).status, 'success');
    assert.deepEqual(statuses, ['running', 'success']);
    assert.equal((await w.svc.get('q2')).state, 'paused');
  });

  it('a graceful stop is cancelled through its signal: the guest keeps running', async () => {
    // before the start: a handle keeps the setting it was made with
    w.driver.powerOffOnShutdown = false;
    await running('g1');
    const s = await w.call('POST', '/api/v1/instances/g1/stop', { timeout: 600 });
    const op = s.json.operation as Operation;
    assert.equal(op.cancellable, true);
    await waitFor(async () => (await w.svc.get('g1')).state === 'stopping');
    const c = await w.call('DELETE', `/api/v1/operations/${op.id}`);
    assert.equal(c.status, 202);
    const done = await w.ops.wait(op.id, 3000);
    assert.equal(done.status, 'cancelled');
    assert.equal((await w.svc.get('g1')).state, 'running');
    assert.equal(w.driver.handles.get('g1')!.state, 'running', 'not killed');
    // and it stays controllable
    const forced = await w.call('POST', '/api/v1/instances/g1/stop', { force: true });
    assert.equal(forced.status, 202, JSON.stringify(forced.json));
    assert.equal((await w.finish(forced)).status, 'success');
  });

  it('a start cannot be interrupted: HF_ERR_NOT_CANCELLABLE; a finished one: HF_ERR_OPERATION_FINISHED', async () => {
    await w.call('POST', '/api/v1/instances', { name: 'n1', boot: { kind: 'kernel', kernel } });
    const hold = gate();
    const holding = w.svc.withInstance('n1', 'test hold', () => hold.promise);
    const op = (await w.call('POST', '/api/v1/instances/n1/start', {})).json.operation as Operation;
    hold.open();
    await holding;
    await waitFor(async () => (await w.ops.get(op.id)).status !== 'queued');
    const refused = await w.call('DELETE', `/api/v1/operations/${op.id}`);
    // the fake start is quick: it may have ended before the cancel came
    const code = (refused.json.error as { code: string }).code;
    assert.ok(code === 'HF_ERR_NOT_CANCELLABLE' || code === 'HF_ERR_OPERATION_FINISHED', code);
    assert.equal((await w.ops.wait(op.id, 3000)).status, 'success');
    const again = await w.call('DELETE', `/api/v1/operations/${op.id}`);
    assert.equal(again.status, 409);
    assert.equal((again.json.error as { code: string }).code, 'HF_ERR_OPERATION_FINISHED');
  });

  it('PATCH waits for a busy instance up to its bound, then HF_ERR_BUSY names the holder', async () => {
    await w.call('POST', '/api/v1/instances', { name: 'b1', boot: { kind: 'kernel', kernel } });
    const hold = gate();
    const holding = w.svc.withInstance('b1', 'test hold', () => hold.promise);
    const busy = await w.call('PATCH', '/api/v1/instances/b1', { memory: '512M' });
    assert.equal(busy.status, 409);
    const err = busy.json.error as { code: string; message: string; details: { busyWith: string } };
    assert.equal(err.code, 'HF_ERR_BUSY');
    assert.equal(err.details.busyWith, 'test hold');
    const patched = w.call('PATCH', '/api/v1/instances/b1', { memory: '512M' });
    hold.open();
    await holding;
    assert.equal((await patched).status, 200, 'a lock freed within the bound lets the PATCH through');
    assert.equal((await w.svc.get('b1')).config.memoryMiB, 512);
  });

  it('a driver without a capability gets HF_ERR_UNSUPPORTED naming it', async () => {
    await running('c1');
    w.driver.capabilities = new Set();
    const r = await w.call('PATCH', '/api/v1/instances/c1', { memory: '512M' });
    assert.equal(r.status, 200);
    assert.deepEqual(r.json.pending, ['memoryMiB'], 'without live-resources a change waits for the next start');
    await assert.rejects(w.svc.attachConsole('c1'), (e: unknown) => isCode('HF_ERR_UNSUPPORTED')(e) && (e as HfError).details?.capability === 'console');
  });
});
