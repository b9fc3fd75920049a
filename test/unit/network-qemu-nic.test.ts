// NIC hot-plug over QMP (drivers/qemu/nic.ts) against the fake QEMU monitor: the model follows
// the VM's device model, the NIC goes onto a free hot-plug port, a failed device_add takes its
// netdev back, unplug waits for DEVICE_DELETED. The real thing runs in network-vm.test.ts.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { HfError } from '../../src/core/errors.js';
import { hotplugNic, nicModelOf, unplugNic } from '../../src/drivers/qemu/nic.js';
import { QmpClient } from '../../src/drivers/qemu/qmp/client.js';
import { FakeQmpServer, type FakeHandler } from '../helpers/fake-qmp-server.js';

const port = (id: string, used: boolean) => ({ qdev_id: id, pci_bridge: { bus: { number: 1 }, devices: used ? [{ qdev_id: 'x' }] : [] } });

async function withVm(handlers: Record<string, FakeHandler>, fn: (server: FakeQmpServer, client: QmpClient) => Promise<void>): Promise<void> {
  // Commands the fake monitor does not know by default: accepted.
  const ok: FakeHandler = () => ({});
  const server = await FakeQmpServer.start({ handlers: { netdev_add: ok, netdev_del: ok, device_add: ok, device_del: ok, ...handlers } });
  const client = await QmpClient.connect(server.socketPath, { connectTimeoutMs: 2000, defaultTimeoutMs: 2000 });
  try {
    await fn(server, client);
  } finally {
    await client.close();
    await server.close();
  }
}

const q35 = (peripherals: Array<{ name: string; type: string }>): Record<string, FakeHandler> => ({
  'qom-list': () => ({ return: peripherals }),
  'query-pci': () => ({ return: [{ bus: 0, devices: [port('port-disk-root', true), port('hotplug-port-0', true), port('hotplug-port-1', false), port('hotplug-port-2', false)] }] }),
});

const nic = { name: 'eth1', network: 'lab', mac: '52:54:00:00:00:11', hostIface: 'hft00000011' };

describe('NIC hot-plug over QMP', { timeout: 15_000 }, () => {
  it('picks the model from an existing NIC, else from the virtio balloon, else e1000', async () => {
    await withVm(q35([{ name: 'nic-eth0', type: 'child<e1000>' }, { name: 'balloon0', type: 'child<virtio-balloon-pci>' }]), async (_s, c) => assert.equal(await nicModelOf(c), 'e1000'));
    await withVm(q35([{ name: 'balloon0', type: 'child<virtio-balloon-pci>' }]), async (_s, c) => assert.equal(await nicModelOf(c), 'virtio-net-pci'));
    await withVm(q35([{ name: 'hotplug-port-0', type: 'child<pcie-root-port>' }]), async (_s, c) => assert.equal(await nicModelOf(c), 'e1000'));
  });

  it('netdev_add on the tap, then device_add on the first free hot-plug port', async () => {
    await withVm(q35([{ name: 'balloon0', type: 'child<virtio-balloon-pci>' }]), async (server, c) => {
      const r = await hotplugNic(c, nic);
      assert.deepEqual(r, { bus: 'hotplug-port-1', model: 'virtio-net-pci' });
      const cmds = server.received.filter((x) => x.command === 'netdev_add' || x.command === 'device_add');
      assert.deepEqual(cmds.map((x) => [x.command, x.args]), [
        ['netdev_add', { type: 'tap', id: 'net-eth1', ifname: 'hft00000011', script: 'no', downscript: 'no' }],
        ['device_add', { driver: 'virtio-net-pci', id: 'nic-eth1', netdev: 'net-eth1', mac: '52:54:00:00:00:11', bus: 'hotplug-port-1' }],
      ]);
    });
  });

  it('a failed device_add removes the netdev again; no free port is a named error', async () => {
    await withVm({ ...q35([]), device_add: () => ({ error: { class: 'GenericError', desc: 'Bus busy' } }) }, async (server, c) => {
      await assert.rejects(hotplugNic(c, nic), (e: unknown) => e instanceof HfError && e.code === 'HF_ERR_QMP_COMMAND');
      assert.deepEqual(server.received.filter((x) => x.command === 'netdev_del').map((x) => x.args), [{ id: 'net-eth1' }]);
    });
    await withVm({ 'qom-list': () => ({ return: [] }), 'query-pci': () => ({ return: [{ bus: 0, devices: [port('hotplug-port-0', true)] }] }) }, async (server, c) => {
      await assert.rejects(hotplugNic(c, nic), (e: unknown) => e instanceof HfError && e.code === 'HF_ERR_INSUFFICIENT_RESOURCES');
      assert.equal(server.received.filter((x) => x.command === 'netdev_add').length, 0);
    });
  });

  it('on a pc machine (no PCIe ports) the NIC goes onto pci.0', async () => {
    await withVm({ 'qom-list': () => ({ return: [] }), 'query-pci': () => ({ return: [{ bus: 0, devices: [{ qdev_id: 'disk-root' }] }] }) }, async (_s, c) => {
      assert.deepEqual(await hotplugNic(c, nic), { bus: 'pci.0', model: 'e1000' });
    });
  });

  it('unplug waits for DEVICE_DELETED, then removes the netdev; a guest that ignores it times out', async () => {
    await withVm(
      {
        device_del: (args, ctx) => {
          setTimeout(() => ctx.server.sendEvent('DEVICE_DELETED', { device: String(args?.id), path: `/machine/peripheral/${String(args?.id)}` }), 50);
          return {};
        },
      },
      async (server, c) => {
        await unplugNic(c, 'eth1');
        assert.deepEqual(server.received.filter((x) => x.command === 'device_del' || x.command === 'netdev_del').map((x) => [x.command, x.args]), [
          ['device_del', { id: 'nic-eth1' }],
          ['netdev_del', { id: 'net-eth1' }],
        ]);
      },
    );
    await withVm({ device_del: () => ({}) }, async (server, c) => {
      await assert.rejects(unplugNic(c, 'eth1', 200), (e: unknown) => e instanceof HfError && e.code === 'HF_ERR_TIMEOUT');
      assert.equal(server.received.filter((x) => x.command === 'netdev_del').length, 0, 'the netdev stays while the device does');
    });
  });
});
