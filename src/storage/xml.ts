// A small, strict XML reader for OVF descriptors: elements, attributes, text, comments, CDATA
// and the predefined / numeric entities. No DTDs (a DOCTYPE is refused: no entity expansion
// tricks), no external anything. Names are kept with their prefix and exposed by local name too,
// since OVF files from VMware, VirtualBox and others bind the same namespaces to different prefixes.

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

const ENTITIES: Record<string, string> = { lt: '<', gt: '>', amp: '&', quot: '"', apos: "'" };

function decode(s: string, at: number): string {
  return s.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[a-zA-Z]+);/g, (_m, e: string) => {
    if (e.startsWith('#x')) return String.fromCodePoint(parseInt(e.slice(2), 16));
    if (e.startsWith('#')) return String.fromCodePoint(parseInt(e.slice(1), 10));
    const v = ENTITIES[e];
    if (v === undefined) throw new XmlError(`unknown entity &${e}; near offset ${at}`);
    return v;
  });
}

export function localName(qname: string): string {
  const i = qname.indexOf(':');
  return i < 0 ? qname : qname.slice(i + 1);
}

const NAME = /^[A-Za-z_][\w.:-]*/;

export function parseXml(src: string): XmlElement {
  let i = 0;
  const n = src.length;
  const stack: XmlElement[] = [];
  let root: XmlElement | undefined;
  if (src.charCodeAt(0) === 0xfeff) i = 1;

  while (i < n) {
    const lt = src.indexOf('<', i);
    const textEnd = lt < 0 ? n : lt;
    if (textEnd > i) {
      const text = src.slice(i, textEnd);
      const top = stack[stack.length - 1];
      if (top) top.text += decode(text, i);
      else if (text.trim()) throw new XmlError(`text outside the root element at offset ${i}`);
    }
    if (lt < 0) break;
    i = lt;
    if (src.startsWith('<?', i)) {
      const e = src.indexOf('?>', i);
      if (e < 0) throw new XmlError('unterminated processing instruction');
      i = e + 2;
    } else if (src.startsWith('<!--', i)) {
      const e = src.indexOf('-->', i);
      if (e < 0) throw new XmlError('unterminated comment');
      i = e + 3;
    } else if (src.startsWith('<![CDATA[', i)) {
      const e = src.indexOf(']]>', i);
      if (e < 0) throw new XmlError('unterminated CDATA section');
      const top = stack[stack.length - 1];
      if (!top) throw new XmlError('CDATA outside the root element');
      top.text += src.slice(i + 9, e);
      i = e + 3;
    } else if (src.startsWith('<!', i)) {
      throw new XmlError('DOCTYPE and other declarations are not accepted');
    } else if (src.startsWith('</', i)) {
      const e = src.indexOf('>', i);
      if (e < 0) throw new XmlError('unterminated end tag');
      const qname = src.slice(i + 2, e).trim();
      const top = stack.pop();
      if (!top || top.qname !== qname) throw new XmlError(`end tag </${qname}> does not match <${top?.qname ?? '(none)'}> at offset ${i}`);
      i = e + 1;
    } else {
      i++;
      const m = NAME.exec(src.slice(i, i + 256));
      if (!m) throw new XmlError(`bad tag name at offset ${i}`);
      const el: XmlElement = { qname: m[0], name: localName(m[0]), attrs: {}, children: [], text: '' };
      i += m[0].length;
      for (;;) {
        while (i < n && /\s/.test(src[i]!)) i++;
        if (src.startsWith('/>', i)) {
          i += 2;
          attach(el, true);
          break;
        }
        if (src[i] === '>') {
          i++;
          attach(el, false);
          break;
        }
        const a = NAME.exec(src.slice(i, i + 256));
        if (!a) throw new XmlError(`bad attribute in <${el.qname}> at offset ${i}`);
        i += a[0].length;
        while (i < n && /\s/.test(src[i]!)) i++;
        if (src[i] !== '=') throw new XmlError(`attribute ${a[0]} of <${el.qname}> has no value`);
        i++;
        while (i < n && /\s/.test(src[i]!)) i++;
        const q = src[i];
        if (q !== '"' && q !== "'") throw new XmlError(`attribute ${a[0]} of <${el.qname}> is not quoted`);
        const e = src.indexOf(q, i + 1);
        if (e < 0) throw new XmlError(`unterminated attribute ${a[0]}`);
        el.attrs[a[0]] = decode(src.slice(i + 1, e), i);
        i = e + 1;
      }
    }
  }
  if (stack.length) throw new XmlError(`element <${stack[stack.length - 1]!.qname}> is not closed (truncated document?)`);
  if (!root) throw new XmlError('no root element');
  return root;

  function attach(el: XmlElement, selfClosing: boolean): void {
    const parent = stack[stack.length - 1];
    if (parent) parent.children.push(el);
    else if (root) throw new XmlError('more than one root element');
    else root = el;
    if (!selfClosing) stack.push(el);
  }
}

/** Attribute by local name (whatever prefix it was written with). */
export function attr(el: XmlElement, local: string): string | undefined {
  if (el.attrs[local] !== undefined) return el.attrs[local];
  for (const [k, v] of Object.entries(el.attrs)) if (localName(k) === local) return v;
  return undefined;
}

export function child(el: XmlElement, local: string): XmlElement | undefined {
  return el.children.find((c) => c.name === local);
}

export function children(el: XmlElement, local: string): XmlElement[] {
  return el.children.filter((c) => c.name === local);
}

/** Every descendant with that local name, document order. */
export function descendants(el: XmlElement, local: string): XmlElement[] {
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
