// The supervised etcd member (cluster/etcd-process.ts) with the real etcd and openssl: TLS with
// client certificates, restart after a crash, the clear start failures (port in use, damaged data
// directory, missing binary), a stale etcd of an earlier daemon replaced, three members joined one
// after another, and a backup. Everything listens on 127.0.0.1 with its data on tmpfs.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import type { Etcd3 } from 'etcd3';
import { Etcd3 as Etcd3Client } from 'etcd3';
import { isHfError } from '../../src/core/errors.js';
import { etcdArgs, parseInitialCluster, type EtcdMemberConfig } from '../../src/cluster/etcd-args.js';
import { addMember, etcdClient, EtcdSupervisor, listMembers, removeMember, snapshot, type EtcdExit, type EtcdSupervisorOptions } from '../../src/cluster/etcd-process.js';
import { createCa, createHostKeyAndCsr, signHostCert, writeHostPki, type CaFiles, type HostPki, type HostPkiPaths } from '../../src/cluster/pki.js';
import { isProcessAlive, waitForProcessExit } from '../../src/util/proc.js';

const DEADLINE = 120_000;

async function freePort(): Promise<number> {
  const srv = createServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const port = (srv.address() as { port: number }).port;
  await new Promise((r) => srv.close(r));
  return port;
}

interface Host {
  name: string;
  pki: HostPki;
  paths: HostPkiPaths;
  peerUrl: string;
  clientUrl: string;
  dataDir: string;
}

