// Live memory and vCPU changes on a real tiny VM under TCG, through the CLI and the API:
// 256M / 1 vCPU with ceilings 1G / 2 → 512M and 2 vCPUs live (DIMM + CPU hot-plug, seen by the
// guest), balloon down (the guest's MemTotal drops), bad input, a daemon SIGKILL + restart that
// re-discovers the hot-plugged devices over QMP and keeps changing them, and pending changes
// (fewer vCPUs under TCG, memory above the running ceiling) that `info` shows and the next boot
// applies. Two VM boots.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { ApiError, type ApiClient } from '../../src/cli/client.js';
import { isVmLiveInfo, type VmLiveInfo } from '../../src/core/live-plan.js';
import type { Instance } from '../../src/core/model/instance.js';
import { CLI, consoleRun, getInstance, op, startTestDaemon, stopTestDaemon, useTestDaemon, waitForConsole } from '../helpers/daemon.js';

const NAME = 'lv1';

/** The guest's view: MemTotal (kB) and the online CPU list. */
async function guestView(api: ApiClient): Promise<{ memTotalKiB: number; online: string }> {
  const out = await consoleRun(api, NAME, 'grep MemTotal /proc/meminfo; cat /sys/devices/system/cpu/online');
  const mem = /MemTotal:\s+(\d+) kB/.exec(out);
  const online = /^(\d[\d,-]*)$/m.exec(out);
  assert.ok(mem && online, `unexpected guest output: ${out}`);
  return { memTotalKiB: Number(mem[1]), online: online[1]! };
}

