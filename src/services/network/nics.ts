// The NICs of instances. As an InstanceExtension: addresses are reserved at create, host
// interfaces made before start (a VM's tap; a container's veth pair, its peer moved into the
// namespace prepared for the container, see drivers/container/netns.ts) and removed after stop,
// and everything an instance held goes at delete. Hot-plug into a running instance makes the
// host side here and hands the rest to the instance's handle (attachNic / detachNic): what
// happens inside a VM or a container is its driver's business. Every step registers its undo.
import { HfError } from '../../core/errors.js';
import { isActive } from '../../core/lifecycle.js';
import type { CreateInstance, Instance, NicConfig } from '../../core/model/instance.js';
import type { Operation } from '../../core/model/operation.js';
import { parseInput } from '../../core/validate.js';
import type { NicPlug } from '../../drivers/driver.js';
import { parseCidr } from '../../network/cidr.js';
import { nicRequestSchema, type Network } from '../../network/model.js';
import { UndoStack } from '../../util/undo.js';
import type { InstanceExtension } from '../extensions.js';
import { liveHandle } from '../instances/live-handle.js';
import { bringUp } from './bridges.js';
import { LOCK, type NetContext } from './context.js';
import { dropLeasesOf, releaseAllOf, releaseNic, reserveNic } from './reservations.js';

export class NicService {
  readonly extension: InstanceExtension;

  constructor(private readonly c: NetContext) {
    this.extension = {
      name: 'network',
      onCreate: (req, inst, undo) => this.onCreate(req, inst, undo),
      beforeStart: (inst, undo) => this.beforeStart(inst, undo),
      afterStop: (inst) => this.afterStop(inst),
      onDelete: (inst) => this.onDelete(inst),
    };
  }

  // ---- the instance extension ----------------------------------------------------------------

  private async onCreate(req: CreateInstance, inst: Instance, undo: UndoStack): Promise<Instance> {
    if (req.nics.length === 0) return inst;
    const c = this.c;
    const nics = await c.lock.run(LOCK, 'reserve NICs', async () => {
      const out: NicConfig[] = [...inst.config.nics];
      for (const r of req.nics) out.push(await reserveNic(c, inst, out, parseInput(nicRequestSchema, r, 'nic'), undo));
      // dnsmasq learns the reservations before the instance first asks for an address.
      undo.add('rewrite DHCP host files', () => c.applyHostsOnly());
      await c.applyHostsOnly();
      return out;
    });
    return { ...inst, config: { ...inst.config, nics } };
  }

  private async beforeStart(inst: Instance, undo: UndoStack): Promise<Instance> {
    const c = this.c;
    const nics = inst.config.nics;
    if (nics.length === 0) {
      if (inst.config.netns && inst.type === 'container') {
        const { netns: _drop, ...config } = inst.config;
        return { ...inst, config };
      }
      return inst;
    }
    const nets = new Map<string, Network>();
    await c.lock.run(LOCK, 'prepare networks', async () => {
      for (const nic of nics) {
        if (!nets.has(nic.network)) {
          const net = await c.load(nic.network);
          await bringUp(c, net);
          nets.set(net.name, net);
        }
      }
      await c.applyLocked();
    });
    const fixed = inst.type === 'vm' ? nics.map((n) => ({ ...n, hostIface: c.hostIfaceOf(inst, n) })) : nics;
    let netnsPath: string | undefined;
    if (inst.type === 'container') {
      const ns = c.d.names.netns(inst.name);
      await c.d.host.deleteNetns(ns);
      netnsPath = await c.d.host.addNetns(ns);
      undo.add(`delete netns ${ns}`, () => c.d.host.deleteNetns(ns));
    }
    for (const nic of fixed) {
      const plug = await this.plugHostSide(inst, nic, nets.get(nic.network)!, undo);
      // Not started yet: the peer goes into the namespace prepared for it, which the driver
      // hands to the container at start (config.netns).
      if (plug.peer) await c.d.host.moveIntoNetns(plug.peer, c.d.names.netns(inst.name), { name: nic.name, mac: nic.mac, address: plug.address, gateway: plug.gateway });
    }
    const config = { ...inst.config, nics: fixed };
    if (netnsPath) config.netns = netnsPath;
    return { ...inst, config };
  }

