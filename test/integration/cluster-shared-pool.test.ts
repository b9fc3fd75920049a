// Shared storage pools in a real two-host cluster (scripts/cluster-sandbox.sh). The sandbox's hosts
// are namespaces of this one machine, so a directory under the sandbox's directory is storage both
// mount at the same path, as an NFS share would be. A pool made on h1 is seen on h2; a volume made
// from h2 is attached to a VM on h2 through h1's API; a VM on h2 keeps its disk in the shared
// directory; a host where another storage is mounted at the path (a bind mount in its daemon's
// mount namespace) shows the pool unavailable there, refuses disks on it, and placement avoids it;
// names are unique across host pools and shared ones; a joining host's clashing pool is refused.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Instance } from '../../src/core/model/instance.js';
import type { PlacementDecision } from '../../src/core/placement.js';
import type { PoolView, VolumeView } from '../../src/storage/model.js';
import { POOL_MARKER_FILE } from '../../src/storage/shared.js';
import { Sandbox, rejectsCode, until } from '../helpers/sandbox.js';
import { guestSh, waitForBoot } from './storage-guest.js';

describe('shared storage pools in a two-host cluster', () => {
  let sb: Sandbox;
  let nfs1: string;
  const api = (h: string) => sb.host(h).api;
  const pool = async (h: string, name: string) => (await api(h).request<{ pool: PoolView }>('GET', `/api/v1/storage/pools/${name}`)).pool;
  /** The answer `host` recorded about a pool, as `from` shows it, once there is one. */
  const answer = (from: string, name: string, host: string) =>
    until(`${host}'s check of ${name}`, async () => (await pool(from, name)).hosts?.find((x) => x.host === host), 20_000);

  before(async () => {
    sb = await Sandbox.up(2, { prefix: 'hfsp', net: '10.213.44', ttl: 3 });
    nfs1 = join(sb.dir, 'shared', 'nfs1');
  });
  after(async () => {
    await sb?.down();
  });

  it('makes a pool on h1 that h2 sees, checks and can use', async () => {
    const made = await sb.cli('h1', 'storage', 'create', 'nfs1', '--path', nfs1, '--shared');
    assert.equal(made.code, 0, made.stderr);
    assert.match(made.stdout, /shared pool nfs1 created/);
    assert.ok(existsSync(join(nfs1, POOL_MARKER_FILE)), 'h1 stamped the storage');
    const a = await answer('h1', 'nfs1', 'h2');
    assert.equal(a.available, true, a.reason);
    const seen = await pool('h2', 'nfs1');
    assert.deepEqual([seen.shared, seen.available, seen.createdBy, seen.path], [true, true, 'h1', nfs1]);
    const list = await sb.cli('h2', 'storage', 'list');
    assert.match(list.stdout, new RegExp(`^nfs1\\s+dir\\s+${nfs1}\\s.*\\sshared\\s+h1,h2$`, 'm'));
    assert.match(list.stdout, /^default\s+dir\s.*\shost\s+yes$/m);
  });

  it('keeps pool names unique across host pools, shared ones and both hosts', async () => {
    await rejectsCode(api('h2').request('POST', '/api/v1/storage/pools', { name: 'nfs1', path: join(sb.dir, 'h2-nfs1') }), 'HF_ERR_ALREADY_EXISTS', /shared storage pool "nfs1" already exists/);
    await api('h2').request('POST', '/api/v1/storage/pools', { name: 'fast', path: join(sb.host('h2').dataDir, 'fast') });
    await rejectsCode(api('h1').request('POST', '/api/v1/storage/pools', { name: 'fast', path: join(sb.dir, 'shared', 'fast'), shared: true }), 'HF_ERR_ALREADY_EXISTS', /host h2 has a storage pool named "fast"/);
    assert.equal(existsSync(join(sb.dir, 'shared', 'fast')), false, 'the refused create made nothing');
  });

  it('creates a volume from h2, launches a VM on h2 with its disk in the shared directory, and attaches the volume to it through h1', async () => {
    const { volume } = await api('h2').request<{ volume: VolumeView }>('POST', '/api/v1/storage/pools/nfs1/volumes', { name: 'data1', size: '64M' });
    assert.equal(volume.path, join(nfs1, 'volumes', 'data1.qcow2'));
    assert.ok(existsSync(volume.path));
    const { volumes } = await api('h1').request<{ volumes: VolumeView[] }>('GET', '/api/v1/storage/volumes?pool=nfs1');
    assert.deepEqual(volumes.map((v) => v.ref), ['nfs1/data1'], 'h1 sees the volume h2 made');

    const launched = await sb.cli('h1', 'launch', 'tiny', 'vm-sp', '--storage', 'nfs1', '--target', 'h2', '--memory', '128M');
    assert.equal(launched.code, 0, launched.stderr);
    const inst = (await api('h1').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-sp')).instance;
    assert.deepEqual([inst.host, inst.state, inst.storage], ['h2', 'running', 'nfs1']);
    const root = join(nfs1, 'instances', 'vm-sp', 'root.qcow2');
    assert.equal(inst.config.disks.find((d) => d.name === 'root')?.path, root);
    assert.ok(existsSync(root), 'the root disk is in the shared directory');
    const info = await sb.cli('h1', 'info', 'vm-sp');
    assert.match(info.stdout, /Storage:\s+pool nfs1/);

    await waitForBoot(api('h1'), 'vm-sp');
    const r = await api('h1').request<{ disk: { name: string }; live: boolean }>('POST', '/api/v1/instances/vm-sp/volumes', { volume: 'nfs1/data1' });
    assert.deepEqual([r.disk.name, r.live], ['data1', true]);
    const sectors = await until('the guest sees the hot-plugged volume', async () => (await guestSh(api('h1'), 'vm-sp', 'cat /sys/block/vdb/size 2>/dev/null')).trim() || undefined, 60_000);
    assert.equal(Number(sectors), (64 * 1024 * 1024) / 512);
    assert.deepEqual((await api('h1').request<{ volume: VolumeView }>('GET', '/api/v1/storage/pools/nfs1/volumes/data1')).volume.attachedTo, { instance: 'vm-sp', disk: 'data1' });
  });

  it('shows a pool unavailable on the host where another storage is mounted at its path, refuses disks there, and places around it', async () => {
    const nfs2 = join(sb.dir, 'shared', 'nfs2');
    const other = join(sb.dir, 'other-storage');
    await mkdir(nfs2, { recursive: true });
    await mkdir(other, { recursive: true });
    await writeFile(join(other, POOL_MARKER_FILE), JSON.stringify({ pool: 'old', id: 'another-storage', createdBy: 'h9', createdAt: new Date().toISOString() }));
    // On h2 only, the path shows another storage (as a host that mounted another export there).
    await sb.inMounts('h2', 'mount', '--bind', other, nfs2);
    await api('h1').request('POST', '/api/v1/storage/pools', { name: 'nfs2', path: nfs2, shared: true });
    const a = await answer('h1', 'nfs2', 'h2');
    assert.equal(a.available, false);
    assert.match(a.reason ?? '', /marker of another storage \(pool old, id another-storage/);
    assert.equal((await answer('h1', 'nfs2', 'h1')).available, true);
    const info = await sb.cli('h2', 'storage', 'info', 'nfs2');
    assert.match(info.stdout, /Available:\s+no: .*another storage is mounted there/);
    assert.match(info.stdout, /h1\s+available/);
    const list = await sb.cli('h1', 'storage', 'list');
    assert.match(list.stdout, /nfs2\s.*h1 \(not h2\)/);

    await rejectsCode(api('h2').request('POST', '/api/v1/storage/pools/nfs2/volumes', { name: 'v', size: '8M' }), 'HF_ERR_POOL_UNAVAILABLE', /not available on host h2/);
    await api('h1').request('POST', '/api/v1/storage/pools/nfs2/volumes', { name: 'v', size: '8M' });
    await rejectsCode(api('h1').request('POST', '/api/v1/instances', { name: 'vm-x', image: 'tiny', storage: 'nfs2', target: 'h2' }), 'HF_ERR_POOL_UNAVAILABLE', /target host "h2".*storage pool nfs2/);
    // Without a target the VM goes to the only host that reaches the pool; h2 is skipped for it.
    const made = await api('h1').request<{ instance: Instance; placement: PlacementDecision }>('POST', '/api/v1/instances', { name: 'vm-x', image: 'tiny', memory: '64M', storage: 'nfs2' });
    assert.equal(made.instance.host, 'h1');
    assert.deepEqual(made.placement.considered.map((c) => `${c.host}:${c.verdict}`), ['h1:chosen', 'h2:skipped']);
    assert.match(made.placement.considered[1]!.why, /cannot use storage pool nfs2/);
    assert.ok(existsSync(join(nfs2, 'instances', 'vm-x', 'root.qcow2')));
    await api('h1').request('DELETE', '/api/v1/instances/vm-x?wait=60');
    await api('h1').request('DELETE', '/api/v1/storage/pools/nfs2/volumes/v');
    await api('h1').request('DELETE', '/api/v1/storage/pools/nfs2');
  });

  it('refuses to delete the pool while a VM on h2 keeps its disks in it', async () => {
    await api('h1').request('DELETE', '/api/v1/instances/vm-sp/volumes/nfs1/data1');
    await api('h1').request('DELETE', '/api/v1/storage/pools/nfs1/volumes/data1');
    const refused = await sb.cli('h1', 'storage', 'delete', 'nfs1');
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /holds the disks of vm-sp \(on h2\).*\(HF_ERR_CONFLICT\)/);
    await rejectsCode(api('h1').request('DELETE', '/api/v1/storage/pools/nfs1'), 'HF_ERR_CONFLICT', /holds the disks of vm-sp \(on h2\)/);
    await api('h1').request('DELETE', '/api/v1/instances/vm-sp?force=true&wait=60');
    assert.equal(existsSync(join(nfs1, 'instances', 'vm-sp')), false, 'its disks went with it');
    await api('h2').request('DELETE', '/api/v1/storage/pools/nfs1');
    assert.equal(existsSync(join(nfs1, POOL_MARKER_FILE)), false);
    assert.deepEqual((await api('h1').request<{ pools: PoolView[] }>('GET', '/api/v1/storage/pools')).pools.map((p) => p.name), ['default']);
  });

  it('refuses a joining host whose own pool has a shared pool’s name', async () => {
    await api('h1').request('POST', '/api/v1/storage/pools', { name: 'nfs3', path: join(sb.dir, 'shared', 'nfs3'), shared: true });
    const h3 = await sb.add('h3');
    await h3.api.request('POST', '/api/v1/storage/pools', { name: 'nfs3', path: join(h3.dataDir, 'nfs3') });
    const { token } = await api('h1').request<{ token: string }>('POST', '/api/v1/cluster/tokens', { ttl: 600 });
    await rejectsCode(h3.api.request('POST', '/api/v1/cluster/join', { url: 'https://10.213.44.1:8444', token }), 'HF_ERR_NAME_CLASH', /pool nfs3 \(the cluster has a shared pool nfs3/);
  });
});
