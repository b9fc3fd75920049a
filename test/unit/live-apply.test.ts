// Live changes over QMP (drivers/qemu/live.ts) against a fake QEMU monitor that models a VM's
// memory devices, CPU slots and balloon; then the whole path through the instance service and
// the REST API (applied / pending / notes, pending applied at the next start, bad input, busy).
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { isHfError } from '../../src/core/errors.js';
import { isVmLiveInfo, type VmLiveInfo } from '../../src/core/live-plan.js';
import type { Instance, InstanceConfig } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import type { InstanceHandle, StartContext } from '../../src/drivers/driver.js';
import { applyLiveChanges, enableGuestStats, readLiveInfo, readLiveVmState } from '../../src/drivers/qemu/live.js';
import { QmpClient } from '../../src/drivers/qemu/qmp/client.js';
import { InstanceService } from '../../src/services/instances.js';
import { OperationManager } from '../../src/services/operations.js';
import { FakeDriver } from '../helpers/fake-driver.js';
import { buildWorld, TEST_TOKEN } from '../helpers/world.js';
import { FakeQmpServer, type FakeReply } from '../helpers/fake-qmp-server.js';
import { vmConfig } from '../helpers/fixtures.js';

const MiB = 1024 * 1024;
const NOT_REPORTED = 2 ** 64; // QEMU's "not reported" (2^64-1) as JSON turns it into a double
const CPU_TYPE = 'max-x86_64-cpu';

interface VmShape {
  memoryMiB: number;
  maxMemoryMiB?: number | undefined;
  vcpus: number;
  maxVcpus?: number | undefined;
}

/** A VM as QEMU's monitor shows it: boot memory, DIMMs, CPU slots, a balloon. */
class FakeVm {
  readonly dimms: Array<{ id: string; memdev: string; slot: number; sizeMiB: number }> = [];
  readonly objects = new Set<string>();
  readonly cpus: Array<{ socket: number; qomPath?: string }> = [];
  balloon: 'active' | 'inactive' | 'absent' = 'active';
  /** query-kvm `enabled` (vCPU unplug is only attempted under KVM). */
  kvm = false;
  actualMiB: number;
  availableMiB = 180;
  /** Served by the next guest-stats read only (a report from before the last change). */
  staleAvailableMiB: number | undefined;
  pollInterval = 0;
  cooperateUnplug = true;
  failDimmAdd = false;
  failCpuAdd = false;
  /** The guest needs this many queries before the balloon reaches its target (-1: never). */
  balloonLag = 0;
  private balloonTarget: number | undefined;
  private reports = 0;

  private constructor(readonly server: FakeQmpServer, readonly shape: VmShape) {
    this.actualMiB = shape.memoryMiB;
    for (let s = 0; s < (shape.maxVcpus ?? shape.vcpus); s++) {
      this.cpus.push({ socket: s, ...(s < shape.vcpus ? { qomPath: `/machine/unattached/device[${s}]` } : {}) });
    }
    this.install();
  }

  static async start(shape: VmShape): Promise<FakeVm> {
    return new FakeVm(await FakeQmpServer.start(), shape);
  }

  get totalMiB(): number {
    return this.shape.memoryMiB + this.dimms.reduce((a, d) => a + d.sizeMiB, 0);
  }

  commands(name: string): Array<Record<string, unknown> | undefined> {
    return this.server.received.filter((r) => r.command === name).map((r) => r.args);
  }

