import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HfError, isHfError, type ErrorCode } from '../../src/core/errors.js';
import { QmpClient, type QmpDisconnectInfo, type QmpEvent } from '../../src/drivers/qemu/qmp/client.js';
import { Qmp } from '../../src/drivers/qemu/qmp/commands.js';
import { QmpLog, redactArgs } from '../../src/drivers/qemu/qmp/log.js';
import { FakeQmpServer, loadQmpFixture, type FakeQmpServerOptions } from '../helpers/fake-qmp-server.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const tmpDirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'hf-qmp-test-'));
  tmpDirs.push(d);
  return d;
}
after(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

/** Asserts that `p` rejects with an HfError of `code`; returns it. */
async function rejectsWith(p: Promise<unknown>, code: ErrorCode): Promise<HfError> {
  try {
    await p;
  } catch (e) {
    assert.ok(isHfError(e), `expected HfError ${code}, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    return e;
  }
  assert.fail(`expected rejection with ${code}`);
}

async function withServer(
  opts: FakeQmpServerOptions,
  fn: (server: FakeQmpServer, client: QmpClient) => Promise<void>,
  connectOpts: Parameters<typeof QmpClient.connect>[1] = {},
): Promise<void> {
  const server = await FakeQmpServer.start(opts);
  const client = await QmpClient.connect(server.socketPath, { connectTimeoutMs: 2000, defaultTimeoutMs: 2000, ...connectOpts });
  try {
    await fn(server, client);
  } finally {
    await client.close();
    await server.close();
  }
}

describe('QmpClient handshake', { timeout: 15_000 }, () => {
  it('reads the greeting and negotiates capabilities', async () => {
    await withServer({}, async (server, client) => {
      assert.deepEqual(client.greeting, loadQmpFixture('greeting'));
      assert.equal(client.greeting.QMP.version.qemu.major, 7);
      assert.equal(server.received.length, 1);
      assert.equal(server.received[0]!.command, 'qmp_capabilities');
      assert.equal(client.closed, false);
      const kinds = client.log.entries().map((e) => e.kind);
      assert.deepEqual(kinds, ['greeting', 'command', 'reply']);
    });
  });

  it('times out when QEMU sends no greeting (another client holds the monitor)', async () => {
    const server = await FakeQmpServer.start({ noGreeting: true });
    try {
      const err = await rejectsWith(QmpClient.connect(server.socketPath, { connectTimeoutMs: 150 }), 'HF_ERR_QMP_TIMEOUT');
      assert.match(err.message, /greeting/);
    } finally {
      await server.close();
    }
  });

  it('fails when the connection closes during the handshake', async () => {
    const server = await FakeQmpServer.start({ handlers: { qmp_capabilities: () => ({ drop: true }) } });
    try {
      await rejectsWith(QmpClient.connect(server.socketPath, { connectTimeoutMs: 1000 }), 'HF_ERR_QMP_DISCONNECTED');
    } finally {
      await server.close();
    }
  });
});

describe('QmpClient connect retry', { timeout: 15_000 }, () => {
  it('fails at once on a missing socket without retry', async () => {
    const path = join(tmp(), 'nope.sock');
    const retries: string[] = [];
    const err = await rejectsWith(QmpClient.connect(path, { onRetry: (a) => retries.push(a.errno) }), 'HF_ERR_QMP_DISCONNECTED');
    assert.equal(err.details?.errno, 'ENOENT');
    assert.equal(err.details?.attempts, 1);
    assert.deepEqual(retries, []);
  });

  /** A connect that retries; `retried` resolves at its first failed attempt (the errnos seen so far). */
  const retrying = (path: string, extra: { signal?: AbortSignal; retryUntilMs?: number } = {}) => {
    const errnos: string[] = [];
    let first!: () => void;
    const retried = new Promise<void>((r) => (first = r));
    // The deadline only bounds a broken test: the suite's timeout comes first.
    const connecting = QmpClient.connect(path, {
      retryUntilMs: 60_000,
      ...extra,
      onRetry: (a) => {
        errnos.push(a.errno);
        first();
      },
    });
    return { connecting, retried, errnos };
  };

  it('retries ENOENT until the socket appears', async () => {
    const path = join(tmp(), 'late.sock');
    const { connecting, retried, errnos } = retrying(path);
    await retried; // the socket was missing at least once before the server starts
    const server = await FakeQmpServer.start({ socketPath: path });
    try {
      const client = await connecting;
      assert.equal((await new Qmp(client).queryStatus()).status, 'prelaunch');
      assert.deepEqual([...new Set(errnos)], ['ENOENT']);
      await client.close();
    } finally {
      await server.close();
    }
  });

  it('retries ECONNREFUSED (stale socket file) until QEMU listens', async () => {
    const path = join(tmp(), 'stale.sock');
    writeFileSync(path, ''); // connect() on a non-socket file: ECONNREFUSED, like a stale socket
    const { connecting, retried, errnos } = retrying(path);
    await retried;
    const server = await FakeQmpServer.start({ socketPath: path });
    try {
      const client = await connecting;
      assert.equal(errnos[0], 'ECONNREFUSED');
      await client.close();
    } finally {
      await server.close();
    }
  });

  it('stops retrying when the signal aborts', async () => {
    const path = join(tmp(), 'aborted.sock');
    const ac = new AbortController();
    // Retrying for a minute: only the abort can end this within the suite's timeout.
    const { connecting, retried, errnos } = retrying(path, { signal: ac.signal });
    await retried;
    ac.abort(new Error('qemu exited'));
    const err = await rejectsWith(connecting, 'HF_ERR_QMP_DISCONNECTED');
    assert.match(String((err.cause as Error).message), /qemu exited/);
    // Aborted during the wait after a failed attempt: no attempt after that one.
    assert.equal(err.details?.attempts, errnos.length, 'no attempt after the abort');
  });

  it('gives up at the deadline with HF_ERR_QMP_DISCONNECTED', async () => {
    const path = join(tmp(), 'never.sock');
    const t0 = Date.now();
    // Not before the deadline: it kept retrying until then (that it ends at all, the suite's timeout checks).
    const err = await rejectsWith(QmpClient.connect(path, { retryUntilMs: 150 }), 'HF_ERR_QMP_DISCONNECTED');
    const elapsed = Date.now() - t0;
    assert.ok(elapsed >= 140, `gave up after ${elapsed} ms, before the deadline`);
    assert.equal(err.details?.errno, 'ENOENT');
    assert.ok((err.details?.attempts as number) > 2);
  });
});

describe('QmpClient commands', { timeout: 15_000 }, () => {
  it('returns typed replies recorded from QEMU 7.2', async () => {
    await withServer({}, async (_server, client) => {
      const qmp = new Qmp(client);
      assert.deepEqual(await qmp.queryStatus(), { status: 'prelaunch', singlestep: false, running: false });
      const v = await qmp.queryVersion();
      assert.equal(v.qemu.major, 7);
      assert.equal(v.qemu.minor, 2);
      const cpus = await qmp.queryCpusFast();
      assert.equal(cpus.length, 1);
      assert.equal(cpus[0]!['cpu-index'], 0);
      assert.equal(cpus[0]!.target, 'x86_64');
      assert.deepEqual(await qmp.queryKvm(), { enabled: false, present: true });
      assert.equal((await qmp.queryMemorySizeSummary())['base-memory'], 64 * 1024 * 1024);
      assert.equal((await qmp.queryHotpluggableCpus())[0]!['vcpus-count'], 1);
      assert.deepEqual(await qmp.queryBlock(), []);
      assert.deepEqual(await qmp.queryMemoryDevices(), []);
      assert.match(await qmp.humanMonitorCommand('info version'), /^7\.2/);
    });
  });

  it('matches replies by id when they arrive out of order', async () => {
    await withServer(
      {
        handlers: {
          'query-version': () => ({ ...loadQmpFixture<{ return: unknown }>('query-version'), delayMs: 80 }),
          'query-kvm': () => ({ return: { enabled: false, present: true }, delayMs: 40 }),
        },
      },
      async (server, client) => {
        const order: string[] = [];
        const v = client.run<{ qemu: { major: number } }>('query-version').then((r) => (order.push('version'), r));
        const k = client.run<{ present: boolean }>('query-kvm').then((r) => (order.push('kvm'), r));
        const s = client.run<{ status: string }>('query-status').then((r) => (order.push('status'), r));
        const [rv, rk, rs] = await Promise.all([v, k, s]);
        assert.deepEqual(order, ['status', 'kvm', 'version']);
        assert.equal(rv.qemu.major, 7);
        assert.equal(rk.present, true);
        assert.equal(rs.status, 'prelaunch');
        const ids = server.received.map((r) => r.id);
        assert.equal(new Set(ids).size, ids.length, 'ids are unique');
      },
    );
  });

  it('runs many concurrent commands, each getting its own reply', async () => {
    await withServer(
      { handlers: { echo: (args) => ({ return: { n: args?.n }, delayMs: Math.floor(Math.random() * 20) }) } },
      async (_server, client) => {
        const results = await Promise.all(Array.from({ length: 60 }, (_, n) => client.run<{ n: number }>('echo', { n })));
        results.forEach((r, n) => assert.equal(r.n, n));
        assert.equal(client.pendingCount, 0);
      },
    );
  });

  it('turns QMP errors into HF_ERR_QMP_COMMAND with class and desc', async () => {
    await withServer({}, async (_server, client) => {
      const qmp = new Qmp(client);
      const err = await rejectsWith(client.run('no-such-command'), 'HF_ERR_QMP_COMMAND');
      assert.equal(err.details?.class, 'CommandNotFound');
      assert.equal(err.details?.desc, 'The command no-such-command has not been found');
      assert.equal(err.details?.command, 'no-such-command');
      const b = await rejectsWith(qmp.queryBalloon(), 'HF_ERR_QMP_COMMAND');
      assert.equal(b.details?.class, 'DeviceNotActive');
      const d = await rejectsWith(qmp.deviceDel('nope'), 'HF_ERR_QMP_COMMAND');
      assert.equal(d.details?.class, 'DeviceNotFound');
      // the connection is still fine
      assert.equal((await qmp.queryStatus()).status, 'prelaunch');
      const last = client.log.entries().filter((e) => e.kind === 'error');
      assert.equal(last.length, 3);
      assert.equal(last[0]!.error?.class, 'CommandNotFound');
    });
  });

  it('times out with HF_ERR_QMP_TIMEOUT and ignores the late reply', async () => {
    await withServer({ handlers: { 'slow-cmd': () => ({ noReply: true }) } }, async (server, client) => {
      const t0 = Date.now();
      const err = await rejectsWith(client.run('slow-cmd', undefined, { timeoutMs: 60 }), 'HF_ERR_QMP_TIMEOUT');
      assert.ok(Date.now() - t0 >= 55);
      assert.equal(err.details?.command, 'slow-cmd');
      assert.equal(client.pendingCount, 0);
      const id = server.received.find((r) => r.command === 'slow-cmd')!.id;
      server.reply(id, { return: { late: true } });
      // the next command gets its own reply, not the late one
      assert.equal((await new Qmp(client).queryStatus()).status, 'prelaunch');
      const late = client.log.entries().find((e) => e.kind === 'late-reply');
      assert.ok(late, 'late reply logged');
      assert.equal(late.command, 'slow-cmd');
      assert.deepEqual(late.reply, { late: true });
      assert.ok(client.log.entries().some((e) => e.kind === 'timeout' && e.command === 'slow-cmd'));
    });
  });

  it('uses the default timeout when none is given', async () => {
    await withServer(
      { handlers: { 'slow-cmd': () => ({ noReply: true }) } },
      async (_server, client) => {
        await rejectsWith(client.run('slow-cmd'), 'HF_ERR_QMP_TIMEOUT');
      },
      { defaultTimeoutMs: 50 },
    );
  });
});

describe('QmpClient disconnect', { timeout: 15_000 }, () => {
  it('rejects every pending command with HF_ERR_QMP_DISCONNECTED and emits disconnect once', async () => {
    await withServer({ handlers: { hang: () => ({ noReply: true }) } }, async (server, client) => {
      const infos: QmpDisconnectInfo[] = [];
      client.on('disconnect', (i) => infos.push(i));
      const pending = [client.run('hang'), client.run('hang'), client.run('hang', { x: 1 }, { timeoutMs: 60_000 })];
      const waiting = client.waitForEvent('NEVER', 60_000);
      await server.waitForCommand('hang', 3);
      server.dropConnections();
      for (const p of pending) {
        const e = await rejectsWith(p, 'HF_ERR_QMP_DISCONNECTED');
        assert.equal(e.details?.command, 'hang');
      }
      await rejectsWith(waiting, 'HF_ERR_QMP_DISCONNECTED');
      await client.whenClosed;
      // 'disconnect' is emitted in the same turn as the connection closes, before whenClosed
      // resolves: a second one would already be here.
      await client.close();
      assert.equal(infos.length, 1);
      assert.equal(infos[0]!.initiatedByClient, false);
      assert.equal(client.closed, true);
      await rejectsWith(client.run('query-status'), 'HF_ERR_QMP_DISCONNECTED');
      assert.equal(await client.isAlive(), false);
      assert.ok(client.log.entries().some((e) => e.kind === 'disconnect'));
    });
  });

  it('close() rejects pending commands and reports initiatedByClient', async () => {
    await withServer({ handlers: { hang: () => ({ noReply: true }) } }, async (_server, client) => {
      const infos: QmpDisconnectInfo[] = [];
      client.on('disconnect', (i) => infos.push(i));
      const p = client.run('hang');
      await client.close();
      await rejectsWith(p, 'HF_ERR_QMP_DISCONNECTED');
      assert.equal(infos.length, 1);
      assert.equal(infos[0]!.initiatedByClient, true);
    });
  });

  it('quit: the reply races the close, both count as success', async () => {
    await withServer({}, async (server, client) => {
      const qmp = new Qmp(client);
      const shutdown = client.waitForEvent('SHUTDOWN', 1000);
      const disconnected = new Promise<QmpDisconnectInfo>((r) => client.once('disconnect', r));
      await qmp.quit();
      assert.equal((await shutdown).data.reason, 'host-qmp-quit');
      assert.equal((await disconnected).initiatedByClient, false);
      // QEMU that closes without replying
      const c2 = await QmpClient.connect(server.socketPath);
      server.respond('quit', { drop: true });
      await new Qmp(c2).quit();
      await c2.whenClosed;
    });
  });
});

describe('QmpClient events', { timeout: 15_000 }, () => {
  it('emits events with data and timestamp', async () => {
    await withServer({}, async (server, client) => {
      const events: QmpEvent[] = [];
      client.on('event', (e) => events.push(e));
      const before = Date.now();
      server.sendEvent('BLOCK_IO_ERROR', { device: '', 'node-name': 'disk0', operation: 'write', action: 'stop', nospace: true });
      const e = await client.waitForEvent('BLOCK_IO_ERROR', 1000);
      assert.equal(e.event, 'BLOCK_IO_ERROR');
      assert.equal(e.data['node-name'], 'disk0');
      assert.ok(Math.abs(e.timestamp - before) < 2000, 'timestamp in ms');
      assert.equal(events.length, 1);
    });
  });

  it('cont / stop send RESUME / STOP before the reply; waitForEvent catches them', async () => {
    await withServer({}, async (_server, client) => {
      const qmp = new Qmp(client);
      const resumed = client.waitForEvent('RESUME', 1000);
      await qmp.cont();
      await resumed;
      assert.deepEqual(await qmp.queryStatus(), loadQmpFixture<{ return: unknown }>('query-status-running').return);
      const stopped = client.waitForEvent('STOP', 1000);
      await qmp.stop();
      await stopped;
      assert.equal((await qmp.queryStatus()).status, 'paused');
    });
  });

  it('waitForEvent: predicate, timeout, abort', async () => {
    await withServer({}, async (server, client) => {
      const wanted = client.waitForEvent('DEVICE_DELETED', (e) => e.data.device === 'nic1', 1000);
      server.sendEvent('DEVICE_DELETED', { device: 'nic0', path: '/machine/peripheral/nic0' });
      server.sendEvent('DEVICE_DELETED', { device: 'nic1', path: '/machine/peripheral/nic1' });
      assert.equal((await wanted).data.device, 'nic1');
      const t = await rejectsWith(client.waitForEvent('NEVER', 40), 'HF_ERR_QMP_TIMEOUT');
      assert.equal(t.details?.event, 'NEVER');
      const ac = new AbortController();
      const aborted = client.waitForEvent('NEVER', undefined, 60_000, { signal: ac.signal });
      ac.abort(new Error('gave up'));
      await assert.rejects(aborted, /gave up/);
      assert.equal(client.listenerCount('event'), 0, 'waiters clean up after themselves');
    });
  });
});

describe('QmpClient framing', { timeout: 15_000 }, () => {
  it('reassembles messages split into 1-byte chunks (incl. multi-byte UTF-8)', async () => {
    const text = 'héllo ✓ 🚀 QEMU';
    await withServer({ fragmentBytes: 1, handlers: { 'human-monitor-command': () => ({ return: text }) } }, async (_server, client) => {
      assert.equal(client.greeting.QMP.version.qemu.minor, 2);
      assert.equal(await new Qmp(client).humanMonitorCommand('info foo'), text);
    });
  });

  it('handles several messages in one chunk, and a line completed by the next chunk', async () => {
    await withServer({ handlers: { hang: () => ({ noReply: true }) } }, async (server, client) => {
      const events: string[] = [];
      client.on('event', (e) => events.push(e.event));
      const a = client.run<{ a: number }>('hang');
      const b = client.run<{ b: number }>('hang');
      await server.waitForCommand('hang', 2);
      const [ida, idb] = server.received.filter((r) => r.command === 'hang').map((r) => r.id);
      const ts = '"timestamp": {"seconds": 1700000000, "microseconds": 5}';
      server.sendRaw(
        `{${ts}, "event": "STOP"}\r\n{"return": {"b": 2}, "id": ${JSON.stringify(idb)}}\r\n{${ts}, "event": "RESUME"}\r\n{"return": {"a"`,
      );
      assert.deepEqual(await b, { b: 2 });
      await sleep(20);
      server.sendRaw(`: 1}, "id": ${JSON.stringify(ida)}}\r\n`);
      assert.deepEqual(await a, { a: 1 });
      assert.deepEqual(events, ['STOP', 'RESUME']);
    });
  });

  it('ignores garbage and id-less errors without breaking the stream', async () => {
    await withServer({}, async (server, client) => {
      server.sendRaw('this is not json\r\n{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n[1,2]\r\n');
      assert.equal((await new Qmp(client).queryStatus()).status, 'prelaunch');
      const kinds = client.log.entries().map((e) => e.kind);
      assert.ok(kinds.includes('garbage'));
      assert.ok(kinds.includes('late-reply'));
    });
  });
});

describe('QmpClient isAlive', { timeout: 15_000 }, () => {
  it('is true after a bad command, false when QEMU stops answering or is gone', async () => {
    await withServer({ handlers: { 'slow-cmd': () => ({ noReply: true }) } }, async (server, client) => {
      await rejectsWith(client.run('bad-cmd'), 'HF_ERR_QMP_COMMAND');
      assert.equal(await client.isAlive(), true);
      await rejectsWith(client.run('slow-cmd', undefined, { timeoutMs: 30 }), 'HF_ERR_QMP_TIMEOUT');
      assert.equal(await client.isAlive(), true, 'one slow command does not mean QEMU is dead');
      // an error reply still proves QEMU is there
      server.respond('query-status', { error: { class: 'GenericError', desc: 'weird' } });
      assert.equal(await client.isAlive(), true);
      // hung QEMU: no answer at all
      server.respond('query-status', { noReply: true });
      const t0 = Date.now();
      assert.equal(await client.isAlive(50), false);
      assert.ok(Date.now() - t0 < 500);
      server.dropConnections();
      await client.whenClosed;
      assert.equal(await client.isAlive(), false);
    });
  });
});

describe('Qmp jobs', { timeout: 15_000 }, () => {
  const jobEvents = (id: string, statuses: string[]): Array<{ event: string; data: Record<string, unknown> }> =>
    statuses.map((status) => ({ event: 'JOB_STATUS_CHANGE', data: { status, id } }));

  it('snapshotSave + waitForJob: waits for concluded, dismisses, returns the job', async () => {
    let jobs: unknown[] = [];
    await withServer(
      {
        handlers: {
          'snapshot-save': (args, ctx) => {
            const id = String(args?.['job-id']);
            jobs = [{ id, type: 'snapshot-save', status: 'running', 'current-progress': 0, 'total-progress': 1 }];
            setTimeout(() => {
              jobs = [{ id, type: 'snapshot-save', status: 'concluded', 'current-progress': 1, 'total-progress': 1 }];
              ctx.server.sendEvent('JOB_STATUS_CHANGE', { status: 'concluded', id });
            }, 30);
            return { return: {}, eventsBefore: jobEvents(id, ['created', 'running']) };
          },
          'query-jobs': () => ({ return: jobs }),
          'job-dismiss': () => {
            jobs = [];
            return { return: {} };
          },
        },
      },
      async (server, client) => {
        const qmp = new Qmp(client);
        await qmp.snapshotSave({ jobId: 'snap1', tag: 'before-upgrade', vmstate: 'disk0', devices: ['disk0'] });
        const job = await qmp.waitForJob('snap1', 2000);
        assert.equal(job.status, 'concluded');
        const save = server.received.find((r) => r.command === 'snapshot-save')!;
        assert.deepEqual(save.args, { 'job-id': 'snap1', tag: 'before-upgrade', vmstate: 'disk0', devices: ['disk0'] });
        assert.deepEqual(server.received.find((r) => r.command === 'job-dismiss')!.args, { id: 'snap1' });
        assert.deepEqual(await qmp.queryJobs(), []);
      },
    );
  });

  it('waitForJob: a job that already failed throws HF_ERR_QMP_COMMAND (JobFailed) with the recorded error', async () => {
    await withServer(
      {
        handlers: {
          'query-jobs': () => ({ return: loadQmpFixture<{ return: unknown }>('query-jobs-snapshot-concluded-error').return }),
          'job-dismiss': () => ({ return: {} }),
        },
      },
      async (server, client) => {
        const err = await rejectsWith(new Qmp(client).waitForJob('snap0', 1000), 'HF_ERR_QMP_COMMAND');
        assert.equal(err.details?.class, 'JobFailed');
        assert.equal(err.details?.desc, 'At least one device is required for snapshot');
        assert.ok(server.received.some((r) => r.command === 'job-dismiss'));
        assert.equal(client.listenerCount('event'), 0);
      },
    );
  });

  it('sends the documented argument names', async () => {
    await withServer({ handlers: { balloon: () => ({}), block_resize: () => ({}), 'blockdev-del': () => ({}), 'object-add': () => ({}), 'object-del': () => ({}), device_add: () => ({}), system_powerdown: () => ({}) } }, async (server, client) => {
      const qmp = new Qmp(client);
      await qmp.balloon(512 * 1024 * 1024);
      await qmp.blockResize('disk0', 2 ** 30);
      await qmp.blockdevDel('disk0');
      await qmp.objectAdd({ 'qom-type': 'memory-backend-ram', id: 'mem1', size: 2 ** 27 });
      await qmp.objectDel('mem1');
      await qmp.deviceAdd({ driver: 'virtio-net-pci', id: 'net1', netdev: 'nd1' });
      await qmp.systemPowerdown();
      const sent = server.received.slice(1).map((r) => [r.command, r.args]);
      assert.deepEqual(sent, [
        ['balloon', { value: 512 * 1024 * 1024 }],
        ['block_resize', { 'node-name': 'disk0', size: 2 ** 30 }],
        ['blockdev-del', { 'node-name': 'disk0' }],
        ['object-add', { 'qom-type': 'memory-backend-ram', id: 'mem1', size: 2 ** 27 }],
        ['object-del', { id: 'mem1' }],
        ['device_add', { driver: 'virtio-net-pci', id: 'net1', netdev: 'nd1' }],
        ['system_powerdown', undefined],
      ]);
    });
  });

  it('deviceDelAndWait waits for DEVICE_DELETED of that device', async () => {
    await withServer(
      { handlers: { device_del: (args) => ({ return: {}, eventsAfter: [{ event: 'DEVICE_DELETED', data: { device: args?.id, path: `/machine/peripheral/${String(args?.id)}` } }] }) } },
      async (_server, client) => {
        await new Qmp(client).deviceDelAndWait('net1', 1000);
        assert.equal(client.listenerCount('event'), 0);
      },
    );
  });
});

describe('QmpLog', { timeout: 15_000 }, () => {
  it('keeps the last N entries in order', () => {
    const log = new QmpLog({ capacity: 5 });
    for (let i = 0; i < 12; i++) log.record({ dir: 'out', kind: 'command', id: `c${i}`, command: 'query-status' });
    const ids = log.entries().map((e) => e.id);
    assert.deepEqual(ids, ['c7', 'c8', 'c9', 'c10', 'c11']);
    assert.ok(log.entries().every((e) => typeof e.ts === 'number'));
  });

  it('records commands, replies with durations, and events from a client', async () => {
    const log = new QmpLog({ capacity: 50 });
    await withServer(
      {},
      async (server, client) => {
        await new Qmp(client).queryStatus();
        server.sendEvent('RTC_CHANGE', { offset: 1 });
        await client.waitForEvent('RTC_CHANGE', 1000);
        const entries = log.entries();
        const cmd = entries.find((e) => e.kind === 'command' && e.command === 'query-status')!;
        const rep = entries.find((e) => e.kind === 'reply' && e.id === cmd.id)!;
        assert.equal(rep.command, 'query-status');
        assert.equal(rep.dir, 'in');
        assert.equal((rep.reply as { status: string }).status, 'prelaunch');
        assert.ok(typeof rep.durationMs === 'number' && rep.durationMs >= 0);
        const ev = entries.find((e) => e.kind === 'event')!;
        assert.equal(ev.event, 'RTC_CHANGE');
        assert.deepEqual(ev.data, { offset: 1 });
      },
      { log },
    );
  });

  it('redacts secrets', () => {
    assert.deepEqual(redactArgs('object-add', { 'qom-type': 'secret', id: 's0', data: 'hunter2', format: 'raw' }), {
      'qom-type': 'secret',
      id: 's0',
      data: '<redacted>',
      format: 'raw',
    });
    assert.deepEqual(redactArgs('set_password', { protocol: 'vnc', password: 'x' }), { protocol: 'vnc', password: '<redacted>' });
    assert.deepEqual(redactArgs('object-add', { 'qom-type': 'memory-backend-ram', id: 'm', size: 1 }), { 'qom-type': 'memory-backend-ram', id: 'm', size: 1 });
  });

  it('appends JSON lines to a file and caps its size, keeping the newest half', async () => {
    const file = join(tmp(), 'qmp.log');
    const log = new QmpLog({ capacity: 10, file, maxFileBytes: 4096 });
    for (let i = 0; i < 300; i++) {
      log.record({ dir: 'in', kind: 'reply', id: `hf-${i}`, command: 'query-status', reply: { status: 'running', running: true }, durationMs: 0.1 });
      if (i % 50 === 0) await sleep(1); // interleave with the async writer
    }
    await log.flush();
    const size = statSync(file).size;
    assert.ok(size <= 4096, `size ${size}`);
    assert.ok(size >= 1024, `size ${size}`);
    const lines = readFileSync(file, 'utf8').trimEnd().split('\n');
    const parsed = lines.map((l) => JSON.parse(l) as { id: string });
    assert.equal(parsed.at(-1)!.id, 'hf-299', 'newest kept');
    const nums = parsed.map((p) => Number(p.id.slice(3)));
    assert.deepEqual(nums, nums.slice().sort((a, b) => a - b), 'in order, no torn lines');
    assert.equal(log.entries().length, 10);
    assert.equal(log.lastFileError, undefined);
  });

  it('truncates huge payloads in the file but not in the ring', async () => {
    const file = join(tmp(), 'big.log');
    const log = new QmpLog({ file, maxLineBytes: 512 });
    const big = 'x'.repeat(10_000);
    log.record({ dir: 'in', kind: 'reply', id: 'a', command: 'query-qmp-schema', reply: big });
    await log.flush();
    const line = JSON.parse(readFileSync(file, 'utf8')) as { truncated: { bytes: number } };
    assert.ok(line.truncated.bytes > 10_000);
    assert.ok(readFileSync(file).length < 1024);
    assert.equal(log.entries()[0]!.reply, big);
  });

  it('never throws when the file cannot be written', async () => {
    const log = new QmpLog({ file: join(tmp(), 'no', 'such', 'dir', 'x.log') });
    log.record({ dir: 'out', kind: 'command', command: 'x' });
    await log.flush();
    assert.ok(log.lastFileError instanceof Error);
    assert.equal(log.entries().length, 1);
  });
});