  /**
   * Creates a NIC's host side on its bridge: a VM's tap, or a container's veth pair (the host end
   * on the bridge; the peer, returned in the plug, is for the container's side).
   */
  private async plugHostSide(inst: Pick<Instance, 'id' | 'name' | 'type'>, nic: NicConfig, net: Network, undo: UndoStack): Promise<NicPlug> {
    const c = this.c;
    const iface = c.hostIfaceOf(inst, nic);
    const managed = net.mode !== 'bridged';
    await c.d.host.deleteLink(iface);
    let peer: string | undefined;
    if (inst.type === 'vm') {
      await c.d.host.createTap(iface, { mtu: net.mtu });
    } else {
      peer = c.d.names.vethPeer(inst.id, nic.name);
      await c.d.host.deleteLink(peer);
      await c.d.host.createVeth(iface, peer, { mtu: net.mtu });
    }
    c.liveIfaces.add(iface);
    // Deleting one end of a veth pair deletes the other, wherever it went.
    undo.add(`delete ${iface}`, async () => {
      c.liveIfaces.delete(iface);
      await c.d.host.deleteLink(iface);
    });
    await c.d.host.setMaster(iface, net.bridge, { isolated: managed });
    if (managed && nic.ip) await c.d.host.forgetNeighbour(net.bridge, nic.ip);
    if (!peer) return {};
    const prefix = net.subnet ? parseCidr(net.subnet).prefix : undefined;
    return { peer, address: nic.ip && prefix !== undefined ? `${nic.ip}/${prefix}` : undefined, gateway: net.mode === 'nat' ? net.gateway : undefined };
  }

  private async afterStop(inst: Instance): Promise<void> {
    const c = this.c;
    for (const nic of inst.config.nics) {
      const iface = c.hostIfaceOf(inst, nic);
      await c.d.host.deleteLink(iface);
      c.liveIfaces.delete(iface);
    }
    if (inst.type === 'container') await c.d.host.deleteNetns(c.d.names.netns(inst.name));
  }

  private async onDelete(inst: Instance): Promise<void> {
    const c = this.c;
    await this.afterStop(inst);
    await c.lock.run(LOCK, 'release NICs', async () => {
      for (const nic of inst.config.nics) await releaseNic(c, inst.name, nic);
      await releaseAllOf(c, inst.name);
      await dropLeasesOf(c, inst.config.nics);
      // The record still exists while hooks run: leave it out of the ruleset explicitly.
      await c.applyLocked({ exclude: inst.name });
    });
  }

  // ---- NIC hot-plug --------------------------------------------------------------------------

