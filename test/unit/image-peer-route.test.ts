// The route another host fetches an image's files from, on a real cluster listener in this process
// (HTTPS with client certificates from the openssl CLI), called with the cluster's peer client:
// a host's certificate gets the tar stream (and it unpacks to checked files), another CA's
// certificate and the admin token are refused, a missing image and a host nobody listens on are
// named errors.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { FastifyInstance } from 'fastify';
import { randomBytes } from 'node:crypto';
import https from 'node:https';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildApp } from '../../src/api/server.js';
import type { ApiServices } from '../../src/api/services.js';
import { getFromPeer, type PeerTls } from '../../src/cluster/peer-client.js';
import { isHfError } from '../../src/core/errors.js';
import { IMAGE_BYTES_HEADER, type ImageRecord } from '../../src/core/model/image.js';
import { imageChecksums } from '../../src/images/digest.js';
import { receiveImageFiles } from '../../src/images/transfer.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { sha256File } from '../../src/util/hash.js';
import { silentLogger } from '../../src/util/log.js';
import { FakeDriver } from '../helpers/fake-driver.js';
import { makeCa } from '../helpers/tls.js';
import { buildWorld, TEST_TOKEN, type TestWorld } from '../helpers/world.js';

describe('the image files route between hosts', () => {
  let dir: string;
  let w: TestWorld;
  let app: FastifyInstance;
  let base: string;
  let peer: PeerTls;
  let stranger: PeerTls;
  let rec: ImageRecord;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-peer-'));
    w = await buildWorld(join(dir, 'h1'), { store: SqliteStateStore.open(':memory:'), drivers: [['vm', new FakeDriver()]] });
    const d = w.images.dir('golden');
    await mkdir(d, { recursive: true });
    await writeFile(join(d, 'disk.qcow2'), randomBytes(200_000));
    rec = {
      name: 'golden',
      type: 'vm',
      description: 'test',
      source: 'publish',
      boot: { kind: 'disk', firmware: 'bios' },
      disk: { path: join(d, 'disk.qcow2'), format: 'qcow2' },
      defaults: {},
      sizeBytes: 200_000,
      sha256: await imageChecksums(d, { files: ['disk.qcow2'] }),
      createdAt: new Date().toISOString(),
      details: {},
    };
    await w.images.register(rec);

    const cluster = await makeCa(dir, 'cluster');
    const h1 = await cluster.issue('h1');
    const h2 = await cluster.issue('h2');
    const other = await (await makeCa(dir, 'other')).issue('h2');
    peer = { ca: cluster.ca, ...h2 };
    stranger = { ca: cluster.ca, ...other };
    const services = { instances: w.svc, operations: w.ops, images: w.images, events: w.events, version: 'test', placement: undefined, host: undefined } as unknown as ApiServices;
    app = await buildApp(services, { token: TEST_TOKEN, log: silentLogger, version: 'test', clusterTls: { ca: cluster.ca, ...h1 } });
    await app.listen({ host: '127.0.0.1', port: 0 });
    base = `https://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
  });
  after(async () => {
    await app?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('streams the image’s files to another host’s certificate; they unpack to checked files', async () => {
    const res = await getFromPeer(`${base}/api/v1/images/golden/files`, peer, { host: 'h1' });
    assert.equal(res.headers['content-type'], 'application/x-tar');
    assert.equal(res.headers[IMAGE_BYTES_HEADER], '200000');
    const dest = join(dir, 'dest');
    await mkdir(dest);
    await receiveImageFiles(res, dest, rec, { from: 'h1' });
    assert.equal(await sha256File(join(dest, 'disk.qcow2')), rec.sha256['disk.qcow2']);
  });

  it('names what is wrong: a missing image, a certificate of another CA, a host nobody listens on', async () => {
    await assert.rejects(getFromPeer(`${base}/api/v1/images/nosuch/files`, peer, { host: 'h1' }), (e: unknown) => isHfError(e, 'HF_ERR_IMAGE_NOT_FOUND'));
    await assert.rejects(getFromPeer(`${base}/api/v1/images/golden/files`, stranger, { host: 'h1' }), (e: unknown) => isHfError(e, 'HF_ERR_UNAUTHORIZED') && /not signed by this cluster's CA/.test(e.message));
    const srv = createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
    const port = (srv.address() as AddressInfo).port;
    await new Promise<void>((r) => srv.close(() => r()));
    await assert.rejects(getFromPeer(`https://127.0.0.1:${port}/api/v1/images/golden/files`, peer, { host: 'h9' }), (e: unknown) => isHfError(e, 'HF_ERR_HOST_OFFLINE') && /host h9 is offline/.test(e.message));
  });

  it('refuses the admin token on the cluster listener: HF_ERR_FORBIDDEN', async () => {
    const answer = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = https.get(`${base}/api/v1/images/golden/files`, { ca: peer.ca, headers: { authorization: `Bearer ${TEST_TOKEN}` } }, (res) => {
        let body = '';
        res.on('data', (c: Buffer) => (body += c.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on('error', reject);
    });
    assert.equal(answer.status, 403);
    assert.equal((JSON.parse(answer.body) as { error: { code: string } }).error.code, 'HF_ERR_FORBIDDEN');
  });
});
