import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ALL_CAPABILITIES, checkAllowed, decideOnExit, restartBackoffMs, type Action } from '../../src/core/lifecycle.js';
import type { InstanceState } from '../../src/core/model/instance.js';
import { checkCanCommit, checkFitsHost } from '../../src/core/resources.js';
import { formatBytes, parseMiB, parseSize } from '../../src/core/units.js';
import { parseInput } from '../../src/core/validate.js';
import { createInstanceSchema, updateInstanceSchema } from '../../src/core/model/instance.js';
import { HfError } from '../../src/core/errors.js';
import { parseProcStat } from '../../src/util/proc.js';
import { UndoStack } from '../../src/util/undo.js';

const isCode = (code: string) => (e: unknown) => e instanceof HfError && e.code === code;

describe('sizes', () => {
  it('parses binary units and bare numbers', () => {
    assert.equal(parseSize('1K'), 1024);
    assert.equal(parseSize('256M'), 256 * 1024 ** 2);
    assert.equal(parseSize('1.5GiB'), 1.5 * 1024 ** 3);
    assert.equal(parseSize('2 gb'), 2 * 1024 ** 3);
    assert.equal(parseMiB('512'), 512);
    assert.equal(parseMiB('1G'), 1024);
    assert.equal(parseMiB(64), 64);
    assert.equal(formatBytes(256 * 1024 ** 2), '256MiB');
  });
  it('refuses nonsense with HF_ERR_INVALID_SIZE', () => {
    for (const bad of ['lots', '12X', '-1G', '', '1e9']) assert.throws(() => parseMiB(bad), isCode('HF_ERR_INVALID_SIZE'), bad);
    assert.throws(() => parseMiB('1000K'), isCode('HF_ERR_INVALID_SIZE'));
    assert.throws(() => parseMiB(1.5), isCode('HF_ERR_INVALID_SIZE'));
  });
});

describe('instance schemas', () => {
  it('fills defaults for a minimal create', () => {
    const v = parseInput(createInstanceSchema, { name: 'web1', image: 'tiny' });
    assert.equal(v.type, 'vm');
    assert.equal(v.vcpus, 1);
    assert.equal(v.memory, 256);
    assert.equal(v.accel, 'auto');
    assert.equal(v.devices, 'virtio');
    assert.equal(v.restartPolicy, 'never');
    assert.equal(v.autostart, false);
  });
  it('names the field and picks a stable code', () => {
    assert.throws(() => parseInput(createInstanceSchema, { name: 'Bad_Name', image: 'tiny' }), (e: unknown) => isCode('HF_ERR_INVALID_NAME')(e) && /name/.test((e as Error).message));
    assert.throws(() => parseInput(createInstanceSchema, { name: 'a', image: 'tiny', memory: 'lots' }), isCode('HF_ERR_INVALID_SIZE'));
    assert.throws(() => parseInput(createInstanceSchema, { name: 'a', image: 'tiny', vcpus: 0 }), (e: unknown) => isCode('HF_ERR_VALIDATION')(e) && /vcpus must be at least 1/.test((e as Error).message));
    assert.throws(() => parseInput(createInstanceSchema, { name: 'a', image: 'tiny', memory: '8M' }), /at least 16 MiB/);
    assert.throws(() => parseInput(createInstanceSchema, { name: 'a', image: 'tiny', vcpus: 2, maxVcpus: 1 }), /maxVcpus/);
    assert.throws(() => parseInput(createInstanceSchema, { name: 'a' }), /image or a boot source/);
    assert.throws(() => parseInput(createInstanceSchema, { name: 'a', image: 'tiny', extra: 1 }), isCode('HF_ERR_VALIDATION'));
  });
  it('an update is all optional, but strict', () => {
    assert.deepEqual(parseInput(updateInstanceSchema, {}), {});
    assert.deepEqual(parseInput(updateInstanceSchema, { memory: '1G' }), { memory: 1024 });
    assert.throws(() => parseInput(updateInstanceSchema, { name: 'x' }), isCode('HF_ERR_VALIDATION'));
  });
});

/** The table's answer for an action no capability gates: the states it moves through. */
function checkAction(name: string, state: InstanceState, action: Action): { during?: InstanceState; to?: InstanceState } {
  const r = checkAllowed({ name, type: 'vm', state }, action, ALL_CAPABILITIES);
  return { during: r.during, to: r.to };
}

