// The cluster's PKI: one certificate authority per cluster, one key and certificate per host.
// A host's certificate is everything it shows and presents: its API server certificate, its
// client certificate towards other hosts, and its etcd peer and client certificate (so it
// carries both serverAuth and clientAuth, and the addresses others reach it by).
//
// Keys and certificates are made by the `openssl` CLI; node:crypto only reads them (fingerprints,
// chain checks). The CA key lives in etcd on most hosts, so signing works from PEM text: it is
// written to a private temporary directory for openssl and removed right after.
import { createHash, randomBytes, X509Certificate } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HfError } from '../core/errors.js';
import { run } from '../util/exec.js';

export interface CaFiles {
  keyPath: string;
  certPath: string;
  keyPem: string;
  certPem: string;
}

export interface HostPki {
  caPem: string;
  certPem: string;
  keyPem: string;
}

export interface HostPkiPaths {
  ca: string;
  cert: string;
  key: string;
}

export interface SignOptions {
  hostName: string;
  /** Addresses other hosts and clients reach this host by (127.0.0.1 is always added). */
  ips: string[];
  /** More DNS names besides the host name and localhost. */
  dnsNames?: string[];
  /** Validity in days; capped at the CA's own expiry. Default ten years, as the CA: nothing rotates them yet. */
  days?: number;
}

const CA_DAYS = 3650;
const HOST_DAYS = 3650;
const DAY_MS = 86_400_000;

/** A DNS name (RFC 1123 labels): what may stand in a SAN and in a subject without escaping. */
const DNS_NAME = /^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/i;

/** Generates a new EC P-256 private key (PEM). */
async function newKey(): Promise<string> {
  const { stdout } = await run('openssl', ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256'], { errorCode: 'HF_ERR_INTERNAL' });
  return stdout;
}

/**
 * Writes a file with `mode` whatever was there before: a new file, then a rename over the old one
 * (writeFile's mode only applies to a file it creates).
 */
async function writePrivate(path: string, content: string, mode: number): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await writeFile(tmp, content, { mode, flag: 'wx' });
    await chmod(tmp, mode); // the umask may have narrowed it
    await rename(tmp, path);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}

/** A value for openssl's -subj: `/`, `+`, `=`, `,` and `\` are escaped with a backslash. */
function subjValue(s: string): string {
  return s.replace(/[\\/+=,]/g, (c) => `\\${c}`);
}

function checkHostName(name: string): void {
  if (!DNS_NAME.test(name)) throw new HfError('HF_ERR_VALIDATION', `invalid host name "${name}": letters, digits, '-' and '.' (a DNS name)`);
}

