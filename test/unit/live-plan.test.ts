// The live-change planner (core/live-plan.ts): given the config, the change and what QEMU
// reports, which steps run (DIMM at slot, balloon target, CPU at socket) and what waits for the
// next boot.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { isHfError } from '../../src/core/errors.js';
import {
  formatVmLiveInfo,
  guestMinimumMiB,
  isVmLiveInfo,
  planLiveChange,
  type CpuSlot,
  type LiveVmState,
  type VmLiveInfo,
} from '../../src/core/live-plan.js';
import type { InstanceConfig } from '../../src/core/model/instance.js';
import { vmConfig } from '../helpers/fixtures.js';

const config: InstanceConfig = vmConfig();

const cpu = (socket: number, present: boolean): CpuSlot => ({
  type: 'max-x86_64-cpu',
  props: { 'node-id': 0, 'socket-id': socket, 'core-id': 0, 'thread-id': 0 },
  ...(present ? { qomPath: socket === 0 ? '/machine/unattached/device[0]' : `/machine/peripheral/cpu-s${socket}-c0-t0` } : {}),
});

function state(over: Partial<LiveVmState> = {}): LiveVmState {
  return {
    bootMemoryMiB: 256,
    maxMemoryMiB: 1024,
    memorySlots: 16,
    dimms: [],
    balloon: { status: 'active', actualMiB: 256 },
    // QEMU lists hot-pluggable CPUs highest socket first.
    cpuSlots: [cpu(1, false), cpu(0, true)],
    accel: 'kvm',
    takenIds: [],
    ...over,
  };
}

function refusal(code: string, re: RegExp): (e: unknown) => boolean {
  return (e) => {
    assert.ok(isHfError(e), `an HfError, got ${String(e)}`);
    assert.equal(e.code, code);
    assert.match(e.message, re);
    return true;
  };
}

