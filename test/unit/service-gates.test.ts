// Services outside the instance service ask the lifecycle table (InstanceService.allowed) and act
// on its `live` answer; operations waiting for an instance's lock say `queued` and can be
// cancelled; a cancelled operation another one waits for is not a success. Fake driver, a
// snapshot provider that records what it was asked, in-memory store.
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HfError } from '../../src/core/errors.js';
import type { Instance } from '../../src/core/model/instance.js';
import type { InstanceHandle } from '../../src/drivers/driver.js';
import { QEMU_CAPABILITIES } from '../../src/drivers/qemu/capabilities.js';
import { liveHandle } from '../../src/services/instances/live-handle.js';
import { SnapshotService, type SnapshotProvider } from '../../src/services/snapshots.js';
import type { SnapshotRecord } from '../../src/storage/model.js';
import { silentLogger } from '../../src/util/log.js';
import { FakeDriver, FakeHandle } from '../helpers/fake-driver.js';
import { buildWorld, type TestWorld } from '../helpers/world.js';

const isCode = (code: string) => (e: unknown) => e instanceof HfError && e.code === code;

async function waitFor(pred: () => Promise<boolean>, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setImmediate(r));
  }
}

/** Records each create/delete and whether it was handed the live handle. */
class RecordingProvider implements SnapshotProvider {
  readonly calls: Array<{ op: 'create' | 'delete' | 'revert'; live: boolean }> = [];
  plan(inst: Instance, req: { name: string; memory: boolean }, parent: string | undefined): SnapshotRecord {
    const rec: SnapshotRecord = { instance: inst.name, name: req.name, memory: req.memory, takenWhile: 'stopped', disks: [], description: '', createdAt: new Date().toISOString() };
    if (parent !== undefined) rec.parent = parent;
    return rec;
  }
  async create(_inst: Instance, live: InstanceHandle | undefined): Promise<void> {
    this.calls.push({ op: 'create', live: live !== undefined });
  }
  async revert(_inst: Instance, _rec: SnapshotRecord, _ctx: unknown, live: boolean): Promise<Record<string, unknown>> {
    this.calls.push({ op: 'revert', live });
    return {};
  }
  async delete(_inst: Instance, live: InstanceHandle | undefined): Promise<void> {
    this.calls.push({ op: 'delete', live: live !== undefined });
  }
}

describe('liveHandle', () => {
  const inst = { name: 'v1', type: 'vm' as const, state: 'running' as const };
  it('no supervised process: HF_ERR_INSTANCE_NOT_RUNNING', () => {
    assert.throws(() => liveHandle(inst, undefined, 'attachDisk'), isCode('HF_ERR_INSTANCE_NOT_RUNNING'));
  });
  it('a capability whose method the handle lacks: HF_ERR_UNSUPPORTED naming the method', () => {
    const h = new FakeHandle({ pid: 1, pidStartTime: 1, accel: 'tcg', startedAt: '', details: {} }, true);
    assert.throws(() => liveHandle(inst, h, 'attachDisk'), (e: unknown) => isCode('HF_ERR_UNSUPPORTED')(e) && /attachDisk/.test((e as Error).message));
    const plugs = Object.assign(new FakeHandle({ pid: 2, pidStartTime: 1, accel: 'tcg', startedAt: '', details: {} }, true), { attachDisk: async () => undefined });
    assert.equal(liveHandle(inst, plugs, 'attachDisk'), plugs);
  });
});