  private install(): void {
    const s = this.server;
    const err = (cls: string, desc: string): FakeReply => ({ error: { class: cls, desc } });
    const props = (socket: number) => ({ 'core-id': 0, 'thread-id': 0, 'node-id': 0, 'socket-id': socket });
    s.setHandler('query-memory-size-summary', () => ({ return: { 'base-memory': this.shape.memoryMiB * MiB, 'plugged-memory': (this.totalMiB - this.shape.memoryMiB) * MiB } }));
    s.setHandler('query-memory-devices', () => ({
      return: this.dimms.map((d) => ({ type: 'dimm', data: { id: d.id, memdev: `/objects/${d.memdev}`, slot: d.slot, size: d.sizeMiB * MiB, addr: 4 * 1024 * MiB, node: 0, hotplugged: true, hotpluggable: true } })),
    }));
    s.setHandler('query-hotpluggable-cpus', () => ({
      return: [...this.cpus].reverse().map((c) => ({ type: CPU_TYPE, 'vcpus-count': 1, props: props(c.socket), ...(c.qomPath ? { 'qom-path': c.qomPath } : {}) })),
    }));
    s.setHandler('query-cpus-fast', () => ({
      return: this.cpus.filter((c) => c.qomPath).map((c, i) => ({ 'cpu-index': i, 'qom-path': c.qomPath, 'thread-id': 1000 + c.socket, target: 'x86_64', props: props(c.socket) })),
    }));
    s.setHandler('query-kvm', () => ({ return: { enabled: this.kvm, present: true } }));
    s.setHandler('qom-list', () => ({ return: [...this.objects].map((name) => ({ name, type: 'child<memory-backend-ram>' })) }));
    s.setHandler('qom-get', (a) => {
      if (a?.path === '/machine' && a.property === 'memory') {
        const max = this.shape.maxMemoryMiB ?? this.shape.memoryMiB;
        return { return: { size: this.shape.memoryMiB * MiB, ...(max > this.shape.memoryMiB ? { slots: 16, 'max-size': max * MiB } : { slots: 0, 'max-size': max * MiB }) } };
      }
      if (a?.property === 'guest-stats-polling-interval') return { return: this.pollInterval };
      if (a?.property === 'guest-stats') {
        const reporting = this.balloon === 'active' && this.pollInterval > 0;
        const available = this.staleAvailableMiB ?? this.availableMiB;
        this.staleAvailableMiB = undefined;
        const v = (n: number): number => (reporting ? n : NOT_REPORTED);
        return {
          return: {
            stats: {
              'stat-total-memory': v((this.actualMiB - 100) * MiB),
              'stat-free-memory': v((available - 10) * MiB),
              'stat-available-memory': v(available * MiB),
              'stat-disk-caches': v(8 * MiB),
              'stat-major-faults': v(3),
              'stat-minor-faults': v(4000),
              'stat-swap-in': v(0),
              'stat-swap-out': v(0),
              'stat-htlb-pgalloc': NOT_REPORTED,
            },
            // a new report on every read (the real guest reports every polling interval)
            'last-update': reporting ? Math.floor(Date.now() / 1000) + this.reports++ : 0,
          },
        };
      }
      return err('GenericError', `no property ${String(a?.property)}`);
    });
    s.setHandler('qom-set', (a) => {
      if (a?.property !== 'guest-stats-polling-interval') return err('GenericError', 'unexpected qom-set');
      this.pollInterval = a.value as number;
      return { return: {} };
    });
    s.setHandler('query-balloon', () => {
      if (this.balloon === 'absent') return err('DeviceNotActive', 'No balloon device has been activated');
      if (this.balloonTarget !== undefined && this.balloonLag !== -1) {
        if (this.balloonLag > 0) this.balloonLag--;
        else {
          this.actualMiB = this.balloonTarget;
          this.balloonTarget = undefined;
        }
      }
      return { return: { actual: this.actualMiB * MiB } };
    });
    s.setHandler('balloon', (a) => {
      if (this.balloon === 'absent') return err('DeviceNotActive', 'No balloon device has been activated');
      if (this.balloon === 'active') this.balloonTarget = Math.min((a?.value as number) / MiB, this.totalMiB);
      return { return: {} };
    });
    s.setHandler('x-query-virtio', () => ({ return: this.balloon === 'absent' ? [] : [{ name: 'virtio-balloon', path: '/machine/peripheral/balloon0/virtio-backend' }] }));
    s.setHandler('x-query-virtio-status', () => ({
      return: {
        name: 'virtio-balloon',
        status: {
          statuses:
            this.balloon === 'active'
              ? ['VIRTIO_CONFIG_S_DRIVER_OK: Driver ready', 'VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete', 'VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device', 'VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found']
              : ['VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found'],
        },
      },
    }));
    s.setHandler('object-add', (a) => {
      const id = a?.id as string;
      if (this.objects.has(id)) return err('GenericError', `attempt to add duplicate property '${id}' to object (type 'container')`);
      this.objects.add(id);
      return { return: {} };
    });
    s.setHandler('object-del', (a) => {
      this.objects.delete(a?.id as string);
      return { return: {} };
    });
    s.setHandler('device_add', (a) => {
      if (a?.driver === 'pc-dimm') {
        if (this.failDimmAdd) return err('GenericError', 'not enough space, currently 0x0 in use of total space for memory devices 0x30000000');
        const memdev = a.memdev as string;
        if (!this.objects.has(memdev)) return err('GenericError', `Device 'memdev' not found`);
        this.dimms.push({ id: a.id as string, memdev, slot: a.slot as number, sizeMiB: 0 });
        // the backend's size is what object-add got
        const add = this.commands('object-add').find((x) => x?.id === memdev);
        this.dimms[this.dimms.length - 1]!.sizeMiB = (add?.size as number) / MiB;
        return { return: {} };
      }
      if (a?.driver === CPU_TYPE) {
        if (this.failCpuAdd) return err('GenericError', 'CPU hot-plug failed');
        const slot = this.cpus.find((c) => c.socket === a['socket-id']);
        if (!slot || slot.qomPath) return err('GenericError', 'CPU[1] with APIC ID 1 exists');
        slot.qomPath = `/machine/peripheral/${a.id as string}`;
        return { return: {}, eventsAfter: [{ event: 'ACPI_DEVICE_OST', data: { info: { device: a.id, source: 1, status: 0, slot: String(slot.socket), 'slot-type': 'CPU' } } }] };
      }
      return err('GenericError', `unexpected device ${String(a?.driver)}`);
    });
    s.setHandler('device_del', (a) => {
      const slot = this.cpus.find((c) => c.qomPath === a?.id);
      if (!slot) return err('DeviceNotFound', `Device '${String(a?.id)}' not found`);
      if (slot.socket === 0) return err('GenericError', 'Boot CPU is unpluggable');
      if (this.cooperateUnplug) {
        const path = slot.qomPath;
        setTimeout(() => {
          slot.qomPath = undefined;
          this.server.sendEvent('DEVICE_DELETED', { path: `${path}/lapic` });
        }, 50);
      }
      return { return: {} };
    });
  }
}