describe('live plan: memory', () => {
  it('grows by hot-plugging one DIMM of the difference at the first free slot', () => {
    const p = planLiveChange(config, { memoryMiB: 512 }, state());
    assert.deepEqual(p.steps, [{ kind: 'dimm-add', field: 'memoryMiB', memdev: 'mem-dimm0', id: 'dimm0', slot: 0, sizeMiB: 256 }]);
    assert.deepEqual(p.applied, ['memoryMiB']);
    assert.deepEqual(p.pending, []);
  });

  it('rounds a DIMM up to 128 MiB and trims the rest with the balloon', () => {
    const p = planLiveChange(config, { memoryMiB: 300 }, state());
    assert.deepEqual(p.steps, [
      { kind: 'dimm-add', field: 'memoryMiB', memdev: 'mem-dimm0', id: 'dimm0', slot: 0, sizeMiB: 128 },
      { kind: 'balloon', field: 'memoryMiB', targetMiB: 300 },
    ]);
  });

  it('uses the next free slot and ids nobody holds (re-discovered DIMMs, leftover objects)', () => {
    const s = state({
      dimms: [{ id: 'dimm0', memdev: 'mem-dimm0', slot: 0, sizeMiB: 256, hotplugged: true }],
      balloon: { status: 'active', actualMiB: 512 },
      takenIds: ['dimm0', 'mem-dimm0', 'mem-dimm1'],
    });
    const p = planLiveChange({ ...config, memoryMiB: 512 }, { memoryMiB: 640 }, s);
    assert.deepEqual(p.steps, [{ kind: 'dimm-add', field: 'memoryMiB', memdev: 'mem-dimm1-2', id: 'dimm1', slot: 1, sizeMiB: 128 }]);
  });

  it('deflates an inflated balloon after the DIMM so the guest ends at the target', () => {
    const p = planLiveChange(config, { memoryMiB: 400 }, state({ balloon: { status: 'active', actualMiB: 200 } }));
    assert.deepEqual(
      p.steps.map((s) => (s.kind === 'dimm-add' ? `dimm ${s.sizeMiB}` : s.kind === 'balloon' ? `balloon ${s.targetMiB}` : s.kind)),
      ['dimm 256', 'balloon 400'],
    );
  });

  it('grows within what the VM has through the balloon only', () => {
    const p = planLiveChange(config, { memoryMiB: 256 }, state({ balloon: { status: 'active', actualMiB: 200 } }));
    assert.deepEqual(p.steps, [{ kind: 'balloon', field: 'memoryMiB', targetMiB: 256 }]);
    assert.deepEqual(p.applied, ['memoryMiB']);
  });

  it('shrinks with the balloon', () => {
    const s = state({ dimms: [{ id: 'dimm0', memdev: 'mem-dimm0', slot: 0, sizeMiB: 256, hotplugged: true }], balloon: { status: 'active', actualMiB: 512, guestAvailableMiB: 380 } });
    const p = planLiveChange({ ...config, memoryMiB: 512 }, { memoryMiB: 320 }, s);
    assert.deepEqual(p.steps, [{ kind: 'balloon', field: 'memoryMiB', targetMiB: 320 }]);
  });

  it('refuses to shrink below what the guest uses now plus headroom', () => {
    // 512 MiB, 100 available: the guest uses 412 MiB, so its minimum is 444 MiB.
    const s = state({ dimms: [{ id: 'dimm0', memdev: 'mem-dimm0', slot: 0, sizeMiB: 256, hotplugged: true }], balloon: { status: 'active', actualMiB: 512, guestAvailableMiB: 100 } });
    assert.equal(guestMinimumMiB(s), 444);
    assert.throws(() => planLiveChange(config, { memoryMiB: 320 }, s), (e: unknown) => {
      refusal('HF_ERR_VALIDATION', /below the guest's minimum of 444MiB/)(e);
      assert.equal((e as { details: { minimumMiB: number } }).details.minimumMiB, 444);
      return true;
    });
    // The same target is fine when the guest has room.
    assert.equal(planLiveChange(config, { memoryMiB: 450 }, s).steps.length, 1);
  });

  it('refuses a balloon target below the absolute floor when the guest reports nothing', () => {
    assert.throws(() => planLiveChange(config, { memoryMiB: 48 }, state()), refusal('HF_ERR_VALIDATION', /below the guest's minimum of 64MiB/));
  });

  it('keeps growth pending on a VM started without a memory ceiling', () => {
    const p = planLiveChange({ ...config, maxMemoryMiB: undefined }, { memoryMiB: 512 }, state({ maxMemoryMiB: 256, memorySlots: 0 }));
    assert.deepEqual(p.steps, []);
    assert.deepEqual(p.pending, ['memoryMiB']);
    assert.match(p.notes[0]!, /without a memory ceiling .*applies at next boot/);
  });

  it('keeps growth above the running ceiling pending (a raised max-memory waits for the next boot)', () => {
    const p = planLiveChange(config, { memoryMiB: 1280, maxMemoryMiB: 2048 }, state());
    assert.deepEqual(p.steps, []);
    assert.deepEqual(p.pending.sort(), ['maxMemoryMiB', 'memoryMiB']);
    assert.ok(p.notes.some((n) => /above the ceiling the VM was started with \(1GiB\)/.test(n)), p.notes.join('\n'));
    assert.ok(p.notes.some((n) => /maxMemoryMiB: the memory ceiling is fixed when QEMU starts/.test(n)));
  });

  it('keeps growth pending when every DIMM slot is used', () => {
    const dimms = Array.from({ length: 4 }, (_, i) => ({ id: `dimm${i}`, memdev: `mem-dimm${i}`, slot: i, sizeMiB: 128, hotplugged: true }));
    const p = planLiveChange(config, { memoryMiB: 1024 }, state({ memorySlots: 4, dimms, balloon: { status: 'active', actualMiB: 768 } }));
    assert.deepEqual(p.pending, ['memoryMiB']);
    assert.match(p.notes[0]!, /all 4 DIMM slots are in use/);
  });

  it('keeps growth pending when the 128 MiB-rounded DIMM does not fit under the ceiling', () => {
    const p = planLiveChange(config, { memoryMiB: 1000 }, state({ maxMemoryMiB: 1000 }));
    assert.deepEqual(p.pending, ['memoryMiB']);
    assert.match(p.notes[0]!, /128 MiB steps/);
  });

  it('without a balloon device: shrink and unaligned growth are pending, aligned growth is live', () => {
    const s = state({ balloon: { status: 'absent' } });
    const down = planLiveChange(config, { memoryMiB: 200 }, s);
    assert.deepEqual(down.pending, ['memoryMiB']);
    assert.match(down.notes[0]!, /no balloon device \(devices=emulated\)/);
    const odd = planLiveChange(config, { memoryMiB: 300 }, s);
    assert.deepEqual(odd.pending, ['memoryMiB']);
    assert.match(odd.notes[0]!, /ask for 384MiB/);
    const even = planLiveChange(config, { memoryMiB: 384 }, s);
    assert.deepEqual(even.applied, ['memoryMiB']);
    assert.deepEqual(even.steps.map((x) => x.kind), ['dimm-add']);
  });

  it('with a balloon the guest has not activated: shrinking is refused naming the driver', () => {
    const s = state({ balloon: { status: 'inactive', actualMiB: 256 } });
    assert.throws(() => planLiveChange(config, { memoryMiB: 200 }, s), (e: unknown) => {
      refusal('HF_ERR_UNSUPPORTED', /virtio balloon driver \(virtio_balloon module not loaded\?\)/)(e);
      assert.equal((e as { details: { cause: string } }).details.cause, 'balloon-driver-inactive');
      return true;
    });
    // Aligned growth needs no balloon.
    assert.deepEqual(planLiveChange(config, { memoryMiB: 384 }, s).steps.map((x) => x.kind), ['dimm-add']);
  });

  it('does nothing when the guest already has the requested memory', () => {
    const p = planLiveChange(config, { memoryMiB: 256 }, state());
    assert.deepEqual(p.steps, []);
    assert.deepEqual(p.applied, ['memoryMiB']);
  });
});

describe('live plan: vCPUs', () => {
  it('hot-plugs the CPU type QEMU lists at the lowest free socket', () => {
    const p = planLiveChange(config, { vcpus: 2 }, state());
    assert.deepEqual(p.steps, [
      { kind: 'cpu-add', field: 'vcpus', driver: 'max-x86_64-cpu', id: 'cpu-s1-c0-t0', props: { 'node-id': 0, 'socket-id': 1, 'core-id': 0, 'thread-id': 0 } },
    ]);
    assert.deepEqual(p.applied, ['vcpus']);
  });

  it('fills sockets in order whatever order QEMU lists them in', () => {
    const s = state({ cpuSlots: [cpu(3, false), cpu(2, false), cpu(1, false), cpu(0, true)] });
    const p = planLiveChange({ ...config, maxVcpus: 4 }, { vcpus: 3 }, s);
    assert.deepEqual(p.steps.map((x) => (x.kind === 'cpu-add' ? x.props['socket-id'] : -1)), [1, 2]);
  });

  it('unplugs from the highest socket down and never the boot CPU', () => {
    const s = state({ cpuSlots: [cpu(3, false), cpu(2, true), cpu(1, true), cpu(0, true)] });
    const p = planLiveChange({ ...config, vcpus: 3, maxVcpus: 4 }, { vcpus: 1 }, s);
    assert.deepEqual(p.steps.map((x) => (x.kind === 'cpu-del' ? x.qomPath : x.kind)), ['/machine/peripheral/cpu-s2-c0-t0', '/machine/peripheral/cpu-s1-c0-t0']);
  });

  it('under TCG keeps fewer vCPUs pending instead of unplugging (QEMU 7.2 TCG unplug breaks later hot-plugs)', () => {
    const s = state({ accel: 'tcg', cpuSlots: [cpu(1, true), cpu(0, true)] });
    const p = planLiveChange({ ...config, vcpus: 2 }, { vcpus: 1 }, s);
    assert.deepEqual(p.steps, []);
    assert.deepEqual(p.pending, ['vcpus']);
    assert.match(p.notes[0]!, /not unplugged live under TCG.*1 vCPUs apply at next boot/);
    // Adding under TCG is fine.
    assert.deepEqual(planLiveChange(config, { vcpus: 2 }, state({ accel: 'tcg' })).applied, ['vcpus']);
  });

  it('keeps vCPUs above the slots QEMU has pending', () => {
    const p = planLiveChange(config, { vcpus: 3, maxVcpus: 3 }, state());
    assert.deepEqual(p.steps, []);
    assert.deepEqual(p.pending.sort(), ['maxVcpus', 'vcpus']);
    assert.ok(p.notes.some((n) => /3 is above the 2 vCPU slots/.test(n)), p.notes.join('\n'));
  });

  it('on a VM without spare slots, more vCPUs wait for the next boot', () => {
    const p = planLiveChange({ ...config, maxVcpus: undefined }, { vcpus: 2 }, state({ cpuSlots: [cpu(0, true)] }));
    assert.deepEqual(p.pending, ['vcpus']);
    assert.match(p.notes[0]!, /started without room for more vCPUs/);
  });
});

describe('live plan: other fields', () => {
  it('plans memory and vCPUs together; boot-time fields are pending unless unchanged', () => {
    const p = planLiveChange(config, { memoryMiB: 512, vcpus: 2, devices: 'emulated', accel: 'tcg', pidsLimit: 10 }, state());
    assert.deepEqual(p.steps.map((s) => s.kind), ['dimm-add', 'cpu-add']);
    assert.deepEqual(p.applied.sort(), ['accel', 'memoryMiB', 'pidsLimit', 'vcpus']);
    assert.deepEqual(p.pending, ['devices']);
    assert.ok(p.notes.some((n) => /devices: the device model .*applies at next boot/.test(n)));
    assert.ok(p.notes.some((n) => /pidsLimit has no effect on a VM/.test(n)));
  });
});

describe('live info formatting', () => {
  const info: VmLiveInfo = {
    kind: 'qemu',
    memory: { bootMiB: 256, pluggedMiB: 256, totalMiB: 512, maxMiB: 1024, slots: 16, dimms: [{ id: 'dimm0', memdev: 'mem-dimm0', slot: 0, sizeMiB: 256, hotplugged: true }] },
    balloon: { status: 'active', actualMiB: 320, stats: { totalMiB: 182, freeMiB: 140, availableMiB: 145, diskCachesMiB: 8, majorFaults: 0, updatedAt: new Date(1_000_000).toISOString() } },
    vcpus: { present: 2, max: 2, hotplugged: ['cpu-s1-c0-t0'], threadIds: [1, 2] },
  };

  it('recognises VM live info and renders memory, DIMMs, balloon statistics and vCPUs', () => {
    assert.ok(isVmLiveInfo(info));
    assert.ok(!isVmLiveInfo({ cgroup: {} }));
    assert.ok(!isVmLiveInfo(undefined));
    const text = formatVmLiveInfo(info, 1_004_000).join('\n');
    assert.match(text, /Memory:\s+512MiB \(boot 256MiB \+ 1 DIMM 256MiB; max 1GiB, 15 of 16 DIMM slots free\)/);
    assert.match(text, /DIMM dimm0: 256MiB in slot 0, hot-plugged/);
    assert.match(text, /Balloon:\s+actual 320MiB; guest reports total 182MiB, free 140MiB, available 145MiB, caches 8MiB, major faults 0 \(4 s ago\)/);
    assert.match(text, /vCPUs:\s+2 present of 2 \(hot-plugged: cpu-s1-c0-t0\)/);
  });

  it('names an inactive balloon driver and a missing balloon', () => {
    assert.match(formatVmLiveInfo({ ...info, balloon: { status: 'inactive', actualMiB: 256 } }).join('\n'), /inactive: the guest has not loaded its virtio_balloon driver/);
    assert.match(formatVmLiveInfo({ ...info, balloon: { status: 'absent' } }).join('\n'), /Balloon:\s+none/);
  });
});
