// Pure parts of the container driver: the OCI spec, limits, seccomp profile, cgroup layout and
// counters, id shifting, runc error messages, image helpers.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { isHfError } from '../../src/core/errors.js';
import type { InstanceConfig } from '../../src/core/model/instance.js';
import { cpuQuotaUs, keyed, parseCgroupLayout } from '../../src/drivers/container/cgroups.js';
import { shiftId } from '../../src/drivers/container/rootfs.js';
import { cleanRuncError } from '../../src/drivers/container/runc.js';
import { DENIED_SYSCALLS, defaultSeccompProfile } from '../../src/drivers/container/seccomp.js';
import { buildOciSpec, checkContainerLimits, containerResources, mergeEnv, type ContainerMeta } from '../../src/drivers/container/spec.js';
import { metaFromImage } from '../../src/drivers/container/driver.js';
import { isStaticElf } from '../../src/images/container/busybox.js';
import { debootstrapProgress, parseDebianMirror } from '../../src/images/container/debian.js';
import { initFromRuntimeConfig } from '../../src/images/container/oci.js';

const config: InstanceConfig = {
  vcpus: 0.5,
  memoryMiB: 128,
  disks: [],
  nics: [],
  boot: { kind: 'disk', firmware: 'bios' },
  accel: 'auto',
  devices: 'virtio',
  restartPolicy: 'never',
  autostart: false,
  privileged: false,
  pidsLimit: 100,
};
const meta: ContainerMeta = { version: 1, init: ['/sbin/init'], env: ['FOO=bar', 'PATH=/custom'], cwd: '/', stopSignal: 'SIGTERM', idmap: { hostId: 1_000_000, size: 65_536 } };

describe('container OCI spec', () => {
  const spec = buildOciSpec({ hostname: 'c1', rootfs: '/x/rootfs', config, meta, cgroupsPath: '/hyperfold/abc', swapLimit: true });

  it('runs the image init as PID 1 in its own namespaces, with a user namespace by default', () => {
    assert.deepEqual(spec.process.args, ['/sbin/init']);
    assert.equal(spec.hostname, 'c1');
    const ns = spec.linux.namespaces.map((n) => n.type).sort();
    assert.deepEqual(ns, ['cgroup', 'ipc', 'mount', 'network', 'pid', 'user', 'uts']);
    assert.deepEqual(spec.linux.uidMappings, [{ containerID: 0, hostID: 1_000_000, size: 65_536 }]);
    assert.deepEqual(spec.linux.gidMappings, spec.linux.uidMappings);
    assert.equal(spec.process.terminal, false);
    assert.ok(spec.process.env.includes('PATH=/custom'), 'image env overrides the default PATH');
    assert.ok(spec.process.env.includes('container=hyperfold'));
  });

  it('sets cgroup limits: CPU quota per 100 ms, memory without swap, pids', () => {
    assert.deepEqual(spec.linux.resources.cpu, { quota: 50_000, period: 100_000 });
    assert.deepEqual(spec.linux.resources.memory, { limit: 128 * 1024 * 1024, swap: 128 * 1024 * 1024 });
    assert.deepEqual(spec.linux.resources.pids, { limit: 100 });
    assert.deepEqual(spec.linux.resources.devices, [{ allow: false, access: 'rwm' }]);
    assert.equal(spec.linux.cgroupsPath, '/hyperfold/abc');
    assert.deepEqual(containerResources({ ...config, pidsLimit: undefined }, { swapLimit: false }).memory, { limit: 128 * 1024 * 1024 });
  });

  it('mounts /sys and the cgroup tree read-only, masks runc\'s default paths, has a seccomp profile', () => {
    const sys = spec.mounts.find((m) => m.destination === '/sys');
    assert.ok(sys?.options?.includes('ro'));
    assert.ok(spec.mounts.find((m) => m.destination === '/sys/fs/cgroup')?.options?.includes('ro'));
    assert.ok(spec.linux.maskedPaths.includes('/proc/kcore'));
    assert.ok(spec.linux.readonlyPaths.includes('/proc/sys'));
    assert.equal(spec.linux.seccomp?.defaultAction, 'SCMP_ACT_ALLOW');
    assert.ok(!spec.process.capabilities.bounding.includes('CAP_SYS_MODULE'));
    assert.ok(!spec.process.capabilities.bounding.includes('CAP_SYS_TIME'));
  });

  it('a privileged container has no user namespace and no id map; an unprivileged one needs a map', () => {
    const p = buildOciSpec({ hostname: 'p', rootfs: 'rootfs', config: { ...config, privileged: true }, meta: { ...meta, idmap: undefined }, cgroupsPath: '/h/p', swapLimit: false });
    assert.ok(!p.linux.namespaces.some((n) => n.type === 'user'));
    assert.equal(p.linux.uidMappings, undefined);
    assert.equal(p.annotations?.['org.hyperfold.privileged'], 'true');
    assert.throws(() => buildOciSpec({ hostname: 'x', rootfs: 'r', config, meta: { ...meta, idmap: undefined }, cgroupsPath: '/h/x', swapLimit: false }));
  });

  it('refuses a CPU quota of zero or under 1 ms, and memory below the minimum', () => {
    for (const bad of [{ vcpus: 0 }, { vcpus: 0.001 }, { memoryMiB: 8 }, { pidsLimit: 0 }]) {
      assert.throws(() => checkContainerLimits({ ...config, ...bad }), (e: unknown) => isHfError(e, 'HF_ERR_VALIDATION'));
    }
    assert.doesNotThrow(() => checkContainerLimits({ ...config, vcpus: 0.01, memoryMiB: 16 }));
    assert.equal(cpuQuotaUs(1.5), 150_000);
  });

  it('seccomp refuses kernel-global calls and answers ENOSYS for the keyring', () => {
    const s = defaultSeccompProfile();
    const deny = s.syscalls.find((x) => x.errnoRet === 1)!;
    for (const c of ['kexec_load', 'init_module', 'open_by_handle_at', 'bpf', 'swapon', 'settimeofday']) assert.ok(deny.names.includes(c), c);
    assert.ok(!DENIED_SYSCALLS.includes('mount' as never), 'mount stays allowed (inside its own namespaces)');
    assert.deepEqual(s.syscalls.find((x) => x.errnoRet === 38)?.names, ['add_key', 'keyctl', 'request_key']);
  });

  it('merges environments: later names win', () => {
    assert.deepEqual(mergeEnv(['A=1', 'B=2'], ['B=3', 'junk', 'C=']), ['A=1', 'B=3', 'C=']);
  });
});

