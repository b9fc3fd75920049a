// Container copies: a new container whose root filesystem is a copy of another's, shifted into
// an id range of its own, with the definition that came from the source's image. The copy is
// made by `provision` (so a failing create removes it with the instance directory); the copy
// path announces the source first (`prepare`), under the source's lock.
import type { Instance } from '../../core/model/instance.js';
import { HfError } from '../../core/errors.js';
import type { InstancePaths } from '../driver.js';
import { containerFiles, readMeta, writeMeta } from './driver.js';
import { copyTreeShifted } from './rootfs.js';
import { IDMAP_SIZE, type ContainerMeta } from './spec.js';

export interface CopySource {
  dir: string;
  meta: ContainerMeta;
  privileged: boolean;
}

/** Sources announced for the next provision of a name. */
export class CopySources {
  private readonly pending = new Map<string, CopySource>();

  async prepare(src: Instance, srcPaths: InstancePaths, dstName: string): Promise<() => void> {
    if (this.pending.has(dstName)) throw new HfError('HF_ERR_BUSY', `a copy to "${dstName}" is already being made`);
    const source: CopySource = { dir: srcPaths.dir, meta: await readMeta(srcPaths.dir), privileged: src.config.privileged === true };
    this.pending.set(dstName, source);
    return () => {
      if (this.pending.get(dstName) === source) this.pending.delete(dstName);
    };
  }

  get(dstName: string): CopySource | undefined {
    return this.pending.get(dstName);
  }
}

/** Copies the source's tree into `dstDir` (shifted from its id range to `idmap`'s) and writes the metadata. */
export async function provisionCopy(copy: CopySource, dstDir: string, idmap: ContainerMeta['idmap'], progress?: (percent: number, message: string) => void): Promise<void> {
  const fromBase = copy.meta.idmap?.hostId ?? 0;
  const toBase = idmap?.hostId ?? 0;
  await copyTreeShifted(containerFiles(copy.dir).rootfs, containerFiles(dstDir).rootfs, { fromBase, toBase, size: IDMAP_SIZE }, (s) => progress?.(50, `copied ${s.files} files`));
  await writeMeta(dstDir, { ...copy.meta, idmap });
}
