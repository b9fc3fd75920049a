// The etcd member command line (cluster/etcd-args.ts): pure, checked flag by flag.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { isHfError } from '../../src/core/errors.js';
import { ETCD_DEFAULTS, etcdArgs, formatInitialCluster, parseInitialCluster, type EtcdMemberConfig } from '../../src/cluster/etcd-args.js';

const TLS = { certFile: '/pki/host.crt', keyFile: '/pki/host.key', caFile: '/pki/ca.crt' };

function config(over: Partial<EtcdMemberConfig> = {}): EtcdMemberConfig {
  return {
    name: 'h1',
    dataDir: '/var/lib/hyperfold/etcd/member',
    peerUrls: ['https://10.0.0.1:2380'],
    clientUrls: ['https://10.0.0.1:2379'],
    initialCluster: [{ name: 'h1', peerUrls: ['https://10.0.0.1:2380'] }],
    state: 'new',
    tls: TLS,
    ...over,
  };
}

/** The flags as a map (every flag is one `--flag=value` item). */
function flags(args: string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (const a of args) {
    const match = /^--([a-z0-9-]+)=(.*)$/.exec(a);
    assert.ok(match, `"${a}" is a --flag=value item`);
    assert.ok(!m.has(match[1]!), `--${match[1]} appears once`);
    m.set(match[1]!, match[2]!);
  }
  return m;
}

function rejects(c: EtcdMemberConfig, re: RegExp): void {
  assert.throws(() => etcdArgs(c), (e) => isHfError(e) && e.code === 'HF_ERR_VALIDATION' && re.test(e.message));
}

