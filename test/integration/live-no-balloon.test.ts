// Live changes on real VMs (TCG) that cannot use the balloon: a guest that never loads its
// virtio_balloon driver (blacklisted on the kernel command line) gets a clear error naming the
// cause, and an emulated-devices VM (no balloon device at all) keeps the change pending; a change
// while a stop holds the VM waits for it. Two VM boots (the second one is stopped early).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { ApiError } from '../../src/cli/client.js';
import { isVmLiveInfo, type VmLiveInfo } from '../../src/core/live-plan.js';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import { CLI, getInstance, useTestDaemon, waitForConsole } from '../helpers/daemon.js';

describe('live changes without a working balloon (TCG)', () => {
  const t = useTestDaemon();
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, ...args], { encoding: 'utf8', timeout: 120_000 });
  const live = async (name: string): Promise<VmLiveInfo> => {
    const r = await t.d.api.request<{ instance: Instance; live?: unknown }>('GET', `/api/v1/instances/${name}`);
    assert.ok(isVmLiveInfo(r.live), JSON.stringify(r.live));
    return r.live;
  };
  const patch = (name: string, body: unknown) => t.d.api.request<{ instance: Instance; applied: string[]; pending: string[]; notes: string[] }>('PATCH', `/api/v1/instances/${name}`, body);


  it('a guest without the virtio_balloon driver: shrinking is refused naming the cause, DIMM growth still works', async () => {
    const img = join(t.dataDir, 'images', 'tiny');
    const res = await t.d.api.request<{ operation: Operation }>('POST', '/api/v1/instances', {
      name: 'nob1',
      image: 'tiny',
      memory: '256M',
      maxMemory: '1G',
      accel: 'tcg',
      start: true,
      // module_blacklist makes the guest's insmod of virtio_balloon fail: the device is there,
      // the driver never takes it.
      boot: { kind: 'kernel', kernel: join(img, 'vmlinuz'), initrd: join(img, 'initrd.img'), cmdline: 'console=ttyS0 quiet panic=-1 module_blacklist=virtio_balloon' },
    });
    assert.equal((await t.d.api.waitOperation(res.operation.id)).status, 'success');
    await waitForConsole(t.d.api, 'nob1', /HYPERFOLD-GUEST-READY/, 120_000);

    assert.equal((await live('nob1')).balloon.status, 'inactive');
    await assert.rejects(patch('nob1', { memory: '200M' }), (e: ApiError) => {
      assert.equal(e.code, 'HF_ERR_UNSUPPORTED');
      assert.equal(e.status, 422);
      assert.match(e.message, /the guest has not activated its virtio balloon driver \(virtio_balloon module not loaded\?\)/);
      return true;
    });
    // An unaligned growth needs the balloon to trim the DIMM: refused the same way.
    await assert.rejects(patch('nob1', { memory: '300M' }), (e: ApiError) => e.code === 'HF_ERR_UNSUPPORTED');
    // A whole 128 MiB DIMM needs no balloon.
    const ok = await patch('nob1', { memory: '384M' });
    assert.deepEqual(ok.applied, ['memoryMiB']);
    assert.deepEqual((await live('nob1')).memory.dimms.map((x) => x.sizeMiB), [128]);
    const info = cli('info', 'nob1');
    assert.equal(info.status, 0, info.stderr);
    assert.match(info.stdout, /Balloon:\s+inactive: the guest has not loaded its virtio_balloon driver/);
    const inst = await getInstance(t.d.api, 'nob1');
    assert.equal(inst.config.memoryMiB, 384);
    assert.deepEqual(inst.pending, {});
    // Done with it: free the CPU for the next VM.
    const { operation } = await t.d.api.request<{ operation: Operation }>('POST', '/api/v1/instances/nob1/stop', { force: true });
    assert.equal((await t.d.api.waitOperation(operation.id)).status, 'success');
  });

  it('an emulated-devices VM has no balloon: a shrink is pending with the reason; a change during a stop waits for it', async () => {
    const res = await t.d.api.request<{ operation: Operation }>('POST', '/api/v1/instances', { name: 'emu1', image: 'tiny', memory: '256M', devices: 'emulated', accel: 'tcg', start: true });
    assert.equal((await t.d.api.waitOperation(res.operation.id)).status, 'success');
    // No need to wait for the guest: the device model alone decides.
    assert.equal((await live('emu1')).balloon.status, 'absent');
    const r = cli('config', 'set', 'emu1', 'memory=200M');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /applies at next boot: memoryMiB/);
    assert.match(r.stdout, /note: memory: this VM has no balloon device \(devices=emulated\)/);
    assert.deepEqual((await getInstance(t.d.api, 'emu1')).pending, { memoryMiB: 200 });
    // The VM was started without max-memory: growth waits for the next boot too.
    const grow = await patch('emu1', { memory: '512M' });
    assert.deepEqual(grow.pending, ['memoryMiB']);
    assert.match(grow.notes.join('\n'), /started without a memory ceiling/);

    // A graceful stop holds the instance while the guest (still booting, its ACPI daemon not up)
    // takes its time; a change meanwhile waits its turn (within the daemon's bound) and then
    // applies to the stopped VM.
    const stop = await t.d.api.request<{ operation: Operation }>('POST', '/api/v1/instances/emu1/stop', { timeout: 5 });
    const deadline = Date.now() + 30_000;
    while ((await getInstance(t.d.api, 'emu1')).state === 'running' && Date.now() < deadline) await new Promise((res2) => setImmediate(res2));
    const during = await patch('emu1', { memory: '384M' });
    assert.equal((await t.d.api.waitOperation(stop.operation.id)).status, 'success');
    assert.deepEqual(during.applied, ['memoryMiB'], 'applied once the stop was done');
    const inst = await getInstance(t.d.api, 'emu1');
    assert.equal(inst.state, 'stopped');
    assert.equal(inst.config.memoryMiB, 384);
    assert.deepEqual(inst.pending, {});
  });
});
