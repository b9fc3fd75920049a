// Pool accounting, size rules, volume references, format sniffing and the import format
// decision, and the tar reader behind OVA import. Pure logic, no qemu-img.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { HfError } from '../../src/core/errors.js';
import { checkGrow, checkRoom, summarizePool } from '../../src/storage/accounting.js';
import { decideFormat, sliceSpec } from '../../src/storage/import.js';
import { parseVolumeRef } from '../../src/storage/model.js';
import { sniffFormat } from '../../src/storage/sniff.js';
import { readTarEntries } from '../../src/util/tar.js';

const MiB = 1024 * 1024;

describe('pool accounting', () => {
  it('sums allocation and provisioning and computes the overcommit ratio', () => {
    const s = summarizePool({ totalBytes: 100 * MiB, usedBytes: 30 * MiB, freeBytes: 70 * MiB }, [
      { allocatedBytes: 2 * MiB, virtualBytes: 100 * MiB },
      { allocatedBytes: 3 * MiB, virtualBytes: 50 * MiB },
    ]);
    assert.equal(s.volumes, 2);
    assert.equal(s.allocatedBytes, 5 * MiB);
    assert.equal(s.provisionedBytes, 150 * MiB);
    assert.equal(s.overcommit, 1.5);
    assert.equal(s.freeBytes, 70 * MiB);
    assert.equal(summarizePool({ totalBytes: 0, usedBytes: 0, freeBytes: 0 }, []).overcommit, 0);
  });

  it('refuses what does not fit with HF_ERR_POOL_FULL naming the pool and the sizes', () => {
    checkRoom('p', 'x', 10 * MiB, 10 * MiB);
    assert.throws(
      () => checkRoom('small', 'image big', 10 * MiB, 4 * MiB),
      (e: HfError) => e.code === 'HF_ERR_POOL_FULL' && e.status === 507 && /pool small is out of space: image big needs 10MiB, 4MiB free/.test(e.message) && e.details?.requiredBytes === 10 * MiB,
    );
    assert.throws(() => checkRoom('p', 'x', 1, 0, 0), (e: HfError) => e.code === 'HF_ERR_POOL_FULL');
    assert.throws(() => checkRoom('p', 'x', 5, 10, 6), (e: HfError) => e.code === 'HF_ERR_POOL_FULL', 'the reserve counts');
  });

  it('only grows disks, by whole sectors', () => {
    checkGrow('v', 64 * MiB, 128 * MiB);
    assert.throws(() => checkGrow('v', 128 * MiB, 64 * MiB), (e: HfError) => e.code === 'HF_ERR_VALIDATION' && /shrinking/.test(e.message));
    assert.throws(() => checkGrow('v', 64 * MiB, 64 * MiB), /already 64MiB/);
    assert.throws(() => checkGrow('v', 64 * MiB, 64 * MiB + 1), (e: HfError) => e.code === 'HF_ERR_INVALID_SIZE');
    assert.throws(() => checkGrow('v', 64 * MiB, 0), (e: HfError) => e.code === 'HF_ERR_INVALID_SIZE');
  });

  it('parses POOL/NAME references and refuses anything else', () => {
    assert.deepEqual(parseVolumeRef('default/data1'), { pool: 'default', name: 'data1' });
    for (const bad of ['data1', 'a/b/c', '../x', 'default/..', 'default/', '/x', 'Default/x', 'default/a_b']) assert.throws(() => parseVolumeRef(bad), Error, bad);
  });
});

function block(s: string, off = 0, size = 1024): Buffer {
  const b = Buffer.alloc(size);
  b.write(s, off, 'latin1');
  return b;
}

/** A minimal ustar archive in memory. */
function tar(entries: Array<{ name: string; data: Buffer; type?: string }>): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const h = Buffer.alloc(512);
    h.write(e.name, 0, 100, 'utf8');
    h.write('0000644\0', 100);
    h.write('0000000\0', 108);
    h.write('0000000\0', 116);
    h.write(e.data.length.toString(8).padStart(11, '0') + '\0', 124);
    h.write('00000000000\0', 136);
    h.write(e.type ?? '0', 156);
    h.write('ustar\0', 257);
    h.write('00', 263);
    h.fill(32, 148, 156);
    let sum = 0;
    for (const x of h) sum += x;
    h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148);
    parts.push(h, e.data, Buffer.alloc((512 - (e.data.length % 512)) % 512));
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

