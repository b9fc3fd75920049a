// Firewall rules as users write them ("tcp/80", "--from 10.0.0.0/8") turned into stored rules.
// Pure; shared by the service (API bodies) and the CLI (rule specs).
import { HfError } from '../core/errors.js';
import { formatCidr, parseCidr } from './cidr.js';
import type { FirewallRule } from './model.js';

/** Turns the API's rule body into a stored rule (port strings, CIDR checks). */
export function parseFirewallRule(req: { action: 'allow' | 'deny'; protocol?: FirewallRule['protocol'] | undefined; port?: number | string | undefined; from?: string | undefined }): FirewallRule {
  const protocol = req.protocol ?? 'tcp';
  const rule: FirewallRule = { action: req.action, protocol };
  if (req.port !== undefined && req.port !== '') {
    if (protocol !== 'tcp' && protocol !== 'udp') throw new HfError('HF_ERR_VALIDATION', `a port only makes sense with tcp or udp (not ${protocol})`);
    const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(String(req.port).trim());
    if (!m) throw new HfError('HF_ERR_VALIDATION', `"${req.port}" is not a port or port range (e.g. 80 or 8000-8080)`);
    const from = Number(m[1]);
    const to = m[2] === undefined ? from : Number(m[2]);
    if (from < 1 || to > 65535 || from > to) throw new HfError('HF_ERR_VALIDATION', `port range ${req.port} must be within 1-65535, low to high`);
    rule.ports = { from, to };
  }
  if (req.from !== undefined && req.from !== '') {
    const s = req.from.includes('/') ? req.from : `${req.from}/32`;
    rule.from = formatCidr(parseCidr(s, { what: 'source (--from)' }));
  }
  return rule;
}

/** "tcp/80", "udp/5000-5100", "icmp", "all", "tcp" → protocol and port. */
export function parseRuleSpec(spec: string): { protocol: FirewallRule['protocol']; port?: string } {
  const m = /^(tcp|udp|icmp|all|any)(?:\/(\d{1,5}(?:-\d{1,5})?))?$/.exec(spec.trim().toLowerCase());
  if (!m) throw new HfError('HF_ERR_VALIDATION', `"${spec}" is not a rule: use tcp/80, udp/53, tcp/8000-8080, icmp or all`);
  const protocol = (m[1] === 'any' ? 'all' : m[1]) as FirewallRule['protocol'];
  if (m[2] && protocol !== 'tcp' && protocol !== 'udp') throw new HfError('HF_ERR_VALIDATION', `"${spec}": only tcp and udp take a port`);
  return m[2] ? { protocol, port: m[2] } : { protocol };
}

