// A real three-host cluster on this machine (scripts/cluster-sandbox.sh: a network namespace, a
// daemon and an etcd member per host, TLS between them): instances on every host through one
// host's API, the whole cluster from any host, forwarding (HTTP and the console/exec streams),
// joins that must fail, an etcd member lost and every member stopped, a daemon SIGKILLed.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
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

  it('keeps working with one etcd member killed; its host restarts it', async () => {
    const before = etcdPid(sb.host('h3').dataDir);
    assert.ok(alive(before));
    process.kill(before, 'SIGKILL');
    // Writes through every host still commit (two of three members).
    await api('h1').request('PATCH', '/api/v1/instances/vm-h1', { description: 'written with an etcd member down' });
    const after = await until('h3 restarts its etcd member', async () => {
      const p = etcdPid(sb.host('h3').dataDir);
      return p !== before && alive(p) ? p : undefined;
    }, 30_000);
    assert.notEqual(after, before);
    const v = await api('h3').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h1');
    assert.equal(v.instance.description, 'written with an etcd member down');
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
    assert.equal((await api('h2').request<{ instance: Instance }>('GET', '/api/v1/instances/vm-h1')).instance.description, 'back');
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