  /** Adds a NIC: at once into a running instance (hot-plug), or for the next start. An operation. */
  async addNic(instance: string, body: unknown): Promise<Operation> {
    const c = this.c;
    const req = parseInput(nicRequestSchema, body);
    const cur = await c.instances.get(instance);
    await c.load(req.network);
    c.instances.precheck(cur, 'attach-nic');
    return c.d.operations.start('instance.nic-add', { kind: 'instance', name: instance }, (ctx) =>
      c.instances.withInstance(instance, 'nic add', (inst, handle) =>
        UndoStack.run(async (undo) => {
          const live = c.instances.allowed(inst, 'attach-nic').live ? liveHandle(inst, handle, 'attachNic') : undefined;
          const running = live !== undefined;
          const nic = await c.lock.run(LOCK, 'reserve NIC', () => reserveNic(c, inst, inst.config.nics, req, undo));
          await c.instances.patch(instance, (r) => ({ ...r, config: { ...r.config, nics: [...r.config.nics, nic] } }));
          undo.add('remove NIC from the record', async () => {
            await c.instances.patch(instance, (r) => ({ ...r, config: { ...r.config, nics: r.config.nics.filter((n) => n.name !== nic.name) } }));
            await c.apply();
          });
          const net = await c.lock.run(LOCK, 'apply rules', async () => {
            const n = await c.load(nic.network);
            if (running) await bringUp(c, n);
            await c.applyLocked();
            return n;
          });
          if (live) {
            ctx.progress(30, `plugging ${nic.name} into ${instance}`);
            if (inst.type === 'container') await this.nameNetns(inst, live.runtime.pid, undo);
            const plug = await this.plugHostSide(inst, nic, net, undo);
            await live.attachNic(nic, plug);
          }
          ctx.progress(100, running ? 'NIC plugged in' : 'NIC added (created at the next start)');
          return { nic, live: running };
        }, c.d.log),
        ctx,
      ),
    );
  }

  /**
   * A container started without NICs has a network namespace runc made, with no name. It gets
   * the name the network layer gives the namespaces it prepares, so that stop, reconcile and
   * `ip netns` find it as they find the others.
   */
  private async nameNetns(inst: Instance, pid: number, undo: UndoStack): Promise<void> {
    const c = this.c;
    const known = inst.config.netns !== undefined && (await c.d.host.listNetns()).includes(c.d.names.netns(inst.name));
    if (known) return;
    const ns = c.d.names.netns(inst.name);
    await c.d.host.deleteNetns(ns);
    const netns = await c.d.host.attachNetns(ns, pid);
    undo.add(`forget the name ${ns}`, () => c.d.host.deleteNetns(ns));
    await c.instances.patch(inst.name, (r) => ({ ...r, config: { ...r.config, netns } }));
    undo.add('remove the namespace from the record', async () => {
      await c.instances.patch(inst.name, (r) => {
        const { netns: _drop, ...config } = r.config;
        return { ...r, config };
      });
    });
  }

  async removeNic(instance: string, nicName: string): Promise<Operation> {
    const c = this.c;
    const cur = await c.instances.get(instance);
    if (!cur.config.nics.some((n) => n.name === nicName)) throw new HfError('HF_ERR_NOT_FOUND', `instance ${instance} has no NIC named ${nicName}`);
    c.instances.precheck(cur, 'detach-nic');
    return c.d.operations.start('instance.nic-remove', { kind: 'instance', name: instance }, (ctx) =>
      c.instances.withInstance(instance, 'nic remove', async (inst, handle) => {
        const live = c.instances.allowed(inst, 'detach-nic').live ? liveHandle(inst, handle, 'detachNic') : undefined;
        const running = live !== undefined;
        const nic = inst.config.nics.find((n) => n.name === nicName);
        if (!nic) throw new HfError('HF_ERR_NOT_FOUND', `instance ${instance} has no NIC named ${nicName}`);
        if (live) {
          ctx.progress(20, `unplugging ${nic.name} (the guest must let go)`);
          await live.detachNic(nic.name);
        }
        const iface = c.hostIfaceOf(inst, nic);
        await c.d.host.deleteLink(iface);
        c.liveIfaces.delete(iface);
        await c.instances.patch(instance, (r) => {
          const nics = r.config.nics.filter((n) => n.name !== nicName);
          const config = { ...r.config, nics };
          // A stopped instance's last NIC takes its namespace along; a running one keeps it.
          if (nics.length === 0 && !isActive(r.state)) delete config.netns;
          return { ...r, config };
        });
        await c.lock.run(LOCK, 'release NIC', async () => {
          await releaseNic(c, instance, nic);
          await dropLeasesOf(c, [nic]);
          await c.applyLocked();
        });
        ctx.progress(100, 'NIC removed');
        return { nic: nic.name, live: running };
      }, ctx),
    );
  }
}
