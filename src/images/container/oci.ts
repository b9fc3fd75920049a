// Importing container images: an OCI image (an OCI layout directory or a docker-archive tarball,
// read by Debian's skopeo and unpacked by umoci, which applies layers and whiteouts safely), or
// a plain root filesystem tarball (checked member by member first, see tar.ts). The result is an
// image directory with `rootfs/` and a manifest; the OCI config's entrypoint, command,
// environment and working directory become the container's init.
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError } from '../../core/errors.js';
import { run, which } from '../../util/exec.js';
import { extractRootfsArchive } from './tar.js';

export const IMPORT_FORMATS = ['oci-layout', 'docker-archive', 'rootfs-tar'] as const;
export type ImportFormat = (typeof IMPORT_FORMATS)[number];

export interface ImportedImage {
  version: 1;
  format: ImportFormat;
  source: string;
  importedAt: string;
  init: string[];
  env: string[];
  cwd: string;
  sizeBytes: number;
}

async function need(tool: string, pkg: string): Promise<string> {
  const p = (await which(tool)) ?? (await which(`/usr/sbin/${tool}`));
  if (!p) throw new HfError('HF_ERR_MISSING_DEPENDENCY', `${tool} is needed to import this image: run \`apt-get install -y ${pkg}\``);
  return p;
}

/** Guesses the format of `source`: a directory with oci-layout is an OCI layout, a tar with manifest.json a docker archive. */
export async function detectFormat(source: string): Promise<ImportFormat> {
  const st = await stat(source).catch(() => undefined);
  if (!st) throw new HfError('HF_ERR_VALIDATION', `${source} does not exist`);
  if (st.isDirectory()) {
    try {
      await stat(join(source, 'oci-layout'));
      return 'oci-layout';
    } catch {
      throw new HfError('HF_ERR_VALIDATION', `${source} is a directory without an oci-layout file: not an OCI image layout`);
    }
  }
  const list = await run('tar', ['--list', '--file', source], { allowFailure: true, timeoutMs: 120_000 });
  if (list.code === 0 && /^(\.\/)?manifest\.json$/m.test(list.stdout) && !/^(\.\/)?(etc|bin|usr)\//m.test(list.stdout)) return 'docker-archive';
  return 'rootfs-tar';
}

/** Parses the runtime config umoci writes (pure): the init, environment and working directory. */
export function initFromRuntimeConfig(cfg: unknown): { init: string[]; env: string[]; cwd: string } {
  const p = (cfg as { process?: { args?: unknown; env?: unknown; cwd?: unknown } } | undefined)?.process ?? {};
  const args = Array.isArray(p.args) && p.args.every((a) => typeof a === 'string') && p.args.length ? (p.args as string[]) : ['/sbin/init'];
  const env = Array.isArray(p.env) ? (p.env as unknown[]).filter((e): e is string => typeof e === 'string') : [];
  const cwd = typeof p.cwd === 'string' && p.cwd ? p.cwd : '/';
  return { init: args, env, cwd };
}

/**
 * Imports `source` into `destDir` (created here, removed again on failure). `workDir` is for
 * temporary files (the OCI layout copy and umoci's bundle).
 */
export async function importContainerImage(opts: {
  source: string;
  format?: ImportFormat;
  destDir: string;
  workDir: string;
  progress: (p: number, m: string) => void;
}): Promise<ImportedImage> {
  const format = opts.format ?? (await detectFormat(opts.source));
  const tmp = join(opts.workDir, `import-${process.pid}-${Date.now()}`);
  await mkdir(tmp, { recursive: true, mode: 0o700 });
  const staged = join(tmp, 'image');
  await mkdir(staged);
  try {
    let init: { init: string[]; env: string[]; cwd: string } = { init: ['/sbin/init'], env: [], cwd: '/' };
    if (format === 'rootfs-tar') {
      opts.progress(10, 'checking the archive');
      await mkdir(join(staged, 'rootfs'), { mode: 0o755 });
      opts.progress(30, 'extracting the root filesystem');
      await extractRootfsArchive(opts.source, join(staged, 'rootfs'));
    } else {
      const skopeo = await need('skopeo', 'skopeo');
      const umoci = await need('umoci', 'umoci');
      const layout = join(tmp, 'layout');
      const src = format === 'docker-archive' ? `docker-archive:${opts.source}` : `oci:${opts.source}`;
      opts.progress(10, `reading ${format} with skopeo`);
      await run(skopeo, ['--insecure-policy', 'copy', '--quiet', src, `oci:${layout}:hyperfold-import`], { errorCode: 'HF_ERR_VALIDATION', timeoutMs: 30 * 60_000 });
      opts.progress(50, 'unpacking layers with umoci');
      const bundle = join(tmp, 'bundle');
      await run(umoci, ['unpack', '--image', `${layout}:hyperfold-import`, bundle], { errorCode: 'HF_ERR_VALIDATION', timeoutMs: 30 * 60_000 });
      init = initFromRuntimeConfig(JSON.parse(await readFile(join(bundle, 'config.json'), 'utf8')));
      await rename(join(bundle, 'rootfs'), join(staged, 'rootfs'));
    }
    opts.progress(90, 'registering the image');
    const du = await run('du', ['-sb', join(staged, 'rootfs')]);
    const manifest: ImportedImage = {
      version: 1,
      format,
      source: opts.source,
      importedAt: new Date().toISOString(),
      ...init,
      sizeBytes: Number(du.stdout.split(/\s/)[0]),
    };
    await writeFile(join(staged, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    await rm(opts.destDir, { recursive: true, force: true });
    await rename(staged, opts.destDir);
    return manifest;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
