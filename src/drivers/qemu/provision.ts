// A VM's disks at create: a linked clone (qcow2 overlay) of the image's disk as `root`, a blank
// disk for every requested size, and a check that every requested existing file is there. The
// files go in the instance directory, or the pool directory the service made for them
// (`paths.disksDir`); the service removes it if the create fails.
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { HfError } from '../../core/errors.js';
import type { ImageRecord } from '../../core/model/image.js';
import type { DiskConfig, Instance } from '../../core/model/instance.js';
import { parseSize } from '../../core/units.js';
import { QemuImg } from '../../storage/qemu-img.js';
import { createLinkedClone } from '../../storage/overlay.js';
import type { DiskRequest, InstancePaths } from '../driver.js';

/** Builds the VM's disks and returns the instance with them in its config (root first). */
export async function provisionVmDisks(instance: Instance, image: ImageRecord | undefined, paths: InstancePaths, requested: DiskRequest[], qemuImg: QemuImg): Promise<Instance> {
  const disks: DiskConfig[] = [];
  const dir = paths.disksDir ?? paths.dir;
  if (image?.disk) {
    const root = join(dir, 'root.qcow2');
    await createLinkedClone(root, image.disk.path, image.disk.format, qemuImg);
    disks.push({ name: 'root', path: root, format: 'qcow2', media: 'disk', readonly: false });
  }
  for (const d of requested) {
    if (disks.some((x) => x.name === d.name)) throw new HfError('HF_ERR_VALIDATION', `disk name "${d.name}" is used twice`);
    const format = d.format ?? 'qcow2';
    let path = d.path ?? '';
    if (d.size !== undefined) {
      path = join(dir, `${d.name}.${format}`);
      await qemuImg.createBlank(path, parseSize(d.size, `disk ${d.name} size`), format);
    } else {
      try {
        await stat(path);
      } catch {
        throw new HfError('HF_ERR_VALIDATION', `disk ${d.name}: ${path} does not exist`);
      }
    }
    disks.push({ name: d.name, path, format, media: d.media ?? 'disk', bus: d.bus, readonly: d.readonly ?? d.media === 'cdrom', volume: d.volume });
  }
  return { ...instance, config: { ...instance.config, disks: [...disks, ...instance.config.disks] } };
}
