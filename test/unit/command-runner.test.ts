// Helper commands through the command runner (util/exec.ts run() with useCommandRunner): the same
// results and errors as spawning them directly, without forking this process for each.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import { run, useCommandRunner } from '../../src/util/exec.js';
import { Spawner } from '../../src/util/spawner.js';

describe('command runner', () => {
  let dir: string;
  let work: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-runner-'));
    work = await mkdtemp(join(tmpdir(), 'hf-runner-work-'));
    useCommandRunner(new Spawner(), join(dir, 'commands'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
    await rm(work, { recursive: true, force: true });
  });

  it('runs through the shell: not a child of this process, output and status as from a direct spawn', async () => {
    const r = await run('/bin/sh', ['-c', 'echo "ppid=$PPID"; echo out; echo err >&2; cat; exit 3', 'x'], { input: 'piped\n', allowFailure: true });
    assert.equal(r.code, 3);
    assert.match(r.stdout, /^ppid=(\d+)\nout\npiped\n$/);
    assert.notEqual(Number(/ppid=(\d+)/.exec(r.stdout)![1]), process.pid, 'started by the runner shell, not forked from here');
    assert.equal(r.stderr, 'err\n');
    assert.deepEqual(await readdir(join(dir, 'commands')), [], 'each call removes its files');
  });

  it('fails like a direct spawn: the command and its stderr in the error, a missing program as HF_ERR_MISSING_DEPENDENCY', async () => {
    await assert.rejects(run('/bin/sh', ['-c', 'echo broken >&2; exit 2'], { errorCode: 'HF_ERR_HYPERVISOR' }), (e: unknown) => isHfError(e) && e.code === 'HF_ERR_HYPERVISOR' && /failed \(exit 2\): broken/.test(e.message));
    await assert.rejects(run('hf-no-such-program', ['x']), (e: unknown) => isHfError(e) && e.code === 'HF_ERR_MISSING_DEPENDENCY');
    const timedOut = await run('/bin/sh', ['-c', 'sleep 5'], { timeoutMs: 200, allowFailure: true });
    assert.equal(timedOut.code, -1, 'a timed-out command is killed and reported as such');
  });

  it("keeps this process's umask for what commands create, and runs side by side", async () => {
    const old = process.umask(0o022);
    try {
      await run('/bin/sh', ['-c', `mkdir ${join(work, 'd')}; : > ${join(work, 'f')}`]);
      assert.equal((await stat(join(work, 'd'))).mode & 0o777, 0o755);
      assert.equal((await stat(join(work, 'f'))).mode & 0o777, 0o644);
    } finally {
      process.umask(old);
    }
    // A rendezvous: each waits (up to 10 s) until all four have arrived, which only side by side can do.
    const meet = join(work, 'meet');
    await run('/bin/mkdir', [meet]);
    const rendezvous = (i: number) =>
      `touch ${meet}/${i}; n=0; while [ "$(ls ${meet} | wc -l)" -lt 4 ]; do n=$((n+1)); [ $n -gt 200 ] && exit 1; sleep 0.05; done; echo ${i}`;
    const outs = await Promise.all([1, 2, 3, 4].map((i) => run('/bin/sh', ['-c', rendezvous(i)])));
    assert.deepEqual(outs.map((o) => o.stdout), ['1\n', '2\n', '3\n', '4\n']);
  });

  it('still spawns directly what the runner cannot carry: an empty argument, a working directory, an environment', async () => {
    assert.equal((await run('/bin/sh', ['-c', 'printf "[%s]" "$1"', 'x', ''])).stdout, '[]');
    assert.equal((await run('/bin/pwd', [], { cwd: work })).stdout.trim(), work);
    assert.equal((await run('/bin/sh', ['-c', 'echo $HF_X'], { env: { HF_X: 'set' } })).stdout, 'set\n');
  });
});
