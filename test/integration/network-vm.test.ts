// Networking with real tiny VMs under TCG (two boots): DHCP from dnsmasq through a tap and the
// anti-spoofing rules, VM ↔ container on one network, the firewall and a port forward in front
// of a busybox httpd in the guest (started through the serial console), a forged source address
// from the guest, NIC hot-plug and unplug, isolation of a second network with an e1000 VM, and
// nothing left behind. All traffic stays on this host (taps, bridges, namespaces).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { NetNames, tagFor } from '../../src/network/names.js';
import type { NetworkView } from '../../src/network/model.js';
import { isProcessAlive } from '../../src/util/proc.js';
import { CLI, consoleRun, destroyDataDir, getInstance, makeDataDir, startTestDaemon, waitForConsole, waitForLease as leaseOf, type TestDaemon } from '../helpers/daemon.js';

function sh(cmd: string, args: string[], timeout = 30_000) {
  return spawnSync(cmd, args, { encoding: 'utf8', timeout });
}

function nsPing(ns: string, ip: string): boolean {
  const r = sh('ip', ['netns', 'exec', ns, 'busybox', 'ping', '-c', '2', '-W', '1', ip]);
  const m = /(\d+) packets received/.exec(r.stdout);
  return m !== null && Number(m[1]) > 0;
}

function curl(url: string): { code: number | null; body: string } {
  const r = sh('curl', ['-s', '-m', '3', url]);
  return { code: r.status, body: r.stdout };
}

const esc = (s: string) => s.replace(/\./g, '\\.');

