// Leftovers. Daemons on other data directories of this host (test suites) each tag their
// objects; when such a daemon is gone for good (not running: the flock on its data directory's
// daemon.lock is free, util/flock.ts; and its store deleted), nothing but another daemon can ever
// remove its interfaces, namespaces and tables. And this daemon's own leftovers: after a crash,
// interfaces and namespaces no active instance needs, and reservations of instances that are gone.
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { isActive } from '../../core/lifecycle.js';
import { NetNames } from '../../network/names.js';
import { buildRuleset } from '../../network/nft.js';
import { daemonLockFile, isLockHeld } from '../../util/flock.js';
import { LOCK, type NetContext } from './context.js';

export const DEFAULT_OWNERS_DIR = '/run/hyperfold/net';

export interface ReconcileReport {
  removedLinks: string[];
  removedNetns: string[];
  removedReservations: number;
}

export class Janitor {
  constructor(private readonly c: NetContext) {}

  private get ownersDir(): string {
    return this.c.d.ownersDir ?? DEFAULT_OWNERS_DIR;
  }

  /** Records which data directory owns this daemon's tag (for the other daemons' janitors). */
  async registerOwner(): Promise<void> {
    await mkdir(this.ownersDir, { recursive: true, mode: 0o755 });
    await writeFile(join(this.ownersDir, this.c.d.names.tag || '_'), this.c.d.dataDir + '\n');
  }

  /**
   * Whether the objects of `dataDir`'s daemon are abandoned: no daemon runs on it (its lock is
   * free) and none can come back for them (its store is gone). A daemon that is merely down (a
   * restart, a SIGKILL) keeps its objects: its guests may still run on its veths and taps, and it
   * reconciles them itself when it starts again.
   */
  private async isAbandoned(dataDir: string): Promise<boolean> {
    if (await isLockHeld(daemonLockFile(dataDir))) return false;
    // A cluster member keeps its state in etcd (its SQLite file moved aside): cluster.json says it is one.
    return !existsSync(join(dataDir, 'state.db')) && !existsSync(join(dataDir, 'cluster', 'cluster.json'));
  }

  /** Removes the interfaces, namespaces and tables of dead daemons (only names with their tag). */
  async collectDeadOwners(): Promise<void> {
    const c = this.c;
    let entries: string[];
    try {
      entries = await readdir(this.ownersDir);
    } catch {
      return;
    }
    for (const tag of entries) {
      if (!/^[0-9a-f]{4}$/.test(tag) || tag === c.d.names.tag) continue;
      const dir = (await readFile(join(this.ownersDir, tag), 'utf8').catch(() => '')).trim();
      if (!dir) continue;
      try {
        if (!(await this.isAbandoned(dir))) continue;
        const other = new NetNames(tag);
        for (const l of await c.d.host.listLinks()) if (other.ownsLink(l.name)) await c.d.host.deleteLink(l.name);
        for (const ns of await c.d.host.listNetns()) if (other.ownsNetns(ns)) await c.d.host.deleteNetns(ns);
        await c.d.host.applyNft(buildRuleset({ table: other.table, networks: [], nics: [], firewalls: [], forwards: [] }));
        await rm(join(this.ownersDir, tag), { force: true });
        c.d.log.info('removed the network objects of a daemon whose data directory is gone', { tag, dataDir: dir });
      } catch (e) {
        c.d.log.warn('cannot clean up after a dead daemon', { tag, error: (e as Error).message });
      }
    }
  }

  /**
   * After instances were re-attached: host interfaces and namespaces that no active instance
   * needs (left by a crash) are removed; reservations of instances that no longer exist too;
   * NICs of running instances are put back on their bridge if it was recreated.
   */
  async reconcileInstances(): Promise<ReconcileReport> {
    const c = this.c;
    return c.lock.run(LOCK, 'network reconcile', async () => {
      const insts = await c.instances.list();
      const nets = (await c.networks.list()).map((v) => v.value);
      const netByName = new Map(nets.map((n) => [n.name, n]));
      const wanted = new Set<string>(c.liveIfaces);
      for (const n of nets) {
        if (!n.external) wanted.add(n.bridge);
        if (n.vlan !== undefined) wanted.add(c.d.names.vlan(n.name));
        // The overlay keeps the tunnels (and removes those of networks that are gone).
        if (c.overlay && n.vni !== undefined) wanted.add(c.d.names.vxlan(n.name));
      }
      const activeInsts = insts.filter((i) => isActive(i.state));
      for (const i of activeInsts) for (const nic of i.config.nics) wanted.add(c.hostIfaceOf(i, nic));
      const links = await c.d.host.listLinks();
      const removedLinks: string[] = [];
      for (const l of links) {
        if (!c.d.names.ownsLink(l.name) || wanted.has(l.name)) continue;
        await c.d.host.deleteLink(l.name);
        removedLinks.push(l.name);
      }
      for (const i of activeInsts) {
        for (const nic of i.config.nics) {
          const net = netByName.get(nic.network);
          const l = links.find((x) => x.name === c.hostIfaceOf(i, nic));
          if (net && l && l.master !== net.bridge) await c.d.host.setMaster(l.name, net.bridge, { isolated: net.mode !== 'bridged' });
        }
      }
      const wantedNs = new Set(activeInsts.filter((i) => i.type === 'container' && i.config.nics.length).map((i) => c.d.names.netns(i.name)));
      const removedNetns: string[] = [];
      for (const ns of await c.d.host.listNetns()) {
        if (c.d.names.ownsNetns(ns) && !wantedNs.has(ns)) {
          await c.d.host.deleteNetns(ns);
          removedNetns.push(ns);
        }
      }
      const names = new Set(insts.map((i) => i.name));
      let removedReservations = 0;
      for (const r of await c.ips.list()) {
        if (!names.has(r.value.instance)) {
          await c.ips.delete(c.ipKey(r.value.network, r.value.ip));
          removedReservations++;
        }
      }
      for (const r of await c.macs.list()) {
        if (!names.has(r.value.instance)) {
          await c.macs.delete(r.value.mac);
          removedReservations++;
        }
      }
      await c.applyLocked();
      if (removedLinks.length || removedNetns.length || removedReservations) {
        c.d.log.info('network leftovers removed', { removedLinks, removedNetns, removedReservations });
      }
      return { removedLinks, removedNetns, removedReservations };
    });
  }
}
