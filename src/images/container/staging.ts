// What every container image builder does around its own steps: build into a temporary tree
// beside the destination and rename it into place only when the build finished (a failed or
// cancelled build leaves the old image, or none, and no half tree); read a manifest back.
import { mkdir, readFile, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';

/** Runs `build(tmp)` in a fresh temporary directory, then moves it to `destDir` (replacing it). */
export async function buildIntoPlace<T>(destDir: string, build: (tmp: string) => Promise<T>, progress?: (p: number, m: string) => void): Promise<T> {
  const tmp = `${destDir}.tmp-${process.pid}-${Date.now()}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  try {
    const made = await build(tmp);
    progress?.(90, 'installing the image');
    await rm(destDir, { recursive: true, force: true });
    await mkdir(dirname(destDir), { recursive: true });
    await rename(tmp, destDir);
    progress?.(100, 'done');
    return made;
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

/** The manifest a builder wrote into `destDir`, if it is there and of the version we know. */
export async function readManifest<T extends { version: number }>(destDir: string, version = 1): Promise<T | undefined> {
  try {
    const m = JSON.parse(await readFile(join(destDir, 'manifest.json'), 'utf8')) as T;
    return m.version === version ? m : undefined;
  } catch {
    return undefined;
  }
}
