// The snapshot tree: building, rendering, deleting with re-parenting, and robustness against
// records whose parent is gone or that form a cycle.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { SnapshotRecord } from '../../src/storage/model.js';
import { ancestors, buildTree, planDelete, renderTree } from '../../src/storage/snapshot-tree.js';

let t = 0;
function snap(name: string, parent?: string, memory = false): SnapshotRecord {
  const r: SnapshotRecord = { instance: 'vm1', name, memory, takenWhile: memory ? 'running' : 'stopped', disks: ['root'], description: '', createdAt: new Date(Date.UTC(2026, 0, 1, 0, 0, t++)).toISOString() };
  if (parent !== undefined) r.parent = parent;
  return r;
}

describe('snapshot tree', () => {
  // base ─┬─ a ── a1
  //       └─ b (memory)
  const records = [snap('base'), snap('a', 'base'), snap('b', 'base', true), snap('a1', 'a')];

  it('builds the tree with children oldest first', () => {
    const roots = buildTree(records);
    assert.equal(roots.length, 1);
    assert.equal(roots[0]!.snapshot.name, 'base');
    assert.deepEqual(roots[0]!.children.map((c) => c.snapshot.name), ['a', 'b']);
    assert.deepEqual(roots[0]!.children[0]!.children.map((c) => c.snapshot.name), ['a1']);
  });

  it('renders branches and marks the current snapshot', () => {
    const lines = renderTree(buildTree(records), 'b');
    assert.equal(lines.length, 4);
    assert.match(lines[0]!, /^base \(disk, stopped/);
    assert.match(lines[1]!, /^├── a \(/);
    assert.match(lines[2]!, /^│   └── a1 \(/);
    assert.match(lines[3]!, /^└── b \(memory, running, .*<- current$/);
    assert.doesNotMatch(lines.slice(0, 3).join('\n'), /current/);
  });

  it('says when the current state descends from no snapshot', () => {
    assert.match(renderTree(buildTree(records), undefined).at(-1)!, /descends from no snapshot/);
    assert.deepEqual(renderTree([], undefined), []);
  });

  it('deleting an inner snapshot moves its children up and fixes the current one', () => {
    const plan = planDelete(records, 'a', 'a');
    assert.deepEqual(plan.reparent.map((r) => [r.name, r.parent]), [['a1', 'base']]);
    assert.equal(plan.current, 'base');
    const root = planDelete(records, 'base', 'a1');
    assert.deepEqual(root.reparent.map((r) => r.name).sort(), ['a', 'b']);
    assert.ok(root.reparent.every((r) => r.parent === undefined), 'children of a root become roots');
    assert.equal(root.current, 'a1', 'current unchanged when another snapshot is deleted');
    assert.deepEqual(planDelete(records, 'nope', 'a'), { reparent: [], current: 'a' });
  });

  it('lists ancestors and tolerates orphans and cycles', () => {
    assert.deepEqual(ancestors(records, 'a1'), ['a', 'base']);
    const odd = [snap('x', 'y'), snap('y', 'x'), snap('orphan', 'gone')];
    const roots = buildTree(odd);
    // A snapshot whose parent is gone is a root; a cycle is broken into roots instead of hanging.
    assert.deepEqual(roots.map((r) => r.snapshot.name).sort(), ['orphan', 'x', 'y']);
    assert.equal(renderTree(roots, undefined).length, 4);
    assert.deepEqual(ancestors(odd, 'x'), ['y']);
  });
});
