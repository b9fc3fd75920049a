// The real accelerator probe on this host. KVM may be broken here (nested virtualization): the
// probe must then say so within its deadline and leave no QEMU behind.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { probeAccelerators, runProbeGuest, PROBE_EXIT_STATUS, type AccelName } from '../../src/drivers/qemu/accel.js';

const QEMU = process.env.HF_QEMU_BINARY ?? 'qemu-system-x86_64';
const haveQemu = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0;

function processGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

describe('accelerator probe (real QEMU)', { skip: haveQemu ? false : `${QEMU} not installed` }, () => {
  it('the probe guest runs under TCG and exits 99', async () => {
    const run = await runProbeGuest(QEMU, 'tcg', 5000);
    assert.equal(run.outcome, 'ran', JSON.stringify(run));
    assert.equal(run.exitCode, PROBE_EXIT_STATUS);
    assert.equal(run.exitCode, 99);
    assert.equal(run.progress, 'REPGL', 'it went real mode -> protected mode -> paging -> long mode');
    assert.ok(run.pid !== undefined && processGone(run.pid));
    console.log(`# TCG probe guest: ${run.durationMs} ms`);
  });

  it('probeAccelerators gives a verdict within deadline + 2 s and leaves no QEMU behind', async () => {
    const deadlineMs = 3000;
    const pids: Array<{ pid: number; accel: AccelName }> = [];
    const t0 = performance.now();
    const v = await probeAccelerators({ qemuBinary: QEMU, deadlineMs, onSpawn: (pid, accel) => pids.push({ pid, accel }) });
    const elapsed = performance.now() - t0;
    console.log(`# verdict after ${Math.round(elapsed)} ms: ${JSON.stringify(v)}`);

    assert.ok(elapsed < deadlineMs + 2000, `probe took ${Math.round(elapsed)} ms`);
    assert.equal(v.tcg.usable, true, v.tcg.reason);
    assert.equal(v.tcg.reason, 'probe guest ran under TCG');
    assert.match(v.qemuVersion ?? '', /^\d+\.\d+/);
    assert.ok(!Number.isNaN(Date.parse(v.kvm.probedAt)));

    if (!existsSync('/dev/kvm')) {
      assert.equal(v.kvm.usable, false);
      assert.equal(v.kvm.reason, '/dev/kvm missing');
    } else if (v.kvm.usable) {
      assert.equal(v.kvm.reason, 'probe guest ran under KVM');
      assert.ok(v.kvm.durationMs < deadlineMs);
    } else {
      assert.match(v.kvm.reason, /^(KVM guest did not run the probe within 3000 ms \(nested virtualization not working\?\)|\/dev\/kvm not accessible|QEMU exited with status)/);
      if (v.kvm.reason.startsWith('KVM guest did not run')) {
        assert.ok(v.kvm.durationMs >= deadlineMs && v.kvm.durationMs < deadlineMs + 2000, `KVM probe took ${v.kvm.durationMs} ms`);
      }
    }

    assert.ok(pids.some((p) => p.accel === 'tcg'));
    if (existsSync('/dev/kvm')) assert.ok(pids.some((p) => p.accel === 'kvm'));
    for (const { pid, accel } of pids) assert.ok(processGone(pid), `${accel} probe process ${pid} is still there`);
  });
});
