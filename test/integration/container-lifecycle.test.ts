// System containers on real runc through the real daemon and CLI: launch, isolation (PID and
// user namespaces, read-only /sys), exec, console, limits (memory with an OOM event, PIDs, live
// changes visible in the cgroup), pause/resume, crash and restart policy, survival of a daemon
// SIGKILL, graceful stop and delete with nothing left.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { hostCgroupLayout, ContainerCgroup, containerCgroupPath } from '../../src/drivers/container/cgroups.js';
import { DEFAULT_RUNC_ROOT } from '../../src/drivers/container/driver.js';
import type { ApiError } from '../../src/cli/client.js';
import { isProcessAlive, waitForProcessExit } from '../../src/util/proc.js';
import { CLI, consoleRun, getInstance, op, startTestDaemon, stopTestDaemon, waitForState, removeNetworkLeftovers, type TestDaemon } from '../helpers/daemon.js';

/** Every runc container whose bundle is under `dataDir` is removed (clean-up even after a failure). */
function removeContainersOf(dataDir: string): void {
  const r = spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'list', '--format', 'json'], { encoding: 'utf8' });
  const list = (r.stdout.trim() && r.stdout.trim() !== 'null' ? JSON.parse(r.stdout) : []) as Array<{ id: string; bundle: string }>;
  for (const c of list) if (c.bundle.startsWith(dataDir)) spawnSync('runc', ['--root', DEFAULT_RUNC_ROOT, 'delete', '--force', c.id]);
}

/** Ready spares of an image on disk (`<data>/containers/spare/<image>/<block>` with a rootfs). */
function readySpares(dataDir: string, image: string): number[] {
  const dir = join(dataDir, 'containers', 'spare', image);
  const names = existsSync(dir) ? readdirSync(dir) : [];
  return names.filter((n) => /^[0-9]+$/.test(n) && existsSync(join(dir, n, 'rootfs'))).map(Number).sort((a, b) => a - b);
}