describe('networking with real VMs (TCG)', () => {
  let dataDir: string;
  let d: TestDaemon;
  let names: NetNames;
  let baseline: { links: string[]; netns: string[]; inet: string; bridge: string; dnsmasq: number };

  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', dataDir, ...args], { encoding: 'utf8', timeout: 180_000 });
  const net = async (name: string) => (await d.api.request<{ network: NetworkView }>('GET', `/api/v1/networks/${name}`)).network;
  const ownState = () => {
    const norm = (s: string) => s.replace(/counter packets \d+ bytes \d+/g, 'counter');
    return {
      links: (JSON.parse(sh('ip', ['-j', 'link', 'show']).stdout) as Array<{ ifname: string }>).map((l) => l.ifname).filter((n) => names.ownsLink(n)).sort(),
      netns: sh('ip', ['netns', 'list']).stdout.split('\n').map((l) => l.split(' ')[0]!).filter((n) => n && names.ownsNetns(n)).sort(),
      inet: norm(sh('nft', ['list', 'table', 'inet', names.table]).stdout),
      bridge: norm(sh('nft', ['list', 'table', 'bridge', names.table]).stdout),
      dnsmasq: sh('pgrep', ['-f', '--', `--pid-file=${dataDir}/`]).stdout.split('\n').filter((p) => p && isProcessAlive(Number(p))).length,
    };
  };

  const guest = (name: string, cmd: string, timeoutMs?: number) => consoleRun(d.api, name, cmd, timeoutMs);
  const waitForLease = (instance: string, nic?: string, timeoutMs?: number) => leaseOf(d.api, instance, nic, timeoutMs);

  before(async () => {
    dataDir = await makeDataDir();
    d = await startTestDaemon(dataDir);
    names = new NetNames(tagFor(dataDir));
    baseline = ownState();
  });

  after(async () => {
    // Also removes what the network left (links, namespaces, tables with this daemon's tag).
    await destroyDataDir(dataDir, d);
  });

  it('a VM on default gets its reserved address by DHCP and talks to a container on the same network', async () => {
    const def = await net('default');
    const base = def.subnet!.replace(/\.0\/24$/, '');
    const c = cli('launch', 'busybox', 'c1', '--container', '--network', 'default');
    assert.equal(c.status, 0, c.stderr);
    const r = cli('launch', 'tiny', 'v1', '--accel', 'tcg', '--network', 'default', '--ip', `${base}.10`);
    assert.equal(r.status, 0, r.stderr);
    const v1 = await getInstance(d.api, 'v1');
    const tap = v1.config.nics[0]!.hostIface!;
    assert.match(tap, new RegExp(`^${names.prefix}t[0-9a-f]{8}$`));
    assert.equal((JSON.parse(sh('ip', ['-j', 'link', 'show', 'dev', tap]).stdout) as Array<{ master?: string }>)[0]!.master, def.bridge);
    await waitForConsole(d.api, 'v1', /HYPERFOLD-GUEST-READY/);
    assert.equal(await waitForLease('v1'), `${base}.10`);
    assert.match(cli('list').stdout, new RegExp(`v1\\s+vm\\s+running.*${esc(base)}\\.10 \\(eth0\\)`));
    assert.match(cli('info', 'v1').stdout, new RegExp(`eth0: default 52:54:00:[0-9a-f:]+ ${esc(base)}\\.10 \\(lease\\)`));
    const addr = await guest('v1', 'ip -4 addr show eth0; ip route');
    assert.match(addr, new RegExp(`inet ${esc(base)}\\.10/24`));
    assert.match(addr, new RegExp(`default via ${esc(def.gateway!)}`));
    const c1ip = (await getInstance(d.api, 'c1')).config.nics[0]!.ip!;
    assert.match(await guest('v1', `ping -c 2 -W 2 ${c1ip}`), /[12] packets received/, 'VM → container');
    assert.ok(nsPing(names.netns('c1'), `${base}.10`), 'container → VM');
  });

  it('a firewall rule blocks the guest httpd; removing it unblocks', async () => {
    const ip = (await getInstance(d.api, 'v1')).config.nics[0]!.ip!;
    await guest('v1', 'mkdir -p /tmp/www && echo hello-from-v1 > /tmp/www/index.html && httpd -p 80 -h /tmp/www');
    assert.match(curl(`http://${ip}/`).body, /hello-from-v1/);
    const add = cli('firewall', 'add', 'v1', '--deny', 'tcp/80');
    assert.equal(add.status, 0, add.stderr);
    assert.notEqual(curl(`http://${ip}/`).code, 0, 'blocked');
    const c1 = sh('ip', ['netns', 'exec', names.netns('c1'), 'curl', '-s', '-m', '3', `http://${ip}/`]);
    assert.notEqual(c1.status, 0, 'blocked from the container on the same bridge too');
    assert.equal(cli('firewall', 'remove', 'v1', '0').status, 0);
    assert.match(curl(`http://${ip}/`).body, /hello-from-v1/, 'unblocked');
  });

  it('a port forward from the host reaches the httpd in the guest', async () => {
    const port = 20000 + Math.floor(Math.random() * 20000);
    const f = cli('forward', 'add', 'v1', '--host-port', String(port), '--port', '80');
    assert.equal(f.status, 0, f.stderr);
    assert.match(curl(`http://127.0.0.1:${port}/`).body, /hello-from-v1/);
    assert.equal(cli('forward', 'remove', String(port)).status, 0);
    assert.notEqual(curl(`http://127.0.0.1:${port}/`).code, 0);
  });

  it('drops packets the VM sends with a forged source address', async () => {
    const def = await net('default');
    const forged = def.subnet!.replace(/\.0\/24$/, '.222');
    const chain = `as_${(await getInstance(d.api, 'v1')).config.nics[0]!.hostIface!}`;
    const count = () => [...sh('nft', ['list', 'chain', 'bridge', names.table, chain]).stdout.matchAll(/counter packets (\d+) bytes \d+ drop/g)].reduce((s, m) => s + Number(m[1]), 0);
    const before = count();
    const out = await guest('v1', `ip addr add ${forged}/24 dev eth0; ping -c 3 -W 1 -I ${forged} ${def.gateway}; ip addr del ${forged}/24 dev eth0`);
    assert.match(out, /0 packets received/);
    assert.ok(count() >= before + 3, `anti-spoofing dropped them (${before} → ${count()})`);
    assert.match(await guest('v1', `ping -c 1 -W 2 ${def.gateway}`), /1 packets received/, 'its own address still works');
  });

  it('hot-plugs a NIC into the running VM (DHCP on it works) and removes it', async () => {
    const lab = cli('network', 'create', 'lab', '--isolated');
    assert.equal(lab.status, 0, lab.stderr);
    const labNet = await net('lab');
    const add = cli('nic', 'add', 'v1', '--network', 'lab');
    assert.equal(add.status, 0, add.stderr);
    assert.match(add.stdout, /added eth1 on lab/);
    const nic = (await getInstance(d.api, 'v1')).config.nics.find((n) => n.name === 'eth1')!;
    assert.equal((JSON.parse(sh('ip', ['-j', 'link', 'show', 'dev', nic.hostIface!]).stdout) as Array<{ master?: string }>)[0]!.master, labNet.bridge);
    const out = await guest('v1', 'i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done; ip link set eth1 up; udhcpc -i eth1 -n -q -t 5 -T 2 -s /usr/share/udhcpc/default.script >/dev/null 2>&1; ip -4 addr show eth1', 90_000);
    assert.match(out, new RegExp(`inet ${esc(nic.ip!)}/24`), 'the hot-plugged NIC got its reserved address');
    assert.equal(await waitForLease('v1', 'eth1'), nic.ip);
    const rm = cli('nic', 'remove', 'v1', 'eth1');
    assert.equal(rm.status, 0, rm.stderr);
    assert.match(await guest('v1', 'sleep 1; ls /sys/class/net'), /eth0/);
    assert.doesNotMatch(await guest('v1', 'ls /sys/class/net'), /eth1/, 'gone from the guest');
    assert.equal(sh('ip', ['link', 'show', 'dev', nic.hostIface!]).status !== 0, true, 'tap removed');
    assert.deepEqual((await getInstance(d.api, 'v1')).config.nics.map((n) => n.name), ['eth0']);
  });

  it('a VM on another network (e1000) is isolated from the first', async () => {
    const r = cli('launch', 'tiny', 'v2', '--accel', 'tcg', '--devices', 'emulated', '--network', 'lab');
    assert.equal(r.status, 0, r.stderr);
    await waitForConsole(d.api, 'v2', /HYPERFOLD-GUEST-READY/);
    const ip2 = await waitForLease('v2');
    const labNet = await net('lab');
    assert.match(await guest('v2', 'cat /sys/class/net/eth0/device/uevent'), /DRIVER=e1000/);
    const v1ip = (await getInstance(d.api, 'v1')).config.nics[0]!.ip!;
    assert.match(await guest('v2', `ping -c 1 -W 2 ${labNet.gateway}`), /1 packets received/, 'v2 → its gateway');
    const def = await net('default');
    const drops = () => [...sh('nft', ['list', 'chain', 'inet', names.table, 'filter_forward']).stdout.matchAll(/counter packets (\d+) bytes \d+ drop/g)].reduce((s, m) => s + Number(m[1]), 0);
    const before = drops();
    // An isolated network has no default route: v2 tries on purpose through its gateway.
    assert.match(await guest('v2', `ip route add ${def.subnet} via ${labNet.gateway}; ping -c 2 -W 1 ${v1ip}`), /0 packets received/, 'v2 → v1 on default is not routed');
    assert.ok(drops() >= before + 2, 'the host dropped them');
    assert.match(await guest('v1', `ping -c 2 -W 1 ${ip2}`), /0 packets received/, 'v1 → v2 on lab is not routed');
    assert.ok(!nsPing(names.netns('c1'), ip2), 'container on default → v2 is not routed');
  });

  it('leaves nothing behind once everything is deleted', async () => {
    for (const n of ['v1', 'v2', 'c1']) {
      const r = cli('delete', '-f', n);
      assert.equal(r.status, 0, `${n}: ${r.stderr}`);
    }
    assert.equal(cli('network', 'delete', 'lab').status, 0);
    assert.deepEqual(ownState(), baseline);
  });
});
