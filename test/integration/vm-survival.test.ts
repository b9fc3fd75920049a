// Guests outlive the daemon: three VMs keep running through a daemon SIGKILL and are
// controllable after the restart; a QEMU killed under a running VM marks it crashed and the
// on-failure policy restarts it.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { isProcessAlive } from '../../src/util/proc.js';
import type { HfEvent } from '../../src/services/events.js';
import {
  getInstance,
  op,
  startTestDaemon,
  waitForConsole,
  waitForState,
  useTestDaemon,
  type TestDaemon,
} from '../helpers/daemon.js';

const NAMES = ['s1', 's2', 's3'];

describe('survival: daemon SIGKILL and QEMU death', () => {
  const t = useTestDaemon();

  it('keeps three running VMs through a daemon SIGKILL and re-attaches to all of them', async () => {
    for (const name of NAMES) {
      // accel "auto": the host's probe decides (TCG on these machines)
      const res = await t.d.api.request<{ operation: { id: string } }>('POST', '/api/v1/instances', { name, image: 'tiny', memory: '128M', start: true });
      const done = await t.d.api.waitOperation(res.operation.id);
      assert.equal(done.status, 'success', JSON.stringify(done.error));
    }
    const pids = new Map<string, number>();
    for (const name of NAMES) {
      const i = await getInstance(t.d.api, name);
      assert.equal(i.state, 'running');
      pids.set(name, i.runtime!.pid);
    }

    t.d.proc.kill('SIGKILL');
    await new Promise((r) => t.d.proc.once('exit', r));
    for (const [name, pid] of pids) assert.ok(isProcessAlive(pid), `${name}'s QEMU survives the daemon`);

    t.d = await startTestDaemon(t.dataDir);
    for (const name of NAMES) {
      const i = await getInstance(t.d.api, name);
      assert.equal(i.state, 'running', `${name} is running after the restart`);
      assert.equal(i.runtime?.pid, pids.get(name), `${name} is the same QEMU process`);
    }
    // Controllable: pause/resume one over the re-attached QMP connection, check the console of another.
    assert.equal((await op(t.d.api, 'POST', '/api/v1/instances/s1/pause', {})).status, 'success');
    assert.equal((await getInstance(t.d.api, 's1')).state, 'paused');
    assert.equal((await op(t.d.api, 'POST', '/api/v1/instances/s1/resume', {})).status, 'success');
    await waitForConsole(t.d.api, 's2', /HYPERFOLD-GUEST-READY/);
    const stopped = await op(t.d.api, 'POST', '/api/v1/instances/s3/stop', { force: true });
    assert.equal(stopped.status, 'success', JSON.stringify(stopped.error));
    assert.equal((await getInstance(t.d.api, 's3')).state, 'stopped');
    assert.equal(isProcessAlive(pids.get('s3')!), false);
  });

  it('marks a VM crashed when its QEMU is killed, with an event', async () => {
    const events: HfEvent[] = [];
    const stream = await openEventStream(t.d, events);
    try {
      const pid = (await getInstance(t.d.api, 's2')).runtime!.pid;
      process.kill(pid, 'SIGKILL');
      const i = await waitForState(t.d.api, 's2', 'crashed', 20_000);
      assert.equal(i.lastExit?.clean, false);
      assert.match(i.lastExit?.reason ?? '', /SIGKILL|vanished|without a shutdown/);
      await waitUntil(() => events.some((e) => e.type === 'instance.crashed' && e.data.name === 's2'), 5000);
    } finally {
      stream.close();
    }
  });

  it('restarts a crashed VM with the on-failure policy', async () => {
    const upd = await t.d.api.request<{ applied: string[] }>('PATCH', '/api/v1/instances/s1', { restartPolicy: 'on-failure' });
    assert.deepEqual(upd.applied, ['restartPolicy']);
    const before = await getInstance(t.d.api, 's1');
    // The crashed state lasts only until the policy restarts the VM, too short to poll for: the
    // event stream tells it instead, and it must be told.
    const events: HfEvent[] = [];
    const stream = await openEventStream(t.d, events);
    try {
      process.kill(before.runtime!.pid, 'SIGKILL');
      await waitUntil(() => events.some((e) => e.type === 'instance.crashed' && e.data.name === 's1'), 20_000);
    } finally {
      stream.close();
    }
    const deadline = Date.now() + 60_000;
    let now = await getInstance(t.d.api, 's1');
    while (Date.now() < deadline && !(now.state === 'running' && now.runtime && now.runtime.pid !== before.runtime!.pid)) {
      await new Promise((r) => setTimeout(r, 200));
      now = await getInstance(t.d.api, 's1');
    }
    assert.equal(now.state, 'running');
    assert.notEqual(now.runtime!.pid, before.runtime!.pid, 'a new QEMU process');
    assert.equal(now.restartCount, before.restartCount + 1);
    assert.equal(now.lastExit?.clean, false);
  });
});

async function waitUntil(pred: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Follows GET /api/v1/events (SSE) over TCP with the token. */
async function openEventStream(d: TestDaemon, into: HfEvent[]): Promise<{ close(): void }> {
  const http = await import('node:http');
  const u = new URL(`${d.url}/api/v1/events`);
  return new Promise((resolve, reject) => {
    const req = http.get({ host: u.hostname, port: u.port, path: u.pathname, headers: { authorization: `Bearer ${d.token}` } }, (res) => {
      assert.equal(res.statusCode, 200);
      assert.match(String(res.headers['content-type']), /text\/event-stream/);
      let buf = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        buf += c;
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = block.split('\n').find((l) => l.startsWith('data: '));
          if (data) into.push(JSON.parse(data.slice(6)) as HfEvent);
        }
      });
      resolve({ close: () => req.destroy() });
    });
    req.on('error', reject);
  });
}