describe('format sniffing and import decisions', () => {
  it('recognises formats by their magic numbers', () => {
    const qcow2 = Buffer.alloc(1024);
    qcow2.writeUInt32BE(0x514649fb, 0);
    qcow2.writeUInt32BE(3, 4);
    assert.equal(sniffFormat(qcow2), 'qcow2');
    qcow2.writeUInt32BE(1, 4);
    assert.equal(sniffFormat(qcow2), 'qcow');
    assert.equal(sniffFormat(block('KDMV')), 'vmdk');
    assert.equal(sniffFormat(block('# Disk DescriptorFile\n')), 'vmdk-descriptor');
    assert.equal(sniffFormat(block('vhdxfile')), 'vhdx');
    assert.equal(sniffFormat(block('conectix')), 'vpc');
    assert.equal(sniffFormat(Buffer.alloc(1024), block('conectix', 0, 512)), 'vpc', 'fixed VHD: footer at the end');
    const vdi = block('<<< Oracle VM VirtualBox Disk Image >>>\n');
    vdi.writeUInt32LE(0xbeda107f, 0x40);
    assert.equal(sniffFormat(vdi), 'vdi');
    assert.equal(sniffFormat(block('QED\0')), 'qed');
    assert.equal(sniffFormat(tar([{ name: 'a.ovf', data: Buffer.from('<Envelope/>') }])), 'ova');
    assert.equal(sniffFormat(block('hello world\n')), 'unknown');
  });

  it('decides the format: hints must agree, raw must be asked for and whole sectors', () => {
    assert.equal(decideFormat('vmdk', 4096, undefined, 'x.vmdk'), 'vmdk');
    assert.equal(decideFormat('vpc', 4096, 'vhd', 'x.vhd'), 'vhd');
    assert.equal(decideFormat('ova', 4096, undefined, 'x.ova'), 'ova');
    assert.equal(decideFormat('unknown', 4096, 'raw', 'x'), 'raw');
    assert.equal(decideFormat('unknown', 4096, undefined, 'disk.img'), 'raw');
    const err = (fn: () => unknown, code: string, re: RegExp) => assert.throws(fn, (e: HfError) => e.code === code && re.test(e.message));
    err(() => decideFormat('unknown', 6, undefined, 'notes.txt'), 'HF_ERR_BAD_IMAGE', /not a disk image/);
    err(() => decideFormat('unknown', 1000, 'raw', 'x.raw'), 'HF_ERR_BAD_IMAGE', /512-byte sectors/);
    err(() => decideFormat('qcow2', 4096, 'raw', 'x.qcow2'), 'HF_ERR_VALIDATION', /is a qcow2 image, not raw/);
    err(() => decideFormat('qed', 4096, undefined, 'x.qed'), 'HF_ERR_UNSUPPORTED', /qed image: not an accepted format/);
    err(() => decideFormat('vmdk-descriptor', 4096, undefined, 'x.vmdk'), 'HF_ERR_UNSUPPORTED', /other files/);
    err(() => decideFormat('unknown', 4096, 'ova', 'x.ova'), 'HF_ERR_BAD_IMAGE', /not an OVA/);
  });

  it('builds a json: spec that reads a slice of the archive', () => {
    const spec = sliceSpec('/tmp/a,b.ova', 'vmdk', 1536, 4096);
    assert.ok(spec.startsWith('json:'));
    assert.deepEqual(JSON.parse(spec.slice(5)), { driver: 'vmdk', file: { driver: 'raw', offset: 1536, size: 4096, file: { driver: 'file', filename: '/tmp/a,b.ova' } } });
  });
});

describe('tar reader', () => {
  const list = (b: Buffer) => readTarEntries((async function* () {
    // in two pieces: a header split across chunks must still parse
    yield b.subarray(0, 700);
    yield b.subarray(700);
  })());

  it('lists entries with their data offsets', async () => {
    const a = tar([
      { name: 'app.ovf', data: Buffer.from('<Envelope/>') },
      { name: 'app.mf', data: Buffer.from('SHA256(app-disk1.vmdk)= 00\n') },
      { name: 'app-disk1.vmdk', data: Buffer.alloc(1500, 7) },
    ]);
    const entries = await list(a);
    assert.deepEqual(entries.map((e) => [e.name, e.size]), [['app.ovf', 11], ['app.mf', 27], ['app-disk1.vmdk', 1500]]);
    const disk = entries[2]!;
    assert.equal(a.subarray(disk.offset, disk.offset + disk.size).every((x) => x === 7), true);
    assert.equal(a.subarray(entries[0]!.offset, entries[0]!.offset + 11).toString(), '<Envelope/>');
  });

  it('follows GNU long names and pax paths', async () => {
    const long = 'd/'.repeat(70) + 'disk.vmdk';
    const pax = (k: string, v: string) => {
      let rec = ` ${k}=${v}\n`;
      let len = rec.length + 1;
      while (String(len).length + rec.length !== len) len = String(len).length + rec.length;
      return Buffer.from(`${len}${rec}`);
    };
    const a = tar([
      { name: '././@LongLink', data: Buffer.from(long + '\0'), type: 'L' },
      { name: 'truncated', data: Buffer.from('x') },
      { name: 'PaxHeader', data: pax('path', 'pax-name.ovf'), type: 'x' },
      { name: 'short', data: Buffer.from('y') },
    ]);
    const entries = await list(a);
    assert.deepEqual(entries.map((e) => e.name), [long, 'pax-name.ovf']);
  });

  it('refuses a corrupt header and an entry running past the end', async () => {
    const a = tar([{ name: 'a.ovf', data: Buffer.alloc(2000) }]);
    const bad = Buffer.from(a);
    bad[10] = 0x41;
    await assert.rejects(list(bad), /checksum/);
    await assert.rejects(list(a.subarray(0, 1024)), /past the end/);
  });
});