/** Polls the guest until `pred` holds (hot-plugged memory and CPUs are onlined by the guest's hotplug helper). */
async function waitGuest(api: ApiClient, pred: (v: { memTotalKiB: number; online: string }) => boolean, what: string, timeoutMs = 60_000): Promise<{ memTotalKiB: number; online: string }> {
  const deadline = Date.now() + timeoutMs;
  let v = await guestView(api);
  while (!pred(v)) {
    if (Date.now() > deadline) throw new Error(`guest never showed ${what}; last: ${JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 500));
    v = await guestView(api);
  }
  return v;
}

async function live(api: ApiClient): Promise<VmLiveInfo> {
  const r = await api.request<{ instance: Instance; live?: unknown }>('GET', `/api/v1/instances/${NAME}`);
  assert.ok(isVmLiveInfo(r.live), `live info: ${JSON.stringify(r.live)}`);
  return r.live;
}

describe('live memory and vCPU changes on a real VM (TCG)', () => {
  const t = useTestDaemon();
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, ...args], { encoding: 'utf8', timeout: 180_000 });
  let bootView: { memTotalKiB: number; online: string };
  let raised: { memTotalKiB: number; online: string };


  it('launches with ceilings: QEMU has DIMM slots up to max-memory and CPU slots up to max-cpus', async () => {
    const r = cli('launch', 'tiny', NAME, '--memory', '256M', '--max-memory', '1G', '--cpus', '1', '--max-cpus', '2', '--accel', 'tcg');
    assert.equal(r.status, 0, r.stderr);
    await waitForConsole(t.d.api, NAME, /HYPERFOLD-GUEST-READY/, 120_000);
    const l = await live(t.d.api);
    assert.deepEqual({ boot: l.memory.bootMiB, max: l.memory.maxMiB, slots: l.memory.slots, dimms: l.memory.dimms.length }, { boot: 256, max: 1024, slots: 16, dimms: 0 });
    assert.deepEqual({ present: l.vcpus.present, max: l.vcpus.max }, { present: 1, max: 2 });
    bootView = await guestView(t.d.api);
    assert.equal(bootView.online, '0');
  });

  it('raises memory to 512M and vCPUs to 2 live; the guest sees both', async () => {
    const r = cli('config', 'set', NAME, 'memory=512M', 'cpus=2');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /applied now: .*vcpus/);
    assert.match(r.stdout, /applied now: .*memoryMiB/);
    assert.doesNotMatch(r.stdout, /applies at next boot/);
    // 256 MiB more in /proc/meminfo (a DIMM onlined block by block) and CPU 1 online.
    raised = await waitGuest(t.d.api, (v) => v.online === '0-1' && v.memTotalKiB >= bootView.memTotalKiB + 250 * 1024, '512M and CPUs 0-1');
    const l = await live(t.d.api);
    assert.deepEqual(l.memory.dimms.map((x) => ({ id: x.id, slot: x.slot, sizeMiB: x.sizeMiB })), [{ id: 'dimm0', slot: 0, sizeMiB: 256 }]);
    assert.equal(l.memory.totalMiB, 512);
    assert.deepEqual(l.vcpus.hotplugged, ['cpu-s1-c0-t0']);
    const inst = await getInstance(t.d.api, NAME);
    assert.equal(inst.config.memoryMiB, 512);
    assert.equal(inst.config.vcpus, 2);
    assert.deepEqual(inst.pending, {});
  });

  it('lowers memory with the balloon: the guest MemTotal drops; info shows the balloon and its statistics', async () => {
    const res = await t.d.api.request<{ applied: string[]; pending: string[] }>('PATCH', `/api/v1/instances/${NAME}`, { memory: '320M' });
    assert.deepEqual(res.applied, ['memoryMiB']);
    // Linux 6.1's virtio_balloon (QEMU's deflate-on-oom off, the default) takes inflated pages out
    // of the managed page count, so MemTotal itself drops by the balloon size (192 MiB here),
    // not just MemFree / MemAvailable. With deflate-on-oom on it would keep MemTotal.
    const v = await waitGuest(t.d.api, (x) => x.memTotalKiB <= raised.memTotalKiB - 180 * 1024, 'MemTotal 192M lower');
    assert.ok(v.memTotalKiB >= raised.memTotalKiB - 200 * 1024, `dropped by no more than the balloon: ${JSON.stringify(v)}`);
    const l = await live(t.d.api);
    assert.equal(l.balloon.status, 'active');
    assert.equal(l.balloon.actualMiB, 320);
    // The guest reports statistics every 2 s; wait for a report taken after the balloon moved.
    const deadline = Date.now() + 30_000;
    let info = '';
    while (Date.now() < deadline) {
      info = cli('info', NAME).stdout;
      const m = /guest reports total (\d+)MiB/.exec(info);
      if (m && Number(m[1]) < 320) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    const reported = /guest reports total (\d+)MiB/.exec(info);
    assert.ok(reported && Number(reported[1]) < 320, `a statistics report from after the balloon moved (total under 320 MiB):\n${info}`);
    assert.match(info, /Balloon:\s+actual 320MiB; guest reports total \d+MiB, free \d+(\.\d)?MiB, available \d+(\.\d)?MiB/);
    assert.match(info, /DIMM dimm0: 256MiB in slot 0, hot-plugged/);
    assert.match(info, /vCPUs:\s+2 present of 2 \(hot-plugged: cpu-s1-c0-t0\)/);
  });

  it('refuses bad input with named errors and changes nothing', async () => {
    const refuse = async (body: unknown, code: string, re: RegExp) => {
      await assert.rejects(t.d.api.request('PATCH', `/api/v1/instances/${NAME}`, body), (e: ApiError) => {
        assert.equal(e.code, code, e.message);
        assert.match(e.message, re);
        return true;
      });
    };
    await refuse({ memory: '2G' }, 'HF_ERR_VALIDATION', /above maxMemory \(1024 MiB\)/);
    await refuse({ vcpus: 3 }, 'HF_ERR_VALIDATION', /vcpus \(3\) above maxVcpus \(2\)/);
    await refuse({ memory: 'lots' }, 'HF_ERR_INVALID_SIZE', /"lots" is not a size/);
    // The tiny guest uses ~40 MiB plus what its kernel reserved: 96 MiB would starve it.
    await refuse({ memory: '96M' }, 'HF_ERR_VALIDATION', /below the guest's minimum of \d+(\.\d)?MiB \(it uses about/);
    const r = cli('config', 'set', NAME, 'cpus=two');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /HF_ERR_VALIDATION/);
    const inst = await getInstance(t.d.api, NAME);
    assert.equal(inst.config.memoryMiB, 320);
    assert.deepEqual(inst.pending, {});
    assert.equal((await live(t.d.api)).balloon.actualMiB, 320);
  });

  it('after a daemon SIGKILL + restart, re-discovers the DIMM, the vCPU and the balloon over QMP and keeps changing them', async () => {
    await stopTestDaemon(t.d, 'SIGKILL');
    t.d = await startTestDaemon(t.dataDir);
    const l = await live(t.d.api);
    assert.deepEqual(l.memory.dimms.map((x) => ({ id: x.id, slot: x.slot, sizeMiB: x.sizeMiB })), [{ id: 'dimm0', slot: 0, sizeMiB: 256 }]);
    assert.deepEqual(l.vcpus.hotplugged, ['cpu-s1-c0-t0']);
    assert.equal(l.balloon.actualMiB, 320);

    // More memory: a second DIMM in the next free slot, the balloon deflated to the new total.
    // One vCPU fewer: under TCG that waits for the next boot (QEMU 7.2 corrupts itself on a TCG
    // vCPU unplug, see core/live-plan.ts), and the answer says so.
    const res = await t.d.api.request<{ applied: string[]; pending: string[]; notes: string[] }>('PATCH', `/api/v1/instances/${NAME}`, { memory: '640M', vcpus: 1 });
    assert.deepEqual(res.applied, ['memoryMiB'], res.notes.join('; '));
    assert.deepEqual(res.pending, ['vcpus']);
    assert.match(res.notes.join('\n'), /vCPUs are not unplugged live under TCG/);
    const v = await waitGuest(t.d.api, (x) => x.memTotalKiB >= raised.memTotalKiB + 120 * 1024, '640M');
    assert.equal(v.online, '0-1');
    const after = await live(t.d.api);
    assert.deepEqual(after.memory.dimms.map((x) => [x.id, x.slot, x.sizeMiB]), [['dimm0', 0, 256], ['dimm1', 1, 128]]);
    assert.equal(after.balloon.actualMiB, 640);
    assert.equal(after.vcpus.present, 2);
    const inst = await getInstance(t.d.api, NAME);
    assert.equal(inst.config.memoryMiB, 640);
    assert.deepEqual(inst.pending, { vcpus: 1 });
  });

  it('keeps a change above the running ceiling pending, shows it in info, and applies it at the next boot', async () => {
    const r = cli('config', 'set', NAME, 'max-memory=2G', 'memory=1280M');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /applies at next boot: memoryMiB, maxMemoryMiB/);
    assert.match(r.stdout, /note: memory: 1.3GiB is above the ceiling the VM was started with \(1GiB\)/);
    const info = cli('info', NAME).stdout;
    assert.match(info, /Pending \(applies at next boot\):\n\s+vcpus = 1\n\s+memoryMiB = 1280\n\s+maxMemoryMiB = 2048/);
    assert.match(info, /Memory:\s+640MiB \(max 1GiB\)/);

    // A line in the console log before the restart, so that the next ready marker is recognisable.
    await consoleRun(t.d.api, NAME, 'echo BEFORE-RESTART-$((40+2))');
    const restarted = await op(t.d.api, 'POST', `/api/v1/instances/${NAME}/restart`, { timeout: 60 });
    assert.equal(restarted.status, 'success', JSON.stringify(restarted.error));
    const inst = await getInstance(t.d.api, NAME);
    assert.deepEqual(inst.pending, {});
    assert.equal(inst.config.memoryMiB, 1280);
    assert.equal(inst.config.maxMemoryMiB, 2048);
    assert.equal(inst.config.vcpus, 1);
    const l = await live(t.d.api);
    assert.deepEqual({ boot: l.memory.bootMiB, max: l.memory.maxMiB, dimms: l.memory.dimms.length, cpus: l.vcpus.present }, { boot: 1280, max: 2048, dimms: 0, cpus: 1 });
    await waitForConsole(t.d.api, NAME, /BEFORE-RESTART-42[\s\S]*HYPERFOLD-GUEST-READY/, 120_000);
    const v = await guestView(t.d.api);
    assert.ok(v.memTotalKiB > 1100 * 1024, `the guest booted with 1280M: ${JSON.stringify(v)}`);
    assert.equal(v.online, '0');
    assert.doesNotMatch(cli('info', NAME).stdout, /Pending/);
  });
});
