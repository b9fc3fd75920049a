// Liveness by flock (util/flock.ts): the lock is seen from other processes while its holder
// lives, and the kernel drops it when the holder is SIGKILLed; a second taker is refused.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isLockHeld, tryLock } from '../../src/util/flock.js';

const FLOCK_MODULE = new URL('../../src/util/flock.js', import.meta.url).href;

describe('flock liveness', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-flock-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('a missing lock file is a lock nobody holds', async () => {
    assert.equal(await isLockHeld(join(dir, 'nothing-here.lock')), false);
  });

  it('held while this process holds it; a second taker is refused; free after release', async () => {
    const path = join(dir, 'a.lock');
    const lock = await tryLock(path);
    assert.ok(lock, 'taken');
    assert.equal(await isLockHeld(path), true);
    assert.equal(await tryLock(path, 50), undefined, 'a second taker (another open of the file) is refused');
    lock.release();
    assert.equal(await isLockHeld(path), false);
    const again = await tryLock(path, 50);
    assert.ok(again, 'free to take again');
    again.release();
  });

  it('held while another process lives; free once it is SIGKILLed', async () => {
    const path = join(dir, 'b.lock');
    const script = `import(${JSON.stringify(FLOCK_MODULE)}).then(async (m) => { const l = await m.tryLock(${JSON.stringify(path)}); process.stdout.write(l ? 'locked\\n' : 'refused\\n'); setInterval(() => {}, 1000); });`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const exited = new Promise((r) => child.once('exit', r));
    try {
      const first = await new Promise<string>((resolve, reject) => {
        let out = '';
        child.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes('\n')) resolve(out.trim());
        });
        child.once('exit', (code) => reject(new Error(`child exited (${code}) before locking`)));
      });
      assert.equal(first, 'locked');
      assert.equal(await isLockHeld(path), true, 'seen from this process');
      assert.equal(await tryLock(path, 50), undefined);
    } finally {
      child.kill('SIGKILL');
      await exited;
    }
    assert.equal(await isLockHeld(path), false, 'the kernel released it with the process');
  });
});
