// The spawner that starts runc from a small shell instead of forking the daemon: stdio wiring
// (stdin opened read-write, output appended), exit statuses, requests side by side, arguments it
// cannot carry, and a timeout that kills what it started.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import { Spawner } from '../../src/util/spawner.js';

describe('runc spawner', () => {
  let dir: string;
  const spawner = new Spawner();
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-spawner-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('runs a command with the given stdin and appends its output; answers its exit status', async () => {
    const input = join(dir, 'in');
    const out = join(dir, 'out.log');
    await writeFile(input, 'from stdin\n');
    await writeFile(out, 'before\n');
    const code = await spawner.run(['/bin/sh', '-c', 'cat; echo "arg: $0 $1"; echo err >&2; exit 3', 'a b', '*'], input, out, 10_000);
    assert.equal(code, 3);
    assert.equal(await readFile(out, 'utf8'), 'before\nfrom stdin\narg: a b *\nerr\n', 'spaces and globs pass unchanged');
  });

  it('runs requests side by side', async () => {
    const input = join(dir, 'in');
    // A rendezvous: each waits until all four have arrived (one after another, the first would give up: 99).
    const meet = join(dir, 'meet');
    await mkdir(meet);
    const rendezvous = (i: number) =>
      `touch ${meet}/${i}; n=0; while [ "$(ls ${meet} | wc -l)" -lt 4 ]; do n=$((n+1)); [ $n -gt 160 ] && exit 99; sleep 0.05; done; exit ${i}`;
    const codes = await Promise.all([0, 1, 2, 3].map((i) => spawner.run(['/bin/sh', '-c', rendezvous(i)], input, join(dir, `p${i}.log`), 20_000)));
    assert.deepEqual(codes, [0, 1, 2, 3]);
  });

  it('refuses what a request line cannot carry, and kills a command past its timeout', async () => {
    assert.equal(spawner.usable(['/bin/echo', 'a\tb'], '/x', '/y'), false);
    assert.equal(spawner.usable(['/bin/echo', 'a\nb'], '/x', '/y'), false);
    assert.equal(spawner.usable(['/bin/echo', ''], '/x', '/y'), false);
    assert.equal(spawner.usable(['/bin/echo', 'ok'], '/x', '/y'), true);
    const pidFile = join(dir, 'sleeper.pid');
    await assert.rejects(spawner.run(['/bin/sh', '-c', `echo $$ > ${pidFile}; exec sleep 30`], join(dir, 'in'), join(dir, 't.log'), 300), (e: unknown) => isHfError(e) && e.code === 'HF_ERR_TIMEOUT');
    const pid = Number(await readFile(pidFile, 'utf8'));
    const deadline = Date.now() + 5000;
    let alive = true;
    while (alive && Date.now() < deadline) {
      try {
        process.kill(pid, 0);
        await new Promise((r) => setTimeout(r, 20));
      } catch {
        alive = false;
      }
    }
    assert.equal(alive, false, 'the timed-out command was killed');
  });
});