describe('cgroup layout and counters', () => {
  const hybrid = [
    '25 24 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755',
    '26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw',
    '27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd',
    '30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory',
    '31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct',
  ].join('\n');

  it('tells v1, hybrid and unified v2 apart', () => {
    const h = parseCgroupLayout(hybrid);
    assert.equal(h.mode, 'hybrid');
    assert.equal(h.v1.memory, '/sys/fs/cgroup/memory');
    assert.equal(h.v1.cpuacct, '/sys/fs/cgroup/cpu,cpuacct');
    assert.equal(h.unified, '/sys/fs/cgroup/unified');
    assert.equal(parseCgroupLayout(hybrid.split('\n').filter((l) => !l.includes('cgroup2')).join('\n')).mode, 'v1');
    const v2 = parseCgroupLayout('30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate');
    assert.equal(v2.mode, 'v2');
    assert.equal(v2.unified, '/sys/fs/cgroup');
  });

  it('parses this host', () => {
    const here = parseCgroupLayout(readFileSync('/proc/self/mountinfo', 'utf8'));
    assert.ok(['v1', 'hybrid', 'v2'].includes(here.mode));
  });

  it('reads keyed counter files (memory.events, memory.oom_control)', () => {
    assert.deepEqual(keyed('oom_kill_disable 0\nunder_oom 0\noom_kill 3\n'), { oom_kill_disable: 0, under_oom: 0, oom_kill: 3 });
  });
});

describe('ids, runc errors, images', () => {
  it('shifts ids into a container range; ids outside the range become the overflow id', () => {
    const s = { fromBase: 0, toBase: 1_000_000, size: 65_536 };
    assert.equal(shiftId(0, s), 1_000_000);
    assert.equal(shiftId(1000, s), 1_001_000);
    assert.equal(shiftId(70_000, s), 1_065_534);
    assert.equal(shiftId(1_065_536 + 5, { fromBase: 1_065_536, toBase: 1_000_000, size: 65_536 }), 1_000_005);
  });

  it('keeps runc\'s error messages', () => {
    const json = '{"level":"warning","msg":"x","time":"t"}\n{"level":"error","msg":"runc run failed: no such file","time":"t"}\n';
    assert.equal(cleanRuncError(json), 'runc run failed: no such file');
    assert.equal(cleanRuncError('time="t" level=error msg="container \\"a\\" does not exist"'), 'container "a" does not exist');
  });

  it('takes the init, environment and stop signal from the image', () => {
    assert.deepEqual(metaFromImage(undefined).init, ['/sbin/init']);
    const m = metaFromImage({ name: 'x', type: 'container', description: '', source: 'import', defaults: {}, sizeBytes: 0, sha256: {}, createdAt: '', details: { init: ['/bin/sh'], env: ['A=1'], stopSignal: 'SIGPWR', cwd: '/srv' } });
    assert.deepEqual([m.init, m.env, m.stopSignal, m.cwd], [['/bin/sh'], ['A=1'], 'SIGPWR', '/srv']);
    assert.deepEqual(initFromRuntimeConfig({ process: { args: ['/entry', 'x'], env: ['E=1'], cwd: '/w' } }), { init: ['/entry', 'x'], env: ['E=1'], cwd: '/w' });
    assert.deepEqual(initFromRuntimeConfig({}).init, ['/sbin/init']);
  });

  it('recognizes a static ELF (no PT_INTERP)', () => {
    assert.equal(isStaticElf(readFileSync(process.execPath).subarray(0, 4096)), false, 'node is dynamically linked');
    assert.equal(isStaticElf(Buffer.from('#!/bin/sh\n')), false);
  });

  it('finds the Debian mirror in apt sources and maps debootstrap output to progress', () => {
    assert.equal(parseDebianMirror('Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n'), 'http://deb.debian.org/debian');
    assert.equal(parseDebianMirror('deb [arch=amd64] http://mirror.example/debian/ bookworm main\n'), 'http://mirror.example/debian');
    assert.equal(parseDebianMirror('URIs: http://deb.debian.org/debian-security\n'), undefined);
    assert.deepEqual(debootstrapProgress('I: Retrieving libc6 2.36'), { percent: 6, message: 'debootstrap: Retrieving libc6 2.36' });
    assert.equal(debootstrapProgress('W: something'), undefined);
  });
});
