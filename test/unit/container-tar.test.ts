// The rootfs archive checker: real archives made with GNU tar (ustar, GNU long names, pax, gzip),
// and archives with absolute, ".." or symlink-traversing members refused before extraction.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import { checkRootfsArchive, extractRootfsArchive, findUnsafeMembers, normalizeMember, type TarEntry } from '../../src/images/container/tar.js';

const entry = (name: string, type: TarEntry['type'] = 'file', linkname = ''): TarEntry => ({ name, type, linkname, size: 0, mode: 0o644, uid: 0, gid: 0, offset: 0 });

function tar(args: string[], cwd: string): void {
  const r = spawnSync('tar', args, { cwd, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
}

describe('rootfs archive checks', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-tar-'));
    const src = join(dir, 'src');
    await mkdir(join(src, 'etc'), { recursive: true });
    await writeFile(join(src, 'etc', 'hostname'), 'x\n');
    const long = 'd'.repeat(120);
    await mkdir(join(src, long), { recursive: true });
    await writeFile(join(src, long, 'f'.repeat(110)), 'long\n');
    await symlink('/etc/hostname', join(src, 'abs-link'));
    for (const fmt of ['gnu', 'pax']) tar(['--format', fmt, '-cf', join(dir, `${fmt}.tar`), '.'], src);
    // ustar has no long names: the short members only (a prefix field splits the path)
    tar(['--format', 'ustar', '-cf', join(dir, 'ustar.tar'), './etc', './abs-link'], src);
    tar(['-czf', join(dir, 'ok.tgz'), '.'], src);
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('lists members of GNU, pax and ustar archives (long names too) and gzip', async () => {
    for (const f of ['gnu.tar', 'pax.tar', 'ok.tgz']) {
      const names = (await checkRootfsArchive(join(dir, f))).map((e) => normalizeMember(e.name));
      assert.ok(names.includes('etc/hostname'), f);
      assert.ok(names.includes(`${'d'.repeat(120)}/${'f'.repeat(110)}`), `${f}: long name`);
      assert.ok(names.includes('abs-link'));
    }
    const ustar = (await checkRootfsArchive(join(dir, 'ustar.tar'))).map((e) => normalizeMember(e.name));
    assert.ok(ustar.includes('etc/hostname'));
  });

  it('extracts a safe archive, symbolic links with absolute targets included', async () => {
    const dest = join(dir, 'out');
    await mkdir(dest);
    await extractRootfsArchive(join(dir, 'ok.tgz'), dest);
    assert.equal(await readFile(join(dest, 'etc', 'hostname'), 'utf8'), 'x\n');
  });

  it('refuses absolute and ".." members and writes nothing', async () => {
    const payload = join(dir, 'payload');
    await writeFile(payload, 'pwned\n');
    tar(['-cPf', join(dir, 'abs.tar'), payload], dir);
    await mkdir(join(dir, 'sub'), { recursive: true });
    tar(['-cPf', join(dir, 'dotdot.tar'), '../payload'], join(dir, 'sub'));
    for (const f of ['abs.tar', 'dotdot.tar']) {
      const dest = join(dir, `dest-${f}`);
      await mkdir(dest);
      await assert.rejects(extractRootfsArchive(join(dir, f), dest), (e: unknown) => isHfError(e, 'HF_ERR_VALIDATION') && /refusing archive/.test((e as Error).message));
      assert.equal(existsSync(join(dest, 'payload')), false);
      assert.equal(existsSync(join(dir, 'sub', 'payload')), false);
    }
  });

  it('refuses hard links out of the tree and paths through an archive symlink', () => {
    const bad = findUnsafeMembers([
      entry('etc', 'dir'),
      entry('link', 'symlink', '/etc'),
      entry('link/passwd'),
      entry('h', 'hardlink', '/etc/shadow'),
      entry('h2', 'hardlink', '../x'),
      entry('./ok/../../x'),
    ]);
    assert.deepEqual(bad.map((b) => b.name), ['link/passwd', 'h', 'h2', './ok/../../x']);
    assert.deepEqual(findUnsafeMembers([entry('./'), entry('./bin/sh', 'symlink', '/bin/busybox'), entry('bin/busybox'), entry('a', 'hardlink', 'bin/busybox')]), []);
  });

  it('refuses something that is not a tar archive', async () => {
    await writeFile(join(dir, 'junk.tar'), Buffer.alloc(2048, 7));
    await assert.rejects(checkRootfsArchive(join(dir, 'junk.tar')), (e: unknown) => isHfError(e, 'HF_ERR_VALIDATION'));
  });
});
