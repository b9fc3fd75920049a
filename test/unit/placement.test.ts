// Placement: the pure scheduler (core/placement.ts), the request fields, the single-host directory,
// the create route over a fake driver, and the CLI's flags and `info` line.
import { after, before, beforeEach, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import { HfError } from '../../src/core/errors.js';
import { createInstanceSchema, instanceSchema, type Instance } from '../../src/core/model/instance.js';
import { place, type PlacementDecision, type PlacementHost, type PlacementRequest } from '../../src/core/placement.js';
import { commitLimits, commitProblem, fitsHostProblem } from '../../src/core/resources.js';
import { parseInput } from '../../src/core/validate.js';
import type { ApiClient } from '../../src/cli/client.js';
import { placementLine, registerInstanceCommands } from '../../src/cli/commands/instances.js';
import type { CliContext } from '../../src/cli/context.js';
import { PlacementService, singleHostDirectory } from '../../src/services/placement.js';
import { SqliteStateStore } from '../../src/state/sqlite-store.js';
import { FakeDriver } from '../helpers/fake-driver.js';
import { buildWorld, type TestWorld } from '../helpers/world.js';

const code = (c: string, message?: RegExp) => (e: unknown) => {
  assert.ok(e instanceof HfError, `not an HfError: ${String(e)}`);
  assert.equal(e.code, c, e.message);
  if (message) assert.match(e.message, message);
  return true;
};

/** A host with 8 CPUs, 8 GiB, no overcommit, nothing committed: override what a case needs. */
function host(name: string, o: Partial<PlacementHost> = {}): PlacementHost {
  return { name, state: 'online', cpus: 8, memoryMiB: 8192, overcommit: { cpu: 1, memory: 1 }, committed: { vcpus: 0, memoryMiB: 0 }, groups: {}, ...o };
}

function req(o: Partial<PlacementRequest> = {}): PlacementRequest {
  return { name: 'web1', type: 'vm', vcpus: 1, memoryMiB: 1024, ...o };
}

const verdicts = (d: PlacementDecision) => d.considered.map((c) => `${c.host}:${c.verdict}`);
const errorOf = (fn: () => unknown): HfError => {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof HfError);
    return e;
  }
  assert.fail('no error thrown');
};

describe('resource helpers shared with admission', () => {
  it('limits are capacity × overcommit, rounded down', () => {
    assert.deepEqual(commitLimits({ cpus: 3, memoryMiB: 1000 }, { cpu: 1.5, memory: 0.5 }), { vcpus: 4, memoryMiB: 500 });
  });
  it('a problem names the resource and its numbers; none when it fits', () => {
    const h = { cpus: 2, memoryMiB: 2048 };
    assert.equal(fitsHostProblem({ name: 'a', vcpus: 2, memoryMiB: 2048 }, h), undefined);
    assert.equal(fitsHostProblem({ name: 'a', vcpus: 3, memoryMiB: 1 }, h)?.resource, 'vcpus');
    assert.equal(fitsHostProblem({ name: 'a', vcpus: 1, memoryMiB: 4096 }, h)?.resource, 'memory');
    assert.equal(commitProblem({ name: 'a', vcpus: 1, memoryMiB: 1024 }, { vcpus: 1, memoryMiB: 1024 }, h, { cpu: 1, memory: 1 }), undefined);
    const p = commitProblem({ name: 'a', vcpus: 1, memoryMiB: 1025 }, { vcpus: 0, memoryMiB: 1024 }, h, { cpu: 1, memory: 1 });
    assert.equal(p?.resource, 'memory');
    assert.match(p?.message ?? '', /^would commit 2\.0GiB of memory, above the limit of 2GiB \(2GiB × overcommit 1\)$/);
    assert.deepEqual(p?.details, { resource: 'memory', committed: 1024, requested: 1025, limit: 2048 });
  });
});

