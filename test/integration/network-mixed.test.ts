// A VM and a container on the default network: both get their addresses and reach each other;
// the container's interface lives in its own network namespace (owned by its user namespace).
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import type { Instance } from '../../src/core/model/instance.js';
import { CLI, consoleRun, getInstance, op, useTestDaemon, waitForConsole } from '../helpers/daemon.js';

describe('VM and container on one network', () => {
  const t = useTestDaemon();
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, ...args], { encoding: 'utf8', timeout: 60_000 });

  it('a container and a VM on `default` get their addresses and ping each other', async () => {
    const vm = cli('launch', 'tiny', 'netvm', '--memory', '128M', '--network', 'default');
    assert.equal(vm.status, 0, vm.stderr);
    const ct = cli('launch', 'busybox', 'netct', '--container', '--memory', '64M', '--network', 'default');
    assert.equal(ct.status, 0, ct.stderr);
    const vmIp = (await getInstance(t.d.api, 'netvm')).config.nics[0]!.ip!;
    const ctInst: Instance = await getInstance(t.d.api, 'netct');
    const ctIp = ctInst.config.nics[0]!.ip!;
    assert.ok(vmIp && ctIp && vmIp !== ctIp);

    // The container sees its own address on eth0, in a namespace of its own.
    const addr = cli('exec', 'netct', '--', 'ip', '-4', 'addr', 'show', 'eth0');
    assert.equal(addr.status, 0, addr.stderr);
    assert.match(addr.stdout, new RegExp(`inet ${ctIp.replace(/\./g, '\\.')}/`));
    const sys = cli('exec', 'netct', '--', 'ls', '/sys/class/net');
    assert.deepEqual(sys.stdout.trim().split(/\s+/).sort(), ['eth0', 'lo'], 'only its own interfaces');

    // The VM gets its reserved address by DHCP; then container → VM.
    await waitForConsole(t.d.api, 'netvm', /HYPERFOLD-GUEST-READY/);
    let ping = cli('exec', 'netct', '--', 'ping', '-c', '1', '-W', '2', vmIp);
    for (let i = 0; i < 20 && ping.status !== 0; i++) {
      await new Promise((r) => setTimeout(r, 1000));
      ping = cli('exec', 'netct', '--', 'ping', '-c', '1', '-W', '2', vmIp);
    }
    assert.equal(ping.status, 0, `container → VM: ${ping.stdout}${ping.stderr}`);

    // VM → container, typed into the VM's serial console.
    const out = await consoleRun(t.d.api, 'netvm', `ping -c 1 -W 3 ${ctIp} && echo PING-$((40+2))-OK`, 30_000);
    assert.match(out, /PING-42-OK/, `no ping reply in the VM: ${out}`);

    // Delete both: the container's interface and namespace go with it.
    assert.equal((await op(t.d.api, 'DELETE', '/api/v1/instances/netct?force=true')).status, 'success');
    assert.equal((await op(t.d.api, 'DELETE', '/api/v1/instances/netvm?force=true')).status, 'success');
    const links = spawnSync('ip', ['-o', 'link'], { encoding: 'utf8' }).stdout;
    for (const n of ctInst.config.nics) if (n.hostIface) assert.doesNotMatch(links, new RegExp(`\\b${n.hostIface}\\b`));
  });
});