async function connect(vm: FakeVm): Promise<QmpClient> {
  return QmpClient.connect(vm.server.socketPath, { defaultTimeoutMs: 3000 });
}

const baseConfig: InstanceConfig = vmConfig();

function hfError(code: string, re?: RegExp): (e: unknown) => boolean {
  return (e) => {
    assert.ok(isHfError(e), `an HfError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (re) assert.match(e.message, re);
    return true;
  };
}

describe('live changes over QMP (fake monitor)', () => {
  const open: Array<{ vm: FakeVm; client: QmpClient }> = [];
  async function vm(shape: VmShape = baseConfig): Promise<{ vm: FakeVm; client: QmpClient }> {
    const v = await FakeVm.start(shape);
    const c = { vm: v, client: await connect(v) };
    open.push(c);
    return c;
  }
  after(async () => {
    for (const o of open) {
      await o.client.close();
      await o.vm.server.close();
    }
  });

  it('reads what QEMU has: boot memory, ceiling, slots, DIMMs, balloon, CPU slots', async () => {
    const { vm: v, client } = await vm();
    v.objects.add('mem-dimm0');
    v.dimms.push({ id: 'dimm0', memdev: 'mem-dimm0', slot: 0, sizeMiB: 256 });
    v.pollInterval = 2;
    v.actualMiB = 400;
    const s = await readLiveVmState(client);
    assert.equal(s.bootMemoryMiB, 256);
    assert.equal(s.maxMemoryMiB, 1024);
    assert.equal(s.memorySlots, 16);
    assert.deepEqual(s.dimms, [{ id: 'dimm0', memdev: 'mem-dimm0', slot: 0, sizeMiB: 256, hotplugged: true }]);
    assert.deepEqual(s.balloon, { status: 'active', actualMiB: 400, guestAvailableMiB: 180 });
    assert.equal(s.cpuSlots.length, 2);
    assert.equal(s.cpuSlots.filter((c) => c.qomPath).length, 1);
    assert.ok(s.takenIds.includes('mem-dimm0') && s.takenIds.includes('dimm0'));
    assert.equal(s.accel, 'tcg');
    v.kvm = true;
    assert.equal((await readLiveVmState(client)).accel, 'kvm');
  });

  it('grows memory with object-add + pc-dimm at a slot and adds a vCPU at the free socket', async () => {
    const { vm: v, client } = await vm();
    const r = await applyLiveChanges(client, { memoryMiB: 512, vcpus: 2 }, baseConfig);
    assert.deepEqual(r, { applied: ['memoryMiB', 'vcpus'], pending: [], notes: [] });
    assert.deepEqual(v.commands('object-add'), [{ 'qom-type': 'memory-backend-ram', id: 'mem-dimm0', size: 256 * MiB }]);
    assert.deepEqual(v.commands('device_add'), [
      { driver: 'pc-dimm', id: 'dimm0', memdev: 'mem-dimm0', slot: 0 },
      { driver: CPU_TYPE, id: 'cpu-s1-c0-t0', 'core-id': 0, 'thread-id': 0, 'node-id': 0, 'socket-id': 1 },
    ]);
    assert.equal(v.totalMiB, 512);
    assert.equal(v.cpus.filter((c) => c.qomPath).length, 2);
    // No balloon step was needed: the DIMM was exactly the difference.
    assert.equal(v.commands('balloon').length, 0);
  });

  it('trims a rounded-up DIMM with the balloon and waits for the guest to get there', async () => {
    const { vm: v, client } = await vm();
    v.balloonLag = 2;
    const r = await applyLiveChanges(client, { memoryMiB: 300 }, baseConfig);
    assert.deepEqual(r.applied, ['memoryMiB']);
    assert.deepEqual(v.commands('balloon'), [{ value: 300 * MiB }]);
    assert.equal(v.totalMiB, 384);
    assert.equal(v.actualMiB, 300);
  });

  it('says so when the guest is slow to reach the balloon target (still applied)', async () => {
    const { vm: v, client } = await vm({ ...baseConfig, memoryMiB: 512 });
    v.balloonLag = -1;
    const r = await applyLiveChanges(client, { memoryMiB: 384 }, { ...baseConfig, memoryMiB: 512 }, { balloonWaitMs: 300 });
    assert.deepEqual(r.applied, ['memoryMiB']);
    assert.match(r.notes.join('\n'), /still adjusting its balloon \(512MiB of target 384MiB/);
  });

  it('rolls the memory backend back when the DIMM cannot be plugged, and reports the hypervisor error', async () => {
    const { vm: v, client } = await vm();
    v.failDimmAdd = true;
    await assert.rejects(applyLiveChanges(client, { memoryMiB: 512 }, baseConfig), hfError('HF_ERR_HYPERVISOR', /dimm-add.*not enough space/));
    assert.deepEqual(v.commands('object-del'), [{ id: 'mem-dimm0' }]);
    assert.equal(v.objects.size, 0);
  });

  it('keeps a field that failed after another applied as pending, with the reason', async () => {
    const { vm: v, client } = await vm();
    v.failCpuAdd = true;
    const r = await applyLiveChanges(client, { memoryMiB: 512, vcpus: 2 }, baseConfig);
    assert.deepEqual(r.applied, ['memoryMiB']);
    assert.deepEqual(r.pending, ['vcpus']);
    assert.match(r.notes[0]!, /hot-plugging vCPU cpu-s1-c0-t0 failed \(0 of 1 added\): CPU hot-plug failed; applies at next boot/);
  });

  it('unplugs a vCPU (KVM) when the guest releases it, and leaves it pending when it does not', async () => {
    const { vm: v, client } = await vm({ ...baseConfig, vcpus: 2 });
    v.kvm = true;
    const ok = await applyLiveChanges(client, { vcpus: 1 }, { ...baseConfig, vcpus: 2 }, { cpuUnplugTimeoutMs: 2000 });
    assert.deepEqual(ok.applied, ['vcpus']);
    assert.deepEqual(v.commands('device_del'), [{ id: '/machine/unattached/device[1]' }]);
    assert.equal(v.cpus.filter((c) => c.qomPath).length, 1);

    const { vm: stubborn, client: c2 } = await vm({ ...baseConfig, vcpus: 2 });
    stubborn.cooperateUnplug = false;
    stubborn.kvm = true;
    const t0 = Date.now();
    const r = await applyLiveChanges(c2, { vcpus: 1 }, { ...baseConfig, vcpus: 2 }, { cpuUnplugTimeoutMs: 400 });
    assert.ok(Date.now() - t0 >= 400);
    assert.deepEqual(r.applied, []);
    assert.deepEqual(r.pending, ['vcpus']);
    assert.match(r.notes[0]!, /did not release vCPU \/machine\/unattached\/device\[1\] within 0.4 s \(0 of 1 removed\)/);

    // Under TCG nothing is sent at all.
    const { vm: tcg, client: c3 } = await vm({ ...baseConfig, vcpus: 2 });
    const t = await applyLiveChanges(c3, { vcpus: 1 }, { ...baseConfig, vcpus: 2 });
    assert.deepEqual(t.pending, ['vcpus']);
    assert.equal(tcg.commands('device_del').length, 0);
  });

  it('no balloon device (DeviceNotActive): shrinking is pending with a note', async () => {
    const { vm: v, client } = await vm();
    v.balloon = 'absent';
    const r = await applyLiveChanges(client, { memoryMiB: 200 }, baseConfig);
    assert.deepEqual(r.pending, ['memoryMiB']);
    assert.match(r.notes[0]!, /no balloon device/);
    assert.equal(v.commands('balloon').length, 0);
    assert.equal((await readLiveInfo(client)).balloon.status, 'absent');
  });

  it('balloon driver not active in the guest: a clear error, nothing sent', async () => {
    const { vm: v, client } = await vm();
    v.balloon = 'inactive';
    await assert.rejects(applyLiveChanges(client, { memoryMiB: 200 }, baseConfig), hfError('HF_ERR_UNSUPPORTED', /has not activated its virtio balloon driver/));
    assert.equal(v.commands('balloon').length, 0);
  });

  it('refuses to shrink below what the guest uses (from its balloon statistics)', async () => {
    const { vm: v, client } = await vm({ ...baseConfig, memoryMiB: 512 });
    v.pollInterval = 2;
    v.availableMiB = 100; // uses 412 of 512: minimum 444
    await assert.rejects(applyLiveChanges(client, { memoryMiB: 300 }, { ...baseConfig, memoryMiB: 512 }), hfError('HF_ERR_VALIDATION', /below the guest's minimum of 444MiB/));
    assert.equal(v.commands('balloon').length, 0);
  });

  it('judges a shrink by a fresh guest report, not one from before a DIMM was onlined', async () => {
    const { vm: v, client } = await vm({ ...baseConfig, memoryMiB: 512 });
    v.pollInterval = 2;
    v.staleAvailableMiB = 100; // as if reported before 256 MiB were onlined: minimum 444
    v.availableMiB = 360; // what the guest reports next: minimum 184
    const r = await applyLiveChanges(client, { memoryMiB: 320 }, { ...baseConfig, memoryMiB: 512 });
    assert.deepEqual(r.applied, ['memoryMiB']);
    assert.deepEqual(v.commands('balloon'), [{ value: 320 * MiB }]);
  });

  it('live info: statistics (unreported values left out), DIMMs and vCPUs; stats switched on when off', async () => {
    const { vm: v, client } = await vm();
    assert.equal(await enableGuestStats(client), true);
    assert.equal(v.pollInterval, 2);
    await applyLiveChanges(client, { memoryMiB: 512, vcpus: 2 }, baseConfig);
    // A second connection (as a restarted daemon would open) sees the same devices: nothing is cached.
    const other = await connect(v);
    try {
      const info = await readLiveInfo(other);
      assert.ok(isVmLiveInfo(info));
      assert.deepEqual(info.memory, { bootMiB: 256, pluggedMiB: 256, totalMiB: 512, maxMiB: 1024, slots: 16, dimms: [{ id: 'dimm0', memdev: 'mem-dimm0', slot: 0, sizeMiB: 256, hotplugged: true }] });
      assert.equal(info.balloon.status, 'active');
      assert.equal(info.balloon.actualMiB, 256);
      assert.equal(info.balloon.stats?.availableMiB, 180);
      assert.equal(info.balloon.stats?.majorFaults, 3);
      assert.ok(!('htlb' in (info.balloon.stats ?? {})));
      assert.deepEqual(info.vcpus, { present: 2, max: 2, hotplugged: ['cpu-s1-c0-t0'], threadIds: [1000, 1001] });
    } finally {
      await other.close();
    }
    // Statistics off (e.g. a VM started by an older daemon): the guest reports nothing yet, and
    // reading live info switches them back on.
    v.pollInterval = 0;
    const info = await readLiveInfo(client);
    assert.equal(info.balloon.stats, undefined);
    assert.equal(v.pollInterval, 2);
  });
});

// ---- through the service and the API ---------------------------------------------------------

const TOKEN = TEST_TOKEN;

/** The fake driver, with handles whose live capabilities are the real live.ts over a FakeVm. */
class LiveFakeDriver extends FakeDriver {
  readonly vms = new Map<string, FakeVm>();
  readonly startedWith: InstanceConfig[] = [];
  private readonly clients: QmpClient[] = [];
  private readonly all: FakeVm[] = [];

  override async start(instance: Instance, ctx: StartContext): Promise<InstanceHandle> {
    const h: InstanceHandle = await super.start(instance, ctx);
    const v = await FakeVm.start(instance.config);
    const client = await connect(v);
    this.clients.push(client);
    this.vms.set(instance.name, v);
    this.all.push(v);
    this.startedWith.push(instance.config);
    h.applyLive = (changes, current) => applyLiveChanges(client, changes, current, { cpuUnplugTimeoutMs: 300, balloonWaitMs: 500 });
    h.liveInfo = async () => ({ ...(await readLiveInfo(client)) });
    return h;
  }

  async close(): Promise<void> {
    for (const c of this.clients) await c.close();
    for (const v of this.all) await v.server.close();
  }
}

describe('live changes through the instance service and the API', () => {
  let dir: string;
  let kernel: string;
  let driver: LiveFakeDriver;
  let svc: InstanceService;
  let ops: OperationManager;
  let app: FastifyInstance;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-live-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not really a kernel');
  });
  after(async () => {
    await driver?.close();
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    await driver?.close();
    driver = new LiveFakeDriver();
    const w = await buildWorld(await mkdtemp(join(dir, 'w-')), { drivers: [['vm', driver]], busyWaitMs: 100 });
    ({ svc, ops, app } = w);
  });

  async function call(method: string, url: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
    const res = await app.inject({ method: method as 'GET', url, payload: body as Record<string, unknown> | undefined, headers: { authorization: `Bearer ${TOKEN}` } });
    return { status: res.statusCode, json: res.body ? (JSON.parse(res.body) as Record<string, unknown>) : {} };
  }
  async function launch(name: string, extra: Record<string, unknown> = {}): Promise<void> {
    const c = await call('POST', '/api/v1/instances', { name, boot: { kind: 'kernel', kernel }, memory: '256M', maxMemory: '1G', vcpus: 1, maxVcpus: 2, start: true, ...extra });
    assert.equal(c.status, 202, JSON.stringify(c.json));
    const op = await ops.wait((c.json.operation as Operation).id, 10_000);
    assert.equal(op.status, 'success', JSON.stringify(op.error));
  }
  const errorOf = (r: { json: Record<string, unknown> }) => r.json.error as { code: string; message: string; details?: Record<string, unknown> };

  it('PATCH says what applied live; the record and GET live follow; the rest waits for the next start', async () => {
    await launch('web1');
    const r = await call('PATCH', '/api/v1/instances/web1', { memory: '512M', vcpus: 2 });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    assert.deepEqual((r.json.applied as string[]).sort(), ['memoryMiB', 'vcpus']);
    assert.deepEqual(r.json.pending, []);
    const inst = r.json.instance as Instance;
    assert.equal(inst.config.memoryMiB, 512);
    assert.equal(inst.config.vcpus, 2);
    assert.equal(driver.vms.get('web1')!.totalMiB, 512);

    const got = await call('GET', '/api/v1/instances/web1');
    const live = got.json.live as VmLiveInfo;
    assert.ok(isVmLiveInfo(live));
    assert.equal(live.memory.dimms.length, 1);
    assert.equal(live.vcpus.present, 2);

    // Above the running ceiling, with a higher ceiling for the next boot: both pending.
    const p = await call('PATCH', '/api/v1/instances/web1', { memory: '1280M', maxMemory: '2G' });
    assert.equal(p.status, 200, JSON.stringify(p.json));
    assert.deepEqual(p.json.applied, []);
    assert.deepEqual((p.json.pending as string[]).sort(), ['maxMemoryMiB', 'memoryMiB']);
    assert.ok((p.json.notes as string[]).some((n) => /above the ceiling the VM was started with \(1GiB\)/.test(n)));
    const pend = (p.json.instance as Instance).pending;
    assert.deepEqual(pend, { memoryMiB: 1280, maxMemoryMiB: 2048 });
    assert.equal((p.json.instance as Instance).config.memoryMiB, 512);

    // Restart: the pending change is what the VM starts with.
    const stop = await call('POST', '/api/v1/instances/web1/stop', {});
    assert.equal((await ops.wait((stop.json.operation as Operation).id, 10_000)).status, 'success');
    const start = await call('POST', '/api/v1/instances/web1/start', {});
    assert.equal((await ops.wait((start.json.operation as Operation).id, 10_000)).status, 'success');
    const after = await svc.get('web1');
    assert.deepEqual(after.pending, {});
    assert.equal(after.config.memoryMiB, 1280);
    assert.equal(after.config.maxMemoryMiB, 2048);
    const last = driver.startedWith.at(-1)!;
    assert.equal(last.memoryMiB, 1280);
    assert.equal(last.maxMemoryMiB, 2048);
    assert.equal(last.vcpus, 2);
  });

  it('bad input: above max-memory, above max-cpus, non-numeric sizes, below the guest minimum', async () => {
    await launch('bad1');
    const above = await call('PATCH', '/api/v1/instances/bad1', { memory: '2G' });
    assert.equal(above.status, 400);
    assert.equal(errorOf(above).code, 'HF_ERR_VALIDATION');
    assert.match(errorOf(above).message, /memory \(2048 MiB\) above maxMemory \(1024 MiB\)/);

    const cpus = await call('PATCH', '/api/v1/instances/bad1', { vcpus: 3 });
    assert.equal(cpus.status, 400);
    assert.match(errorOf(cpus).message, /vcpus \(3\) above maxVcpus \(2\)/);

    const nan = await call('PATCH', '/api/v1/instances/bad1', { memory: 'lots' });
    assert.equal(nan.status, 400);
    assert.equal(errorOf(nan).code, 'HF_ERR_INVALID_SIZE');
    assert.match(errorOf(nan).message, /"lots" is not a size/);

    const frac = await call('PATCH', '/api/v1/instances/bad1', { vcpus: 1.5 });
    assert.equal(frac.status, 400);

    const v = driver.vms.get('bad1')!;
    v.pollInterval = 2;
    v.availableMiB = 100; // the guest uses 156 of 256 MiB: its minimum is 188 MiB
    const low = await call('PATCH', '/api/v1/instances/bad1', { memory: '128M' });
    assert.equal(low.status, 400);
    assert.equal(errorOf(low).code, 'HF_ERR_VALIDATION');
    assert.match(errorOf(low).message, /below the guest's minimum of 188MiB/);
    assert.equal(errorOf(low).details?.minimumMiB, 188);
    // Nothing changed anywhere.
    const inst = await svc.get('bad1');
    assert.equal(inst.config.memoryMiB, 256);
    assert.deepEqual(inst.pending, {});
    assert.equal(v.commands('balloon').length, 0);
  });

  it('more memory than the host has, or can commit next to running instances: HF_ERR_INSUFFICIENT_RESOURCES', async () => {
    await launch('big', { maxMemory: '8G' });
    const r = await call('PATCH', '/api/v1/instances/big', { memory: '6G' });
    assert.equal(r.status, 422);
    assert.equal(errorOf(r).code, 'HF_ERR_INSUFFICIENT_RESOURCES');
    assert.match(errorOf(r).message, /more than the host's 4GiB/);

    await launch('other', { memory: '3G', maxMemory: '3G' });
    const c = await call('PATCH', '/api/v1/instances/big', { memory: '1536M' });
    assert.equal(c.status, 422);
    assert.equal(errorOf(c).code, 'HF_ERR_INSUFFICIENT_RESOURCES');
    assert.match(errorOf(c).message, /would commit 4.5GiB of memory, above the limit of 4GiB/);
    assert.equal(driver.vms.get('big')!.totalMiB, 256);
  });

  it('a change while another operation holds the instance (e.g. a snapshot) past the wait bound is HF_ERR_BUSY', async () => {
    await launch('busy1');
    let release!: () => void;
    const held = svc.withInstance('busy1', 'snapshot', () => new Promise<void>((r) => (release = r)));
    await new Promise((r) => setImmediate(r));
    const r = await call('PATCH', '/api/v1/instances/busy1', { memory: '512M' });
    assert.equal(r.status, 409);
    assert.equal(errorOf(r).code, 'HF_ERR_BUSY');
    assert.match(errorOf(r).message, /busy \(snapshot in progress\)/);
    release();
    await held;
    const ok = await call('PATCH', '/api/v1/instances/busy1', { memory: '512M' });
    assert.equal(ok.status, 200);
    assert.deepEqual(ok.json.applied, ['memoryMiB']);
  });

  it('an emulated-devices VM (no balloon) keeps a shrink pending and says why', async () => {
    await launch('emu1', { devices: 'emulated' });
    driver.vms.get('emu1')!.balloon = 'absent';
    const r = await call('PATCH', '/api/v1/instances/emu1', { memory: '200M' });
    assert.equal(r.status, 200);
    assert.deepEqual(r.json.pending, ['memoryMiB']);
    assert.match((r.json.notes as string[])[0]!, /no balloon device \(devices=emulated\)/);
    assert.deepEqual((r.json.instance as Instance).pending, { memoryMiB: 200 });
  });
});
