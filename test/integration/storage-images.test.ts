// Images with real qemu-img and a real tiny VM under TCG: a VMDK and an OVA made here with
// qemu-img and tar are imported (progress, check, sha256, OVF CPUs/memory) and boot; a URL
// import; publish of a stopped VM into a template that boots; export to VMDK; and the bad
// inputs (names with / or .., a file that is not an image, a truncated qcow2, an OVA without
// an OVF, an unsupported format), each leaving no file and no record. Three guest boots.
import { describe, it, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { createReadStream } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ApiError } from '../../src/cli/client.js';
import type { ImageRecord } from '../../src/core/model/image.js';
import type { Operation } from '../../src/core/model/operation.js';
import { QemuImg } from '../../src/storage/qemu-img.js';
import { getInstance, op, useTestDaemon, CLI } from '../helpers/daemon.js';
import { guestSh, waitForBoot } from './storage-guest.js';

const MiB = 1024 * 1024;

function ovf(diskFile: string, cpus: number, memMiB: number): string {
  return `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:href="${diskFile}" ovf:id="file1"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1"
    ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <VirtualSystem ovf:id="tiny-appliance">
    <Info>A virtual machine</Info><Name>tiny-appliance</Name>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>${cpus}</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>${memMiB}</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>`;
}

describe('image import, publish and export with real qemu-img and QEMU (TCG)', () => {
  const t = useTestDaemon();
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, '--data-dir', t.dataDir, ...args], { encoding: 'utf8', timeout: 180_000 });
  let work: string;
  let kernelArgs: string[];
  let server: Server | undefined;

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'hf-img-'));
  });
  after(async () => {
    server?.close();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** Nothing half-made: no image directory, staging empty, no record. */
  async function nothingLeft(name: string): Promise<void> {
    await assert.rejects(t.d.api.request('GET', `/api/v1/images/${name}`), (e: ApiError) => e.code === 'HF_ERR_IMAGE_NOT_FOUND' || e.code === 'HF_ERR_INVALID_NAME');
    assert.ok(!(await readdir(join(t.dataDir, 'images'))).includes(name), `no images/${name}`);
    assert.deepEqual(await readdir(join(t.dataDir, '.staging')).catch(() => []), []);
  }

  it('imports a VMDK made with qemu-img, with checks and sha256, and it boots', async () => {
    const tiny = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/tiny')).image;
    assert.equal(tiny.boot?.kind, 'kernel');
    if (tiny.boot?.kind !== 'kernel') return;
    kernelArgs = ['--kernel', tiny.boot.kernel, '--initrd', tiny.boot.initrd!, '--cmdline', tiny.boot.cmdline];
    const vmdk = join(work, 'appliance.vmdk');
    const c = spawnSync('qemu-img', ['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', tiny.disk!.path, vmdk]);
    assert.equal(c.status, 0);

    const r = cli('image', 'import', vmdk, '--name', 'fromvmdk', ...kernelArgs, '--memory', '192M');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /image fromvmdk imported/);
    const img = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/fromvmdk')).image;
    assert.equal(img.source, 'import');
    assert.equal(img.details.sourceFormat, 'vmdk');
    assert.equal(img.defaults.memoryMiB, 192);
    const info = await new QemuImg().info(img.disk!.path);
    assert.equal(info.format, 'qcow2');
    assert.equal(info.virtualSize, 64 * MiB);
    assert.equal(img.sha256['disk.qcow2'], createHash('sha256').update(await readFile(img.disk!.path)).digest('hex'));
    assert.equal(img.details.sourceSha256, createHash('sha256').update(await readFile(vmdk)).digest('hex'));
    assert.equal((await stat(img.disk!.path)).mode & 0o222, 0, 'image disks are read-only');
    // The import was an operation with progress from qemu-img convert.
    const { operations } = await t.d.api.request<{ operations: Operation[] }>('GET', '/api/v1/operations');
    const imp = operations.find((o) => o.type === 'image.import' && o.target.name === 'fromvmdk')!;
    assert.equal(imp.status, 'success');

    const l = cli('launch', 'fromvmdk', 'vmdk1', '--accel', 'tcg');
    assert.equal(l.status, 0, l.stderr);
    await waitForBoot(t.d.api, 'vmdk1', 1);
    assert.equal((await guestSh(t.d.api, 'vmdk1', 'cat /mnt/hyperfold-disk')).trim(), 'HYPERFOLD-TINY-DISK-OK');
    await guestSh(t.d.api, 'vmdk1', 'echo published-marker > /mnt/pub; sync');
  });

  it('publishes a stopped VM as a read-only template that boots on its own, and exports it', async () => {
    const running = cli('publish', 'vmdk1', '--as', 'golden');
    assert.notEqual(running.status, 0);
    assert.match(running.stderr, /stop it before publishing \(HF_ERR_INSTANCE_RUNNING\)/);
    const s = await op(t.d.api, 'POST', '/api/v1/instances/vmdk1/stop', { timeout: 60 });
    assert.equal(s.status, 'success');

    const p = cli('publish', 'vmdk1', '--as', 'golden');
    assert.equal(p.status, 0, p.stderr);
    const g = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/golden')).image;
    assert.equal(g.source, 'publish');
    assert.equal(g.details.publishedFrom, 'vmdk1');
    assert.equal((await new QemuImg().info(g.disk!.path)).backingFile, undefined, 'flattened');
    assert.ok(g.boot?.kind === 'kernel' && g.boot.kernel.startsWith(join(t.dataDir, 'images', 'golden')), 'kernel copied into the image');
    await assert.rejects(t.d.api.request('POST', '/api/v1/instances/vmdk1/publish', { as: 'golden' }), (e: ApiError) => e.code === 'HF_ERR_ALREADY_EXISTS');

    // Export to VMDK: same content as the VM's disk.
    const out = join(work, 'export.vmdk');
    const e = cli('export', 'vmdk1', out, '--format', 'vmdk');
    assert.equal(e.status, 0, e.stderr);
    assert.equal((await new QemuImg().info(out)).format, 'vmdk');
    const src = (await getInstance(t.d.api, 'vmdk1')).config.disks[0]!.path;
    assert.equal(spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'vmdk', src, out]).status, 0, 'exported content is identical');
    const again = cli('export', 'vmdk1', out);
    assert.notEqual(again.status, 0);
    assert.match(again.stderr, /already exists: export never overwrites/);

    // The published image boots with the marker in it, even with its source VM gone.
    assert.equal((await op(t.d.api, 'DELETE', '/api/v1/instances/vmdk1')).status, 'success');
    const launched = await op(t.d.api, 'POST', '/api/v1/instances', { name: 'gold1', image: 'golden', accel: 'tcg', start: true });
    assert.equal(launched.status, 'success', JSON.stringify(launched.error));
    await waitForBoot(t.d.api, 'gold1', 1);
    assert.equal((await guestSh(t.d.api, 'gold1', 'cat /mnt/pub')).trim(), 'published-marker');
    await op(t.d.api, 'POST', '/api/v1/instances/gold1/stop', { force: true });
  });

  it('imports an OVA made with tar: the OVF gives CPUs and memory, the VM is defined and boots', async () => {
    const tiny = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/tiny')).image;
    const dir = join(work, 'ova');
    await rm(dir, { recursive: true, force: true });
    spawnSync('mkdir', ['-p', dir]);
    assert.equal(spawnSync('qemu-img', ['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', tiny.disk!.path, join(dir, 'appliance-disk1.vmdk')]).status, 0);
    await writeFile(join(dir, 'appliance.ovf'), ovf('appliance-disk1.vmdk', 2, 192));
    const sha = createHash('sha256').update(await readFile(join(dir, 'appliance-disk1.vmdk'))).digest('hex');
    await writeFile(join(dir, 'appliance.mf'), `SHA256(appliance-disk1.vmdk)= ${sha}\n`);
    const ova = join(work, 'appliance.ova');
    assert.equal(spawnSync('tar', ['-C', dir, '-cf', ova, 'appliance.ovf', 'appliance.mf', 'appliance-disk1.vmdk']).status, 0);

    const r = cli('image', 'import', ova, '--name', 'appliance', '--instance', 'ova1', ...kernelArgs);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /instance ova1 created/);
    assert.match(r.stdout, /OVF: tiny-appliance, 2 vCPUs, 192 MiB, 1 disk\(s\), firmware bios/);
    assert.match(r.stdout, /manifest: 1 digest\(s\) verified/);
    const img = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/appliance')).image;
    assert.deepEqual(img.defaults, { vcpus: 2, memoryMiB: 192 });
    assert.equal(img.details.sourceFormat, 'ova');
    const inst = await getInstance(t.d.api, 'ova1');
    assert.equal(inst.config.vcpus, 2);
    assert.equal(inst.config.memoryMiB, 192);
    assert.equal(inst.state, 'stopped');
    const st = await op(t.d.api, 'POST', '/api/v1/instances/ova1/start', {});
    assert.equal(st.status, 'success', JSON.stringify(st.error));
    await waitForBoot(t.d.api, 'ova1', 1);
    assert.equal((await guestSh(t.d.api, 'ova1', 'cat /mnt/hyperfold-disk; grep -c ^processor /proc/cpuinfo')).trim().split('\n').map((x) => x.trim()).join('|'), 'HYPERFOLD-TINY-DISK-OK|2');

    // The image has a linked clone now: delete refused, naming it.
    await assert.rejects(t.d.api.request('DELETE', '/api/v1/images/appliance'), (e: ApiError) => e.code === 'HF_ERR_CONFLICT' && /used by ova1/.test(e.message));

    // A manifest that does not match: refused, nothing registered.
    await writeFile(join(dir, 'appliance.mf'), `SHA256(appliance-disk1.vmdk)= ${'0'.repeat(64)}\n`);
    const bad = join(work, 'badsum.ova');
    spawnSync('tar', ['-C', dir, '-cf', bad, 'appliance.ovf', 'appliance.mf', 'appliance-disk1.vmdk']);
    const b = await op(t.d.api, 'POST', '/api/v1/images/import', { name: 'badsum', source: bad });
    assert.equal(b.status, 'failure');
    assert.match(b.error!.message, /does not match its SHA256/);
    await nothingLeft('badsum');
  });

  it('imports from an http URL', async () => {
    const file = join(work, 'appliance.vmdk');
    server = createServer((req, res) => {
      if (req.url !== '/images/appliance.vmdk') {
        res.statusCode = 404;
        res.end('no');
        return;
      }
      void stat(file).then((s) => {
        res.setHeader('content-length', String(s.size));
        createReadStream(file).pipe(res);
      });
    });
    await new Promise<void>((r) => server!.listen(0, '127.0.0.1', r));
    const port = (server.address() as AddressInfo).port;
    const ok = await op(t.d.api, 'POST', '/api/v1/images/import', { name: 'fromurl', source: `http://127.0.0.1:${port}/images/appliance.vmdk` });
    assert.equal(ok.status, 'success', JSON.stringify(ok.error));
    const img = (await t.d.api.request<{ image: ImageRecord }>('GET', '/api/v1/images/fromurl')).image;
    assert.equal(img.details.sourceFile, 'appliance.vmdk');
    assert.equal(img.details.sourceSha256, createHash('sha256').update(await readFile(file)).digest('hex'));
    const missing = await op(t.d.api, 'POST', '/api/v1/images/import', { name: 'nourl', source: `http://127.0.0.1:${port}/nope.vmdk` });
    assert.equal(missing.status, 'failure');
    assert.match(missing.error!.message, /HTTP 404/);
    await nothingLeft('nourl');
  });

  it('refuses bad input with a clear error, leaving no file and no record', async () => {
    // Names with / or ..
    for (const name of ['a/b', '..', '../etc', 'x..y/z']) {
      await assert.rejects(t.d.api.request('POST', '/api/v1/images/import', { name, source: join(work, 'appliance.vmdk') }), (e: ApiError) => e.code === 'HF_ERR_INVALID_NAME', name);
    }
    const slash = cli('image', 'import', join(work, 'appliance.vmdk'), '--name', '../evil');
    assert.notEqual(slash.status, 0);
    assert.match(slash.stderr, /HF_ERR_INVALID_NAME/);

    // A file that is not an image.
    await writeFile(join(work, 'notes.txt'), 'hello, this is not a disk\n');
    let r = cli('image', 'import', join(work, 'notes.txt'), '--name', 'notes');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /notes.txt is not a disk image in any accepted format .*\(HF_ERR_BAD_IMAGE\)/);
    await nothingLeft('notes');

    // A truncated qcow2.
    const full = join(work, 'full.qcow2');
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', full, '64M']);
    spawnSync('qemu-io', ['-c', 'write -P 0x55 0 8M', full]);
    const trunc = join(work, 'trunc.qcow2');
    await writeFile(trunc, (await readFile(full)).subarray(0, 300_000));
    r = cli('image', 'import', trunc, '--name', 'trunc');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /trunc.qcow2 is corrupt or truncated \(qemu-img check: .*errors.*\(HF_ERR_BAD_IMAGE\)/);
    await nothingLeft('trunc');

    // An OVA without an OVF.
    const noOvf = join(work, 'noovf.ova');
    spawnSync('tar', ['-C', work, '-cf', noOvf, 'appliance.vmdk']);
    r = cli('image', 'import', noOvf, '--name', 'noovf');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /noovf.ova contains no OVF descriptor \(.ovf\): not an OVA \(entries: appliance.vmdk\) \(HF_ERR_BAD_IMAGE\)/);
    await nothingLeft('noovf');

    // An unsupported format.
    const qed = join(work, 'disk.qed');
    spawnSync('qemu-img', ['create', '-q', '-f', 'qed', qed, '16M']);
    r = cli('image', 'import', qed, '--name', 'qed');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /disk.qed is a qed image: not an accepted format .*\(HF_ERR_UNSUPPORTED\)/);
    await nothingLeft('qed');

    // A qcow2 overlay pointing at a file of the host: refused (it would read that file).
    const overlay = join(work, 'overlay.qcow2');
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', full, overlay]);
    const o = await op(t.d.api, 'POST', '/api/v1/images/import', { name: 'overlay', source: overlay });
    assert.equal(o.error?.code, 'HF_ERR_BAD_IMAGE');
    assert.match(o.error!.message, /is an overlay on/);
    await nothingLeft('overlay');

    // A missing file, a relative path, an existing name, a format that does not match.
    await assert.rejects(t.d.api.request('POST', '/api/v1/images/import', { name: 'gone', source: join(work, 'gone.img') }), (e: ApiError) => e.code === 'HF_ERR_NOT_FOUND');
    await assert.rejects(t.d.api.request('POST', '/api/v1/images/import', { name: 'rel', source: 'x.img' }), (e: ApiError) => e.code === 'HF_ERR_VALIDATION');
    await assert.rejects(t.d.api.request('POST', '/api/v1/images/import', { name: 'golden', source: full }), (e: ApiError) => e.code === 'HF_ERR_ALREADY_EXISTS');
    const mismatch = await op(t.d.api, 'POST', '/api/v1/images/import', { name: 'mismatch', source: full, format: 'vdi' });
    assert.equal(mismatch.error?.code, 'HF_ERR_VALIDATION');
    await nothingLeft('mismatch');

    const { images } = await t.d.api.request<{ images: ImageRecord[] }>('GET', '/api/v1/images');
    assert.deepEqual(images.filter((i) => i.source !== 'builtin').map((i) => i.name).sort(), ['appliance', 'fromurl', 'fromvmdk', 'golden']);
  });
});
