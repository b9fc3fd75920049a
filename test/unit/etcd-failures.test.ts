// What a failed etcd start is reported as (cluster/etcd-process.ts), from lines etcd 3.4 really
// logs, and the backup stream's checks on a stream that ends early or arrives damaged.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Etcd3 } from 'etcd3';
import { isHfError } from '../../src/core/errors.js';
import { silentFailure, snapshot, startFailure } from '../../src/cluster/etcd-process.js';

const MEMBER = { name: 'h1', dataDir: '/var/lib/hyperfold/etcd/member', clientUrls: ['https://10.0.0.1:2379'] };

const STARTING = '{"level":"info","ts":"2026-12-04T18:59:34.800Z","caller":"embed/etcd.go:305","msg":"starting an etcd server","etcd-version":"3.4.23"}';
const GRPC_NOISE =
  'WARNING: 2026/12/04 18:59:34 [core] grpc: addrConn.createTransport failed to connect to {127.0.0.1:23791 127.0.0.1:23791 <nil> 0 <nil>}. Err: connection error: desc = "transport: Error while dialing dial tcp 127.0.0.1:23791: connect: connection refused". Reconnecting...';
const PORT_IN_USE = [
  '{"level":"warn","ts":"2026-12-04T18:59:15.115Z","caller":"etcdmain/etcd.go:176","msg":"failed to start etcd","error":"listen tcp 127.0.0.1:38273: bind: address already in use"}',
  '{"level":"fatal","ts":"2026-12-04T18:59:15.115Z","caller":"etcdmain/etcd.go:271","msg":"discovery failed","error":"listen tcp 127.0.0.1:38273: bind: address already in use","stacktrace":"go.etcd.io/etcd/etcdmain.startEtcdOrProxyV2"}',
];
const DB_DAMAGED = [
  '{"level":"panic","ts":"2026-12-04T18:59:34.815Z","caller":"backend/backend.go:162","msg":"failed to open database","path":"/x/member/snap/db","error":"invalid database","stacktrace":"go.etcd.io/etcd/mvcc/backend.newBackend"}',
  'panic: failed to open database',
  '',
  'goroutine 136 [running]:',
  'go.uber.org/zap/zapcore.CheckWriteAction.OnWrite(0x2?, 0x0?, {0x0?, 0x0?, 0xc00007b640?})',
];
const WAL_DAMAGED =
  '{"level":"fatal","ts":"2026-12-04T18:59:37.936Z","caller":"etcdmain/etcd.go:271","msg":"discovery failed","error":"wal: max entry size limit exceeded","stacktrace":"go.etcd.io/etcd/etcdmain.startEtcdOrProxyV2"}';
const WAL_REPAIRED = '{"level":"info","ts":"2026-12-04T18:56:36.431Z","caller":"etcdserver/storage.go:121","msg":"repaired WAL","error":"unexpected EOF"}';
const BAD_FLAG = '{"level":"fatal","ts":"2026-12-04T18:59:40.000Z","caller":"etcdmain/etcd.go:99","msg":"invalid flag","error":"unknown flag --bogus"}';

function log(...lines: string[]): string {
  return lines.join('\n') + '\n';
}

describe('etcd start failures, as reported', () => {
  it('a port in use (from its own log): the port and address', () => {
    const e = startFailure(MEMBER, { code: 1, signal: null }, log(STARTING, ...PORT_IN_USE));
    assert.equal(e.code, 'HF_ERR_ETCD_START');
    assert.match(e.message, /port 38273 on 127\.0\.0\.1 is already in use/);
  });

  it('a damaged database or write-ahead log: "damaged data directory DIR", the cause and how to restore', () => {
    const db = startFailure(MEMBER, { code: 2, signal: null }, log(STARTING, GRPC_NOISE, ...DB_DAMAGED));
    assert.equal(db.code, 'HF_ERR_ETCD_START');
    assert.ok(db.message.startsWith(`damaged data directory ${MEMBER.dataDir}: failed to open database: invalid database`), db.message);
    assert.match(db.message, /restore/i);
    assert.match(db.message, /exit 2/);
    const wal = startFailure(MEMBER, { code: 1, signal: null }, log(STARTING, WAL_DAMAGED));
    assert.match(wal.message, /^damaged data directory .*wal: max entry size limit exceeded/);
  });

  it('an unrelated failure is not called damage, even after a repaired WAL tail; its error lines are quoted, not the stack', () => {
    const e = startFailure(MEMBER, { code: 1, signal: null }, log(STARTING, WAL_REPAIRED, BAD_FLAG, 'goroutine 1 [running]:'));
    assert.doesNotMatch(e.message, /damaged/);
    assert.match(e.message, /exited during its start \(exit 1\): invalid flag: unknown flag --bogus$/);
    const killed = startFailure(MEMBER, { code: null, signal: 'SIGKILL' }, '');
    assert.match(killed.message, /killed by SIGKILL\): \(no output\)/);
  });

  it('silent past the deadline: a repaired WAL is named as damage; otherwise the quorum hint', () => {
    const damaged = silentFailure(MEMBER, 60_000, log(STARTING, WAL_REPAIRED));
    assert.match(damaged.message, /^damaged data directory .*repaired WAL: unexpected EOF.*within 60 s/);
    const waiting = silentFailure(MEMBER, 60_000, log(STARTING));
    assert.match(waiting.message, /did not answer on https:\/\/10\.0\.0\.1:2379 within 60 s.*quorum/);
  });
});

/** A client whose snapshot stream sends `chunks` and then ends (or fails). */
function fakeClient(chunks: Buffer[], failWith?: Error): Etcd3 {
  return {
    maintenance: {
      snapshot: async () => {
        const s = Object.assign(new EventEmitter(), { pause() {}, resume() {} });
        setImmediate(() => {
          for (const blob of chunks) s.emit('data', { header: null, remaining_bytes: '0', blob });
          if (failWith) s.emit('error', failWith);
          else s.emit('end');
        });
        return s;
      },
    },
  } as unknown as Etcd3;
}

describe('etcd backup stream', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-snap-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const body = Buffer.from('bbolt database bytes '.repeat(1000));
  const sum = createHash('sha256').update(body).digest();
  const whole = Buffer.concat([body, sum]);

  it('a whole stream (checksum split across chunks) is saved with its checksum', async () => {
    const file = join(dir, 'ok.db');
    const r = await snapshot(fakeClient([whole.subarray(0, 5000), whole.subarray(5000, whole.length - 10), whole.subarray(whole.length - 10)]), file);
    assert.equal(r.bytes, whole.length);
    assert.equal(r.revision, undefined);
    assert.ok(readFileSync(file).equals(whole));
  });

  it('a damaged or cut stream leaves no file', async () => {
    const damaged = Buffer.from(whole);
    damaged[100] ^= 1;
    await assert.rejects(snapshot(fakeClient([damaged]), join(dir, 'bad.db')), (e) => isHfError(e) && e.code === 'HF_ERR_CLUSTER_UNAVAILABLE');
    await assert.rejects(snapshot(fakeClient([whole.subarray(0, 4000)]), join(dir, 'cut.db')), (e) => isHfError(e) && /ended early or is damaged/.test(e.message));
    await assert.rejects(snapshot(fakeClient([whole.subarray(0, 4000)], new Error('connection reset')), join(dir, 'reset.db')), /connection reset/);
    assert.equal(existsSync(join(dir, 'bad.db')), false);
    assert.deepEqual(readdirSync(dir).sort(), ['ok.db'], 'no partial file remains');
  });
});