/** Creates the cluster's CA in `dir`: ca.key (0600) and ca.crt, valid ten years. */
export async function createCa(dir: string, clusterName: string): Promise<CaFiles> {
  if (!clusterName || /[\0\n\r]/.test(clusterName)) throw new HfError('HF_ERR_VALIDATION', 'invalid cluster name: empty or with control characters');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const keyPath = join(dir, 'ca.key');
  const certPath = join(dir, 'ca.crt');
  const keyPem = await newKey();
  await writePrivate(keyPath, keyPem, 0o600);
  const { stdout: certPem } = await run('openssl', [
    'req', '-x509', '-new', '-key', keyPath, '-sha256', '-days', String(CA_DAYS),
    '-subj', `/O=Hyperfold/OU=${subjValue(clusterName)}/CN=Hyperfold CA ${subjValue(clusterName)}`,
    '-addext', 'basicConstraints=critical,CA:TRUE,pathlen:0',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  await writePrivate(certPath, certPem, 0o644);
  return { keyPath, certPath, keyPem, certPem };
}

/** A new host key in `dir`/host.key (0600) and a certificate request for it. */
export async function createHostKeyAndCsr(dir: string, hostName: string): Promise<{ keyPem: string; csrPem: string }> {
  checkHostName(hostName);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const keyPath = join(dir, 'host.key');
  const keyPem = await newKey();
  await writePrivate(keyPath, keyPem, 0o600);
  const { stdout: csrPem } = await run('openssl', ['req', '-new', '-key', keyPath, '-sha256', '-subj', `/O=Hyperfold/CN=${hostName}`]);
  return { keyPem, csrPem };
}

/**
 * A private directory for key material: on tmpfs when there is one (the CA key should not reach
 * a disk), else the system's temporary directory. mkdtemp makes it 0700.
 */
async function privateTmpDir(): Promise<string> {
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  try {
    return await mkdtemp(join(base, 'hf-pki-'));
  } catch {
    return mkdtemp(join(tmpdir(), 'hf-pki-'));
  }
}

/**
 * Signs a host's certificate request with the CA (both as PEM text). The CA decides what the
 * certificate says: the subject is the host name whatever the request asked, the SANs are the
 * host name, `localhost`, 127.0.0.1 and the given IPs and names; the request only contributes its
 * public key (openssl checks its self-signature: the requester holds the key).
 */
export async function signHostCert(ca: { certPem: string; keyPem: string }, csrPem: string, opts: SignOptions): Promise<string> {
  checkHostName(opts.hostName);
  const dns = [...new Set([opts.hostName, 'localhost', ...(opts.dnsNames ?? [])])];
  for (const d of dns) checkHostName(d);
  const ips = [...new Set(['127.0.0.1', ...opts.ips])];
  for (const ip of ips) if (!isIP(ip)) throw new HfError('HF_ERR_VALIDATION', `invalid IP address "${ip}" for the certificate of ${opts.hostName}`);
  // No certificate outlives its CA.
  const caCert = new X509Certificate(ca.certPem);
  const caDaysLeft = Math.floor((Date.parse(caCert.validTo) - Date.now()) / DAY_MS);
  const days = Math.min(opts.days ?? HOST_DAYS, caDaysLeft);
  if (!(days >= 1)) throw new HfError('HF_ERR_VALIDATION', `cannot sign for ${opts.days ?? HOST_DAYS} days: the CA expires ${caCert.validTo}`);

  const san = [...dns.map((d) => `DNS:${d}`), ...ips.map((ip) => `IP:${ip}`)].join(', ');
  const ext = [
    '[v3_host]',
    'basicConstraints = critical, CA:FALSE',
    'keyUsage = critical, digitalSignature, keyEncipherment',
    'extendedKeyUsage = serverAuth, clientAuth',
    `subjectAltName = ${san}`,
    'subjectKeyIdentifier = hash',
    'authorityKeyIdentifier = keyid',
    '',
  ].join('\n');
  // A random positive 128-bit serial: unique without a serial file shared between hosts.
  const serial = randomBytes(16);
  serial[0]! &= 0x7f;

  const dir = await privateTmpDir();
  try {
    const f = { caCrt: join(dir, 'ca.crt'), caKey: join(dir, 'ca.key'), csr: join(dir, 'host.csr'), ext: join(dir, 'ext.cnf') };
    await writeFile(f.caKey, ca.keyPem, { mode: 0o600 });
    await writeFile(f.caCrt, ca.certPem, { mode: 0o600 });
    await writeFile(f.csr, csrPem, { mode: 0o600 });
    await writeFile(f.ext, ext, { mode: 0o600 });
    const { stdout } = await run('openssl', [
      'x509', '-req', '-in', f.csr, '-CA', f.caCrt, '-CAkey', f.caKey,
      '-set_serial', `0x${serial.toString('hex')}`, '-days', String(days), '-sha256',
      '-subj', `/O=Hyperfold/CN=${opts.hostName}`,
      '-extfile', f.ext, '-extensions', 'v3_host',
    ], { errorCode: 'HF_ERR_VALIDATION' });
    return stdout;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** 'sha256:' + the lowercase hex SHA-256 of the certificate's DER. */
export function fingerprint(certPem: string): string {
  return 'sha256:' + createHash('sha256').update(new X509Certificate(certPem).raw).digest('hex');
}

/** Whether `certPem` was issued and signed by the CA `caPem` and is valid now. False on unparsable input. */
export function verifyChain(certPem: string, caPem: string): boolean {
  try {
    const cert = new X509Certificate(certPem);
    const ca = new X509Certificate(caPem);
    const now = Date.now();
    if (now < Date.parse(cert.validFrom) || now > Date.parse(cert.validTo)) return false;
    return ca.ca && cert.checkIssued(ca) && cert.verify(ca.publicKey);
  } catch {
    return false;
  }
}

export function hostPkiPaths(dir: string): HostPkiPaths {
  return { ca: join(dir, 'ca.crt'), cert: join(dir, 'host.crt'), key: join(dir, 'host.key') };
}

/** Writes a host's ca.crt, host.crt and host.key (0600) under `dir` (made 0700 if missing). */
export async function writeHostPki(dir: string, pki: HostPki): Promise<HostPkiPaths> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const p = hostPkiPaths(dir);
  await writePrivate(p.key, pki.keyPem, 0o600);
  await writePrivate(p.cert, pki.certPem, 0o644);
  await writePrivate(p.ca, pki.caPem, 0o644);
  return p;
}

/**
 * Reads a host's PKI from `dir`. Undefined when none of the three files exists (the host has no
 * PKI yet); a partial set is an error naming what is missing.
 */
export async function readHostPki(dir: string): Promise<HostPki | undefined> {
  const p = hostPkiPaths(dir);
  const read = (f: string) => readFile(f, 'utf8').catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return undefined;
    throw new HfError('HF_ERR_DATA_DIR', `cannot read ${f}: ${e.message}`, { cause: e });
  });
  const [caPem, certPem, keyPem] = await Promise.all([read(p.ca), read(p.cert), read(p.key)]);
  if (caPem === undefined && certPem === undefined && keyPem === undefined) return undefined;
  if (caPem === undefined || certPem === undefined || keyPem === undefined) {
    const missing = [caPem === undefined && p.ca, certPem === undefined && p.cert, keyPem === undefined && p.key].filter(Boolean).join(', ');
    throw new HfError('HF_ERR_DATA_DIR', `incomplete host PKI in ${dir}: missing ${missing}`);
  }
  return { caPem, certPem, keyPem };
}