describe('lifecycle state machine', () => {
  it('allows what makes sense', () => {
    assert.deepEqual(checkAction('a', 'stopped', 'start'), { during: 'starting', to: 'running' });
    assert.deepEqual(checkAction('a', 'crashed', 'start'), { during: 'starting', to: 'running' });
    assert.equal(checkAction('a', 'running', 'pause').to, 'paused');
    assert.equal(checkAction('a', 'paused', 'resume').to, 'running');
    assert.equal(checkAction('a', 'paused', 'stop').to, 'stopped');
    checkAction('a', 'stopped', 'delete');
  });
  it('refuses the rest with named errors', () => {
    assert.throws(() => checkAction('a', 'running', 'start'), isCode('HF_ERR_INSTANCE_RUNNING'));
    assert.throws(() => checkAction('a', 'running', 'delete'), (e: unknown) => isCode('HF_ERR_INSTANCE_RUNNING')(e) && /--force/.test((e as Error).message));
    assert.throws(() => checkAction('a', 'stopped', 'stop'), isCode('HF_ERR_INSTANCE_NOT_RUNNING'));
    assert.throws(() => checkAction('a', 'stopped', 'pause'), isCode('HF_ERR_INSTANCE_NOT_RUNNING'));
    assert.throws(() => checkAction('a', 'running', 'resume'), isCode('HF_ERR_INVALID_STATE'));
    assert.throws(() => checkAction('a', 'paused', 'pause'), isCode('HF_ERR_INVALID_STATE'));
  });
  it('decides what an exit means and whether the policy restarts', () => {
    assert.deepEqual(decideOnExit({ clean: false, requestedStop: false, policy: 'on-failure', restartCount: 0 }), { state: 'crashed', restart: true });
    assert.deepEqual(decideOnExit({ clean: true, requestedStop: false, policy: 'on-failure', restartCount: 0 }), { state: 'stopped', restart: false });
    assert.deepEqual(decideOnExit({ clean: true, requestedStop: false, policy: 'always', restartCount: 0 }), { state: 'stopped', restart: true });
    assert.deepEqual(decideOnExit({ clean: true, requestedStop: true, policy: 'always', restartCount: 0 }), { state: 'stopped', restart: false });
    assert.deepEqual(decideOnExit({ clean: false, requestedStop: false, policy: 'never', restartCount: 0 }), { state: 'crashed', restart: false });
    assert.deepEqual(decideOnExit({ clean: false, requestedStop: false, policy: 'always', restartCount: 10 }), { state: 'crashed', restart: false });
    assert.equal(restartBackoffMs(0), 500);
    assert.equal(restartBackoffMs(3), 4000);
    assert.equal(restartBackoffMs(20), 30_000);
  });
});

describe('resource admission', () => {
  const host = { cpus: 2, memoryMiB: 4096 };
  it('refuses a guest larger than the host', () => {
    assert.throws(() => checkFitsHost({ name: 'a', vcpus: 3, memoryMiB: 128 }, host), isCode('HF_ERR_INSUFFICIENT_RESOURCES'));
    assert.throws(() => checkFitsHost({ name: 'a', vcpus: 1, memoryMiB: 8192 }, host), /more than the host's 4GiB/);
    checkFitsHost({ name: 'a', vcpus: 2, memoryMiB: 4096 }, host);
  });
  it('applies the overcommit ratios to what is already committed', () => {
    const policy = { cpu: 2, memory: 1 };
    checkCanCommit({ name: 'a', vcpus: 2, memoryMiB: 1024 }, { vcpus: 2, memoryMiB: 3072 }, host, policy);
    assert.throws(() => checkCanCommit({ name: 'a', vcpus: 1, memoryMiB: 1025 }, { vcpus: 0, memoryMiB: 3072 }, host, policy), /memory/);
    assert.throws(() => checkCanCommit({ name: 'a', vcpus: 1, memoryMiB: 1 }, { vcpus: 4, memoryMiB: 0 }, host, policy), /vCPUs/);
    checkCanCommit({ name: 'a', vcpus: 1, memoryMiB: 2048 }, { vcpus: 0, memoryMiB: 6144 }, host, { cpu: 1, memory: 2 });
  });
});

describe('/proc parsing', () => {
  it('handles spaces and parentheses in comm', () => {
    const raw = '1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000000 500 18446744073709551615';
    const st = parseProcStat(raw)!;
    assert.equal(st.pid, 1234);
    assert.equal(st.comm, 'qemu (x) y');
    assert.equal(st.state, 'S');
    assert.equal(st.ppid, 1);
    assert.equal(st.startTime, 987654);
  });
});

describe('undo stack', () => {
  it('unwinds newest first on failure and keeps going past a failing step', async () => {
    const done: string[] = [];
    await assert.rejects(
      UndoStack.run(async (u) => {
        u.add('a', () => void done.push('a'));
        u.add('b', () => {
          throw new Error('b fails');
        });
        u.add('c', async () => void done.push('c'));
        throw new Error('boom');
      }),
      /boom/,
    );
    assert.deepEqual(done, ['c', 'a']);
  });
  it('forgets the steps on success', async () => {
    const done: string[] = [];
    const r = await UndoStack.run(async (u) => {
      u.add('a', () => void done.push('a'));
      return 7;
    });
    assert.equal(r, 7);
    assert.deepEqual(done, []);
  });
});
