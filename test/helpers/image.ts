// The tiny image for tests: built once into a shared cache dir and hard-linked (or copied)
// into each test daemon's data directory.
import { copyFile, link, mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { buildTinyImage, readTinyManifest } from '../../src/images/tiny/build.js';

export const TEST_CACHE = process.env.HYPERFOLD_TEST_CACHE ?? '/var/cache/hyperfold-test';

export async function ensureTestImage(): Promise<string> {
  const dir = join(TEST_CACHE, 'images', 'tiny');
  if (!(await readTinyManifest(dir))) {
    await mkdir(join(TEST_CACHE, 'images'), { recursive: true });
    await buildTinyImage({ destDir: dir, cacheDir: TEST_CACHE });
  }
  return dir;
}

/** Puts the tiny image into `dataDir/images/tiny`. */
export async function installTestImage(dataDir: string): Promise<void> {
  const src = await ensureTestImage();
  const dst = join(dataDir, 'images', 'tiny');
  await mkdir(dst, { recursive: true });
  for (const f of await readdir(src)) {
    await link(join(src, f), join(dst, f)).catch(() => copyFile(join(src, f), join(dst, f)));
  }
}
