// Bad input and faults against a real daemon: each gets a clear error with a stable code, and
// nothing is left half-created.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ApiClient, ApiError } from '../../src/cli/client.js';
import type { Instance } from '../../src/core/model/instance.js';
import { CLI, destroyDataDir, makeDataDir, op, startTestDaemon, useTestDaemon } from '../helpers/daemon.js';

function code(c: string, status?: number) {
  return (e: unknown) => {
    assert.ok(e instanceof ApiError, `expected an API error, got ${String(e)}`);
    assert.equal(e.code, c, e.message);
    if (status !== undefined) assert.equal(e.status, status);
    return true;
  };
}

describe('API errors', () => {
  const t = useTestDaemon();

  const create = (body: Record<string, unknown>) => t.d.http.request('POST', '/api/v1/instances', body);

  it('unknown instance → 404 HF_ERR_INSTANCE_NOT_FOUND', async () => {
    await assert.rejects(t.d.http.request('GET', '/api/v1/instances/nope'), code('HF_ERR_INSTANCE_NOT_FOUND', 404));
    await assert.rejects(t.d.http.request('POST', '/api/v1/instances/nope/start', {}), code('HF_ERR_INSTANCE_NOT_FOUND', 404));
  });

  it('invalid names → 400 HF_ERR_INVALID_NAME', async () => {
    for (const name of ['Web1', '-x', 'a_b', 'x'.repeat(64), '../etc', '']) {
      await assert.rejects(create({ name, image: 'tiny' }), code('HF_ERR_INVALID_NAME', 400), name);
    }
  });

  it('memory "lots" → 400 HF_ERR_INVALID_SIZE; zero vCPUs → 400', async () => {
    await assert.rejects(create({ name: 'm1', image: 'tiny', memory: 'lots' }), code('HF_ERR_INVALID_SIZE', 400));
    await assert.rejects(create({ name: 'm1', image: 'tiny', vcpus: 0 }), (e: ApiError) => {
      assert.equal(e.code, 'HF_ERR_VALIDATION');
      assert.match(e.message, /vcpus must be at least 1/);
      return true;
    });
  });

  it('memory above the host and more vCPUs than the host → 422 HF_ERR_INSUFFICIENT_RESOURCES', async () => {
    await assert.rejects(create({ name: 'big', image: 'tiny', memory: '100T' }), code('HF_ERR_INSUFFICIENT_RESOURCES', 422));
    await assert.rejects(create({ name: 'big', image: 'tiny', vcpus: 500 }), code('HF_ERR_INSUFFICIENT_RESOURCES', 422));
    assert.equal(existsSync(join(t.dataDir, 'instances', 'big')), false, 'nothing half-created');
  });

  it('duplicate name → 409 HF_ERR_ALREADY_EXISTS, the first one intact', async () => {
    const first = (await create({ name: 'dup', image: 'tiny' })) as { instance: Instance };
    await assert.rejects(create({ name: 'dup', image: 'tiny', memory: '512M' }), code('HF_ERR_ALREADY_EXISTS', 409));
    const { instance } = await t.d.http.request<{ instance: Instance }>('GET', '/api/v1/instances/dup');
    assert.equal(instance.id, first.instance.id);
    assert.equal(instance.config.memoryMiB, 256);
    assert.equal((await op(t.d.http, 'DELETE', '/api/v1/instances/dup')).status, 'success');
  });

  it('blank disks: `name=size` creates a file; a disk with neither size nor path is refused', async () => {
    const r = spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, 'create', 'tiny', 'withdisk', '--disk', 'data=64M', '--format', 'json'], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const inst = JSON.parse(r.stdout) as Instance;
    const data = inst.config.disks.find((x) => x.name === 'data');
    assert.ok(data && existsSync(data.path), 'the blank disk exists');
    const info = spawnSync('qemu-img', ['info', '--output=json', data.path], { encoding: 'utf8' });
    assert.equal((JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size'], 64 * 1024 * 1024);
    await assert.rejects(create({ name: 'nodisk', image: 'tiny', disks: [{ name: 'x' }] }), code('HF_ERR_VALIDATION', 400));
    assert.equal((await op(t.d.http, 'DELETE', '/api/v1/instances/withdisk')).status, 'success');
    assert.equal(existsSync(data.path), false, 'deleted with its instance');
  });

  it('unknown image → 404 HF_ERR_IMAGE_NOT_FOUND with nothing created', async () => {
    await assert.rejects(create({ name: 'noimg', image: 'nosuchimage' }), code('HF_ERR_IMAGE_NOT_FOUND', 404));
    assert.equal(existsSync(join(t.dataDir, 'instances', 'noimg')), false);
    const { instances } = await t.d.http.request<{ instances: Instance[] }>('GET', '/api/v1/instances');
    assert.equal(instances.some((i) => i.name === 'noimg'), false);
  });

  it('the instance list pages by name (limit, after, next); a bad limit → 400 HF_ERR_VALIDATION', async () => {
    for (const n of ['pg-c', 'pg-a', 'pg-b']) await create({ name: n, image: 'tiny' });
    type Page = { instances: Instance[]; next?: string };
    const all = await t.d.http.request<Page>('GET', '/api/v1/instances');
    assert.equal(all.next, undefined);
    const names = all.instances.map((i) => i.name);
    assert.deepEqual(names, [...names].sort());
    const seen: string[] = [];
    let after: string | undefined;
    for (let pages = 0; ; pages++) {
      assert.ok(pages <= names.length, 'paging ends');
      const p = await t.d.http.request<Page>('GET', `/api/v1/instances?limit=1${after ? `&after=${after}` : ''}`);
      seen.push(...p.instances.map((i) => i.name));
      assert.ok(p.instances.length <= 1);
      if (p.next === undefined) break;
      after = p.next;
    }
    assert.deepEqual(seen, names);
    const vms = await t.d.http.request<Page>('GET', '/api/v1/instances?type=vm&after=pg-a&limit=5');
    assert.deepEqual(vms.instances.map((i) => i.name).filter((n) => n.startsWith('pg-')), ['pg-b', 'pg-c']);
    assert.deepEqual(vms.instances, all.instances.filter((i) => i.type === 'vm' && i.name > 'pg-a').slice(0, 5));
    await assert.rejects(t.d.http.request('GET', '/api/v1/instances?limit=0'), code('HF_ERR_VALIDATION', 400));
    for (const n of ['pg-a', 'pg-b', 'pg-c']) assert.equal((await op(t.d.http, 'DELETE', `/api/v1/instances/${n}`)).status, 'success');
  });

  it('malformed JSON → 400 HF_ERR_BAD_JSON', async () => {
    const http = await import('node:http');
    const u = new URL(t.d.url);
    const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = http.request(
        { host: u.hostname, port: u.port, path: '/api/v1/instances', method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${t.d.token}` } },
        (r) => {
          let body = '';
          r.on('data', (c) => (body += c));
          r.on('end', () => resolve({ status: r.statusCode ?? 0, body }));
        },
      );
      req.on('error', reject);
      req.end('{"name": "x", ');
    });
    assert.equal(res.status, 400);
    assert.equal((JSON.parse(res.body) as { error: { code: string } }).error.code, 'HF_ERR_BAD_JSON');
  });

  it('unknown fields are refused, not ignored', async () => {
    await assert.rejects(create({ name: 'typo', image: 'tiny', memroy: '1G' }), code('HF_ERR_VALIDATION', 400));
  });

  it('missing token and wrong token → 401 HF_ERR_UNAUTHORIZED', async () => {
    await assert.rejects(new ApiClient({ url: t.d.url, token: '' }).request('GET', '/api/v1/instances'), code('HF_ERR_UNAUTHORIZED', 401));
    await assert.rejects(new ApiClient({ url: t.d.url, token: 'x'.repeat(32) }).request('GET', '/api/v1/instances'), code('HF_ERR_UNAUTHORIZED', 401));
    // The unix socket is root-only and needs no token.
    const st = (await import('node:fs')).statSync(join(t.dataDir, 'hyperfold.sock'));
    assert.equal(st.mode & 0o777, 0o600);
    await t.d.api.request('GET', '/api/v1/instances');
  });

  it('serves an OpenAPI document generated from the request schemas', async () => {
    const doc = await t.d.http.request<{ openapi: string; paths: Record<string, Record<string, { requestBody?: { content: Record<string, { schema: { properties: Record<string, unknown> } }> } }>> }>(
      'GET',
      '/api/v1/openapi.json',
    );
    assert.equal(doc.openapi, '3.0.3');
    const createOp = doc.paths['/api/v1/instances']!.post!;
    const props = createOp.requestBody!.content['application/json']!.schema.properties;
    for (const k of ['name', 'vcpus', 'memory', 'accel', 'devices', 'restartPolicy', 'autostart']) assert.ok(k in props, k);
    assert.ok(doc.paths['/api/v1/operations/{id}']);
    assert.ok(doc.paths['/api/v1/instances/{name}/stop']);
  });

  it('reports the accelerator verdict: KVM judged by a guest, with a reason', async () => {
    const { host } = await t.d.http.request<{ host: { accelerator: { kvm: { usable: boolean; reason: string }; tcg: { usable: boolean }; default: string }; cpus: { count: number } } }>('GET', '/api/v1/host');
    assert.equal(typeof host.accelerator.kvm.usable, 'boolean');
    assert.ok(host.accelerator.kvm.reason.length > 5);
    assert.equal(host.accelerator.tcg.usable, true);
    assert.equal(host.accelerator.default, host.accelerator.kvm.usable ? 'kvm' : 'tcg');
    if (!host.accelerator.kvm.usable) {
      // accel=kvm on a host where KVM is unusable: a clear error at create, nothing created
      await assert.rejects(create({ name: 'kvmvm', image: 'tiny', accel: 'kvm' }), code('HF_ERR_ACCEL_UNAVAILABLE', 422));
      assert.equal(existsSync(join(t.dataDir, 'instances', 'kvmvm')), false);
    }
  });

  it('unknown operation → 404; operation wait returns a finished operation', async () => {
    await assert.rejects(t.d.http.request('GET', '/api/v1/operations/nope'), code('HF_ERR_OPERATION_NOT_FOUND', 404));
  });

  it('the CLI prints the error code and exits non-zero', () => {
    const r = spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, 'info', 'ghost'], { encoding: 'utf8' });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /instance "ghost" not found \(HF_ERR_INSTANCE_NOT_FOUND\)/);
  });
});

describe('faults at the edges', () => {
  it('QEMU binary missing: start fails with HF_ERR_MISSING_DEPENDENCY, the VM stays stopped', async () => {
    const dataDir = await makeDataDir();
    const d = await startTestDaemon(dataDir, { HYPERFOLD_QEMU: '/nonexistent/qemu-system-x86_64' });
    try {
      await assert.rejects(d.api.request('POST', '/api/v1/instances', { name: 'noqemu', image: 'tiny', accel: 'tcg' }), code('HF_ERR_MISSING_DEPENDENCY', 500));
      assert.equal(existsSync(join(dataDir, 'instances', 'noqemu')), false, 'no half-created instance');
      const { instances } = await d.api.request<{ instances: Instance[] }>('GET', '/api/v1/instances');
      assert.deepEqual(instances, []);
    } finally {
      await destroyDataDir(dataDir, d);
    }
  });

  it('data directory not writable: the daemon refuses to start with HF_ERR_DATA_DIR', async () => {
    const parent = await mkdtemp(join(tmpdir(), 'hf-ro-'));
    const file = join(parent, 'not-a-dir');
    await writeFile(file, 'x');
    await chmod(parent, 0o500);
    try {
      const r = spawnSync(process.execPath, [CLI, '--data-dir', join(file, 'data'), 'serve', '--listen', '127.0.0.1:0', '--no-build-image'], { encoding: 'utf8', timeout: 20_000 });
      assert.equal(r.status, 1);
      assert.match(r.stderr, /data directory .* is not writable.*HF_ERR_DATA_DIR/);
      assert.deepEqual(readdirSync(parent), ['not-a-dir']);
    } finally {
      await chmod(parent, 0o700);
      await rm(parent, { recursive: true, force: true });
    }
  });
});