/** Waits until the image has `want` ready spares and none is being prepared. */
async function sparesSettled(dataDir: string, image: string, want: number, timeoutMs = 60_000): Promise<number[]> {
  const dir = join(dataDir, 'containers', 'spare', image);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ready = readySpares(dataDir, image);
    const busy = existsSync(dir) && readdirSync(dir).some((n) => n.endsWith('.tmp'));
    if (ready.length >= want && !busy) return ready;
    if (Date.now() > deadline) throw new Error(`spares of ${image}: ${ready.join(', ') || 'none'} ready after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The id block a container's container.json names. */
function blockOf(dataDir: string, name: string): number {
  return (JSON.parse(readFileSync(join(dataDir, 'instances', name, 'container.json'), 'utf8')) as { idmap: { hostId: number } }).idmap.hostId;
}

/** The first event of `type` for `name` on the SSE stream (from the start of the daemon's buffer). */
function waitForEvent(d: TestDaemon, type: string, name: string, timeoutMs: number): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const req = http.get({ socketPath: join(d.dataDir, 'hyperfold.sock'), path: `/api/v1/events?since=0&types=${type}` }, (res) => {
      let buf = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        buf += c;
        for (const m of buf.matchAll(/^data: (.*)$/gm)) {
          const ev = JSON.parse(m[1]!) as { type: string; data: Record<string, unknown> };
          if (ev.type === type && ev.data.name === name) {
            clearTimeout(timer);
            req.destroy();
            resolve(ev.data);
            return;
          }
        }
      });
    });
    req.on('error', () => undefined);
    const timer = setTimeout(() => {
      req.destroy();
      reject(new Error(`no ${type} event for ${name} within ${timeoutMs} ms`));
    }, timeoutMs);
  });
}

describe('system containers on runc', () => {
  let dataDir: string;
  let d: TestDaemon;
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', dataDir, ...args], { encoding: 'utf8', timeout: 60_000 });
  const cliIn = (input: string, ...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', dataDir, ...args], { encoding: 'utf8', timeout: 60_000, input });
  const cgroup = async (name: string) => new ContainerCgroup(hostCgroupLayout(), containerCgroupPath((await getInstance(d.api, name)).id));

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'hf-ct-'));
    d = await startTestDaemon(dataDir, { HYPERFOLD_STOP_TIMEOUT_MS: '10000' });
  });
  after(async () => {
    if (d) await stopTestDaemon(d, 'SIGKILL');
    removeContainersOf(dataDir);
    removeNetworkLeftovers(dataDir);
    await rm(dataDir, { recursive: true, force: true });
  });

  it('launches a busybox container with the CLI: init is PID 1, type shows in list', async () => {
    const r = cli('launch', 'busybox', 'c1', '--container', '--cpus', '0.5', '--memory', '64M', '--pids-limit', '40');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /launched container c1 \(running\)/);
    assert.match(cli('list').stdout, /c1\s+container\s+running\s+0\.5\s+64MiB\s+busybox/);
    const inst = await getInstance(d.api, 'c1');
    assert.ok(inst.runtime && isProcessAlive(inst.runtime.pid, inst.runtime.pidStartTime));
    assert.equal(cli('exec', 'c1', '--', 'cat', '/proc/1/comm').stdout.trim(), 'init');
    assert.equal(cli('exec', 'c1', '--', 'hostname').stdout.trim(), 'c1');
  });

  it('cannot see host processes, runs in a user namespace, and has a read-only /sys', async () => {
    const pids = cli('exec', 'c1', '--', 'sh', '-c', 'ls /proc | grep -E "^[0-9]+$"').stdout.trim().split('\n').map(Number);
    assert.ok(pids.length < 10, `few processes inside: ${pids.join(' ')}`);
    assert.ok(!pids.includes(process.pid) || process.pid < 10, 'the test runner is not visible');
    const killHost = cli('exec', 'c1', '--', 'kill', '-0', String(d.proc.pid));
    assert.notEqual(killHost.status, 0, 'the daemon pid cannot be signalled from inside');
    const map = cli('exec', 'c1', '--', 'cat', '/proc/self/uid_map').stdout.trim().split(/\s+/).map(Number);
    assert.equal(map[0], 0);
    assert.ok(map[1]! >= 100_000, `root inside maps to an unprivileged host id (${map[1]})`);
    assert.equal(statSync(join(dataDir, 'instances', 'c1', 'rootfs', 'bin', 'busybox')).uid, map[1], 'the rootfs is owned by the mapped id');
    const touch = cli('exec', 'c1', '--', 'touch', '/sys/hf-test');
    assert.notEqual(touch.status, 0);
    assert.match(touch.stderr, /Read-only file system/);
    assert.match(cli('info', 'c1').stdout, /Privileged:\s+no/);
  });

  it('creates from a spare: moved in whole, owned by its own id block; no two containers (or spares) share a block; privileged ones copy', async () => {
    // The pool refills (2 spares of busybox) after c1's create.
    const before = await sparesSettled(dataDir, 'busybox', 2);
    const c1 = blockOf(dataDir, 'c1');
    assert.ok(!before.includes(c1), 'a spare never holds a running container\'s block');
    assert.equal((await op(d.api, 'POST', '/api/v1/instances', { name: 'sp1', type: 'container', image: 'busybox', memory: '32M', start: true })).status, 'success');
    const sp1 = blockOf(dataDir, 'sp1');
    assert.equal(sp1, before[0], 'the lowest ready spare was taken');
    assert.ok(!existsSync(join(dataDir, 'containers', 'spare', 'busybox', String(sp1))), 'the spare is gone from the pool');
    const root = join(dataDir, 'instances', 'sp1', 'rootfs');
    for (const p of ['', 'bin/busybox', 'etc/inittab', 'sbin/init']) {
      const st = lstatSync(join(root, p));
      assert.equal(st.uid, sp1, `${p || '/'} is owned by the block's root`);
      assert.equal(st.gid, sp1);
    }
    assert.equal(statSync(join(root, 'root')).mode & 0o7777, 0o700, 'modes kept');
    assert.ok(lstatSync(join(dataDir, 'instances', 'sp1', 'console.in')).isFIFO(), 'its console FIFO came with it');
    const map = cli('exec', 'sp1', '--', 'cat', '/proc/self/uid_map').stdout.trim().split(/\s+/).map(Number);
    assert.deepEqual(map, [0, sp1, 65_536]);
    // A second one right away (the pool may be refilling): another block again.
    await d.api.request('POST', '/api/v1/instances', { name: 'sp2', type: 'container', image: 'busybox', memory: '32M' });
    const sp2 = blockOf(dataDir, 'sp2');
    const after = await sparesSettled(dataDir, 'busybox', 2);
    const all = [c1, sp1, sp2, ...after];
    assert.equal(new Set(all).size, all.length, `blocks are unique: ${all.join(' ')}`);
    for (const b of all) assert.equal((b - all[0]!) % 65_536, 0);
    // A privileged container takes no spare and no block: a plain copy of the root-owned tree.
    await d.api.request('POST', '/api/v1/instances', { name: 'pv1', type: 'container', image: 'busybox', memory: '32M', privileged: true });
    const pv = JSON.parse(readFileSync(join(dataDir, 'instances', 'pv1', 'container.json'), 'utf8')) as { idmap?: unknown };
    assert.equal(pv.idmap, undefined);
    for (const p of ['', 'bin/busybox', 'sbin/init']) assert.equal(lstatSync(join(dataDir, 'instances', 'pv1', 'rootfs', p)).uid, 0);
    assert.equal(statSync(join(dataDir, 'instances', 'pv1', 'rootfs', 'tmp')).mode & 0o7777, 0o1777);
    assert.deepEqual(readySpares(dataDir, 'busybox'), after, 'the pool is untouched');
    for (const n of ['sp1', 'sp2', 'pv1']) assert.equal((await op(d.api, 'DELETE', `/api/v1/instances/${n}?force=true`)).status, 'success');
  });

  it('exec returns the output, exit status and stdin of the command; exec into a stopped container is refused', async () => {
    const r = cli('exec', 'c1', '--', 'sh', '-c', 'echo out-$((6*7)); echo err >&2; exit 3');
    assert.equal(r.stdout, 'out-42\n');
    assert.equal(r.stderr, 'err\n');
    assert.equal(r.status, 3);
    assert.equal(cliIn('piped input\n', 'exec', 'c1', '--', 'cat').stdout, 'piped input\n');
  });

  it('runs an interactive session in a terminal of its own: keys in, output out, resize, status back', async () => {
    const ws = d.api.websocket('/api/v1/containers/c1/exec');
    let out = '';
    let exit: number | undefined;
    const sent = new Set<string>();
    let answered = 0;
    const when = (marker: string, send: () => void) => {
      if (out.includes(marker) && !sent.has(marker)) {
        sent.add(marker);
        send();
      }
    };
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`session did not end; got: ${out.slice(-800)}`)), 20_000);
      ws.on('open', () => ws.send(JSON.stringify({ command: ['sh'], tty: true, cols: 100, rows: 40 })));
      ws.on('message', (b: Buffer, isBinary: boolean) => {
        if (!isBinary) {
          const msg = JSON.parse(b.toString()) as { exit?: number; error?: unknown };
          if (msg.error) reject(new Error(`exec refused: ${b.toString()}`));
          exit = msg.exit;
          return;
        }
        assert.equal(b[0], 1, 'a terminal has one stream');
        out += b.subarray(1).toString();
        // At each prompt busybox's shell asks the terminal where the cursor is (ESC[6n) and takes
        // the next input as the answer: answer as a terminal does, before typing anything.
        // Nothing tells when the shell has read the answer, and a line typed right behind it gets
        // mangled ("syntax error"): so this types a moment after the answer, as a person would.
        const queries = out.split('\x1b[6n').length - 1;
        for (; answered < queries; answered++) ws.send(Buffer.from('\x1b[1;5R'));
        const type = (text: string, afterMs = 250) => setTimeout(() => ws.send(Buffer.from(text)), afterMs);
        // Markers are computed by the shell, so the terminal's echo of the typed line never matches.
        if (answered >= 1) when('# ', () => type('echo hf-$((6*7)); tty; stty size; echo mark-$((1+1))\n'));
        if (answered >= 2)
          when('mark-2\r\n', () => {
            // The shell redraws its line when the resize reaches it (SIGWINCH), and a line typed
            // during that redraw is lost: type it again until the shell has answered it.
            ws.send(JSON.stringify({ resize: { cols: 132, rows: 50 } }));
            const line = 'stty size; echo mark-$((2+1))\n';
            type(line, 400);
            const retype = setInterval(() => (out.includes('mark-3\r\n') ? clearInterval(retype) : ws.send(Buffer.from(line))), 2000);
            ws.on('close', () => clearInterval(retype));
          });
        // The resize lands asynchronously (stty on runc's terminal, then SIGWINCH): ask for the
        // size again at each prompt until it shows (the session's deadline bounds this), then exit.
        for (let n = 3; n <= answered; n++) {
          when(`mark-${n}\r\n`, () => {
            const answer = out.slice(out.indexOf(`mark-${n - 1}\r\n`), out.indexOf(`mark-${n}\r\n`));
            type(answer.includes('50 132\r\n') ? 'exit 7\n' : `stty size; echo mark-$((${n}+1))\n`);
          });
        }
      });
      ws.on('close', () => {
        clearTimeout(timer);
        resolve();
      });
      ws.on('error', reject);
    });
    assert.match(out, /hf-42\r\n\/dev\/pts\/\d+\r\n40 100\r\n/, 'a pty of the asked size');
    assert.match(out, /50 132\r\n/, 'the resize reached the terminal');
    assert.equal(exit, 7);
    assert.deepEqual(readdirSync(join(dataDir, 'instances', 'c1')).filter((f) => f.startsWith('exec-')), [], 'no session files left');

    // Without a terminal: stdout and stderr apart, stdin ended by an eof message.
    const plain = d.api.websocket('/api/v1/containers/c1/exec');
    const streams: Record<number, string> = { 1: '', 2: '' };
    let plainExit: number | undefined;
    await new Promise<void>((resolve, reject) => {
      plain.on('open', () => {
        plain.send(JSON.stringify({ command: ['sh', '-c', 'cat; echo oops >&2; exit 2'] }));
        plain.send(Buffer.from('typed text\n'));
        plain.send(JSON.stringify({ eof: true }));
      });
      plain.on('message', (b: Buffer, isBinary: boolean) => {
        if (isBinary) streams[b[0]!] += b.subarray(1).toString();
        else plainExit = (JSON.parse(b.toString()) as { exit: number }).exit;
      });
      plain.on('close', () => resolve());
      plain.on('error', reject);
    });
    assert.deepEqual(streams, { 1: 'typed text\n', 2: 'oops\n' });
    assert.equal(plainExit, 2);

    // The CLI from a terminal (script gives it one) gets a terminal in the container.
    const viaCli = spawnSync('script', ['-qfec', `${process.execPath} ${CLI} --data-dir ${dataDir} exec c1 -- sh -c 'tty; exit 5'`, '/dev/null'], {
      encoding: 'utf8',
      timeout: 30_000,
      input: '',
    });
    assert.match(viaCli.stdout, /\/dev\/pts\/\d+/, viaCli.stdout + viaCli.stderr);
    assert.equal(viaCli.status, 5);
    // A bad first message is refused with a stable code.
    const bad = d.api.websocket('/api/v1/containers/c1/exec');
    const refused = await new Promise<string>((resolve) => {
      bad.on('open', () => bad.send('not json'));
      bad.on('message', (b: Buffer) => resolve((JSON.parse(b.toString()) as { error: { code: string } }).error.code));
    });
    assert.equal(refused, 'HF_ERR_BAD_JSON');
  });

  it('answers on the console (websocket)', async () => {
    const got = await consoleRun(d.api, 'c1', 'echo hf-$((6*7))-console', 15_000);
    assert.match(got, /hf-42-console/);
  });

  it('enforces the PID limit', async () => {
    const cg = await cgroup('c1');
    assert.equal((await cg.usage()).pidsLimit, 40);
    const r = cli('exec', 'c1', '--timeout', '30', '--', 'sh', '-c', 'for i in $(seq 80); do sleep 3 & done 2>&1; wait; echo done');
    assert.match(r.stdout + r.stderr, /can't fork|Resource temporarily unavailable|Try again/i, 'forks beyond the limit fail');
    const u = await cg.usage();
    assert.ok((u.pids ?? 0) <= 40);
    // The shell gave up at the first failed fork: let its sleeps end before the next test.
    const deadline = Date.now() + 10_000;
    while (((await cg.usage()).pids ?? 0) > 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
  });

  it('enforces the memory limit: an allocation beyond it is OOM-killed and an event is published', async () => {
    const event = waitForEvent(d, 'instance.oom', 'c1', 30_000);
    // `tail` keeps the last lines in memory: 200 MiB of zeros without a newline is far over 64 MiB.
    const r = cli('exec', 'c1', '--timeout', '60', '--', 'sh', '-c', 'head -c 200m /dev/zero | tail >/dev/null; echo "tail exit $?"');
    assert.match(r.stdout, /tail exit 137/, `the allocating process was SIGKILLed: ${r.stdout} ${r.stderr}`);
    const ev = await event;
    assert.ok(Number(ev.kills) >= 1);
    assert.ok(((await (await cgroup('c1')).usage()).oomKills ?? 0) >= 1);
    assert.equal((await getInstance(d.api, 'c1')).state, 'running', 'init itself was not the victim');
  });

  it('changes limits of the running container live (config set), visible in the cgroup', async () => {
    const r = cli('config', 'set', 'c1', 'memory=96M', 'cpus=1', 'pids=60');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /applied now: .*memoryMiB/);
    const u = await (await cgroup('c1')).usage();
    assert.equal(u.memoryLimitBytes, 96 * 1024 * 1024);
    assert.equal(u.cpuQuotaUs, 100_000);
    assert.equal(u.pidsLimit, 60);
    const inst = await getInstance(d.api, 'c1');
    assert.equal(inst.config.memoryMiB, 96);
    assert.deepEqual(inst.pending, {});
  });

  it('pauses (freezer) and resumes', async () => {
    assert.equal((await op(d.api, 'POST', '/api/v1/instances/c1/pause', {})).status, 'success');
    assert.equal((await getInstance(d.api, 'c1')).state, 'paused');
    assert.equal(await (await cgroup('c1')).frozen(), true);
    assert.equal((await op(d.api, 'POST', '/api/v1/instances/c1/resume', {})).status, 'success');
    assert.equal(await (await cgroup('c1')).frozen(), false);
    assert.equal(cli('exec', 'c1', '--', 'echo', 'thawed').stdout, 'thawed\n');
  });

  it('keeps running when the daemon is SIGKILLed; a new daemon re-attaches', async () => {
    const before = await getInstance(d.api, 'c1');
    const spares = await sparesSettled(dataDir, 'busybox', 2);
    await stopTestDaemon(d, 'SIGKILL');
    assert.ok(isProcessAlive(before.runtime!.pid, before.runtime!.pidStartTime), 'the container outlived the daemon');
    // What a crash can leave in the pool: a spare half prepared, and one half taken (no rootfs).
    const pool = join(dataDir, 'containers', 'spare', 'busybox');
    mkdirSync(join(pool, '4000000000.tmp', 'rootfs', 'bin'), { recursive: true });
    mkdirSync(join(pool, '3999934464'));
    writeFileSync(join(pool, '3999934464', 'spare.json'), '{}');
    d = await startTestDaemon(dataDir, { HYPERFOLD_STOP_TIMEOUT_MS: '10000' });
    const deadline = Date.now() + 20_000;
    while ((existsSync(join(pool, '4000000000.tmp')) || existsSync(join(pool, '3999934464'))) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    assert.ok(!existsSync(join(pool, '4000000000.tmp')) && !existsSync(join(pool, '3999934464')), 'leftovers removed');
    assert.deepEqual(readySpares(dataDir, 'busybox'), spares, 'ready spares kept for reuse');
    const afterRestart = await getInstance(d.api, 'c1');
    assert.equal(afterRestart.state, 'running');
    assert.equal(afterRestart.runtime?.pid, before.runtime?.pid);
    assert.equal(cli('exec', 'c1', '--', 'echo', 'still-here').stdout, 'still-here\n');
  });

  it('marks a container whose init dies as crashed, and the restart policy brings it back', async () => {
    assert.equal(cli('config', 'set', 'c1', 'restart-policy=on-failure').status, 0);
    const pid = (await getInstance(d.api, 'c1')).runtime!.pid;
    process.kill(pid, 'SIGKILL');
    await waitForProcessExit(pid, undefined, 5000);
    const crashed = await waitForEvent(d, 'instance.crashed', 'c1', 10_000);
    assert.match(String(crashed.reason), /init/);
    const back = await waitForState(d.api, 'c1', 'running', 20_000);
    assert.notEqual(back.runtime?.pid, pid);
    assert.equal(back.restartCount, 1);
  });

  it('stops gracefully (SIGTERM to init), then deletes with nothing left', async () => {
    const inst = await getInstance(d.api, 'c1');
    const stopped = await op(d.api, 'POST', '/api/v1/instances/c1/stop', { timeout: 20 });
    assert.equal(stopped.status, 'success', JSON.stringify(stopped.error));
    assert.doesNotMatch(JSON.stringify(stopped.messages), /forcing/);
    const s = await getInstance(d.api, 'c1');
    assert.equal(s.state, 'stopped');
    assert.equal(s.lastExit?.clean, true);
    assert.ok(!isProcessAlive(inst.runtime!.pid, inst.runtime!.pidStartTime));
    const exec = cli('exec', 'c1', '--', 'true');
    assert.notEqual(exec.status, 0);
    assert.match(exec.stderr, /HF_ERR_INSTANCE_NOT_RUNNING/);
    const del = cli('delete', 'c1');
    assert.equal(del.status, 0, del.stderr);
    assert.equal(existsSync(join(dataDir, 'instances', 'c1')), false);
    assert.equal(existsSync(join(DEFAULT_RUNC_ROOT, inst.id)), false, 'runc state removed');
    const memDir = new ContainerCgroup(hostCgroupLayout(), containerCgroupPath(inst.id)).dir('memory');
    assert.ok(memDir && !existsSync(memDir), 'cgroup removed');
    await assert.rejects(getInstance(d.api, 'c1'), (e: ApiError) => e.code === 'HF_ERR_INSTANCE_NOT_FOUND', 'the record is gone');
  });
});
