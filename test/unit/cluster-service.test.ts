// The cluster service over an in-memory store: join tokens (wrong, expired, used, another
// cluster's), admission (one name per host, clashes, one token for one host even when two joins
// race), the first three members running etcd, remove, the own-host guard on instance actions and
// the `unknown` state of an offline host's instances. Certificates come from the real openssl.
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import type { Instance } from '../../src/core/model/instance.js';
import { createCa, createHostKeyAndCsr, verifyChain, writeHostPki, signHostCert } from '../../src/cluster/pki.js';
import { decodeJoinToken, encodeJoinToken, hashSecret, newJoinToken } from '../../src/cluster/token.js';
import { ClusterMembers } from '../../src/services/cluster/members.js';
import { EtcdHealth, spaceLevel } from '../../src/services/cluster/etcd-health.js';
import { memberEndpoints } from '../../src/daemon/cluster.js';
import { EventBus } from '../../src/services/events.js';
import { ClusterService, type JoinRequest } from '../../src/services/cluster/service.js';
import { StorageService } from '../../src/services/storage/index.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { silentLogger } from '../../src/util/log.js';
import { FakeDriver } from '../helpers/fake-driver.js';
import { buildWorld, type TestWorld } from '../helpers/world.js';

const rejectsWith = async (p: Promise<unknown>, code: string, re?: RegExp) =>
  assert.rejects(p, (e: unknown) => {
    assert.ok(isHfError(e), `expected an HfError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (re) assert.match(e.message, re);
    return true;
  });

describe('cluster service', () => {
  let dir: string;
  let ca: { certPem: string; keyPem: string };
  let csr: string;
  let kernel: string;
  let w: TestWorld;
  let members: ClusterMembers;
  let svc: ClusterService;
  let storage: StorageService;
  let etcdCalls: string[];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-cluster-'));
    ca = await createCa(join(dir, 'ca'), 'test');
    csr = (await createHostKeyAndCsr(join(dir, 'joiner'), 'h2')).csrPem;
    const host = await createHostKeyAndCsr(join(dir, 'h1'), 'h1');
    const cert = await signHostCert(ca, host.csrPem, { hostName: 'h1', ips: ['10.0.0.1'] });
    await writeHostPki(join(dir, 'h1pki'), { caPem: ca.certPem, certPem: cert, keyPem: host.keyPem });
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'x');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  beforeEach(async () => {
    const store = SqliteStateStore.open(':memory:');
    w = await buildWorld(await mkdtemp(join(dir, 'w-')), { store, drivers: [['vm', new FakeDriver()]] });
    await store.put('/cluster/info', { clusterId: 'c-1', name: 'test', createdAt: new Date().toISOString() });
    await store.put('/cluster/pki/ca', ca);
    members = new ClusterMembers({
      store,
      hostName: 'h1',
      leaseTtl: 5,
      log: silentLogger,
      self: async () => ({ name: 'h1', address: '10.0.0.1', clusterPort: 8444, etcd: { clientUrl: 'https://10.0.0.1:2379', peerUrl: 'https://10.0.0.1:2380' }, cpus: 4, memoryMiB: 4096, overcommit: { cpu: 1, memory: 1 }, version: 't' }),
      usage: () => ({ host: 'h1', at: new Date().toISOString(), memoryUsedMiB: 1, loadavg: 0 }),
    });
    await members.start();
    etcdCalls = [];
    storage = new StorageService({ store, defaultPoolPath: w.dir, instances: w.svc, images: w.images, events: w.events, log: silentLogger });
    await storage.init();
    svc = new ClusterService({
      store,
      hostName: 'h1',
      members,
      instances: w.svc,
      pools: storage,
      leaseTtl: 5,
      pkiDir: join(dir, 'h1pki'),
      log: silentLogger,
      etcd: {
        managed: true,
        addMember: async (name) => {
          etcdCalls.push(`add ${name}`);
          return { initialCluster: `h1=https://10.0.0.1:2380,${name}=https://x:2380` };
        },
        removeMember: async (name) => void etcdCalls.push(`remove ${name}`),
      },
    });
  });

  const joinReq = (token: string, name = 'h2', manifest: JoinRequest['manifest'] = { instances: [], networks: [], ips: [], pools: [] }): JoinRequest => ({
    token,
    csrPem: csr,
    member: { name, address: `10.0.0.${name.slice(1)}`, clusterPort: 8444, cpus: 2, memoryMiB: 2048, overcommit: { cpu: 1, memory: 1 }, version: 't' },
    manifest,
  });

  it('encodes and decodes join tokens, and names what is wrong with a bad one', () => {
    const t = newJoinToken('c-1', 'sha256:ab', 60);
    assert.deepEqual(decodeJoinToken(encodeJoinToken(t)), t);
    assert.throws(() => decodeJoinToken('nope'), /does not start with hfj1/);
    assert.throws(() => decodeJoinToken('hfj1.!!!!'), /not readable|fields are missing/);
  });

  it('admits a host once: signed certificate, member record, etcd member; the token is then used', async () => {
    const { token } = await svc.createToken(600);
    const ans = await svc.admit(joinReq(token));
    assert.equal(ans.clusterId, 'c-1');
    assert.ok(verifyChain(ans.certPem, ca.certPem), 'the certificate chains to the cluster CA');
    assert.equal(ans.etcd.member, true);
    assert.deepEqual(ans.etcd.endpoints, ['https://10.0.0.1:2379', 'https://10.0.0.2:2379']);
    assert.deepEqual(etcdCalls, ['add h2']);
    assert.equal((await members.get('h2'))?.address, '10.0.0.2');
    await rejectsWith(svc.admit(joinReq(token, 'h3')), 'HF_ERR_TOKEN_INVALID', /already used \(by host h2/);
  });

  it('refuses an expired token, a wrong secret and another cluster’s token', async () => {
    const expired = newJoinToken('c-1', 'sha256:x', 60, Date.now() - 120_000);
    await w.store.put(`/cluster/tokens/${expired.id}`, { hash: hashSecret(expired.secret), expiresAt: expired.expiresAt, createdBy: 'h1' });
    await rejectsWith(svc.admit(joinReq(encodeJoinToken(expired))), 'HF_ERR_TOKEN_INVALID', /expired/);
    const { token } = await svc.createToken(600);
    const wrong = { ...decodeJoinToken(token), secret: 'guess' };
    await rejectsWith(svc.admit(joinReq(encodeJoinToken(wrong))), 'HF_ERR_TOKEN_INVALID', /wrong secret/);
    const other = { ...decodeJoinToken(token), clusterId: 'c-2' };
    await rejectsWith(svc.admit(joinReq(encodeJoinToken(other))), 'HF_ERR_TOKEN_INVALID', /another cluster/);
    const unknown = newJoinToken('c-1', 'sha256:x', 600);
    await rejectsWith(svc.admit(joinReq(encodeJoinToken(unknown))), 'HF_ERR_TOKEN_INVALID', /unknown/);
    // None of these used the real token up.
    assert.equal((await svc.admit(joinReq(token))).clusterId, 'c-1');
  });

  it('refuses a second host with a member’s name without using the token', async () => {
    const { token } = await svc.createToken(600);
    await rejectsWith(svc.admit(joinReq(token, 'h1')), 'HF_ERR_ALREADY_EXISTS', /host named h1/);
    assert.equal((await svc.admit(joinReq(token, 'h2'))).etcd.member, true);
  });

  it('lets one of two racing joins with one token win', async () => {
    const { token } = await svc.createToken(600);
    const results = await Promise.allSettled([svc.admit(joinReq(token, 'h2')), svc.admit(joinReq(token, 'h3'))]);
    assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
    const lost = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
    assert.equal((lost.reason as { code: string }).code, 'HF_ERR_TOKEN_INVALID');
  });

  it('runs etcd on the first three members only', async () => {
    const names = ['h2', 'h3', 'h4'];
    const roles: boolean[] = [];
    for (const n of names) roles.push((await svc.admit(joinReq((await svc.createToken(600)).token, n))).etcd.member);
    assert.deepEqual(roles, [true, true, false]);
    assert.deepEqual(etcdCalls, ['add h2', 'add h3']);
  });

  it('lists every clash of a joining host at once, merges an identical network, and an unused one gives way', async () => {
    await w.call('POST', '/api/v1/instances', { name: 'web1', boot: { kind: 'kernel', kernel } });
    const net = { name: 'default', mode: 'nat' as const, subnet: '10.9.0.0/24', gateway: '10.9.0.1', bridge: 'hfbr0', external: false, description: '', createdAt: 'x' };
    await w.store.put('/networks/default', net);
    await w.store.put('/networks/lab', { ...net, name: 'lab', subnet: '10.8.0.0/24', gateway: '10.8.0.1' });
    await w.store.put('/network-ips/default@10.9.0.5', { network: 'default', ip: '10.9.0.5', mac: 'm', instance: 'web1', nic: 'eth0' });
    const manifest = {
      instances: ['web1', 'db1'],
      networks: [{ ...net, bridge: 'other0', createdAt: 'y' }, { ...net, name: 'lab', subnet: '10.7.0.0/24', gateway: '10.7.0.1' }],
      ips: [
        { network: 'default', ip: '10.9.0.5', mac: 'n', instance: 'db1', nic: 'eth0' },
        { network: 'default', ip: '10.9.0.6', mac: 'o', instance: 'db1', nic: 'eth1' },
        { network: 'lab', ip: '10.7.0.5', mac: 'p', instance: 'db1', nic: 'eth2' },
      ],
      pools: [],
    };
    const { token } = await svc.createToken(600);
    await assert.rejects(svc.admit(joinReq(token, 'h2', manifest)), (e: unknown) => {
      assert.ok(isHfError(e, 'HF_ERR_NAME_CLASH'));
      const clashes = (e.details as { clashes: { kind: string; name: string }[] }).clashes;
      assert.deepEqual(clashes.map((c) => `${c.kind} ${c.name}`).sort(), ['address default 10.9.0.5', 'instance web1', 'network lab']);
      return true;
    });
    // The refused join used nothing up: without the clashes, the same token admits the host (its
    // own `lab`, used by no NIC, gives way to the cluster's).
    assert.equal((await svc.admit(joinReq(token, 'h2', { instances: ['db1'], networks: manifest.networks, ips: [manifest.ips[1]!], pools: [] }))).clusterId, 'c-1');
  });

  it('refuses a joining host whose own pool has the name of a shared pool; one of the same storage merges', async () => {
    await storage.createPool({ name: 'nfs1', path: join(w.dir, 'share'), shared: true });
    const id = (await storage.getPool('nfs1')).id;
    const { token } = await svc.createToken(600);
    await assert.rejects(svc.admit(joinReq(token, 'h2', { instances: [], networks: [], ips: [], pools: [{ name: 'default', shared: false }, { name: 'nfs1', shared: false }] })), (e: unknown) => {
      assert.ok(isHfError(e, 'HF_ERR_NAME_CLASH'));
      assert.match(e.message, /pool nfs1 \(the cluster has a shared pool nfs1/);
      assert.deepEqual((e.details as { clashes: { kind: string; name: string }[] }).clashes.map((c) => `${c.kind} ${c.name}`), ['pool nfs1']);
      return true;
    });
    assert.equal((await svc.admit(joinReq(token, 'h2', { instances: [], networks: [], ips: [], pools: [{ name: 'default', shared: false }, { name: 'nfs1', shared: true, id }] }))).clusterId, 'c-1');
    // A removed host's answers about the shared pools go with it.
    await w.store.put('/shared/storage-pool-hosts/nfs1/h2', { pool: 'nfs1', host: 'h2', poolId: id, available: true, since: 'x' });
    await svc.remove('h2');
    assert.deepEqual((await storage.getPool('nfs1')).hosts?.map((h) => h.host), ['h1']);
  });

  it('refuses to remove a host that holds instances unless forced, and removes its etcd member', async () => {
    await svc.admit(joinReq((await svc.createToken(600)).token, 'h2'));
    await w.store.put('/instances/far1', { ...(await makeRecord(w, 'far1')), host: 'h2' });
    await rejectsWith(svc.remove('h2'), 'HF_ERR_HOST_IN_USE', /far1/);
    await svc.remove('h2', { force: true });
    assert.equal(await members.get('h2'), undefined);
    assert.deepEqual(etcdCalls, ['add h2', 'remove h2']);
    await rejectsWith(svc.remove('h9'), 'HF_ERR_HOST_NOT_FOUND');
  });

  it('acts only on its own instances, and shows an offline host’s instances as unknown', async () => {
    await svc.admit(joinReq((await svc.createToken(600)).token, 'h2'));
    await w.store.put('/instances/far1', { ...(await makeRecord(w, 'far1')), host: 'h2' });
    await w.svc.list(); // the cache has caught up once the list shows it
    await rejectsWith(w.svc.action('far1', 'start'), 'HF_ERR_INVALID_STATE', /lives on host h2/);
    await rejectsWith(w.svc.delete('far1'), 'HF_ERR_INVALID_STATE', /lives on host h2/);
    const shown = await svc.present(await w.svc.list());
    assert.equal((shown.find((i) => i.name === 'far1') as unknown as { state: string }).state, 'unknown');
    await rejectsWith(svc.endpoint('h2'), 'HF_ERR_HOST_OFFLINE', /h2 is offline/);
    // h2 comes alive: its instances show their recorded state, and requests can reach it.
    await w.store.put('/cluster/alive/h2', { host: 'h2', at: new Date().toISOString(), memoryUsedMiB: 1, loadavg: 0 });
    await members.alive.waitFor('h2', (v) => v !== undefined, 5000);
    const again = await svc.present(await w.svc.list());
    assert.equal(again.find((i) => i.name === 'far1')?.state, 'stopped');
    assert.equal((await svc.endpoint('h2')).url, 'https://10.0.0.2:8444');
  });

  it('sees a host offline when its heartbeat lease ends', async () => {
    assert.equal(await members.stateOf('h1'), 'online');
    await members.close();
    await members.alive.start().catch(() => undefined);
    const left = await w.store.get('/cluster/alive/h1');
    assert.equal(left, undefined, 'closing revokes the lease: the heartbeat key is gone');
  });
});

