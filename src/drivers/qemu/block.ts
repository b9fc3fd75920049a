// Disk hot-plug, hot-unplug and live resize of a running VM over QMP. Node and device ids are
// the ones argv.ts gives cold-plugged disks (diskIds), so a disk attached at start can be
// detached live and vice versa. On q35, a hot-plugged virtio disk goes onto the first empty
// "hotplug-port-N" pcie-root-port (found with query-pci); on pc, onto pci.0.
import { HfError, isHfError } from '../../core/errors.js';
import type { DiskConfig } from '../../core/model/instance.js';
import { diskIds } from './argv.js';
import type { QmpClient } from './qmp/client.js';
import { Qmp } from './qmp/commands.js';

interface PciDevice {
  qdev_id?: string;
  pci_bridge?: { bus: { number: number }; devices?: PciDevice[] };
}
interface PciBus {
  bus: number;
  devices: PciDevice[];
}

/** How long the guest gets to release an unplugged device. */
export const UNPLUG_TIMEOUT_MS = 30_000;

/** The empty hot-plug ports (q35), in order; `null` when the machine has none (pc: use pci.0). */
export async function freeHotplugPorts(qmp: QmpClient): Promise<string[] | null> {
  const buses = await qmp.run<PciBus[]>('query-pci');
  const ports: Array<{ id: string; used: boolean }> = [];
  const walk = (devs: PciDevice[]): void => {
    for (const d of devs) {
      if (d.qdev_id?.startsWith('hotplug-port-')) ports.push({ id: d.qdev_id, used: (d.pci_bridge?.devices?.length ?? 0) > 0 });
      if (d.pci_bridge?.devices) walk(d.pci_bridge.devices);
    }
  };
  for (const b of buses) walk(b.devices);
  const hasPcie = buses.some((b) => b.devices.some((d) => d.qdev_id?.startsWith('port-') || d.qdev_id?.startsWith('hotplug-port-')));
  if (!ports.length && !hasPcie) return null;
  return ports.filter((p) => !p.used).map((p) => p.id).sort((a, b) => Number(a.split('-').pop()) - Number(b.split('-').pop()));
}

/** blockdev-add (file + format node) then device_add; undone step by step on failure. */
export async function hotplugDisk(client: QmpClient, disk: DiskConfig): Promise<{ bus: string }> {
  if (disk.media !== 'disk') throw new HfError('HF_ERR_UNSUPPORTED', `disk ${disk.name}: only hard disks can be hot-plugged (not ${disk.media})`);
  if (disk.bus && disk.bus !== 'virtio') throw new HfError('HF_ERR_UNSUPPORTED', `disk ${disk.name}: hot-plug is supported on the virtio bus only (asked for ${disk.bus})`);
  const qmp = new Qmp(client);
  const ids = diskIds(disk.name);
  const ports = await freeHotplugPorts(client);
  let bus: string;
  if (ports === null) bus = 'pci.0';
  else if (ports.length === 0) throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `no free hot-plug port left for disk ${disk.name}: detach something or attach it while the instance is stopped`);
  else bus = ports[0]!;

  const ro = disk.readonly;
  const file: Record<string, unknown> = { driver: 'file', filename: disk.path, 'node-name': ids.fileNode, 'read-only': ro };
  const fmt: Record<string, unknown> = { driver: disk.format, file: ids.fileNode, 'node-name': ids.formatNode, 'read-only': ro };
  if (!ro) {
    file.discard = 'unmap';
    fmt.discard = 'unmap';
  }
  await qmp.blockdevAdd({ driver: 'file', ...file });
  try {
    await qmp.blockdevAdd({ driver: disk.format, ...fmt });
    try {
      await qmp.deviceAdd({ driver: 'virtio-blk-pci', id: ids.device, drive: ids.formatNode, bus });
    } catch (e) {
      await qmp.blockdevDel(ids.formatNode).catch(() => undefined);
      throw e;
    }
  } catch (e) {
    await qmp.blockdevDel(ids.fileNode).catch(() => undefined);
    throw e;
  }
  return { bus };
}

/** device_del (waiting for the guest to let go), then blockdev-del of both nodes. */
export async function unplugDisk(client: QmpClient, diskName: string, timeoutMs = UNPLUG_TIMEOUT_MS): Promise<void> {
  const qmp = new Qmp(client);
  const ids = diskIds(diskName);
  try {
    await qmp.deviceDelAndWait(ids.device, timeoutMs);
  } catch (e) {
    if (isHfError(e, 'HF_ERR_QMP_TIMEOUT')) {
      throw new HfError('HF_ERR_TIMEOUT', `the guest did not release disk ${diskName} within ${Math.round(timeoutMs / 1000)} s (is its OS hot-plug aware?)`, { cause: e });
    }
    if (!(isHfError(e, 'HF_ERR_QMP_COMMAND') && /not found/i.test(e.message))) throw e;
  }
  for (const node of [ids.formatNode, ids.fileNode]) {
    try {
      await qmp.blockdevDel(node);
    } catch (e) {
      if (!(isHfError(e, 'HF_ERR_QMP_COMMAND') && /not found|Failed to find/i.test(e.message))) throw e;
    }
  }
}

/** Grows a disk of the running VM (block_resize on its format node); the guest sees a capacity change. */
export async function resizeDiskLive(client: QmpClient, diskName: string, sizeBytes: number): Promise<void> {
  await new Qmp(client).blockResize(diskIds(diskName).formatNode, sizeBytes);
}
