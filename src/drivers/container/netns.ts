// Networking handoff between the network layer and the container driver. The network layer
// prepares a named network namespace (`ip netns add`, config.netns) holding the instance's
// interfaces with their addresses and routes. An unprivileged container cannot join that
// namespace (it belongs to the host's user namespace, so the container could not mount /sys);
// instead, between `runc create` and `runc start`, its interfaces are moved into the
// container's own namespace with their addresses and routes, and the name is re-pointed at the
// container's namespace, so later hot-plugs through the same name reach the running container.
import { basename } from 'node:path';
import { HfError } from '../../core/errors.js';
import { run } from '../../util/exec.js';

interface IpAddr {
  ifname: string;
  link_type?: string;
  address?: string;
  addr_info?: Array<{ family: string; local: string; prefixlen: number; scope?: string }>;
}
interface IpRoute {
  dst: string;
  gateway?: string;
  dev?: string;
  prefsrc?: string;
}

export interface NetnsLink {
  name: string;
  addresses: string[];
}

export interface NetnsPlan {
  links: NetnsLink[];
  routes: Array<{ dst: string; gateway?: string; dev?: string }>;
}

/** Pure: what to recreate from `ip -j addr` and `ip -j route` of the prepared namespace. */
export function planNetnsTransplant(addrs: IpAddr[], routes: IpRoute[]): NetnsPlan {
  const links = addrs
    .filter((a) => a.ifname !== 'lo' && a.link_type !== 'loopback')
    .map((a) => ({
      name: a.ifname,
      addresses: (a.addr_info ?? []).filter((i) => i.family === 'inet' && i.scope !== 'host').map((i) => `${i.local}/${i.prefixlen}`),
    }));
  const names = new Set(links.map((l) => l.name));
  // Only routes the kernel does not recreate from the addresses themselves (default, via-gateway).
  const extra = routes
    .filter((r) => r.gateway !== undefined && (r.dev === undefined || names.has(r.dev)))
    .map((r) => ({ dst: r.dst, gateway: r.gateway, dev: r.dev }));
  return { links, routes: extra };
}

async function ipJson<T>(args: string[]): Promise<T> {
  const { stdout } = await run('ip', ['-j', ...args], { errorCode: 'HF_ERR_HYPERVISOR' });
  return (stdout.trim() ? JSON.parse(stdout) : []) as T;
}

/**
 * Moves every interface of the prepared namespace `netnsPath` into the namespace of `pid` (the
 * container's init, created but not started), restoring addresses and routes, then points the
 * namespace name at the container's namespace.
 */
export async function transplantNetns(netnsPath: string, pid: number): Promise<NetnsPlan> {
  const name = basename(netnsPath);
  const plan = planNetnsTransplant(await ipJson<IpAddr[]>(['-n', name, 'addr', 'show']), await ipJson<IpRoute[]>(['-n', name, '-4', 'route', 'show']));
  const inCt = (args: string[]) => run('nsenter', ['-t', String(pid), '-n', 'ip', ...args], { errorCode: 'HF_ERR_HYPERVISOR' });
  try {
    for (const l of plan.links) await run('ip', ['-n', name, 'link', 'set', 'dev', l.name, 'netns', String(pid)], { errorCode: 'HF_ERR_HYPERVISOR' });
    await inCt(['link', 'set', 'dev', 'lo', 'up']);
    for (const l of plan.links) {
      for (const a of l.addresses) await inCt(['addr', 'add', a, 'dev', l.name]);
      await inCt(['link', 'set', 'dev', l.name, 'up']);
    }
    for (const r of plan.routes) await inCt(['route', 'replace', r.dst, 'via', r.gateway!, ...(r.dev ? ['dev', r.dev] : [])]);
    // The name now refers to the container's namespace (kept alive by the bind mount until the
    // network layer deletes it after the container stops).
    await run('ip', ['netns', 'del', name], { errorCode: 'HF_ERR_HYPERVISOR' });
    await run('ip', ['netns', 'attach', name, String(pid)], { errorCode: 'HF_ERR_HYPERVISOR' });
  } catch (e) {
    throw new HfError('HF_ERR_HYPERVISOR', `cannot move the network interfaces into the container: ${(e as Error).message}`, { cause: e });
  }
  return plan;
}

// ---- NIC hot-plug into a running container ----------------------------------------------------

export interface NicInside {
  /** The interface's name inside the container. */
  name: string;
  mac: string;
  /** a.b.c.d/n to configure. */
  address?: string | undefined;
  /** Default route through it, unless the container has one (its first NIC's). */
  gateway?: string | undefined;
}

export interface PlugStep {
  argv: string[];
  /** Failure is fine (IPv6 knob missing), or fine when stderr matches (default route exists). */
  tolerate?: true | RegExp;
}

/**
 * Pure: the commands that move host interface `peer` into the network namespace of `pid` (a
 * running container's init) and configure it there as `nic`.
 */
export function planNicPlug(pid: number, peer: string, nic: NicInside): PlugStep[] {
  const inCt = (...args: string[]) => ['nsenter', '-t', String(pid), '-n', ...args];
  const steps: PlugStep[] = [
    { argv: ['ip', 'link', 'set', 'dev', peer, 'netns', String(pid)] },
    { argv: inCt('ip', 'link', 'set', 'dev', peer, 'name', nic.name) },
    { argv: inCt('ip', 'link', 'set', 'dev', nic.name, 'address', nic.mac) },
    // Hyperfold networks are IPv4 only: no link-local IPv6 chatter from the container either.
    { argv: inCt('sysctl', '-q', '-w', `net.ipv6.conf.${nic.name}.disable_ipv6=1`), tolerate: true },
  ];
  if (nic.address) steps.push({ argv: inCt('ip', 'addr', 'add', nic.address, 'dev', nic.name) });
  steps.push({ argv: inCt('ip', 'link', 'set', 'dev', nic.name, 'up') });
  if (nic.gateway) steps.push({ argv: inCt('ip', 'route', 'add', 'default', 'via', nic.gateway, 'dev', nic.name), tolerate: /File exists/ });
  return steps;
}

/** Moves `peer` into the running container `pid` and configures it as `nic` (see planNicPlug). */
export async function plugNic(pid: number, peer: string, nic: NicInside): Promise<void> {
  for (const s of planNicPlug(pid, peer, nic)) {
    const r = await run(s.argv[0]!, s.argv.slice(1), { allowFailure: true, timeoutMs: 15_000 });
    if (r.code === 0 || s.tolerate === true || (s.tolerate && s.tolerate.test(r.stderr))) continue;
    throw new HfError('HF_ERR_HYPERVISOR', `cannot plug ${nic.name} into the container: ${s.argv.join(' ')}: ${r.stderr.trim()}`);
  }
}

/** Deletes interface `name` in the running container `pid` (its veth peer on the host goes with it). */
export async function unplugNic(pid: number, name: string): Promise<void> {
  const r = await run('nsenter', ['-t', String(pid), '-n', 'ip', 'link', 'del', 'dev', name], { allowFailure: true, timeoutMs: 15_000 });
  if (r.code !== 0 && !/Cannot find device|does not exist/i.test(r.stderr)) {
    throw new HfError('HF_ERR_HYPERVISOR', `cannot remove ${name} from the container: ${r.stderr.trim()}`);
  }
}
