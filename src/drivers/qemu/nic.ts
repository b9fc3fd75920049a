// NIC hot-plug and hot-unplug of a running VM over QMP. The ids are the ones argv.ts gives
// cold-plugged NICs (nicIds: netdev net-<nic>, device nic-<nic>), so a NIC attached at start can
// be removed live and vice versa. The tap (NicConfig.hostIface) must exist before attachNic: the
// network layer creates it and puts it on the bridge.
//
// The device model follows the instance's device model without needing the config: a NIC the
// VM already has decides; otherwise the balloon device that argv.ts adds only to virtio
// machines does (virtio-net-pci), else e1000. On q35 the device goes onto the first empty
// "hotplug-port-N" (see block.ts); on pc, onto pci.0.
import { HfError, isHfError } from '../../core/errors.js';
import type { NicConfig } from '../../core/model/instance.js';
import { nicIds } from './argv.js';
import { freeHotplugPorts, UNPLUG_TIMEOUT_MS } from './block.js';
import type { QmpClient } from './qmp/client.js';
import { Qmp } from './qmp/commands.js';

interface QomProperty {
  name: string;
  type: string;
}

const NIC_MODELS = ['virtio-net-pci', 'e1000'] as const;
export type NicModel = (typeof NIC_MODELS)[number];

/** Which NIC model this VM uses (see the header). */
export async function nicModelOf(client: QmpClient): Promise<NicModel> {
  const props = await client.run<QomProperty[]>('qom-list', { path: '/machine/peripheral' });
  const typeOf = (p: QomProperty) => /^child<(.+)>$/.exec(p.type)?.[1] ?? '';
  for (const p of props) {
    const t = typeOf(p);
    if (p.name.startsWith('nic-') && (NIC_MODELS as readonly string[]).includes(t)) return t as NicModel;
  }
  return props.some((p) => typeOf(p) === 'virtio-balloon-pci') ? 'virtio-net-pci' : 'e1000';
}

/** netdev_add (the existing tap) then device_add; the netdev is removed again if the device fails. */
export async function hotplugNic(client: QmpClient, nic: NicConfig): Promise<{ bus: string; model: NicModel }> {
  if (!nic.hostIface) throw new HfError('HF_ERR_VALIDATION', `NIC ${nic.name} has no host interface (the network layer must create its tap first)`);
  const qmp = new Qmp(client);
  const ids = nicIds(nic.name);
  const model = await nicModelOf(client);
  const ports = await freeHotplugPorts(client);
  let bus: string;
  if (ports === null) bus = 'pci.0';
  else if (ports.length === 0) throw new HfError('HF_ERR_INSUFFICIENT_RESOURCES', `no free hot-plug port left for NIC ${nic.name}: remove a device or add the NIC while the instance is stopped`);
  else bus = ports[0]!;
  await client.run('netdev_add', { type: 'tap', id: ids.netdev, ifname: nic.hostIface, script: 'no', downscript: 'no' });
  try {
    await qmp.deviceAdd({ driver: model, id: ids.device, netdev: ids.netdev, mac: nic.mac, bus });
  } catch (e) {
    await client.run('netdev_del', { id: ids.netdev }).catch(() => undefined);
    throw e;
  }
  return { bus, model };
}

/** device_del (waiting until the guest lets go), then netdev_del. */
export async function unplugNic(client: QmpClient, nicName: string, timeoutMs = UNPLUG_TIMEOUT_MS): Promise<void> {
  const qmp = new Qmp(client);
  const ids = nicIds(nicName);
  try {
    await qmp.deviceDelAndWait(ids.device, timeoutMs);
  } catch (e) {
    if (isHfError(e, 'HF_ERR_QMP_TIMEOUT')) {
      throw new HfError('HF_ERR_TIMEOUT', `the guest did not release NIC ${nicName} within ${Math.round(timeoutMs / 1000)} s (is its OS hot-plug aware?)`, { cause: e });
    }
    if (!(isHfError(e, 'HF_ERR_QMP_COMMAND') && /not found/i.test(e.message))) throw e;
  }
  try {
    await client.run('netdev_del', { id: ids.netdev });
  } catch (e) {
    if (!(isHfError(e, 'HF_ERR_QMP_COMMAND') && /not found/i.test(e.message))) throw e;
  }
}