describe('etcd member argv', () => {
  it('a new single member: identity, URLs, TLS on both ports with client certificates, the defaults', () => {
    const f = flags(etcdArgs(config({ clusterToken: 'prod' })));
    assert.equal(f.get('name'), 'h1');
    assert.equal(f.get('data-dir'), '/var/lib/hyperfold/etcd/member');
    assert.equal(f.get('listen-peer-urls'), 'https://10.0.0.1:2380');
    assert.equal(f.get('initial-advertise-peer-urls'), 'https://10.0.0.1:2380');
    assert.equal(f.get('listen-client-urls'), 'https://10.0.0.1:2379');
    assert.equal(f.get('advertise-client-urls'), 'https://10.0.0.1:2379');
    assert.equal(f.get('initial-cluster'), 'h1=https://10.0.0.1:2380');
    assert.equal(f.get('initial-cluster-state'), 'new');
    assert.equal(f.get('initial-cluster-token'), 'prod');
    assert.equal(f.get('cert-file'), TLS.certFile);
    assert.equal(f.get('key-file'), TLS.keyFile);
    assert.equal(f.get('trusted-ca-file'), TLS.caFile);
    assert.equal(f.get('client-cert-auth'), 'true');
    assert.equal(f.get('peer-cert-file'), TLS.certFile);
    assert.equal(f.get('peer-key-file'), TLS.keyFile);
    assert.equal(f.get('peer-trusted-ca-file'), TLS.caFile);
    assert.equal(f.get('peer-client-cert-auth'), 'true');
    assert.equal(f.get('heartbeat-interval'), '200');
    assert.equal(f.get('election-timeout'), '2000');
    assert.equal(f.get('quota-backend-bytes'), String(512 * 1024 * 1024));
    assert.equal(f.get('auto-compaction-mode'), 'revision');
    assert.equal(f.get('auto-compaction-retention'), '10000');
    assert.equal(f.get('snapshot-count'), String(ETCD_DEFAULTS.snapshotCount));
    assert.equal(f.get('enable-v2'), 'false');
    assert.equal(f.get('logger'), 'zap');
    assert.equal(f.get('log-outputs'), 'stderr');
  });

  it('a member joining an existing cluster: the whole cluster listed, state existing, no token needed', () => {
    const initialCluster = parseInitialCluster('h1=https://10.0.0.1:2380,h2=https://10.0.0.2:2380,h3=https://10.0.0.3:2380');
    const f = flags(etcdArgs(config({ name: 'h3', peerUrls: ['https://10.0.0.3:2380'], clientUrls: ['https://10.0.0.3:2379'], initialCluster, state: 'existing' })));
    assert.equal(f.get('initial-cluster'), 'h1=https://10.0.0.1:2380,h2=https://10.0.0.2:2380,h3=https://10.0.0.3:2380');
    assert.equal(f.get('initial-cluster-state'), 'existing');
    assert.equal(f.has('initial-cluster-token'), false);
  });

  it('listen addresses may differ from the advertised ones; several URLs are comma-joined', () => {
    const f = flags(
      etcdArgs(
        config({
          clientUrls: ['https://10.0.0.1:2379', 'https://127.0.0.1:2379'],
          listenClientUrls: ['https://0.0.0.0:2379'],
          listenPeerUrls: ['https://0.0.0.0:2380'],
        }),
      ),
    );
    assert.equal(f.get('listen-client-urls'), 'https://0.0.0.0:2379');
    assert.equal(f.get('advertise-client-urls'), 'https://10.0.0.1:2379,https://127.0.0.1:2379');
    assert.equal(f.get('listen-peer-urls'), 'https://0.0.0.0:2380');
    assert.equal(f.get('initial-advertise-peer-urls'), 'https://10.0.0.1:2380');
  });

  it('tuning overrides: timeouts, quota, periodic compaction', () => {
    const f = flags(etcdArgs(config({ heartbeatMs: 100, electionMs: 1000, quotaBackendBytes: 1 << 30, compaction: { mode: 'periodic', retention: '1h' }, snapshotCount: 5000 })));
    assert.equal(f.get('heartbeat-interval'), '100');
    assert.equal(f.get('election-timeout'), '1000');
    assert.equal(f.get('quota-backend-bytes'), String(1 << 30));
    assert.equal(f.get('auto-compaction-mode'), 'periodic');
    assert.equal(f.get('auto-compaction-retention'), '1h');
    assert.equal(f.get('snapshot-count'), '5000');
  });

  it('refuses what etcd would refuse at start, with the reason', () => {
    rejects(config({ peerUrls: ['http://10.0.0.1:2380'], initialCluster: [{ name: 'h1', peerUrls: ['http://10.0.0.1:2380'] }] }), /not https/);
    rejects(config({ clientUrls: ['https://10.0.0.1'] }), /no port/);
    rejects(config({ clientUrls: [] }), /clientUrls is empty/);
    rejects(config({ clientUrls: ['not a url'] }), /invalid URL/);
    rejects(config({ initialCluster: [{ name: 'h2', peerUrls: ['https://10.0.0.2:2380'] }] }), /does not list this member/);
    rejects(config({ initialCluster: [{ name: 'h1', peerUrls: ['https://10.0.0.9:2380'] }] }), /gives h1 peer URLs/);
    rejects(config({ heartbeatMs: 500, electionMs: 2000 }), /at least 5 heartbeats/);
    rejects(config({ name: 'a=b' }), /invalid member name/);
  });

  it('initial cluster text: one entry a URL, parsed back; unnamed (not yet started) members kept', () => {
    const members = [
      { name: 'a', peerUrls: ['https://1.1.1.1:2380', 'https://[fd00::1]:2380'] },
      { name: '', peerUrls: ['https://2.2.2.2:2380'] },
    ];
    const text = formatInitialCluster(members);
    assert.equal(text, 'a=https://1.1.1.1:2380,a=https://[fd00::1]:2380,=https://2.2.2.2:2380');
    assert.deepEqual(parseInitialCluster(text), members);
    assert.throws(() => parseInitialCluster('a=https://1.1.1.1:2380,junk'), /expected name=url/);
  });
});