describe('services gated by the lifecycle table (fake driver)', () => {
  let dir: string;
  let kernel: string;
  let w: TestWorld;
  let driver: FakeDriver;
  let provider: RecordingProvider;
  let snapshots: SnapshotService;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-gates-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not a kernel');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    driver = new FakeDriver();
    w = await buildWorld(await mkdtemp(join(dir, 'w-')), { drivers: [['vm', driver]] });
    snapshots = new SnapshotService({ store: w.store, instances: w.svc, operations: w.ops, events: w.events, log: silentLogger });
    provider = new RecordingProvider();
    snapshots.registerProvider('vm', provider);
    await w.svc.create({ name: 'v1', boot: { kind: 'kernel', kernel } });
  });

  const start = async () => assert.equal((await w.ops.succeeded(w.svc.action('v1', 'start'))).status, 'success');

  it('a snapshot is taken through the handle exactly when the table says live', async () => {
    assert.equal((await w.ops.wait((await snapshots.create('v1', { name: 'off' })).id, 3000)).status, 'success');
    await start();
    assert.equal((await w.ops.wait((await snapshots.create('v1', { name: 'on' })).id, 3000)).status, 'success');
    assert.equal((await w.ops.wait((await snapshots.delete('v1', 'on')).id, 3000)).status, 'success');
    assert.deepEqual(provider.calls, [
      { op: 'create', live: false },
      { op: 'create', live: true },
      { op: 'delete', live: true },
    ]);
  });

  it('refusals come from the table before an operation exists, naming the capability', async () => {
    await assert.rejects(snapshots.create('v1', { name: 'm', memory: true }), (e: unknown) => isCode('HF_ERR_INSTANCE_NOT_RUNNING')(e) && /disk-only/.test((e as Error).message));
    await start();
    // This running instance's handle cannot snapshot live (a narrower set than its driver's).
    (w.svc.handle('v1') as FakeHandle).capabilities = new Set([...QEMU_CAPABILITIES].filter((c) => c !== 'snapshot-live'));
    await assert.rejects(snapshots.create('v1', { name: 's' }), (e: unknown) => isCode('HF_ERR_UNSUPPORTED')(e) && /snapshot-live/.test((e as Error).message) && /stop it first/.test((e as Error).message));
    assert.deepEqual(provider.calls, [], 'the provider was never asked');
    assert.deepEqual((await w.ops.list()).map((o) => o.type), ['instance.start'], 'no snapshot operation');
  });

  it('a snapshot waiting for the instance lock is queued, and a cancel means it never runs', async () => {
    let release!: () => void;
    const held = w.svc.withInstance('v1', 'hold', () => new Promise<void>((r) => (release = r)));
    const op = await snapshots.create('v1', { name: 'q' });
    await waitFor(async () => (await w.ops.get(op.id)).status === 'queued');
    assert.match((await w.ops.get(op.id)).progress.message, /waiting for hold/);
    await w.ops.cancel(op.id);
    const done = await w.ops.wait(op.id, 3000);
    assert.equal(done.status, 'cancelled');
    release();
    await held;
    assert.deepEqual(provider.calls, []);
    assert.deepEqual((await snapshots.list('v1')).snapshots, []);
  });

  it('on a busy instance the check waits for its turn: the state the holder leaves decides', async () => {
    let release!: () => void;
    const held = w.svc.withInstance('v1', 'hold', () => new Promise<void>((r) => (release = r)));
    // Stopped now, so a memory snapshot would be refused at once; busy, it queues instead.
    const op = await snapshots.create('v1', { name: 'm', memory: true });
    await waitFor(async () => (await w.ops.get(op.id)).status === 'queued');
    release();
    await held;
    const done = await w.ops.wait(op.id, 3000);
    assert.equal(done.status, 'failure');
    assert.equal(done.error?.code, 'HF_ERR_INSTANCE_NOT_RUNNING');
    assert.deepEqual(provider.calls, []);
  });

  it('OperationManager.succeeded: a cancelled operation is not a success', async () => {
    let release!: () => void;
    const held = w.svc.withInstance('v1', 'hold', () => new Promise<void>((r) => (release = r)));
    const started = w.svc.action('v1', 'start');
    const id = (await started).id;
    await waitFor(async () => (await w.ops.get(id)).status === 'queued');
    const waiting = w.ops.succeeded(started);
    await w.ops.cancel(id);
    await assert.rejects(waiting, isCode('HF_ERR_CANCELLED'));
    release();
    await held;
    assert.equal((await w.svc.get('v1')).state, 'stopped');
  });
});
