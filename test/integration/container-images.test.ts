// Container images and bad input, on real runc: importing an OCI layout and a docker-archive the
// test builds itself (umoci + skopeo), refusing rootfs archives with absolute or ".." members
// (nothing written), snapshots and copies, and the errors a user can hit: memory below the
// minimum, a CPU quota of zero, an unknown image, exec into a stopped container, runc missing.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ApiError } from '../../src/cli/client.js';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import { DEFAULT_RUNC_ROOT } from '../../src/drivers/container/driver.js';
import type { SnapshotListing } from '../../src/storage/model.js';
import { CLI, getInstance, op, removeNetworkLeftovers, startTestDaemon, stopTestDaemon, type TestDaemon } from '../helpers/daemon.js';

function removeContainersOf(dataDir: string): void {
  const r = spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'list', '--format', 'json'], { encoding: 'utf8' });
  const list = (r.stdout.trim() && r.stdout.trim() !== 'null' ? JSON.parse(r.stdout) : []) as Array<{ id: string; bundle: string }>;
  for (const c of list) if (c.bundle.startsWith(dataDir)) spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', c.id]);
}

function sh(cmd: string, args: string[], cwd?: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

describe('container images, snapshots, copies and bad input', () => {
  let dataDir: string;
  let work: string;
  let d: TestDaemon;
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', dataDir, ...args], { encoding: 'utf8', timeout: 120_000 });
  const rejects = (p: Promise<unknown>, code: string, status: number) => assert.rejects(p, (e: ApiError) => e.code === code && e.status === status);

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'hf-cti-'));
    work = await mkdtemp(join(tmpdir(), 'hf-cti-work-'));
    d = await startTestDaemon(dataDir);
  });
  after(async () => {
    if (d) await stopTestDaemon(d, 'SIGKILL');
    removeContainersOf(dataDir);
    removeNetworkLeftovers(dataDir);
    await rm(dataDir, { recursive: true, force: true });
    await rm(work, { recursive: true, force: true });
  });

  it('refuses bad limits and unknown images, leaving nothing behind', async () => {
    const base = { type: 'container', image: 'busybox' };
    await rejects(d.api.request('POST', '/api/v1/instances', { ...base, name: 'm1', memory: '8M' }), 'HF_ERR_INVALID_SIZE', 400);
    await rejects(d.api.request('POST', '/api/v1/instances', { ...base, name: 'q0', vcpus: 0 }), 'HF_ERR_VALIDATION', 400);
    await rejects(d.api.request('POST', '/api/v1/instances', { ...base, name: 'q1', vcpus: 0.001 }), 'HF_ERR_VALIDATION', 400);
    await rejects(d.api.request('POST', '/api/v1/instances', { ...base, name: 'u1', image: 'no-such-image' }), 'HF_ERR_IMAGE_NOT_FOUND', 404);
    await rejects(d.api.request('POST', '/api/v1/instances', { ...base, name: 'vm-image', image: 'busybox', type: 'vm' }), 'HF_ERR_VALIDATION', 400);
    const { instances } = await d.api.request<{ instances: Instance[] }>('GET', '/api/v1/instances');
    assert.deepEqual(instances, []);
    for (const n of ['m1', 'q0', 'q1', 'u1']) assert.equal(existsSync(join(dataDir, 'instances', n)), false);
    const r = cli('launch', 'busybox', 'zero', '--container', '--cpus', '0');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /HF_ERR_VALIDATION/);
  });

  it('refuses exec into a stopped container', async () => {
    await d.api.request('POST', '/api/v1/instances', { name: 'idle', type: 'container', image: 'busybox', memory: '32M' });
    await rejects(d.api.request('POST', '/api/v1/containers/idle/exec', { command: ['true'] }), 'HF_ERR_INSTANCE_NOT_RUNNING', 409);
    const r = cli('exec', 'idle', '--', 'ps');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /HF_ERR_INSTANCE_NOT_RUNNING/);
  });

  it('refuses rootfs archives with absolute or ".." members: nothing is written', async () => {
    const src = join(work, 'src');
    await mkdir(join(src, 'a'), { recursive: true });
    await writeFile(join(src, 'payload'), 'pwned\n');
    const escapeDir = join(work, `escape-${process.pid}`);
    // absolute member names (-P keeps the leading /)
    await mkdir(escapeDir);
    await writeFile(join(escapeDir, 'abs-payload'), 'pwned\n');
    sh('tar', ['-cPf', join(work, 'abs.tar'), join(escapeDir, 'abs-payload')]);
    await rm(escapeDir, { recursive: true });
    // ".." member names
    sh('tar', ['-C', join(src, 'a'), '-cPf', join(work, 'dotdot.tar'), '../payload']);
    for (const [file, name] of [['abs.tar', 'evil-abs'], ['dotdot.tar', 'evil-dotdot']] as const) {
      const res = await d.api.request<{ operation: Operation }>('POST', '/api/v1/containers/images', { name, source: join(work, file), format: 'rootfs-tar' });
      const done = await d.api.waitOperation(res.operation.id);
      assert.equal(done.status, 'failure');
      assert.equal(done.error?.code, 'HF_ERR_VALIDATION');
      assert.match(done.error?.message ?? '', /refusing archive.*(absolute path|"\.\." in the path)/);
      assert.equal(existsSync(join(dataDir, 'images', name)), false, 'no image directory');
      await rejects(d.api.request('GET', `/api/v1/images/${name}`), 'HF_ERR_IMAGE_NOT_FOUND', 404);
    }
    assert.equal(existsSync(escapeDir), false, 'nothing written at the absolute path');
    assert.equal(existsSync(join(dataDir, 'images', 'payload')), false, 'nothing written beside the root');
    assert.equal(existsSync(join(dataDir, 'cache', 'payload')), false);
  });

  it('imports an OCI layout and a docker-archive (built here with umoci and skopeo) and runs them', async () => {
    // The busybox image is built on first use; its tree becomes the OCI image's only layer.
    const { image } = await d.api.request<{ image: { rootfs: { path: string } } }>('GET', '/api/v1/images/busybox');
    const layout = join(work, 'oci');
    const bundle = join(work, 'bundle');
    sh('umoci', ['init', '--layout', layout]);
    sh('umoci', ['new', '--image', `${layout}:t`]);
    sh('umoci', ['unpack', '--image', `${layout}:t`, bundle]);
    sh('cp', ['-a', `${image.rootfs.path}/.`, join(bundle, 'rootfs')]);
    await writeFile(join(bundle, 'rootfs', 'etc', 'from-oci'), 'layer content\n');
    sh('umoci', ['repack', '--image', `${layout}:t`, bundle]);
    sh('umoci', ['config', '--image', `${layout}:t`, '--config.cmd', '/sbin/init', '--config.env', 'HF_FROM=oci']);
    const archive = join(work, 'image.tar');
    sh('skopeo', ['--insecure-policy', 'copy', '--quiet', `oci:${layout}:t`, `docker-archive:${archive}:hf/test:1`]);

    const r1 = cli('image', 'import-container', layout, '--name', 'bb-oci');
    assert.equal(r1.status, 0, r1.stderr);
    assert.match(r1.stdout, /imported from oci-layout .*init: \/sbin\/init/);
    const r2 = cli('image', 'import-container', archive, '--name', 'bb-docker');
    assert.equal(r2.status, 0, r2.stderr);
    assert.match(r2.stdout, /imported from docker-archive/);

    const l = cli('launch', 'bb-docker', 'fromdocker', '--container', '--memory', '32M');
    assert.equal(l.status, 0, l.stderr);
    assert.equal(cli('exec', 'fromdocker', '--', 'cat', '/etc/from-oci').stdout, 'layer content\n');
    assert.match(cli('exec', 'fromdocker', '--', 'sh', '-c', 'echo $HF_FROM').stdout, /oci/);
    assert.equal(cli('exec', 'fromdocker', '--', 'cat', '/proc/1/comm').stdout.trim(), 'init');
    assert.equal((await op(d.api, 'POST', '/api/v1/instances/fromdocker/stop', { force: true })).status, 'success');
  });

  it('snapshots, reverts and copies a container (root filesystem and definition)', async () => {
    const l = cli('launch', 'busybox', 's1', '--container', '--memory', '48M');
    assert.equal(l.status, 0, l.stderr);
    assert.equal(cli('exec', 's1', '--', 'sh', '-c', 'echo before > /root/state').status, 0);
    const snap = cli('snapshot', 'create', 's1', 'snap1');
    assert.equal(snap.status, 0, snap.stderr);
    assert.equal(cli('exec', 's1', '--', 'sh', '-c', 'echo after > /root/state').status, 0);
    assert.equal(cli('config', 'set', 's1', 'memory=80M').status, 0);
    assert.match(cli('snapshot', 'list', 's1').stdout, /snap1/);
    const { snapshots } = await d.api.request<SnapshotListing>('GET', '/api/v1/instances/s1/snapshots');
    assert.deepEqual(snapshots.map((s) => [s.name, s.takenWhile]), [['snap1', 'running']]);
    await assert.rejects(d.api.request('GET', '/api/v1/containers/s1/snapshots'), (e: ApiError) => e.status === 404, 'the container-only route is gone');

    // revert needs a stopped container
    const running = cli('snapshot', 'revert', 's1', 'snap1');
    assert.notEqual(running.status, 0);
    assert.equal((await op(d.api, 'POST', '/api/v1/instances/s1/stop', { force: true })).status, 'success');
    const rev = cli('snapshot', 'revert', 's1', 'snap1');
    assert.equal(rev.status, 0, rev.stderr);
    assert.equal((await getInstance(d.api, 's1')).config.memoryMiB, 48, 'the definition came back');
    assert.equal(cli('start', 's1').status, 0);
    assert.equal(cli('exec', 's1', '--', 'cat', '/root/state').stdout, 'before\n');
    assert.equal((await op(d.api, 'POST', '/api/v1/instances/s1/stop', { force: true })).status, 'success');

    // a copy gets its own id range and the same definition
    const cp = cli('copy', 's1', 's2');
    assert.equal(cp.status, 0, cp.stderr);
    const s2 = await getInstance(d.api, 's2');
    assert.equal(s2.type, 'container');
    assert.equal(s2.config.memoryMiB, 48);
    assert.equal(s2.image, 'busybox');
    const owner1 = statSync(join(dataDir, 'instances', 's1', 'rootfs', 'root', 'state')).uid;
    const owner2 = statSync(join(dataDir, 'instances', 's2', 'rootfs', 'root', 'state')).uid;
    assert.notEqual(owner1, owner2, 'each container has its own host id range');
    assert.equal(cli('start', 's2').status, 0);
    assert.equal(cli('exec', 's2', '--', 'cat', '/root/state').stdout, 'before\n');
    assert.equal(cli('snapshot', 'delete', 's1', 'snap1').status, 0);
    assert.equal(existsSync(join(dataDir, 'instances', 's1', 'snapshots', 'snap1')), false);
  });

  it('reports runc missing with a named error and creates nothing', async () => {
    const dir2 = await mkdtemp(join(tmpdir(), 'hf-cti-norunc-'));
    const d2 = await startTestDaemon(dir2, { HYPERFOLD_RUNC: '/nonexistent/runc' });
    try {
      await assert.rejects(d2.api.request('POST', '/api/v1/instances', { name: 'n1', type: 'container', image: 'busybox' }), (e: ApiError) => e.code === 'HF_ERR_MISSING_DEPENDENCY' && /runc/.test(e.message));
      assert.equal(existsSync(join(dir2, 'instances', 'n1')), false);
    } finally {
      await stopTestDaemon(d2);
      await rm(dir2, { recursive: true, force: true });
    }
  });
});
