// Disk image formats by their magic numbers. qemu-img probes too, but it calls anything it does
// not recognise "raw" (a text file becomes a 512-byte raw disk), and it does not probe fixed VHDs
// (their footer is at the end) or look into tar archives (OVA): so we look first.
import { open } from 'node:fs/promises';
import { isTarHeader } from '../util/tar.js';

export type SniffedFormat =
  | 'qcow2'
  | 'vmdk'
  /** A text VMDK descriptor: the data lives in other files. */
  | 'vmdk-descriptor'
  | 'vpc'
  | 'vhdx'
  | 'vdi'
  | 'ova'
  | 'qcow'
  | 'qed'
  | 'luks'
  | 'dmg'
  | 'parallels'
  | 'iso'
  | 'unknown';

/** `head`: the first bytes (at least 512; 0x8006 to see an ISO); `tail`: the last 512 bytes. */
export function sniffFormat(head: Buffer, tail: Buffer = Buffer.alloc(0)): SniffedFormat {
  const at = (off: number, s: string): boolean => head.length >= off + s.length && head.subarray(off, off + s.length).toString('latin1') === s;
  if (head.length >= 8 && head.readUInt32BE(0) === 0x514649fb) {
    const version = head.readUInt32BE(4);
    return version >= 2 ? 'qcow2' : 'qcow';
  }
  if (at(0, 'KDMV') || at(0, 'COWD')) return 'vmdk';
  if (at(0, '# Disk DescriptorFile')) return 'vmdk-descriptor';
  if (at(0, 'vhdxfile')) return 'vhdx';
  if (at(0, 'conectix')) return 'vpc';
  if (head.length >= 0x44 && head.readUInt32LE(0x40) === 0xbeda107f) return 'vdi';
  if (at(0, 'QED\0')) return 'qed';
  if (at(0, 'LUKS\xba\xbe')) return 'luks';
  if (at(0, 'WithoutFreeSpace') || at(0, 'WithouFreSpacExt')) return 'parallels';
  if (isTarHeader(head.subarray(0, 512))) return 'ova';
  if (tail.length >= 512 && tail.subarray(0, 8).toString('latin1') === 'conectix') return 'vpc';
  if (tail.length >= 512 && tail.subarray(0, 4).toString('latin1') === 'koly') return 'dmg';
  if (at(0x8001, 'CD001')) return 'iso';
  return 'unknown';
}

/** Sniffs a file, or a slice of one (an OVA entry). */
export async function sniffFile(path: string, slice?: { offset: number; size: number }): Promise<{ format: SniffedFormat; size: number }> {
  const fh = await open(path, 'r');
  try {
    const total = slice ? slice.size : (await fh.stat()).size;
    const base = slice?.offset ?? 0;
    const head = Buffer.alloc(Math.min(0x8006, total));
    await fh.read(head, 0, head.length, base);
    const tail = Buffer.alloc(total >= 1024 ? 512 : 0);
    if (tail.length) await fh.read(tail, 0, 512, base + total - 512);
    return { format: sniffFormat(head, tail), size: total };
  } finally {
    await fh.close();
  }
}
