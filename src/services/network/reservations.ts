// Address reservations: a NIC's MAC (unique on the store) and, on managed networks, its IPv4
// address (unique on its network). Both are written in one store transaction that also requires
// the network to be unchanged, so two daemons sharing a store can never hand out one address
// twice or reserve on a network being deleted; an automatically chosen address or MAC that
// another writer took in between is simply chosen again.
import { readFile } from 'node:fs/promises';
import { HfError } from '../../core/errors.js';
import type { Instance, NicConfig } from '../../core/model/instance.js';
import { checkRequestedIp, nextFreeIp, normalizeMac, randomMac } from '../../network/alloc.js';
import { formatIpv4, parseCidr } from '../../network/cidr.js';
import { buildDnsmasqArgv, dropLeases, readLeases, writeAtomic } from '../../network/dnsmasq.js';
import { ipReservationSchema, macReservationSchema, type NicRequest } from '../../network/model.js';
import type { Compare, TxnOp } from '../../state/store.js';
import type { UndoStack } from '../../util/undo.js';
import type { NetContext } from './context.js';

/** Attempts when an automatic choice keeps losing to concurrent writers. */
const RESERVE_ATTEMPTS = 5;

/** Reserves name, MAC and address for one NIC; registers the undo. */
export async function reserveNic(c: NetContext, inst: Pick<Instance, 'id' | 'name' | 'type'>, existing: NicConfig[], req: NicRequest, undo: UndoStack): Promise<NicConfig> {
  const name = nicName(inst.name, existing, req.name);
  for (let attempt = 0; attempt < RESERVE_ATTEMPTS; attempt++) {
    const { value: net, revision: netRev } = await c.loadVersioned(req.network);
    const mac = req.mac ? normalizeMac(req.mac) : randomMac(new Set((await c.macs.list()).map((v) => v.value.mac)));
    let ip: string | undefined;
    if (net.mode === 'bridged') {
      if (req.ip) throw new HfError('HF_ERR_VALIDATION', `network ${net.name} is bridged to ${net.uplink}: its addresses come from that network, so --ip cannot reserve one`);
    } else {
      const plan = { subnet: parseCidr(net.subnet!), gateway: parseCidr(`${net.gateway}/32`).network };
      if (req.ip) {
        checkRequestedIp(plan, req.ip);
        ip = formatIpv4(parseCidr(`${req.ip}/32`).network);
      } else {
        ip = nextFreeIp(plan, new Set((await c.reservationsOf(net.name)).map((r) => r.ip)));
      }
    }
    const macKey = c.macs.key(mac);
    const ipKey = ip ? c.ips.key(c.ipKey(net.name, ip)) : undefined;
    const compares: Compare[] = [{ key: c.networks.key(net.name), modRevision: netRev }, { key: macKey, modRevision: 0 }];
    const ops: TxnOp[] = [{ type: 'put', key: macKey, value: macReservationSchema.parse({ mac, instance: inst.name, nic: name, network: net.name }) }];
    if (ip && ipKey) {
      compares.push({ key: ipKey, modRevision: 0 });
      ops.push({ type: 'put', key: ipKey, value: ipReservationSchema.parse({ network: net.name, ip, mac, instance: inst.name, nic: name }) });
    }
    if ((await c.d.store.txn(compares, ops)).succeeded) {
      undo.add(`release MAC ${mac}${ip ? ` and ${ip}` : ''}`, async () => {
        await c.d.store.txn([], ops.map((o) => ({ type: 'delete', key: o.key })));
      });
      const nic: NicConfig = { name, network: net.name, mac };
      // A VM's tap name goes on QEMU's command line. A container's veth is found by name: the
      // container joins the namespace in config.netns and needs no host interface of its own.
      if (inst.type === 'vm') nic.hostIface = c.d.names.tap(inst.id, name);
      if (ip) nic.ip = ip;
      return nic;
    }
    // Lost to another writer: a taken address the user asked for is an error; a chosen one is chosen again.
    const macOwner = (await c.macs.get(mac))?.value;
    if (macOwner && req.mac) {
      throw new HfError('HF_ERR_ADDRESS_IN_USE', `MAC ${mac} is already used by ${macOwner.instance} (${macOwner.nic})`, { details: { mac, instance: macOwner.instance } });
    }
    const ipOwner = ip ? (await c.ips.get(c.ipKey(net.name, ip)))?.value : undefined;
    if (ipOwner && req.ip) {
      throw new HfError('HF_ERR_ADDRESS_IN_USE', `${ip} is already reserved on network ${net.name} by ${ipOwner.instance} (${ipOwner.nic})`, { details: { ip, instance: ipOwner.instance } });
    }
  }
  throw new HfError('HF_ERR_CONFLICT', `could not reserve addresses on network ${req.network}: other reservations kept getting in the way; try again`);
}

function nicName(instance: string, existing: NicConfig[], asked: string | undefined): string {
  const taken = new Set(existing.map((n) => n.name));
  if (asked && taken.has(asked)) throw new HfError('HF_ERR_ALREADY_EXISTS', `instance ${instance} already has a NIC named ${asked}`);
  if (asked) return asked;
  let i = 0;
  while (taken.has(`eth${i}`)) i++;
  return `eth${i}`;
}

/** Releases what one NIC of `inst` holds (only reservations still owned by it) and its forwards. */
export async function releaseNic(c: NetContext, inst: string, nic: NicConfig): Promise<void> {
  const m = await c.macs.get(nic.mac);
  if (m && m.value.instance === inst) await c.macs.delete(nic.mac, m.revision);
  if (nic.ip) {
    const key = c.ipKey(nic.network, nic.ip);
    const r = await c.ips.get(key);
    if (r && r.value.instance === inst) await c.ips.delete(key, r.revision);
  }
  for (const { value: f } of await c.forwards.list()) {
    if (f.instance === inst && f.nic === nic.name) await c.forwards.delete(c.forwardKey(f));
  }
}

/** Everything reserved under an instance's name (also leftovers of a create that died half-way). */
export async function releaseAllOf(c: NetContext, inst: string): Promise<void> {
  for (const r of await c.ips.list()) if (r.value.instance === inst) await c.ips.delete(c.ipKey(r.value.network, r.value.ip));
  for (const r of await c.macs.list()) if (r.value.instance === inst) await c.macs.delete(r.value.mac);
  for (const r of await c.forwards.list()) if (r.value.instance === inst) await c.forwards.delete(c.forwardKey(r.value));
  await c.firewalls.delete(inst);
}

/** Removes the DHCP leases of these MACs (dnsmasq is stopped while its lease file is edited). */
export async function dropLeasesOf(c: NetContext, nics: NicConfig[]): Promise<void> {
  const byNet = new Map<string, Set<string>>();
  for (const n of nics) byNet.set(n.network, (byNet.get(n.network) ?? new Set()).add(n.mac));
  for (const [network, macs] of byNet) {
    const net = await c.networks.get(network);
    if (!net || net.value.mode === 'bridged') continue;
    const files = c.files(network);
    const leases = await readLeases(files);
    if (!leases.some((l) => macs.has(l.mac))) continue;
    const running = c.d.host.dhcpPid(network) !== undefined;
    if (running) await c.d.host.stopDhcp(network);
    try {
      const text = await readFile(files.leaseFile, 'utf8').catch(() => '');
      await writeAtomic(files.leaseFile, dropLeases(text, macs));
    } finally {
      if (running) await c.d.host.startDhcp(network, buildDnsmasqArgv(net.value, files), files);
    }
  }
}
