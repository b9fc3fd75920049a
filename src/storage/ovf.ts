// OVF descriptors (DMTF DSP0243, 1.x and 2.x, as written by VMware, VirtualBox and others): what a
// VM definition needs from them — name, vCPUs, memory, firmware and the disks in boot order, each
// with the file (in the OVA) that holds it. Pure: a string in, a description out. The XML is
// read by fast-xml-parser (validated first; a DOCTYPE is refused, so no entity-expansion tricks)
// into a small element tree addressed by local name, since OVF files from VMware, VirtualBox and
// others bind the same namespaces to different prefixes.
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { HfError } from '../core/errors.js';

export interface XmlElement {
  /** Qualified name as written ("rasd:ResourceType"). */
  qname: string;
  /** Local name ("ResourceType"). */
  name: string;
  /** Attributes by qualified name. */
  attrs: Record<string, string>;
  children: XmlElement[];
  /** Concatenated character data directly inside this element. */
  text: string;
}

export class XmlError extends Error {}

const ATTRS = ':@';
const TEXT = '#text';
/** One node of fast-xml-parser's `preserveOrder` output: `{ tag: [children], ':@': attrs }` or `{ '#text': text }`. */
type OrderedNode = Record<string, unknown>;

const parser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  // Values stay strings: "0042" is an id, not a number.
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: false,
  processEntities: true,
  htmlEntities: true,
  ignoreDeclaration: true,
  ignorePiTags: true,
});

function localName(qname: string): string {
  const i = qname.indexOf(':');
  return i < 0 ? qname : qname.slice(i + 1);
}

function toElement(node: OrderedNode): XmlElement | undefined {
  const qname = Object.keys(node).find((k) => k !== ATTRS && k !== TEXT);
  if (qname === undefined) return undefined;
  const attrs: Record<string, string> = {};
  for (const [k, v] of Object.entries((node[ATTRS] ?? {}) as Record<string, unknown>)) attrs[k] = String(v);
  const el: XmlElement = { qname, name: localName(qname), attrs, children: [], text: '' };
  for (const c of (node[qname] ?? []) as OrderedNode[]) {
    if (TEXT in c) el.text += String(c[TEXT]);
    else {
      const e = toElement(c);
      if (e) el.children.push(e);
    }
  }
  return el;
}

/** Parses a whole document into its root element; XmlError names what is wrong and where. */
export function parseXml(src: string): XmlElement {
  if (/<!DOCTYPE/i.test(src)) throw new XmlError('a DOCTYPE is not accepted in an OVF descriptor');
  const valid = XMLValidator.validate(src);
  if (valid !== true) throw new XmlError(`${valid.err.msg} (line ${valid.err.line}, column ${valid.err.col})`);
  const roots = (parser.parse(src) as OrderedNode[]).map(toElement).filter((e): e is XmlElement => e !== undefined);
  if (roots.length !== 1) throw new XmlError(roots.length ? `more than one root element (<${roots[0]!.qname}>, <${roots[1]!.qname}>)` : 'no root element');
  return roots[0]!;
}

function attr(el: XmlElement, local: string): string | undefined {
  if (el.attrs[local] !== undefined) return el.attrs[local];
  for (const [k, v] of Object.entries(el.attrs)) if (localName(k) === local) return v;
  return undefined;
}

function child(el: XmlElement, local: string): XmlElement | undefined {
  return el.children.find((c) => c.name === local);
}

function children(el: XmlElement, local: string): XmlElement[] {
  return el.children.filter((c) => c.name === local);
}

/** Every element named `local` below `el`, in document order. */
function descendants(el: XmlElement, local: string): XmlElement[] {
  const out: XmlElement[] = [];
  const walk = (e: XmlElement): void => {
    for (const c of e.children) {
      if (c.name === local) out.push(c);
      walk(c);
    }
  };
  walk(el);
  return out;
}

export interface OvfDisk {
  /** ovf:diskId */
  id: string;
  /** The file (OVA entry) holding the disk image. */
  href: string;
  /** Capacity the descriptor declares (bytes), when it does. */
  capacityBytes?: number;
  /** Declared format URL (…vmdk.html#streamOptimized), when given. */
  format?: string;
  /** The controller it hangs off, from the hardware section. */
  controller?: 'ide' | 'scsi' | 'sata' | 'nvme' | 'other';
}

