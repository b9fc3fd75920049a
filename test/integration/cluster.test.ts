// A real three-host cluster on this machine (scripts/cluster-sandbox.sh: a network namespace, a
// daemon and an etcd member per host, TLS between them): instances on every host through one
// host's API, the whole cluster from any host, forwarding (HTTP and the console/exec streams),
// joins that must fail, an etcd member lost and every member stopped, a daemon SIGKILLed.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Instance } from '../../src/core/model/instance.js';
import type { Operation } from '../../src/core/model/operation.js';
import { consoleRun, waitForConsole } from '../helpers/daemon.js';
import { Sandbox, rejectsCode, until } from '../helpers/sandbox.js';

const TTL = 3;

interface HostView {
  name: string;
  state: string;
  etcdMember: boolean;
  instances: number;
  lastHeartbeat?: string;
}

/** /proc says the process lives (not a zombie). */
function alive(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.[0] !== 'Z';
  } catch {
    return false;
  }
}

/** The pid of a host's etcd member (its supervisor's pid file). */
function etcdPid(dataDir: string): number {
  return Number(readFileSync(join(dataDir, 'cluster', 'etcd.pid'), 'utf8').trim());
}

describe('a three-host cluster', () => {
  let sb: Sandbox;
  const api = (h: string) => sb.host(h).api;
  const members = async (h: string) => (await api(h).request<{ members: HostView[] }>('GET', '/api/v1/cluster/members')).members;
  const opDone = async (h: string, o: Operation) => api(h).request<{ operation: Operation }>('GET', `/api/v1/operations/${o.id}?wait=120`);

  before(async () => {
    sb = await Sandbox.up(3, { prefix: 'hfct', net: '10.213.41', ttl: TTL });
  });
  after(async () => {
    await sb?.down();
  });

  it('forms one cluster: three hosts online, each running an etcd member', async () => {
    const m = await members('h3');
    assert.deepEqual(m.map((x) => [x.name, x.state, x.etcdMember]), [
      ['h1', 'online', true],
      ['h2', 'online', true],
      ['h3', 'online', true],
    ]);
    const list = await sb.cli('h2', 'cluster', 'list');
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, /h1\s+online\s+10\.213\.41\.1\s+member/);
    // Each member's host watches its etcd database against the quota (the space alert).
    const space = await until('h2 measured its etcd database', async () => {
      const { cluster } = await api('h2').request<{ cluster: { etcd: { space?: { level: string; space?: { dbSizeBytes: number; quotaBytes: number } } } } }>('GET', '/api/v1/cluster');
      return cluster.etcd.space?.space ? cluster.etcd.space : undefined;
    }, 10_000);
    assert.equal(space.level, 'ok');
    assert.ok(space.space!.dbSizeBytes > 0 && space.space!.dbSizeBytes < space.space!.quotaBytes);
    assert.equal(space.space!.quotaBytes, 512 * 1024 * 1024);
    // h1 started its daemon with only its own etcd member; it reaches the members that joined since.
    const urls = await until('h1 reaches every etcd member', async () => {
      const { cluster } = await api('h1').request<{ cluster: { etcd: { endpoints: string[] } } }>('GET', '/api/v1/cluster');
      return cluster.etcd.endpoints.length === 3 ? cluster.etcd.endpoints : undefined;
    }, 10_000);
    assert.deepEqual([...urls].sort(), ['https://10.213.41.1:2379', 'https://10.213.41.2:2379', 'https://10.213.41.3:2379']);
    const status = await sb.cli('h2', 'cluster', 'status');
    assert.match(status.stdout, /Space:\s+[\d.]+ MiB of 512\.0 MiB \(\d+%\), ok/);
  });

  it('launches a VM and a container on each host through h1; every host lists all six with their hosts', async () => {
    for (const h of ['h1', 'h2', 'h3']) {
      const vm = await api('h1').request<{ instance: Instance; operation: Operation; placement: { host: string } }>('POST', '/api/v1/instances', { name: `vm-${h}`, image: 'tiny', vcpus: 1, memory: '128M', start: true, target: h });
      assert.equal(vm.instance.host, h);
      const ct = await api('h1').request<{ instance: Instance; operation: Operation }>('POST', '/api/v1/instances', { name: `ct-${h}`, type: 'container', image: 'busybox', memory: '64M', start: true, target: h, nics: [{ network: 'default' }] });
      assert.equal(ct.instance.host, h);
      for (const o of [vm.operation, ct.operation]) {
        const done = (await opDone('h1', o)).operation;
        assert.equal(done.status, 'success', JSON.stringify(done.error));
      }
    }
    const { instances } = await api('h3').request<{ instances: Instance[] }>('GET', '/api/v1/instances');
    const seen = instances.map((i) => `${i.name}@${i.host}:${i.state}`).sort();
    assert.deepEqual(seen, ['ct-h1@h1:running', 'ct-h2@h2:running', 'ct-h3@h3:running', 'vm-h1@h1:running', 'vm-h2@h2:running', 'vm-h3@h3:running']);
    const cli = await sb.cli('h3', 'list');
    assert.match(cli.stdout, /vm-h2\s+vm\s+running.*\bh2\b/);
  });

  it('serves the console and exec of h2’s instances from h3 (forwarded streams)', async () => {
    await waitForConsole(api('h3'), 'vm-h2', /HYPERFOLD-GUEST-READY/);
    const out = await consoleRun(api('h3'), 'vm-h2', 'echo hf-$((6*7))-from-h2', 90_000);
    assert.match(out, /hf-42-from-h2/);
    const ex = await api('h3').request<{ exitCode: number; stdout: string }>('POST', '/api/v1/containers/ct-h2/exec', { command: ['sh', '-c', 'echo $((7*6)) in $(hostname)'] });
    assert.equal(ex.exitCode, 0);
    assert.match(ex.stdout, /42 in ct-h2/);
    // A lifecycle call on another host's instance is forwarded and done there.
    const info = await api('h3').request<{ instance: Instance; live?: unknown }>('GET', '/api/v1/instances/vm-h2');
    assert.equal(info.instance.host, 'h2');
  });

  it('lets an instance on h1 reach one on h3 over the cluster network (VXLAN)', async () => {
    const { addresses } = await api('h1').request<{ addresses: { instance: string; ip?: string }[] }>('GET', '/api/v1/addresses?instance=ct-h3');
    const ip = addresses.find((a) => a.ip)?.ip;
    assert.ok(ip, `ct-h3 has an address: ${JSON.stringify(addresses)}`);
    const ping = await api('h2').request<{ exitCode: number; stdout: string; stderr: string }>('POST', '/api/v1/containers/ct-h1/exec', { command: ['ping', '-c', '2', '-W', '3', ip] });
    assert.equal(ping.exitCode, 0, `${ping.stdout}${ping.stderr}`);
    assert.match(ping.stdout, /2 packets received|2 received/);
  });

  it('refuses joins with a wrong, a used or an expired token, and a host already in the cluster', async () => {
    const h4 = await sb.add('h4');
    const url = 'https://10.213.41.1:8444';
    const { token } = await api('h1').request<{ token: string }>('POST', '/api/v1/cluster/tokens', { ttl: 600 });
    const t = JSON.parse(Buffer.from(token.slice(5), 'base64url').toString()) as Record<string, unknown>;
    const forged = 'hfj1.' + Buffer.from(JSON.stringify({ ...t, s: 'not-the-secret' })).toString('base64url');
    await rejectsCode(h4.api.request('POST', '/api/v1/cluster/join', { url, token: forged }), 'HF_ERR_TOKEN_INVALID', /wrong secret/);
    const pinned = 'hfj1.' + Buffer.from(JSON.stringify({ ...t, f: 'sha256:' + '0'.repeat(64) })).toString('base64url');
    await rejectsCode(h4.api.request('POST', '/api/v1/cluster/join', { url, token: pinned }), 'HF_ERR_TOKEN_INVALID', /presents CA/);
    const expired = 'hfj1.' + Buffer.from(JSON.stringify({ ...t, e: Math.floor(Date.now() / 1000) - 5 })).toString('base64url');
    await rejectsCode(h4.api.request('POST', '/api/v1/cluster/join', { url, token: expired }), 'HF_ERR_TOKEN_INVALID', /expired/);
    await rejectsCode(api('h2').request('POST', '/api/v1/cluster/join', { url, token }), 'HF_ERR_ALREADY_CLUSTERED');
    // A host with a running guest joins: its record moves into the cluster, the guest keeps running.
    const own = await h4.api.request<{ instance: Instance; operation: Operation }>('POST', '/api/v1/instances', { name: 'ct-h4', type: 'container', image: 'busybox', memory: '32M', start: true });
    assert.equal((await h4.api.request<{ operation: Operation }>('GET', `/api/v1/operations/${own.operation.id}?wait=60`)).operation.status, 'success');
    const guestPid = (await h4.api.request<{ instance: Instance }>('GET', '/api/v1/instances/ct-h4')).instance.runtime!.pid;
    // The real token still works (nothing above used it), once.
    const joined = await sb.cli('h4', 'cluster', 'join', url, '--token', token);
    assert.equal(joined.code, 0, joined.stderr);
    const moved = (await api('h1').request<{ instance: Instance }>('GET', '/api/v1/instances/ct-h4')).instance;
    assert.deepEqual([moved.host, moved.state, moved.runtime?.pid], ['h4', 'running', guestPid]);
    assert.ok(alive(guestPid));
    await api('h1').request('DELETE', '/api/v1/instances/ct-h4?force=true&wait=60');
    const m = await members('h1');
    assert.deepEqual(m.find((x) => x.name === 'h4') && [m.find((x) => x.name === 'h4')!.state, m.find((x) => x.name === 'h4')!.etcdMember], ['online', false], 'the fourth host is an etcd client only');
    await rejectsCode(h4.api.request('POST', '/api/v1/cluster/join', { url, token }), 'HF_ERR_ALREADY_CLUSTERED');
    const removed = await sb.cli('h1', 'cluster', 'remove', 'h4');
    assert.equal(removed.code, 0, removed.stderr);
    const refused = await sb.cli('h1', 'cluster', 'remove', 'h2');
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /holds 2 instance/);
  });

  it('init with a guest running: its record moves into etcd with the guest still running; the SQLite file is kept', async () => {
    const h5 = await sb.add('h5');
    const made = await h5.api.request<{ instance: Instance; operation: Operation }>('POST', '/api/v1/instances', { name: 'ct-h5', type: 'container', image: 'busybox', memory: '32M', start: true });
    assert.equal((await h5.api.request<{ operation: Operation }>('GET', `/api/v1/operations/${made.operation.id}?wait=60`)).operation.status, 'success');
    const guestPid = (await h5.api.request<{ instance: Instance }>('GET', '/api/v1/instances/ct-h5')).instance.runtime!.pid;
    const init = await sb.cli('h5', 'cluster', 'init', '--name', 'solo', '--address', '10.213.41.5', '--lease-ttl', String(TTL));
    assert.equal(init.code, 0, init.stderr);
    const { cluster } = await h5.api.request<{ cluster: { clustered: boolean; cluster: { name: string } } }>('GET', '/api/v1/cluster');
    assert.deepEqual([cluster.clustered, cluster.cluster.name], [true, 'solo']);
    const moved = (await h5.api.request<{ instance: Instance }>('GET', '/api/v1/instances/ct-h5')).instance;
    assert.deepEqual([moved.host, moved.state, moved.runtime?.pid], ['h5', 'running', guestPid]);
    assert.ok(alive(guestPid), 'the guest ran through the move');
    assert.ok(existsSync(join(h5.dataDir, 'state.db.pre-cluster')), 'the SQLite file is kept as a backup');
    assert.equal(existsSync(join(h5.dataDir, 'state.db')), false);
    // The record is etcd's now: a change is written there and survives a daemon restart.
    await h5.api.request('PATCH', '/api/v1/instances/ct-h5', { description: 'in etcd' });
    process.kill(await sb.pid('h5'), 'SIGKILL');
    await sb.start('h5');
    const again = (await h5.api.request<{ instance: Instance }>('GET', '/api/v1/instances/ct-h5')).instance;
    assert.deepEqual([again.description, again.state, again.runtime?.pid], ['in etcd', 'running', guestPid]);
    await h5.api.request('DELETE', '/api/v1/instances/ct-h5?force=true&wait=60');
  });

  it('keeps working with one etcd member killed; its host restarts it', async () => {
    const before = etcdPid(sb.host('h3').dataDir);
    assert.ok(alive(before));
    process.kill(before, 'SIGKILL');
    // Writes through every host still commit (two of three members). (One that was on its way to the
    // killed member fails as unavailable, its outcome unknown: clients retry.)
    await until('a write through h1 commits', async () => (await api('h1').request('PATCH', '/api/v1/instances/vm-h1', { description: 'written with an etcd member down' })) ?? true, 20_000);
    const after = await until('h3 restarts its etcd member', async () => {
      const p = etcdPid(sb.host('h3').dataDir);
      return p !== before && alive(p) ? p : undefined;
    }, 30_000);
    assert.notEqual(after, before);
    const v = await api('h3').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h1');
    assert.equal(v.instance.description, 'written with an etcd member down');
    // h1's own member frozen: h1 reaches the other two (it learned of them when they joined).
    const h1etcd = etcdPid(sb.host('h1').dataDir);
    process.kill(h1etcd, 'SIGSTOP');
    try {
      await until('h1 writes through the other members', async () => (await api('h1').request('PATCH', '/api/v1/instances/vm-h1', { description: 'h1 member frozen' })) ?? true, 30_000);
    } finally {
      process.kill(h1etcd, 'SIGCONT');
    }
    assert.equal((await api('h2').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h1')).instance.description, 'h1 member frozen');
  });

  it('with every etcd member stopped: writes answer HF_ERR_CLUSTER_UNAVAILABLE, reads are served, guests run; all recovers', async () => {
    const pids = ['h1', 'h2', 'h3'].map((h) => etcdPid(sb.host(h).dataDir));
    const vmPid = (await api('h1').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h1')).instance.runtime!.pid;
    try {
      for (const p of pids) process.kill(p, 'SIGSTOP');
      await rejectsCode(api('h1').request('PATCH', '/api/v1/instances/vm-h1', { description: 'lost?' }), 'HF_ERR_CLUSTER_UNAVAILABLE');
      // h2's store notices at its next probe (a read every second, 2.5 s deadline): its answers then say stale.
      const res = await until('h2 marks its answers stale', async () => {
        const r = await fetch(`${sb.host('h2').url}/api/v1/instances`, { headers: { authorization: `Bearer ${sb.host('h2').token}` } });
        return r.headers.get('x-hyperfold-stale') === 'true' ? r : undefined;
      }, 15_000);
      assert.equal(res.status, 200);
      assert.equal(((await res.json()) as { instances: unknown[] }).instances.length, 6);
      assert.ok(alive(vmPid), 'the guest keeps running');
    } finally {
      for (const p of pids) process.kill(p, 'SIGCONT');
    }
    await until('writes commit again', async () => (await api('h1').request('PATCH', '/api/v1/instances/vm-h1', { description: 'back' })) ?? true, 60_000);
    // Another host's copy follows once its watch has resumed.
    await until('h2 sees the write', async () => ((await api('h2').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h1')).instance.description === 'back' ? true : undefined), 20_000);
  });

  it('two hosts creating networks at once: both land on different subnets (compare-and-swap on the network version, the loser retries)', async () => {
    const [a, b] = await Promise.all([
      api('h1').request<{ network: { subnet: string } }>('POST', '/api/v1/networks', { name: 'race-a' }),
      api('h3').request<{ network: { subnet: string } }>('POST', '/api/v1/networks', { name: 'race-b' }),
    ]);
    assert.notEqual(a.network.subnet, b.network.subnet);
    const { networks } = await api('h2').request<{ networks: { name: string }[] }>('GET', '/api/v1/networks');
    assert.ok(networks.some((n) => n.name === 'race-a') && networks.some((n) => n.name === 'race-b'));
    await api('h1').request('DELETE', '/api/v1/networks/race-a');
    await api('h1').request('DELETE', '/api/v1/networks/race-b');
  });

  it('one host cut off: the others see it offline and go on; it keeps its guests, refuses writes, serves stale reads; all heals when it is back', async () => {
    const vm = (await api('h3').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h3')).instance;
    await sb.link('h3', false);
    try {
      const cutAt = Date.now();
      // A generous bound: when h3's member led etcd, the others first elect a leader, and a new
      // leader gives every lease a full TTL again; a connection to the cut-off member is found dead
      // by its pings (2 s) first.
      await until('h1 sees h3 offline', async () => ((await members('h1')).find((m) => m.name === 'h3')?.state === 'offline' ? true : undefined), (TTL + 15) * 1000);
      assert.ok(Date.now() - cutAt <= (TTL + 15) * 1000);
      // The majority (h1, h2 and two etcd members) goes on: writes commit, h3's instances are unknown.
      // (A call that went to h3's etcd member before its connection was found dead fails: clients retry.)
      await until('a write through h2 commits', async () => (await api('h2').request('PATCH', '/api/v1/instances/vm-h1', { description: 'written while h3 was cut off' })) ?? true, 20_000);
      const { instances } = await api('h1').request<{ instances: Instance[] }>('GET', '/api/v1/instances');
      assert.equal(instances.find((i) => i.name === 'vm-h3')?.state as string, 'unknown');
      assert.equal(instances.find((i) => i.name === 'vm-h2')?.state, 'running');
      await rejectsCode(api('h1').request('POST', '/api/v1/instances/vm-h3/stop', {}), 'HF_ERR_HOST_OFFLINE', /h3/);
      // h3 alone (its CLI reaches it over the unix socket): its guest runs, its writes are refused.
      assert.ok(alive(vm.runtime!.pid), 'h3’s guest keeps running');
      const write = await sb.cli('h3', 'config', 'set', 'vm-h3', 'description=lost');
      assert.notEqual(write.code, 0);
      assert.match(write.stderr, /HF_ERR_CLUSTER_UNAVAILABLE/);
      const read = await until('h3 marks its answers stale', async () => {
        const r = await sb.cli('h3', 'list', '--format', 'json');
        return /cannot reach the cluster store/.test(r.stderr) ? r : undefined;
      }, 15_000);
      assert.equal(read.code, 0, read.stderr);
      assert.ok((JSON.parse(read.stdout) as Instance[]).some((i) => i.name === 'vm-h3'));
    } finally {
      await sb.link('h3', true);
    }
    await until('h1 sees h3 online again', async () => ((await members('h1')).find((m) => m.name === 'h3')?.state === 'online' ? true : undefined), 60_000);
    // h3 caught up with what the others wrote, and acts on its own instance again.
    await until('h3 sees the write made without it', async () => ((await api('h3').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h1')).instance.description === 'written while h3 was cut off' ? true : undefined), 30_000);
    await until('h3 writes again', async () => (await api('h1').request('PATCH', '/api/v1/instances/vm-h3', { description: 'back' })) ?? true, 30_000);
    const back = await api('h2').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h3');
    assert.equal(back.instance.state, 'running');
    assert.equal(back.instance.description, 'back');
    assert.equal(back.instance.runtime?.pid, vm.runtime!.pid, 'the same guest');
  });

  it('shows a SIGKILLed daemon’s host offline within TTL + 5 s, its instances unknown, its guests running; online again after a restart', async () => {
    const vm = (await api('h2').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h2')).instance;
    const pid = await sb.pid('h2');
    process.kill(pid, 'SIGKILL');
    const killedAt = Date.now();
    await until('h1 sees h2 offline', async () => ((await members('h1')).find((m) => m.name === 'h2')?.state === 'offline' ? true : undefined), (TTL + 5) * 1000);
    assert.ok(Date.now() - killedAt <= (TTL + 5) * 1000);
    const { instances } = await api('h3').request<{ instances: Instance[] }>('GET', '/api/v1/instances');
    assert.equal(instances.find((i) => i.name === 'vm-h2')?.state as string, 'unknown');
    assert.equal(instances.find((i) => i.name === 'vm-h1')?.state, 'running');
    await rejectsCode(api('h1').request('POST', '/api/v1/instances/vm-h2/stop', {}), 'HF_ERR_HOST_OFFLINE', /h2/);
    assert.ok(alive(vm.runtime!.pid), 'h2’s guest keeps running without its daemon');
    await sb.start('h2');
    await until('h1 sees h2 online', async () => ((await members('h1')).find((m) => m.name === 'h2')?.state === 'online' ? true : undefined), 30_000);
    const back = await api('h3').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h2');
    assert.equal(back.instance.state, 'running');
    assert.equal(back.instance.runtime?.pid, vm.runtime!.pid, 'the same guest, re-attached');
  });
});
