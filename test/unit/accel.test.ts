import { afterEach, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import {
  loadOrProbe,
  probeAccelerators,
  probeArgv,
  probeFirmwareImage,
  resolveAccel,
  sameCacheKey,
  type AccelCacheKey,
  type AccelVerdict,
  type ProbeOptions,
} from '../../src/drivers/qemu/accel.js';

function verdict(kvm: boolean, tcg = true): AccelVerdict {
  return {
    kvm: { usable: kvm, reason: kvm ? 'probe guest ran under KVM' : 'KVM guest did not run the probe within 3000 ms (nested virtualization not working?)', probedAt: '2025-01-01T00:00:00.000Z', durationMs: kvm ? 40 : 3001 },
    tcg: { usable: tcg, reason: tcg ? 'probe guest ran under TCG' : 'could not run QEMU: spawn ENOENT' },
    qemuVersion: '7.2.22',
  };
}

describe('resolveAccel', () => {
  it('auto picks KVM when usable, else TCG', () => {
    assert.equal(resolveAccel('auto', verdict(true)), 'kvm');
    assert.equal(resolveAccel('auto', verdict(false)), 'tcg');
  });
  it('tcg is always tcg when TCG works, even with KVM usable', () => {
    assert.equal(resolveAccel('tcg', verdict(true)), 'tcg');
    assert.equal(resolveAccel('tcg', verdict(false)), 'tcg');
  });
  it('kvm works when KVM is usable', () => {
    assert.equal(resolveAccel('kvm', verdict(true)), 'kvm');
  });
  it('kvm throws HF_ERR_ACCEL_UNAVAILABLE with the probe reason when it is not', () => {
    assert.throws(
      () => resolveAccel('kvm', verdict(false)),
      (e: unknown) => {
        assert.ok(isHfError(e, 'HF_ERR_ACCEL_UNAVAILABLE'));
        assert.equal(e.message, 'KVM is not usable on this host: KVM guest did not run the probe within 3000 ms (nested virtualization not working?)');
        assert.equal(e.status, 422);
        return true;
      },
    );
  });
  it('throws when nothing is usable', () => {
    assert.throws(() => resolveAccel('auto', verdict(false, false)), (e: unknown) => isHfError(e, 'HF_ERR_ACCEL_UNAVAILABLE') && /no accelerator is usable/.test(e.message));
    assert.throws(() => resolveAccel('tcg', verdict(true, false)), (e: unknown) => isHfError(e, 'HF_ERR_ACCEL_UNAVAILABLE') && /^TCG is not usable/.test(e.message));
  });
});

describe('probe image', () => {
  it('is 64 KiB with a far jump at the reset vector', () => {
    const img = probeFirmwareImage();
    assert.equal(img.length, 0x10000);
    assert.deepEqual([...img.subarray(0xfff0, 0xfff5)], [0xea, 0x00, 0x00, 0x00, 0xf0]); // ljmp $0xf000,$0
    assert.equal(img[0], 0xfa); // cli
    // out %al,$0xf4 with al=0x31 (isa-debug-exit -> status 99) is in there
    assert.ok(img.includes(Buffer.from([0xb0, 0x31, 0xe6, 0xf4])));
  });
  it('is exactly the image assembled from the listing in accel.ts', () => {
    // Re-assemble the listing and update this hash when changing the probe on purpose; the real
    // check is test/integration/accel-probe.test.ts (it must exit 99 under TCG).
    assert.equal(createHash('sha256').update(probeFirmwareImage()).digest('hex'), '549fef3ea6f772f9a8eee4cca328586977192ecd865bbadcc4139aef7222e969');
  });
  it('argv uses the requested accelerator and the debug-exit device', () => {
    const a = probeArgv('kvm', '/tmp/p.bin', '/tmp/pr,og');
    assert.ok(a.includes('pc,accel=kvm'));
    assert.ok(a.includes('host'));
    assert.ok(a.includes('isa-debug-exit,iobase=0xf4,iosize=0x04'));
    assert.ok(a.includes('file,id=progress,path=/tmp/pr,,og'));
    assert.ok(probeArgv('tcg', '/p', '/q').includes('pc,accel=tcg'));
  });
});

describe('probeAccelerators without a usable QEMU or /dev/kvm', () => {
  it('reports both unusable with reasons, quickly', async () => {
    const t0 = Date.now();
    const v = await probeAccelerators({ qemuBinary: '/nonexistent/qemu-system-x86_64', kvmDevice: '/nonexistent/kvm', deadlineMs: 1000 });
    assert.equal(v.tcg.usable, false);
    assert.match(v.tcg.reason, /^could not run QEMU: .*ENOENT/);
    assert.equal(v.kvm.usable, false);
    assert.equal(v.kvm.reason, '/nonexistent/kvm missing');
    assert.equal(v.qemuVersion, undefined);
    assert.ok(Date.now() - t0 < 1000);
  });
});

describe('sameCacheKey', () => {
  const k: AccelCacheKey = { qemuBinary: '/usr/bin/qemu-system-x86_64', qemuVersion: '7.2.22', kernelRelease: '6.1.0-1', kvmDevicePresent: true };
  it('matches only when every part matches', () => {
    assert.ok(sameCacheKey(k, { ...k }));
    assert.ok(!sameCacheKey(k, { ...k, qemuVersion: '8.0.0' }));
    assert.ok(!sameCacheKey(k, { ...k, kernelRelease: '6.1.0-2' }));
    assert.ok(!sameCacheKey(k, { ...k, qemuBinary: '/opt/qemu' }));
    assert.ok(!sameCacheKey(k, { ...k, kvmDevicePresent: false }));
  });
});

describe('loadOrProbe', () => {
  let dir: string;
  let cacheFile: string;
  let key: AccelCacheKey | undefined;
  let probes: number;
  let next: AccelVerdict;
  const opts = (extra: { force?: boolean } = {}) => ({
    qemuBinary: '/usr/bin/qemu-system-x86_64',
    ...extra,
    hostKey: async (): Promise<AccelCacheKey | undefined> => key,
    prober: async (o: ProbeOptions): Promise<AccelVerdict> => {
      assert.equal(o.qemuBinary, '/usr/bin/qemu-system-x86_64');
      assert.ok(!('prober' in o) && !('force' in o), 'probe options do not leak cache options');
      assert.equal(o.workDir, path.dirname(cacheFile), 'the probe works next to the cache file');
      probes++;
      return next;
    },
  });

  beforeEach(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'hf-accel-cache-'));
    cacheFile = path.join(dir, 'sub', 'accel.json');
    key = { qemuBinary: '/usr/bin/qemu-system-x86_64', qemuVersion: '7.2.22', kernelRelease: '6.1.0-1', kvmDevicePresent: true };
    probes = 0;
    next = verdict(false);
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("removes the scratch directory a probe killed mid-way left, before probing again", async () => {
    const stale = path.join(dir, 'sub', 'hf-accel-probe-abc123');
    await mkdir(stale, { recursive: true });
    await writeFile(path.join(stale, 'probe.bin'), 'x');
    await loadOrProbe(cacheFile, opts());
    assert.equal(probes, 1);
    await assert.rejects(stat(stale), /ENOENT/);
  });

  it('probes once, then serves the cache', async () => {
    assert.deepEqual(await loadOrProbe(cacheFile, opts()), next);
    assert.equal(probes, 1);
    const stored = JSON.parse(await readFile(cacheFile, 'utf8')) as { schema: number; key: AccelCacheKey; verdict: AccelVerdict };
    assert.equal(stored.schema, 1);
    assert.deepEqual(stored.key, key);
    assert.deepEqual(stored.verdict, next);
    next = verdict(true);
    assert.deepEqual(await loadOrProbe(cacheFile, opts()), verdict(false));
    assert.equal(probes, 1);
  });
  it('re-probes when the QEMU version changes', async () => {
    await loadOrProbe(cacheFile, opts());
    key = { ...key!, qemuVersion: '8.2.0' };
    next = verdict(true);
    assert.equal((await loadOrProbe(cacheFile, opts())).kvm.usable, true);
    assert.equal(probes, 2);
  });
  it('re-probes when the kernel release changes', async () => {
    await loadOrProbe(cacheFile, opts());
    key = { ...key!, kernelRelease: '6.1.0-2' };
    await loadOrProbe(cacheFile, opts());
    assert.equal(probes, 2);
    await loadOrProbe(cacheFile, opts());
    assert.equal(probes, 2);
  });
  it('re-probes when forced', async () => {
    await loadOrProbe(cacheFile, opts());
    await loadOrProbe(cacheFile, opts({ force: true }));
    assert.equal(probes, 2);
  });
  it('re-probes over a corrupt cache file', async () => {
    await loadOrProbe(cacheFile, opts());
    await writeFile(cacheFile, '{"schema":1,"key":');
    await loadOrProbe(cacheFile, opts());
    assert.equal(probes, 2);
    await writeFile(cacheFile, JSON.stringify({ schema: 1, key, verdict: { kvm: {} } }));
    await loadOrProbe(cacheFile, opts());
    assert.equal(probes, 3);
  });
  it('does not cache when the host key is unknown (QEMU missing)', async () => {
    key = undefined;
    await loadOrProbe(cacheFile, opts());
    await loadOrProbe(cacheFile, opts());
    assert.equal(probes, 2);
    await assert.rejects(readFile(cacheFile, 'utf8'), /ENOENT/);
  });
  it('concurrent callers share one probe', async () => {
    const [a, b] = await Promise.all([loadOrProbe(cacheFile, opts()), loadOrProbe(cacheFile, opts())]);
    assert.deepEqual(a, b);
    assert.equal(probes, 1);
  });
});