describe('etcd member under supervision (real etcd, TLS)', { timeout: 10 * 60_000 }, () => {
  let root: string;
  let ca: CaFiles;
  const supervisors: EtcdSupervisor[] = [];
  const clients: Etcd3[] = [];
  const strayPids: number[] = [];

  /** A host's certificate, ports and data directory (nothing started). */
  async function makeHost(name: string): Promise<Host> {
    const dir = join(root, name);
    const req = await createHostKeyAndCsr(join(dir, 'pki'), name);
    const certPem = await signHostCert(ca, req.csrPem, { hostName: name, ips: ['127.0.0.1'] });
    const pki = { caPem: ca.certPem, certPem, keyPem: req.keyPem };
    const paths = await writeHostPki(join(dir, 'pki'), pki);
    return { name, pki, paths, peerUrl: `https://127.0.0.1:${await freePort()}`, clientUrl: `https://127.0.0.1:${await freePort()}`, dataDir: join(dir, 'etcd', 'member') };
  }

  function memberConfig(h: Host, initialCluster: string, state: 'new' | 'existing'): EtcdMemberConfig {
    return {
      name: h.name,
      dataDir: h.dataDir,
      peerUrls: [h.peerUrl],
      clientUrls: [h.clientUrl],
      initialCluster: parseInitialCluster(initialCluster),
      state,
      clusterToken: 'test',
      tls: { certFile: h.paths.cert, keyFile: h.paths.key, caFile: h.paths.ca },
    };
  }

  function supervise(h: Host, initialCluster = `${h.name}=${h.peerUrl}`, state: 'new' | 'existing' = 'new', opts: Partial<EtcdSupervisorOptions> = {}): EtcdSupervisor {
    const s = new EtcdSupervisor(memberConfig(h, initialCluster, state), { pki: h.pki, startTimeoutMs: DEADLINE, ...opts });
    supervisors.push(s);
    return s;
  }

  function client(h: Host | Host[]): Etcd3 {
    const hosts = Array.isArray(h) ? h : [h];
    const c = etcdClient(hosts.map((x) => x.clientUrl), hosts[0]!.pki, 10_000);
    clients.push(c);
    return c;
  }

  /** Resolves once `h`'s member answers a status call (a fresh client a try: gRPC backs off). */
  async function answers(h: Host): Promise<void> {
    const deadline = Date.now() + DEADLINE;
    for (;;) {
      const c = etcdClient([h.clientUrl], h.pki, 2000);
      try {
        await c.maintenance.status();
        return;
      } catch (e) {
        if (Date.now() > deadline) throw e;
      } finally {
        c.close();
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  before(async () => {
    root = await mkdtemp(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'hf-etcd-test-'));
    ca = await createCa(join(root, 'ca'), 'test');
  });

  after(async () => {
    for (const c of clients) c.close();
    await Promise.all(supervisors.map((s) => s.stop().catch(() => undefined)));
    for (const pid of strayPids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
      await waitForProcessExit(pid, undefined, 10_000);
    }
    await rm(root, { recursive: true, force: true });
  });

  it('one member: answers with the host certificate, refuses a client without one; a SIGKILL is restarted with the data intact', async () => {
    const h = await makeHost('solo');
    const s = supervise(h);
    await s.start();
    const pid = s.pid!;
    assert.ok(pid > 0 && isProcessAlive(pid));
    const c = client(h);
    await c.put('/greeting').value('hello');
    assert.equal(await c.get('/greeting').string(), 'hello');

    // TLS without a client certificate: the handshake is refused.
    const anonymous = new Etcd3Client({ hosts: h.clientUrl, credentials: { rootCertificate: Buffer.from(h.pki.caPem) }, dialTimeout: 3000 });
    clients.push(anonymous);
    await assert.rejects(anonymous.get('/greeting').string(), /certificate/);
    // …and a certificate of another CA neither.
    const strangerCa = await createCa(join(root, 'stranger-ca'), 'stranger');
    const req = await createHostKeyAndCsr(join(root, 'stranger'), 'stranger');
    const strangerCert = await signHostCert(strangerCa, req.csrPem, { hostName: 'stranger', ips: ['127.0.0.1'] });
    const stranger = new Etcd3Client({
      hosts: h.clientUrl,
      credentials: { rootCertificate: Buffer.from(h.pki.caPem), certChain: Buffer.from(strangerCert), privateKey: Buffer.from(req.keyPem) },
      dialTimeout: 3000,
    });
    clients.push(stranger);
    await assert.rejects(stranger.get('/greeting').string(), /certificate/);

    // A crash: the exit is reported, the member restarted, and the data is still there.
    const exited = once(s, 'exit') as Promise<[EtcdExit]>;
    const restarted = once(s, 'restarted') as Promise<[{ pid: number; attempt: number }]>;
    process.kill(pid, 'SIGKILL');
    const [exit] = await exited;
    assert.equal(exit.signal, 'SIGKILL');
    assert.equal(exit.expected, false);
    const [again] = await restarted;
    assert.notEqual(again.pid, pid);
    assert.equal(s.pid, again.pid);
    assert.ok(isProcessAlive(again.pid));
    assert.equal(again.attempt, 1);
    const c2 = client(h);
    assert.equal(await c2.get('/greeting').string(), 'hello');

    // A second crash soon after (up less than 30 s) counts as the second in a row: a longer delay.
    const restarted2 = once(s, 'restarted') as Promise<[{ pid: number; attempt: number }]>;
    process.kill(again.pid, 'SIGKILL');
    const [third] = await restarted2;
    assert.equal(third.attempt, 2);
    assert.equal(await client(h).get('/greeting').string(), 'hello');

    // stop(): the process ends, no restart follows, the pid file goes.
    const stoppedExit = once(s, 'exit') as Promise<[EtcdExit]>;
    await s.stop();
    const [se] = await stoppedExit;
    assert.equal(se.expected, true);
    assert.equal(s.pid, undefined);
    assert.ok(await waitForProcessExit(third.pid, undefined, 5000));
    assert.equal(existsSync(s.pidFile), false);
  });

  it('an etcd left running by an earlier daemon is stopped and replaced', async () => {
    const h = await makeHost('stale');
    const s = supervise(h);
    // The earlier daemon: etcd started by hand with the same command line and pid file.
    await s.start();
    await s.stop();
    const fd = openSync(join(root, 'stale-etcd.log'), 'a');
    const old = spawn('etcd', etcdArgs(s.member), { detached: true, stdio: ['ignore', fd, fd] });
    closeSync(fd);
    strayPids.push(old.pid!);
    await writeFile(s.pidFile, `${old.pid}\n`);
    const oldExit = once(old, 'exit');
    // It must be up before the new daemon looks: wait until it answers.
    await answers(h);
    await s.start();
    const [, signal] = (await oldExit) as [number | null, string | null];
    assert.equal(signal, 'SIGTERM', 'the stale etcd was asked to stop');
    assert.notEqual(s.pid, old.pid);
    await client(h).put('/k').value('v');
    await s.stop();
  });

  it('a port in use: HF_ERR_ETCD_START naming the port, and nothing left running', async () => {
    const h = await makeHost('busy');
    const port = Number(new URL(h.clientUrl).port);
    const blocker: Server = createServer();
    blocker.listen(port, '127.0.0.1');
    await once(blocker, 'listening');
    try {
      const s = supervise(h);
      await assert.rejects(s.start(), (e) => isHfError(e) && e.code === 'HF_ERR_ETCD_START' && e.message.includes(`port ${port}`) && /already in use/.test(e.message));
      assert.equal(s.pid, undefined);
    } finally {
      await new Promise((r) => blocker.close(r));
    }
  });

  it('a damaged data directory: HF_ERR_ETCD_START saying damaged and how to restore', async () => {
    const h = await makeHost('damaged');
    const s = supervise(h);
    await s.start();
    await client(h).put('/precious').value('data');
    await s.stop();
    // The backend database torn (a disk that lost its tail).
    const db = join(h.dataDir, 'member', 'snap', 'db');
    await truncate(db, 1000);
    const s2 = supervise(h);
    await assert.rejects(s2.start(), (e) => {
      assert.ok(isHfError(e) && e.code === 'HF_ERR_ETCD_START', String(e));
      assert.match(e.message, /damaged data directory/);
      assert.ok(e.message.includes(h.dataDir));
      assert.match(e.message, /restore/i);
      return true;
    });
    assert.equal(s2.pid, undefined);

    // The write-ahead log overwritten with garbage.
    const h2 = await makeHost('damaged-wal');
    const s3 = supervise(h2);
    await s3.start();
    await client(h2).put('/precious').value('data');
    await s3.stop();
    const walDir = join(h2.dataDir, 'member', 'wal');
    const wal = (await readdir(walDir)).find((f) => f.endsWith('.wal'))!;
    await writeFile(join(walDir, wal), Buffer.alloc(64 * 1024, 0x5a));
    const s4 = supervise(h2);
    await assert.rejects(s4.start(), (e) => isHfError(e) && e.code === 'HF_ERR_ETCD_START' && /damaged data directory/.test(e.message));

    // The write-ahead log cut short: etcd repairs the tail, loses its own records and never gets
    // ready. Past the deadline, the repair is named as the damage.
    const h3 = await makeHost('torn-wal');
    const s5 = supervise(h3);
    await s5.start();
    await client(h3).put('/precious').value('data');
    await s5.stop();
    const walDir3 = join(h3.dataDir, 'member', 'wal');
    await truncate(join(walDir3, (await readdir(walDir3)).find((f) => f.endsWith('.wal'))!), 100);
    const s6 = supervise(h3, undefined, undefined, { startTimeoutMs: 15_000 });
    await assert.rejects(s6.start(), (e) => isHfError(e) && /^damaged data directory .*repaired WAL/.test(e.message));
    assert.equal(s6.pid, undefined);
    assert.deepEqual(etcdPidsOf(h3.dataDir), [], 'the silent etcd was killed');
  });

  it('stop() during a start: the start gives up, nothing keeps running', async () => {
    const h = await makeHost('interrupted');
    const s = supervise(h);
    // Its outcome is caught at once: it settles while stop() is awaited.
    const starting = s.start().then(
      () => undefined,
      (e: unknown) => e,
    );
    // Once etcd exists (its pid file is written right after the spawn), stop.
    const deadline = Date.now() + DEADLINE;
    while (!existsSync(s.pidFile) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    await s.stop();
    const e = await starting;
    assert.ok(isHfError(e) && e.code === 'HF_ERR_ETCD_START' && /stopped during its start/.test(e.message), String(e));
    assert.equal(s.pid, undefined);
    assert.deepEqual(etcdPidsOf(h.dataDir), []);
  });

  it('a missing binary: HF_ERR_ETCD_START saying what to install', async () => {
    const h = await makeHost('nobinary');
    const s = supervise(h, undefined, undefined, { binary: '/nonexistent/etcd' });
    await assert.rejects(s.start(), (e) => isHfError(e) && e.code === 'HF_ERR_ETCD_START' && e.message.includes('apt-get install etcd-server'));
  });

  it('three members joined one by one; with one down the cluster still writes; remove and backup', async () => {
    const [a, b, c] = [await makeHost('m1'), await makeHost('m2'), await makeHost('m3')];
    const sa = supervise(a);
    await sa.start();
    const ca1 = client(a);

    const joinB = await addMember(ca1, b.name, b.peerUrl);
    assert.match(joinB.id, /^[0-9a-f]{16}$/);
    const sb = supervise(b, joinB.initialCluster, 'existing');
    await sb.start();

    const joinC = await addMember(ca1, c.name, c.peerUrl);
    assert.equal(parseInitialCluster(joinC.initialCluster).length, 3);
    const sc = supervise(c, joinC.initialCluster, 'existing');
    await sc.start();

    const members = await listMembers(ca1);
    assert.deepEqual(members.map((m) => m.name).sort(), ['m1', 'm2', 'm3']);
    assert.ok(members.every((m) => m.started && m.peerUrls.length === 1));
    assert.equal(members.find((m) => m.name === 'm2')!.id, joinB.id);
    for (const h of [a, b, c]) {
      const st = await client(h).maintenance.status();
      assert.notEqual(st.leader, '0', `${h.name} knows a leader`);
    }

    // One member down (for good: its supervisor stopped): two of three still make a quorum.
    await sc.stop();
    const ab = client([a, b]);
    await ab.put('/after-one-down').value('yes');
    assert.equal(await client(b).get('/after-one-down').string(), 'yes');

    // Remove it by name: two members remain; an unknown name is a named error.
    await removeMember(ab, 'm3');
    assert.deepEqual((await listMembers(ab)).map((m) => m.name).sort(), ['m1', 'm2']);
    await assert.rejects(removeMember(ab, 'm3'), (e) => isHfError(e) && e.code === 'HF_ERR_HOST_NOT_FOUND');

    // A backup that etcdctl accepts, as of now (nothing is written meanwhile).
    const now = (await ab.get('/after-one-down').exec()).header.revision;
    const file = join(root, 'backup.db');
    const snap = await snapshot(ab, file);
    assert.ok(snap.bytes > 0);
    const st = spawnSync('etcdctl', ['snapshot', 'status', file, '-w', 'json'], { encoding: 'utf8', env: { ...process.env, ETCDCTL_API: '3' } });
    assert.equal(st.status, 0, st.stderr);
    const status = JSON.parse(st.stdout) as { revision: number; totalKey: number };
    assert.ok(status.totalKey >= 1, `keys in the snapshot: ${status.totalKey}`);
    assert.equal(String(status.revision), now);
    if (snap.revision !== undefined) assert.equal(snap.revision, now);
  });
});

/** Live processes whose command line names `--data-dir=DIR`. */
function etcdPidsOf(dataDir: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      if (readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0').includes(`--data-dir=${dataDir}`) && isProcessAlive(Number(d))) out.push(Number(d));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}
