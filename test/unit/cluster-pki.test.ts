// The cluster PKI (cluster/pki.ts) with the real openssl: a CA, a host certificate signed from
// PEM text, chain checks, fingerprints, SANs, and the host's files with their modes.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { chmod, mkdtemp, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isHfError } from '../../src/core/errors.js';
import { createCa, createHostKeyAndCsr, fingerprint, readHostPki, signHostCert, verifyChain, writeHostPki, type CaFiles } from '../../src/cluster/pki.js';

const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';

function mode(path: string): number {
  return statSync(path).mode & 0o777;
}

function pkiTmpDirs(): string[] {
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  return readdirSync(base).filter((n) => n.startsWith('hf-pki-'));
}

describe('cluster PKI (openssl)', () => {
  let dir: string;
  let ca: CaFiles;
  let other: CaFiles;
  let host: { keyPem: string; csrPem: string };
  let certPem: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-unit-pki-'));
    ca = await createCa(join(dir, 'ca'), 'prod/east=1');
    other = await createCa(join(dir, 'other-ca'), 'other');
    host = await createHostKeyAndCsr(join(dir, 'host1'), 'host1');
    const before = pkiTmpDirs();
    certPem = await signHostCert({ certPem: ca.certPem, keyPem: ca.keyPem }, host.csrPem, { hostName: 'host1', ips: ['10.1.2.3', 'fd00::7'], dnsNames: ['host1.example.net'] });
    assert.deepEqual(pkiTmpDirs(), before, 'signing leaves no temporary directory behind');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('the CA: EC P-256, a CA certificate valid ten years, its key private', () => {
    assert.equal(mode(ca.keyPath), 0o600);
    assert.ok(existsSync(ca.certPath));
    const c = new X509Certificate(ca.certPem);
    assert.equal(c.ca, true);
    assert.equal(c.publicKey.asymmetricKeyType, 'ec');
    assert.equal(c.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1');
    const years = (Date.parse(c.validTo) - Date.now()) / (365.25 * 86_400_000);
    assert.ok(years > 9.9 && years < 10.1, `valid ${years} years`);
    // The cluster name, special characters and all, is in the subject.
    assert.match(c.subject, /CN=Hyperfold CA prod\/east=1/);
    assert.ok(c.checkIssued(c) && c.verify(c.publicKey), 'self-signed');
  });

  it('the host key is private; the request names the host', () => {
    assert.equal(mode(join(dir, 'host1', 'host.key')), 0o600);
    assert.match(host.csrPem, /^-----BEGIN CERTIFICATE REQUEST-----/);
    const r = spawnSync('openssl', ['req', '-noout', '-subject', '-verify'], { input: host.csrPem, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /CN\s*=\s*host1/);
  });

  it('a host certificate chains to its CA, not to another one', () => {
    assert.equal(verifyChain(certPem, ca.certPem), true);
    assert.equal(verifyChain(certPem, other.certPem), false);
    assert.equal(verifyChain(ca.certPem, other.certPem), false);
    assert.equal(verifyChain('not a certificate', ca.certPem), false);
    // openssl agrees.
    const caFile = join(dir, 'ca', 'ca.crt');
    const r = spawnSync('openssl', ['verify', '-CAfile', caFile], { input: certPem, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stdout + r.stderr);
  });

  it('SANs: the host name, localhost, 127.0.0.1 and the given IPs and names; server and client auth; not a CA', () => {
    const c = new X509Certificate(certPem);
    const sans = (c.subjectAltName ?? '').split(', ').sort();
    assert.deepEqual(sans, ['DNS:host1', 'DNS:host1.example.net', 'DNS:localhost', 'IP Address:10.1.2.3', 'IP Address:127.0.0.1', 'IP Address:FD00:0:0:0:0:0:0:7'].sort());
    assert.deepEqual([...(c.keyUsage ?? [])].sort(), [SERVER_AUTH, CLIENT_AUTH].sort());
    assert.equal(c.ca, false);
    assert.match(c.subject, /CN=host1/);
    assert.ok(c.checkHost('host1'));
    assert.ok(c.checkIP('127.0.0.1'));
    assert.ok(c.checkIP('10.1.2.3'));
    assert.equal(c.checkIP('10.1.2.4'), undefined);
  });

  it('the CA decides the subject: a request for another name gets the name it is signed for', async () => {
    const req = await createHostKeyAndCsr(join(dir, 'liar'), 'someone-else');
    const pem = await signHostCert(ca, req.csrPem, { hostName: 'host2', ips: [] });
    const c = new X509Certificate(pem);
    assert.match(c.subject, /CN=host2/);
    assert.doesNotMatch(c.subject, /someone-else/);
    assert.equal(c.checkHost('someone-else'), undefined);
  });

  it('a damaged request, a bad name or a bad IP is refused', async () => {
    const broken = host.csrPem.replace(/\n(.)(.)/, (_m, a: string, b: string) => `\n${b}${a}`);
    await assert.rejects(signHostCert(ca, broken, { hostName: 'host1', ips: [] }), (e) => isHfError(e) && e.code === 'HF_ERR_VALIDATION');
    await assert.rejects(signHostCert(ca, host.csrPem, { hostName: 'bad name/x', ips: [] }), (e) => isHfError(e) && e.code === 'HF_ERR_VALIDATION' && /host name/.test(e.message));
    await assert.rejects(signHostCert(ca, host.csrPem, { hostName: 'host1', ips: ['10.1.2'] }), (e) => isHfError(e) && /IP address "10.1.2"/.test(e.message));
    await assert.rejects(signHostCert(ca, host.csrPem, { hostName: 'host1', ips: [], dnsNames: ['a,IP:1.2.3.4'] }), (e) => isHfError(e) && e.code === 'HF_ERR_VALIDATION');
  });

  it('no certificate outlives its CA', async () => {
    const pem = await signHostCert(ca, host.csrPem, { hostName: 'host1', ips: [], days: 100_000 });
    assert.ok(Date.parse(new X509Certificate(pem).validTo) <= Date.parse(new X509Certificate(ca.certPem).validTo));
  });

  it('fingerprint: sha256 of the DER, stable, as openssl computes it', () => {
    const fp = fingerprint(certPem);
    assert.match(fp, /^sha256:[0-9a-f]{64}$/);
    assert.equal(fingerprint(certPem), fp);
    assert.equal(fingerprint(certPem.replace(/\n/g, '\r\n')), fp, 'independent of the PEM line endings');
    assert.notEqual(fingerprint(ca.certPem), fp);
    const r = spawnSync('openssl', ['x509', '-noout', '-fingerprint', '-sha256'], { input: certPem, encoding: 'utf8' });
    const theirs = /=([0-9A-F:]+)/.exec(r.stdout)![1]!.replace(/:/g, '').toLowerCase();
    assert.equal(fp, `sha256:${theirs}`);
  });

  it('host files: written with private modes, read back; none is undefined, a partial set an error', async () => {
    const hostDir = join(dir, 'pki');
    assert.equal(await readHostPki(hostDir), undefined);
    const paths = await writeHostPki(hostDir, { caPem: ca.certPem, certPem, keyPem: host.keyPem });
    assert.equal(mode(hostDir), 0o700);
    assert.equal(mode(paths.key), 0o600);
    assert.deepEqual(await readHostPki(hostDir), { caPem: ca.certPem, certPem, keyPem: host.keyPem });
    // Rewriting keeps the key private even over a file with a wider mode.
    await writeFile(paths.key, 'x');
    await chmod(paths.key, 0o644);
    await writeHostPki(hostDir, { caPem: ca.certPem, certPem, keyPem: host.keyPem });
    assert.equal(mode(paths.key), 0o600);
    await unlink(paths.cert);
    await assert.rejects(readHostPki(hostDir), (e) => isHfError(e) && e.code === 'HF_ERR_DATA_DIR' && e.message.includes('host.crt'));
  });
});