describe('place: choosing among hosts that fit', () => {
  it('picks the least allocated host and lists the others that fit after it', () => {
    const d = place(req(), [
      host('a', { committed: { vcpus: 4, memoryMiB: 4096 } }),
      host('b', { committed: { vcpus: 1, memoryMiB: 1024 } }),
      host('c', { committed: { vcpus: 2, memoryMiB: 2048 } }),
    ]);
    assert.equal(d.host, 'b');
    assert.deepEqual(verdicts(d), ['b:chosen', 'c:fits', 'a:fits']);
    assert.match(d.reason, /^least allocated of 3 hosts that fit \(cpu 25%, memory 25% of its limits after placing\)$/);
  });

  it('allocation is the larger of the cpu and memory ratios', () => {
    // a: cpu 7/8, memory 1/8 → 0.875; b: cpu 4/8, memory 4/8 → 0.5.
    const d = place(req(), [host('a', { committed: { vcpus: 6, memoryMiB: 0 } }), host('b', { committed: { vcpus: 3, memoryMiB: 3072 } })]);
    assert.equal(d.host, 'b');
  });

  it('ratios are to the overcommit limits, not the bare capacity', () => {
    // a: 4 committed of 8 CPUs × 4 = 32 → 5/32; b: nothing committed but no overcommit → 1/8 cpu, but memory 1024/2048.
    const d = place(req(), [host('a', { committed: { vcpus: 4, memoryMiB: 0 }, overcommit: { cpu: 4, memory: 1 } }), host('b', { memoryMiB: 2048 })]);
    assert.equal(d.host, 'a');
  });

  it('ties go to the first name, whatever the order the hosts come in', () => {
    const hosts = [host('m'), host('c'), host('x'), host('b')];
    assert.equal(place(req(), hosts).host, 'b');
    assert.equal(place(req(), [...hosts].reverse()).host, 'b');
    assert.deepEqual(verdicts(place(req(), hosts)), ['b:chosen', 'c:fits', 'm:fits', 'x:fits']);
  });

  it('ratios equal up to rounding are a tie (sums of fractions)', () => {
    // A container's fractional vCPUs: on a, 0.1 + 0.2 = 0.30000000000000004; on b, (0.3 - 0.2) + 0.2 = 0.3.
    assert.ok(0.1 + 0.2 > 0.3 - 0.2 + 0.2);
    const d = place(req({ type: 'container', vcpus: 0.2, memoryMiB: 16 }), [
      host('b', { cpus: 1, committed: { vcpus: 0.3 - 0.2, memoryMiB: 0 } }),
      host('a', { cpus: 1, committed: { vcpus: 0.1, memoryMiB: 0 } }),
      host('c', { cpus: 1, committed: { vcpus: 0.2, memoryMiB: 0 } }),
    ]);
    assert.equal(d.host, 'a');
  });

  it('one host that fits is "the only host that fits"', () => {
    const d = place(req(), [host('solo')]);
    assert.equal(d.host, 'solo');
    assert.match(d.reason, /^the only host that fits/);
    assert.deepEqual(verdicts(d), ['solo:chosen']);
  });

  it('offline and maintenance hosts are skipped, and say so, even when emptier', () => {
    const d = place(req(), [host('a', { state: 'offline' }), host('b', { state: 'maintenance' }), host('c', { committed: { vcpus: 7, memoryMiB: 0 } })]);
    assert.equal(d.host, 'c');
    assert.deepEqual(d.considered, [
      { host: 'c', verdict: 'chosen', why: d.considered[0]!.why },
      { host: 'a', verdict: 'skipped', why: 'offline' },
      { host: 'b', verdict: 'skipped', why: 'in maintenance' },
    ]);
  });

  it('hosts that cannot run the type are skipped', () => {
    const d = place(req({ type: 'container' }), [host('a', { supports: ['vm'] }), host('b', { supports: ['vm', 'container'], committed: { vcpus: 4, memoryMiB: 0 } })]);
    assert.equal(d.host, 'b');
    assert.equal(d.considered.find((c) => c.host === 'a')?.why, 'cannot run containers');
  });

  it('a host too small for the instance alone, or over its overcommit, is skipped with the reason', () => {
    const d = place(req({ vcpus: 4, memoryMiB: 4096 }), [
      host('small', { cpus: 2 }),
      host('full', { committed: { vcpus: 2, memoryMiB: 6144 } }),
      host('busy', { committed: { vcpus: 4, memoryMiB: 4096 } }),
    ]);
    assert.equal(d.host, 'busy');
    const why = Object.fromEntries(d.considered.map((c) => [c.host, c.why]));
    assert.match(why.small!, /4 vCPUs is more than the host's 2 CPUs/);
    assert.match(why.full!, /would commit 10GiB of memory, above the limit of 8GiB/);
  });

  it('overcommit lets a host take more than its capacity', () => {
    const hosts = [host('a', { committed: { vcpus: 8, memoryMiB: 0 }, overcommit: { cpu: 2, memory: 1 } })];
    assert.equal(place(req(), hosts).host, 'a');
    assert.throws(() => place(req(), [{ ...hosts[0]!, overcommit: { cpu: 1, memory: 1 } }]), code('HF_ERR_INSUFFICIENT_RESOURCES'));
  });

  it('nothing fits: HF_ERR_INSUFFICIENT_RESOURCES naming every host in the message and details.considered', () => {
    const e = errorOf(() => place(req({ memoryMiB: 6000 }), [host('a', { state: 'offline' }), host('b', { memoryMiB: 4096 }), host('c', { committed: { vcpus: 0, memoryMiB: 4096 } })]));
    assert.equal(e.code, 'HF_ERR_INSUFFICIENT_RESOURCES');
    assert.match(e.message, /web1: no host can take it: a: offline; b: memory 5\.9GiB is more than the host's 4GiB; c: would commit/);
    const considered = e.details?.considered as PlacementDecision['considered'];
    assert.deepEqual(considered.map((c) => `${c.host}:${c.verdict}`), ['a:skipped', 'b:skipped', 'c:skipped']);
  });

  it('no hosts at all: HF_ERR_INSUFFICIENT_RESOURCES', () => {
    assert.throws(() => place(req(), []), code('HF_ERR_INSUFFICIENT_RESOURCES', /no host to place it on/));
  });
});

describe('place: a create that does not start', () => {
  it('may go to a host that cannot commit it now, but only when no host can', () => {
    const full = host('full', { committed: { vcpus: 8, memoryMiB: 8192 } });
    assert.throws(() => place(req(), [full]), code('HF_ERR_INSUFFICIENT_RESOURCES', /would commit 9 vCPUs/));
    const d = place(req({ createStopped: true }), [full]);
    assert.equal(d.host, 'full');
    assert.match(d.reason, /no host can commit it now; created stopped/);
    assert.match(d.considered[0]!.why, /cannot commit it now \(would commit 9 vCPUs/);
    // A host that can commit it wins, even far more allocated than a full, emptier-looking one.
    const d2 = place(req({ createStopped: true }), [host('a', { committed: { vcpus: 7, memoryMiB: 7168 } }), full]);
    assert.equal(d2.host, 'a');
    assert.deepEqual(verdicts(d2), ['a:chosen', 'full:fits']);
  });
  it('a host that can commit it comes before one with fewer of the group', () => {
    const d = place(req({ createStopped: true, group: 'web' }), [host('full', { committed: { vcpus: 8, memoryMiB: 0 } }), host('has-web', { groups: { web: 2 } })]);
    assert.equal(d.host, 'has-web');
  });
  it('still never a host too small for it alone', () => {
    assert.throws(() => place(req({ createStopped: true, vcpus: 16 }), [host('a')]), code('HF_ERR_INSUFFICIENT_RESOURCES', /16 vCPUs is more than the host's 8 CPUs/));
  });
});

describe('place: placement groups', () => {
  it('without spread, fewer of the group comes before less allocated', () => {
    const d = place(req({ group: 'web' }), [host('a', { groups: { web: 2 } }), host('b', { groups: { web: 1, db: 3 }, committed: { vcpus: 6, memoryMiB: 0 } })]);
    assert.equal(d.host, 'b');
    assert.match(d.reason, /^fewest instances of group "web" \(1\), then least allocated of 2 hosts/);
    assert.match(d.considered[1]!.why, /2 of group "web" there/);
  });

  it('without spread, a host that holds the group is still used when it is the only one', () => {
    const d = place(req({ group: 'web' }), [host('a', { groups: { web: 3 } })]);
    assert.equal(d.host, 'a');
    assert.match(d.reason, /3 other instances of group "web" there/);
  });

  it('equal counts of the group fall back to the least allocated, then the name', () => {
    const hosts = [host('c', { groups: { web: 1 } }), host('b', { groups: { web: 1 }, committed: { vcpus: 1, memoryMiB: 0 } }), host('a', { groups: { web: 1 } })];
    assert.equal(place(req({ group: 'web' }), hosts).host, 'a');
  });

  it('other groups do not count', () => {
    assert.equal(place(req({ group: 'web' }), [host('a', { groups: { db: 5 } }), host('b', { groups: { web: 1 } })]).host, 'a');
  });

  it('with spread, never a host that holds an instance of the group, however empty', () => {
    const d = place(req({ group: 'web', spread: true }), [host('a', { groups: { web: 1 } }), host('b', { committed: { vcpus: 7, memoryMiB: 0 } })]);
    assert.equal(d.host, 'b');
    assert.match(d.reason, /^no other instance of group "web" there \(spread\); the only host that fits/);
    assert.deepEqual(d.considered[1], { host: 'a', verdict: 'skipped', why: 'already holds 1 instance of group "web" (spread)' });
  });

  it('spread exhausted: an error naming the group and the hosts that hold it', () => {
    const hosts = [host('a', { groups: { web: 1 } }), host('b', { groups: { web: 2 } }), host('c', { state: 'offline' }), host('d', { cpus: 1, memoryMiB: 512 })];
    const e = errorOf(() => place(req({ group: 'web', spread: true }), hosts));
    assert.equal(e.code, 'HF_ERR_INSUFFICIENT_RESOURCES');
    assert.match(e.message, /every host that could take it already holds an instance of group "web" \(spread asks for one per host\): a, b$/);
    assert.equal(e.details?.group, 'web');
    assert.equal((e.details?.considered as unknown[]).length, 4);
  });

  it('spread without a group is a validation error', () => {
    assert.throws(() => place(req({ spread: true }), [host('a')]), code('HF_ERR_VALIDATION', /spread needs a placement group/));
  });
});

describe('place: target', () => {
  const hosts = [host('a'), host('b', { committed: { vcpus: 6, memoryMiB: 6144 }, groups: { web: 4 } }), host('c', { state: 'offline' }), host('d', { state: 'maintenance' }), host('e', { cpus: 2, memoryMiB: 8192 })];

  it('picks exactly that host, over every preference', () => {
    const d = place(req({ target: 'b', group: 'web' }), hosts);
    assert.equal(d.host, 'b');
    assert.match(d.reason, /^target host as asked \(group "web"\): cpu 88%, memory 88%.*4 of group "web" there/);
    assert.deepEqual(verdicts(d), ['b:chosen', 'a:skipped', 'c:skipped', 'd:skipped', 'e:skipped']);
    assert.equal(d.considered[1]!.why, 'not the target');
  });

  it('an unknown host: HF_ERR_HOST_NOT_FOUND listing the hosts', () => {
    const e = errorOf(() => place(req({ target: 'zz' }), hosts));
    assert.equal(e.code, 'HF_ERR_HOST_NOT_FOUND');
    assert.match(e.message, /no host named "zz" \(hosts: a, b, c, d, e\)/);
  });

  it('an offline or maintenance host: HF_ERR_HOST_OFFLINE', () => {
    assert.throws(() => place(req({ target: 'c' }), hosts), code('HF_ERR_HOST_OFFLINE', /target host "c" is offline/));
    assert.throws(() => place(req({ target: 'd' }), hosts), code('HF_ERR_HOST_OFFLINE', /target host "d" is in maintenance/));
  });

  it('a host it does not fit: HF_ERR_INSUFFICIENT_RESOURCES naming why', () => {
    assert.throws(() => place(req({ target: 'e', vcpus: 4 }), hosts), code('HF_ERR_INSUFFICIENT_RESOURCES', /target host "e" cannot take it: 4 vCPUs is more than the host's 2 CPUs/));
    const e = errorOf(() => place(req({ target: 'b', vcpus: 4 }), hosts));
    assert.equal(e.code, 'HF_ERR_INSUFFICIENT_RESOURCES');
    assert.match(e.message, /would commit 10 vCPUs, above the limit of 8/);
    assert.equal(e.details?.target, 'b');
    assert.equal(e.details?.resource, 'vcpus');
  });

  it('a created-stopped instance may target a host that cannot commit it now', () => {
    assert.equal(place(req({ target: 'b', vcpus: 4, createStopped: true }), hosts).host, 'b');
  });

  it('a host that cannot run the type: HF_ERR_UNSUPPORTED', () => {
    assert.throws(() => place(req({ target: 'a', type: 'container' }), [host('a', { supports: ['vm'] })]), code('HF_ERR_UNSUPPORTED', /cannot run containers/));
  });

  it('spread onto a host that holds the group: HF_ERR_CONFLICT naming the group', () => {
    assert.throws(() => place(req({ target: 'b', group: 'web', spread: true }), hosts), code('HF_ERR_CONFLICT', /already holds 4 instances of group "web" \(spread\)/));
  });
});

describe('place: an instance kept in a shared storage pool', () => {
  const hosts = [host('a'), host('b', { committed: { vcpus: 4, memoryMiB: 4096 } }), host('c', { state: 'offline' })];
  const pooled = (o: Partial<PlacementRequest> = {}) => req({ storage: 'nfs1', storageHosts: ['b', 'c'], ...o });

  it('goes only to a host that reaches the pool, even when another is emptier', () => {
    const d = place(pooled(), hosts);
    assert.equal(d.host, 'b');
    assert.deepEqual(verdicts(d), ['b:chosen', 'a:skipped', 'c:skipped']);
    assert.equal(d.considered.find((c) => c.host === 'a')?.why, 'cannot use storage pool nfs1 (unavailable there)');
    assert.equal(place(req({ storage: 'nfs1' }), hosts).host, 'a', 'hosts not known: every host');
  });

  it('a target that does not reach it, or no online host that does: HF_ERR_POOL_UNAVAILABLE', () => {
    assert.throws(() => place(pooled({ target: 'a' }), hosts), code('HF_ERR_POOL_UNAVAILABLE', /target host "a" cannot take it: cannot use storage pool nfs1/));
    const e = errorOf(() => place(pooled({ storageHosts: ['c'] }), hosts));
    assert.equal(e.code, 'HF_ERR_POOL_UNAVAILABLE');
    assert.match(e.message, /no online host can use storage pool nfs1: a: cannot use storage pool nfs1.*c: offline/);
    // A host that reaches the pool but is too small is a resources problem, not a storage one.
    assert.throws(() => place(pooled({ vcpus: 6 }), hosts), code('HF_ERR_INSUFFICIENT_RESOURCES'));
  });

  it('the service asks which hosts reach the pool', async () => {
    const asked: string[] = [];
    const svc = new PlacementService({ hosts: async () => hosts, poolHosts: async (p) => (asked.push(p), p === 'nfs1' ? ['b'] : undefined) });
    assert.equal((await svc.choose(req({ storage: 'nfs1' }))).host, 'b');
    assert.equal((await svc.choose(req({ storage: 'fast' }))).host, 'a');
    assert.equal((await svc.choose(req())).host, 'a');
    assert.deepEqual(asked, ['nfs1', 'fast']);
  });
});

describe('create request fields', () => {
  const base = { name: 'a', image: 'tiny' };
  it('takes target, group and spread', () => {
    const v = parseInput(createInstanceSchema, { ...base, target: 'Host-1.example', group: 'web', spread: true });
    assert.equal(v.target, 'Host-1.example');
    assert.equal(v.group, 'web');
    assert.equal(v.spread, true);
    const plain = parseInput(createInstanceSchema, base);
    assert.equal(plain.target, undefined);
    assert.equal(plain.spread, undefined);
  });
  it('spread needs a group; spread false does not', () => {
    assert.throws(() => parseInput(createInstanceSchema, { ...base, spread: true }), code('HF_ERR_VALIDATION', /spread: spread needs a group/));
    assert.equal(parseInput(createInstanceSchema, { ...base, spread: false }).spread, false);
  });
  it('a group follows the name rule; a target is not empty', () => {
    assert.throws(() => parseInput(createInstanceSchema, { ...base, group: 'Web_1' }), code('HF_ERR_VALIDATION', /group: invalid name/));
    assert.throws(() => parseInput(createInstanceSchema, { ...base, target: '' }), code('HF_ERR_VALIDATION', /target/));
  });
  it('records without placement still parse; records with it keep it', () => {
    const rec = {
      id: 'x', name: 'a', type: 'vm', host: 'h1', config: { vcpus: 1, memoryMiB: 64, disks: [], nics: [], boot: { kind: 'disk' }, accel: 'auto', devices: 'virtio', restartPolicy: 'never', autostart: false },
      state: 'stopped', desired: 'stopped', createdAt: 'now', updatedAt: 'now',
    };
    assert.equal(instanceSchema.parse(rec).placement, undefined);
    assert.deepEqual(instanceSchema.parse({ ...rec, placement: { group: 'g', spread: true, reason: 'why' } }).placement, { group: 'g', spread: true, reason: 'why' });
  });
});

describe('the single-host directory', () => {
  const inst = (name: string, o: { host?: string; state?: Instance['state']; vcpus?: number; memoryMiB?: number; group?: string }): Instance =>
    ({
      name, host: o.host ?? 'h1', state: o.state ?? 'stopped', config: { vcpus: o.vcpus ?? 1, memoryMiB: o.memoryMiB ?? 256 },
      ...(o.group ? { placement: { group: o.group } } : {}),
    }) as unknown as Instance;

  it('commits the active instances of this host and counts every one of its groups', async () => {
    const list = [
      inst('a', { state: 'running', vcpus: 2, memoryMiB: 1024, group: 'web' }),
      inst('b', { state: 'paused', vcpus: 1, memoryMiB: 512, group: 'web' }),
      inst('c', { state: 'stopped', vcpus: 4, memoryMiB: 4096, group: 'db' }),
      inst('d', { state: 'running', host: 'other', vcpus: 8, memoryMiB: 8192, group: 'web' }),
    ];
    const dir = singleHostDirectory({ hostName: 'h1', capacity: () => ({ cpus: 4, memoryMiB: 4096 }), overcommit: { cpu: 2, memory: 1 }, instances: async () => list });
    assert.deepEqual(await dir(), [
      { name: 'h1', state: 'online', cpus: 4, memoryMiB: 4096, overcommit: { cpu: 2, memory: 1 }, committed: { vcpus: 3, memoryMiB: 1536 }, groups: { web: 2, db: 1 } },
    ]);
  });
});

describe('create over the API with placement (fake driver)', () => {
  let dir: string;
  let kernel: string;
  let w: TestWorld;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'hf-place-'));
    kernel = join(dir, 'vmlinuz');
    await writeFile(kernel, 'not really a kernel');
  });
  after(async () => {
    await w?.svc.close();
    await rm(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    await w?.svc.close();
    w = await buildWorld(await mkdtemp(join(dir, 'w-')), { store: SqliteStateStore.open(':memory:'), drivers: [['vm', new FakeDriver()]], capacity: { cpus: 4, memoryMiB: 4096 } });
  });
  const body = (name: string, extra: Record<string, unknown> = {}) => ({ name, boot: { kind: 'kernel', kernel }, ...extra });
  const err = (r: { json: Record<string, unknown> }) => r.json.error as { code: string; message: string };

  it('stores the group, spread and reason; answers the decision', async () => {
    const r = await w.call('POST', '/api/v1/instances', body('p1', { group: 'web', spread: true }));
    assert.equal(r.status, 201);
    const inst = r.json.instance as Instance;
    assert.equal(inst.host, 'h1');
    assert.equal((r.json.placement as PlacementDecision).host, 'h1');
    assert.deepEqual(inst.placement, { group: 'web', spread: true, reason: (r.json.placement as PlacementDecision).reason });
    assert.match(inst.placement?.reason ?? '', /no other instance of group "web" there \(spread\); the only host that fits/);
    assert.deepEqual((await w.svc.get('p1')).placement, inst.placement);
  });

  it('a second instance of a spread group on the one host is refused, naming the group', async () => {
    assert.equal((await w.call('POST', '/api/v1/instances', body('p1', { group: 'web', spread: true }))).status, 201);
    const r = await w.call('POST', '/api/v1/instances', body('p2', { group: 'web', spread: true }));
    assert.equal(r.status, 422);
    assert.equal(err(r).code, 'HF_ERR_INSUFFICIENT_RESOURCES');
    assert.match(err(r).message, /group "web"/);
    assert.equal((await w.call('GET', '/api/v1/instances/p2')).status, 404);
    // Without spread the group only prefers other hosts: there is none, so here it is.
    const ok = await w.call('POST', '/api/v1/instances', body('p3', { group: 'web' }));
    assert.equal(ok.status, 201);
    assert.match((ok.json.instance as Instance).placement?.reason ?? '', /1 other instance of group "web" there/);
  });

  it('--target this host works; another host is HF_ERR_HOST_NOT_FOUND', async () => {
    const ok = await w.call('POST', '/api/v1/instances', body('t1', { target: 'h1' }));
    assert.equal(ok.status, 201);
    assert.match((ok.json.instance as Instance).placement?.reason ?? '', /^target host as asked/);
    const r = await w.call('POST', '/api/v1/instances', body('t2', { target: 'h2' }));
    assert.equal(r.status, 404);
    assert.equal(err(r).code, 'HF_ERR_HOST_NOT_FOUND');
    assert.match(err(r).message, /no host named "h2"/);
    // The service alone (a copy, an import) refuses another host too.
    await assert.rejects(w.svc.create(body('t3', { target: 'h2' })), code('HF_ERR_HOST_NOT_FOUND', /this host is "h1"/));
  });

  it('spread without group: 400 before anything is made', async () => {
    const r = await w.call('POST', '/api/v1/instances', body('v1', { spread: true }));
    assert.equal(r.status, 400);
    assert.equal(err(r).code, 'HF_ERR_VALIDATION');
    assert.match(err(r).message, /spread needs a group/);
  });

  it('a create without start still goes onto a full host (its start is refused); a launch is refused at once', async () => {
    const first = await w.call('POST', '/api/v1/instances', body('big', { memory: '3G', start: true }));
    assert.equal((await w.finish(first)).status, 'success');
    const created = await w.call('POST', '/api/v1/instances', body('later', { memory: '2G' }));
    assert.equal(created.status, 201);
    assert.match((created.json.instance as Instance).placement?.reason ?? '', /created stopped/);
    const launched = await w.call('POST', '/api/v1/instances', body('now', { memory: '2G', start: true }));
    assert.equal(launched.status, 422);
    assert.match(err(launched).message, /would commit 5GiB of memory, above the limit of 4GiB/);
    assert.equal((await w.call('GET', '/api/v1/instances/now')).status, 404);
  });

  it('a plain create keeps no placement field but the reason', async () => {
    const r = await w.call('POST', '/api/v1/instances', body('plain'));
    assert.deepEqual(Object.keys((r.json.instance as Instance).placement ?? {}), ['reason']);
    const direct = await w.svc.create(body('direct'));
    assert.equal(direct.placement, undefined);
  });
});

describe('CLI: launch flags and the info line', () => {
  function cli(answers: (method: string, url: string, body?: unknown) => unknown): { run: (...argv: string[]) => Promise<void>; calls: Array<{ method: string; url: string; body?: unknown }>; printed: string[] } {
    const calls: Array<{ method: string; url: string; body?: unknown }> = [];
    const printed: string[] = [];
    const client = {
      request: async (method: string, url: string, body?: unknown) => {
        calls.push({ method, url, body });
        return answers(method, url, body);
      },
    } as unknown as ApiClient;
    const program = new Command().exitOverride();
    const ctx: CliContext = { program, client: () => client, print: (_d, _f, human) => void printed.push(human()), follow: async (op) => op };
    registerInstanceCommands(ctx);
    return { run: (...argv) => program.parseAsync(argv, { from: 'user' }).then(() => undefined), calls, printed };
  }
  const instance = { name: 'web1', id: 'i', type: 'vm', state: 'stopped', host: 'h1', config: { vcpus: 1, memoryMiB: 256, disks: [], nics: [], boot: { kind: 'disk', firmware: 'bios' }, accel: 'auto', devices: 'virtio', restartPolicy: 'never', autostart: false }, pending: {}, restartCount: 0 };

  it('launch --target --group --spread sends the fields', async () => {
    const c = cli(() => ({ instance }));
    await c.run('launch', 'tiny', 'web1', '--target', 'h1', '--group', 'web', '--spread', '--no-wait');
    const post = c.calls.find((x) => x.method === 'POST');
    assert.deepEqual(post?.body, { name: 'web1', start: true, image: 'tiny', target: 'h1', group: 'web', spread: true });
  });

  it('launch without them sends none', async () => {
    const c = cli(() => ({ instance }));
    await c.run('create', 'tiny', 'web1');
    const sent = c.calls.find((x) => x.method === 'POST')?.body as Record<string, unknown>;
    assert.ok(!('target' in sent) && !('group' in sent) && !('spread' in sent), JSON.stringify(sent));
  });

  it('info shows the placement line when the record has one', async () => {
    const reason = 'no other instance of group "web" there (spread); the only host that fits (cpu 25%, memory 6% of its limits after placing)';
    const c = cli((_m, url) => {
      if (url.startsWith('/api/v1/addresses')) throw new Error('no networking');
      return { instance: { ...instance, placement: { group: 'web', spread: true, reason } } };
    });
    await c.run('info', 'web1');
    assert.match(c.printed[0]!, new RegExp(`^Placement: +group web \\(spread: one per host\\); ${reason.replace(/[()%]/g, '\\$&')}$`, 'm'));
    const bare = cli((_m, url) => {
      if (url.startsWith('/api/v1/addresses')) throw new Error('no networking');
      return { instance };
    });
    await bare.run('info', 'web1');
    assert.doesNotMatch(bare.printed[0]!, /Placement:/);
  });

  it('placementLine: group alone, reason alone', () => {
    assert.equal(placementLine({ group: 'db' }), 'group db');
    assert.equal(placementLine({ reason: 'the only host that fits' }), 'the only host that fits');
  });
});
