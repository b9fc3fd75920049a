// The lifecycle table (core/lifecycle.ts), exhaustively: every action × every state, with every
// capability and with none, against the answers written out below (reviewed by hand: change
// them only with the table). Then the two drivers' capability sets on the cases that differ.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ACTIONS, ALL_CAPABILITIES, checkAllowed, type Action, type Capability } from '../../src/core/lifecycle.js';
import { HfError } from '../../src/core/errors.js';
import { INSTANCE_STATES, type InstanceState, type InstanceType } from '../../src/core/model/instance.js';
import { QEMU_CAPABILITIES } from '../../src/drivers/qemu/capabilities.js';
import { CONTAINER_CAPABILITIES } from '../../src/drivers/container/capabilities.js';

// live = allowed, through the running instance's handle; ok = allowed, not live (a stopped
// instance, or an update kept pending); RUN / OFF / BAD / UNS = HF_ERR_INSTANCE_RUNNING,
// HF_ERR_INSTANCE_NOT_RUNNING, HF_ERR_INVALID_STATE, HF_ERR_UNSUPPORTED.
type Answer = 'ok' | 'live' | 'RUN' | 'OFF' | 'BAD' | 'UNS';

// columns: stopped starting running paused stopping crashed error
const WITH_ALL: Record<Action, string> = {
  start:             'ok   RUN  RUN  RUN  BAD  ok   ok',
  stop:              'OFF  live live live live OFF  OFF',
  kill:              'OFF  live live live live OFF  OFF',
  restart:           'OFF  BAD  live live BAD  OFF  OFF',
  pause:             'OFF  BAD  live BAD  BAD  OFF  OFF',
  resume:            'OFF  BAD  BAD  live BAD  OFF  OFF',
  delete:            'ok   RUN  RUN  RUN  RUN  ok   ok',
  update:            'ok   BAD  live live BAD  ok   ok',
  console:           'OFF  BAD  live live BAD  OFF  OFF',
  exec:              'OFF  BAD  live BAD  BAD  OFF  OFF',
  'attach-disk':     'ok   BAD  live live BAD  ok   ok',
  'detach-disk':     'ok   BAD  live live BAD  ok   ok',
  'resize-disk':     'ok   BAD  live live BAD  ok   ok',
  'attach-nic':      'ok   BAD  live live BAD  ok   ok',
  'detach-nic':      'ok   BAD  live live BAD  ok   ok',
  snapshot:          'ok   BAD  live live BAD  ok   ok',
  'snapshot-memory': 'OFF  BAD  live live BAD  OFF  OFF',
  revert:            'ok   BAD  live live BAD  ok   ok',
  'delete-snapshot': 'ok   BAD  live live BAD  ok   ok',
  copy:              'ok   BAD  live live BAD  ok   ok',
  publish:           'ok   RUN  RUN  RUN  RUN  ok   ok',
  export:            'ok   RUN  RUN  RUN  RUN  ok   ok',
  move:              'ok   BAD  live live BAD  ok   ok',
};

const WITH_NONE: Record<Action, string> = {
  start:             'ok   RUN  RUN  RUN  BAD  ok   ok',
  stop:              'OFF  live live live live OFF  OFF',
  kill:              'OFF  live live live live OFF  OFF',
  restart:           'OFF  BAD  live live BAD  OFF  OFF',
  pause:             'OFF  BAD  live BAD  BAD  OFF  OFF',
  resume:            'OFF  BAD  BAD  live BAD  OFF  OFF',
  delete:            'ok   RUN  RUN  RUN  RUN  ok   ok',
  update:            'ok   BAD  ok   ok   BAD  ok   ok',
  console:           'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  exec:              'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  'attach-disk':     'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  'detach-disk':     'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  'resize-disk':     'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  'attach-nic':      'ok   BAD  UNS  UNS  BAD  ok   ok',
  'detach-nic':      'ok   BAD  UNS  UNS  BAD  ok   ok',
  snapshot:          'UNS  BAD  UNS  UNS  BAD  UNS  UNS',
  'snapshot-memory': 'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  revert:            'UNS  BAD  RUN  RUN  BAD  UNS  UNS',
  'delete-snapshot': 'UNS  BAD  UNS  UNS  BAD  UNS  UNS',
  copy:              'ok   BAD  RUN  RUN  BAD  ok   ok',
  publish:           'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  export:            'UNS  UNS  UNS  UNS  UNS  UNS  UNS',
  move:              'ok   BAD  UNS  UNS  BAD  ok   ok',
};

const CODES: Record<string, Answer> = {
  HF_ERR_INSTANCE_RUNNING: 'RUN',
  HF_ERR_INSTANCE_NOT_RUNNING: 'OFF',
  HF_ERR_INVALID_STATE: 'BAD',
  HF_ERR_UNSUPPORTED: 'UNS',
};