export interface OvfDescriptor {
  name?: string;
  os?: string;
  vcpus?: number;
  memoryMiB?: number;
  firmware: 'bios' | 'uefi';
  /** In boot order: hard disks of the hardware section first, then unreferenced ones. */
  disks: OvfDisk[];
  nics: number;
  /** Things present but not imported (CD-ROM images, unknown units…). */
  warnings: string[];
}

/** ResourceType values from CIM_ResourceAllocationSettingData. */
const RT = { cpu: 3, memory: 4, ide: 5, scsi: 6, ethernet: 10, cdrom: 15, dvd: 16, disk: 17, sata: 20 } as const;

/**
 * Multiplier in bytes of a programmatic unit ("byte * 2^20", "byte*10^6", "MegaBytes", "MB", …).
 * Undefined when it is not a byte unit.
 */
export function allocationUnitBytes(units: string | undefined): number | undefined {
  if (units === undefined || units.trim() === '') return 1;
  const u = units.trim().replace(/\s+/g, '');
  const m = /^byte(?:\*(\d+)\^(\d+))?$/i.exec(u);
  if (m) return m[1] ? Number(m[1]) ** Number(m[2]) : 1;
  const named: Record<string, number> = {
    b: 1, bytes: 1,
    kb: 1024, kilobytes: 1024, kib: 1024,
    mb: 1024 ** 2, megabytes: 1024 ** 2, mib: 1024 ** 2,
    gb: 1024 ** 3, gigabytes: 1024 ** 3, gib: 1024 ** 3,
    tb: 1024 ** 4, terabytes: 1024 ** 4, tib: 1024 ** 4,
  };
  return named[u.toLowerCase()];
}

function intText(el: XmlElement | undefined): number | undefined {
  if (!el) return undefined;
  const t = el.text.trim();
  if (!/^\d+$/.test(t)) return undefined;
  return Number(t);
}

/** The href must name a file inside the OVA: relative, no "..", no backslashes. */
export function safeHref(href: string): boolean {
  if (!href || href.startsWith('/') || href.includes('\\') || href.includes('\0')) return false;
  if (/^[a-z][a-z0-9+.-]*:/i.test(href)) return false; // a URL
  return !href.split('/').some((s) => s === '..' || s === '');
}