/** A stopped instance record like the service writes (made through the API, then renamed). */
async function makeRecord(w: TestWorld, name: string): Promise<Instance> {
  const kernel = join(w.dir, 'k');
  await writeFile(kernel, 'x');
  const res = await w.call('POST', '/api/v1/instances', { name: `${name}-tmpl`, boot: { kind: 'kernel', kernel } });
  const inst = res.json.instance as Instance;
  return { ...inst, name, id: `${inst.id}-x` };
}

describe('etcd space alert', () => {
  it('grades the database size against the quota', () => {
    assert.equal(spaceLevel({ dbSizeBytes: 10, quotaBytes: 100 }), 'ok');
    assert.equal(spaceLevel({ dbSizeBytes: 80, quotaBytes: 100 }), 'warning');
    assert.equal(spaceLevel({ dbSizeBytes: 96, quotaBytes: 100 }), 'critical');
  });

  it('raises one event per change of level, and one when it is back to ok', async () => {
    const events = new EventBus('h1');
    const seen: string[] = [];
    events.subscribe((ev) => {
      if (ev.type === 'cluster.etcd-space') seen.push(String(ev.data.level));
    });
    let size = 10;
    const h = new EtcdHealth({ host: 'h1', events, log: silentLogger, space: async () => ({ dbSizeBytes: size, quotaBytes: 100 }) });
    for (const s of [10, 85, 86, 97, 50]) {
      size = s;
      await h.check();
    }
    assert.deepEqual(seen, ['warning', 'critical', 'ok']);
    assert.equal(h.status.space?.dbSizeBytes, 50);
  });

  it('memberEndpoints: the etcd members to reach, from the member records', () => {
    const m = (u?: string, online = true) => (u ? { etcd: { clientUrl: u }, online } : { online });
    // At a start: every member's URL joins what was known; nothing new → undefined (no change).
    assert.deepEqual(memberEndpoints(['https://a:2379'], [m('https://a:2379'), m('https://b:2379', false), m()]), ['https://a:2379', 'https://b:2379']);
    assert.equal(memberEndpoints(['https://a:2379', 'https://b:2379'], [m('https://b:2379'), m('https://a:2379')]), undefined);
    // Running: a new member's URL once it is online; a removed member's URL goes; an offline member's stays; never none.
    assert.equal(memberEndpoints(['https://a:2379'], [m('https://a:2379'), m('https://b:2379', false)], true), undefined);
    assert.deepEqual(memberEndpoints(['https://a:2379'], [m('https://a:2379'), m('https://b:2379')], true), ['https://a:2379', 'https://b:2379']);
    assert.equal(memberEndpoints(['https://a:2379', 'https://b:2379'], [m('https://a:2379'), m('https://b:2379', false)], true), undefined);
    assert.deepEqual(memberEndpoints(['https://a:2379', 'https://b:2379'], [m('https://a:2379')], true), ['https://a:2379']);
    assert.equal(memberEndpoints(['https://a:2379'], [m()], true), undefined);
  });
});