function answer(type: InstanceType, state: InstanceState, action: Action, caps: ReadonlySet<Capability>): Answer {
  try {
    return checkAllowed({ name: 'i1', type, state }, action, caps).live ? 'live' : 'ok';
  } catch (e) {
    assert.ok(e instanceof HfError, `${action} while ${state} threw ${String(e)}`);
    const a = CODES[e.code];
    assert.ok(a, `${action} while ${state}: unexpected code ${e.code}`);
    assert.match(e.message, /"i1"/, 'the message names the instance');
    return a;
  }
}

function expectGrid(grid: Record<Action, string>, caps: ReadonlySet<Capability>): void {
  assert.deepEqual(Object.keys(grid).sort(), [...ACTIONS].sort(), 'one row per action');
  for (const action of ACTIONS) {
    const row = grid[action].split(/\s+/);
    assert.equal(row.length, INSTANCE_STATES.length, `${action}: one column per state`);
    INSTANCE_STATES.forEach((state, i) => assert.equal(answer('vm', state, action, caps), row[i], `${action} while ${state}`));
  }
}

describe('lifecycle table', () => {
  it('answers every action in every state with every capability', () => expectGrid(WITH_ALL, ALL_CAPABILITIES));
  it('answers every action in every state with no capability', () => expectGrid(WITH_NONE, new Set()));

  it('taking away the capability a cell relied on refuses that cell', () => {
    for (const action of ACTIONS) {
      for (const state of INSTANCE_STATES) {
        let cap: Capability | undefined;
        try {
          cap = checkAllowed({ name: 'i1', type: 'vm', state }, action, ALL_CAPABILITIES).capability;
        } catch {
          continue;
        }
        if (!cap) continue;
        const fewer = new Set([...ALL_CAPABILITIES].filter((c) => c !== cap));
        const got = answer('vm', state, action, fewer);
        // update keeps the change for the next start instead of refusing it
        if (action === 'update') assert.equal(got, 'ok', `${action} while ${state} without ${cap}`);
        else assert.notEqual(got, 'live', `${action} while ${state} without ${cap}`);
      }
    }
  });

  it('HF_ERR_UNSUPPORTED names the missing capability, and "stop it first" when that works', () => {
    assert.throws(
      () => checkAllowed({ name: 'web', type: 'vm', state: 'running' }, 'move', QEMU_CAPABILITIES),
      (e: unknown) => e instanceof HfError && e.code === 'HF_ERR_UNSUPPORTED' && e.details?.capability === 'migrate-live' && /migrate-live/.test(e.message) && /stop it first/.test(e.message),
    );
    assert.throws(
      () => checkAllowed({ name: 'c', type: 'container', state: 'stopped' }, 'attach-disk', CONTAINER_CAPABILITIES),
      (e: unknown) => e instanceof HfError && e.code === 'HF_ERR_UNSUPPORTED' && e.details?.capability === 'disks' && !/stop it first/.test(e.message),
    );
  });

  it('keeps the messages users know for start and delete', () => {
    assert.throws(() => checkAllowed({ name: 'a', type: 'vm', state: 'running' }, 'start', ALL_CAPABILITIES), /already running/);
    assert.throws(() => checkAllowed({ name: 'a', type: 'vm', state: 'paused' }, 'delete', ALL_CAPABILITIES), /--force/);
  });

  it('lifecycle actions carry the states they move through', () => {
    const r = checkAllowed({ name: 'a', type: 'vm', state: 'crashed' }, 'start', new Set());
    assert.deepEqual([r.during, r.to], ['starting', 'running']);
    const p = checkAllowed({ name: 'a', type: 'vm', state: 'running' }, 'pause', new Set());
    assert.deepEqual([p.during, p.to], [undefined, 'paused']);
  });
});

describe('driver capability sets', () => {
  const vm = (state: InstanceState, action: Action) => answer('vm', state, action, QEMU_CAPABILITIES);
  const ct = (state: InstanceState, action: Action) => answer('container', state, action, CONTAINER_CAPABILITIES);
  it('VMs: disks hot-plug, memory snapshots, revert while running; no exec, no live copy or migration yet', () => {
    assert.deepEqual(
      [vm('running', 'attach-disk'), vm('running', 'resize-disk'), vm('running', 'snapshot-memory'), vm('running', 'revert'), vm('running', 'exec'), vm('running', 'copy'), vm('running', 'move'), vm('stopped', 'move')],
      ['live', 'live', 'live', 'live', 'UNS', 'RUN', 'UNS', 'ok'],
    );
  });
  it('containers: exec, NIC hot-plug, live snapshot and copy; no disks, no memory snapshot, revert stopped only', () => {
    assert.deepEqual(
      [ct('running', 'exec'), ct('paused', 'exec'), ct('running', 'attach-nic'), ct('running', 'snapshot'), ct('running', 'copy'), ct('stopped', 'attach-disk'), ct('running', 'snapshot-memory'), ct('running', 'revert'), ct('stopped', 'revert'), ct('stopped', 'publish')],
      ['live', 'BAD', 'live', 'live', 'live', 'UNS', 'UNS', 'RUN', 'ok', 'UNS'],
    );
  });
});
