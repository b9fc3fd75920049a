// Test certificates made with the openssl CLI: a CA and the host certificates it signs (each
// both a server and a client certificate, as a cluster host's is). EC P-256 keys: quick to make.
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { run } from '../../src/util/exec.js';

export interface TestCert {
  /** PEM certificate and key. */
  cert: string;
  key: string;
}

export interface TestCa {
  /** The CA's certificate (PEM). */
  ca: string;
  /** A certificate signed by this CA for `name` (its CN), valid for the given IP addresses. */
  issue(name: string, ips?: string[]): Promise<TestCert>;
}

const KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

/** Makes a CA in `dir` (an existing directory the caller removes); `label` keeps several CAs in one directory apart. */
export async function makeCa(dir: string, label: string): Promise<TestCa> {
  const caKey = join(dir, `${label}-ca.key`);
  const caCert = join(dir, `${label}-ca.crt`);
  await run('openssl', [
    'req', '-x509', ...KEY, '-keyout', caKey, '-out', caCert, '-days', '2', '-subj', `/CN=${label} test CA`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  const ca = await readFile(caCert, 'utf8');
  let serial = 0;
  return {
    ca,
    async issue(name, ips = ['127.0.0.1']) {
      const base = join(dir, `${label}-${name}`);
      await run('openssl', ['req', ...KEY, '-keyout', `${base}.key`, '-out', `${base}.csr`, '-subj', `/CN=${name}`]);
      await writeFile(
        `${base}.ext`,
        [
          `subjectAltName=${ips.map((ip) => `IP:${ip}`).join(',')}`,
          'basicConstraints=CA:FALSE',
          'keyUsage=critical,digitalSignature',
          'extendedKeyUsage=serverAuth,clientAuth',
        ].join('\n') + '\n',
      );
      await run('openssl', [
        'x509', '-req', '-in', `${base}.csr`, '-CA', caCert, '-CAkey', caKey, '-set_serial', String(++serial),
        '-days', '2', '-extfile', `${base}.ext`, '-out', `${base}.crt`,
      ]);
      return { cert: await readFile(`${base}.crt`, 'utf8'), key: await readFile(`${base}.key`, 'utf8') };
    },
  };
}