export function parseOvf(text: string): OvfDescriptor {
  let root: XmlElement;
  try {
    root = parseXml(text);
  } catch (e) {
    throw new HfError('HF_ERR_BAD_IMAGE', `the OVF descriptor is not valid XML: ${(e as XmlError).message}`);
  }
  if (root.name !== 'Envelope') throw new HfError('HF_ERR_BAD_IMAGE', `the OVF descriptor's root is <${root.qname}>, not <Envelope>`);
  const warnings: string[] = [];

  // Files and disks.
  const files = new Map<string, string>();
  for (const f of children(child(root, 'References') ?? root, 'File')) {
    const id = attr(f, 'id');
    const href = attr(f, 'href');
    if (!id || !href) continue;
    if (!safeHref(href)) throw new HfError('HF_ERR_BAD_IMAGE', `the OVF references "${href}": only files inside the OVA can be imported`);
    files.set(id, href);
  }
  const diskById = new Map<string, OvfDisk>();
  const diskSection = child(root, 'DiskSection') ?? descendants(root, 'DiskSection')[0];
  for (const d of diskSection ? children(diskSection, 'Disk') : []) {
    const id = attr(d, 'diskId');
    if (!id) continue;
    const fileRef = attr(d, 'fileRef');
    const href = fileRef ? files.get(fileRef) : undefined;
    if (!href) {
      warnings.push(`disk ${id} has no file (a blank disk): skipped`);
      continue;
    }
    const cap = attr(d, 'capacity');
    const mult = allocationUnitBytes(attr(d, 'capacityAllocationUnits'));
    const disk: OvfDisk = { id, href };
    if (cap && /^\d+$/.test(cap) && mult) disk.capacityBytes = Number(cap) * mult;
    const format = attr(d, 'format');
    if (format) disk.format = format;
    diskById.set(id, disk);
  }

  const vs = child(root, 'VirtualSystem') ?? descendants(root, 'VirtualSystem')[0];
  if (!vs) {
    if (descendants(root, 'VirtualSystemCollection').length) throw new HfError('HF_ERR_UNSUPPORTED', 'the OVF describes several virtual systems (a VirtualSystemCollection): import them one at a time');
    throw new HfError('HF_ERR_BAD_IMAGE', 'the OVF has no <VirtualSystem>');
  }
  const out: OvfDescriptor = { firmware: 'bios', disks: [], nics: 0, warnings };
  const name = child(vs, 'Name')?.text.trim() || attr(vs, 'id');
  if (name) out.name = name;
  const os = child(vs, 'OperatingSystemSection');
  if (os) {
    const desc = child(os, 'Description')?.text.trim();
    out.os = desc || attr(os, 'osType') || attr(os, 'id');
  }

  const hw = child(vs, 'VirtualHardwareSection');
  if (!hw) throw new HfError('HF_ERR_BAD_IMAGE', 'the OVF has no <VirtualHardwareSection>');
  const items = hw.children.filter((c) => c.name === 'Item' || c.name === 'StorageItem' || c.name === 'EthernetPortItem');
  const controllers = new Map<string, OvfDisk['controller']>();
  for (const it of items) {
    const type = intText(child(it, 'ResourceType'));
    const instanceId = child(it, 'InstanceID')?.text.trim();
    if (!instanceId) continue;
    if (type === RT.ide) controllers.set(instanceId, 'ide');
    else if (type === RT.scsi) controllers.set(instanceId, 'scsi');
    else if (type === RT.sata) controllers.set(instanceId, 'sata');
  }
  const ordered: OvfDisk[] = [];
  for (const it of items) {
    const type = intText(child(it, 'ResourceType'));
    const quantity = intText(child(it, 'VirtualQuantity'));
    switch (type) {
      case RT.cpu:
        if (quantity && quantity > 0) out.vcpus = quantity;
        break;
      case RT.memory: {
        const mult = allocationUnitBytes(child(it, 'AllocationUnits')?.text);
        if (quantity && mult) out.memoryMiB = Math.max(16, Math.round((quantity * mult) / 1048576));
        else warnings.push(`memory given in units "${child(it, 'AllocationUnits')?.text ?? ''}" that are not bytes: using the default`);
        break;
      }
      case RT.ethernet:
        out.nics++;
        break;
      case RT.cdrom:
      case RT.dvd:
        if (child(it, 'HostResource')?.text.trim()) warnings.push('a CD/DVD image is attached in the OVF: not imported');
        break;
      case RT.disk: {
        const host = child(it, 'HostResource')?.text.trim() ?? '';
        // "ovf:/disk/<diskId>" (OVF 1.x) or "/disk/<diskId>"; some tools reference the file directly.
        const m = /(?:^|\/)disk\/([^/]+)$/.exec(host) ?? /(?:^|\/)file\/([^/]+)$/.exec(host);
        let disk = m ? diskById.get(m[1]!) : undefined;
        if (!disk && m) {
          const href = files.get(m[1]!);
          if (href) disk = [...diskById.values()].find((d) => d.href === href);
        }
        if (!disk) {
          if (host) warnings.push(`hard disk item references "${host}", which the OVF does not define`);
          break;
        }
        const parent = child(it, 'Parent')?.text.trim();
        const ctl = parent ? controllers.get(parent) : undefined;
        if (ctl) disk.controller = ctl;
        if (!ordered.includes(disk)) ordered.push(disk);
        break;
      }
      default:
        break;
    }
  }
  for (const d of diskById.values()) if (!ordered.includes(d)) ordered.push(d);
  out.disks = ordered;

  // Firmware: VMware writes <vmw:Config vmw:key="firmware" vmw:value="efi"/>; VirtualBox puts
  // <Platform><BIOS>… or <EFI> in its own Machine section.
  for (const c of descendants(hw, 'Config')) {
    if (attr(c, 'key') === 'firmware' && /efi/i.test(attr(c, 'value') ?? '')) out.firmware = 'uefi';
  }
  const vbox = descendants(vs, 'Machine')[0];
  if (vbox && descendants(vbox, 'Firmware').some((f) => /efi/i.test(attr(f, 'type') ?? ''))) out.firmware = 'uefi';
  return out;
}
