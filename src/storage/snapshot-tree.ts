// Snapshots form a tree: each one records the snapshot its instance descended from when it was
// taken (the "current" one: the last taken or reverted to). Pure functions over the records.
import type { SnapshotRecord } from './model.js';

export interface SnapshotNode {
  snapshot: SnapshotRecord;
  children: SnapshotNode[];
}

/** Roots (no parent, or a parent that no longer exists) with their children, oldest first. */
export function buildTree(records: SnapshotRecord[]): SnapshotNode[] {
  const byName = new Map<string, SnapshotNode>();
  for (const s of records) byName.set(s.name, { snapshot: s, children: [] });
  const roots: SnapshotNode[] = [];
  for (const node of byName.values()) {
    const p = node.snapshot.parent;
    const parent = p !== undefined ? byName.get(p) : undefined;
    if (parent && !createsCycle(byName, node.snapshot.name)) parent.children.push(node);
    else roots.push(node);
  }
  const sort = (nodes: SnapshotNode[]): void => {
    nodes.sort((a, b) => a.snapshot.createdAt.localeCompare(b.snapshot.createdAt) || a.snapshot.name.localeCompare(b.snapshot.name));
    for (const n of nodes) sort(n.children);
  };
  sort(roots);
  return roots;
}

function createsCycle(byName: Map<string, SnapshotNode>, start: string): boolean {
  const seen = new Set<string>();
  let cur: string | undefined = start;
  while (cur !== undefined) {
    if (seen.has(cur)) return true;
    seen.add(cur);
    cur = byName.get(cur)?.snapshot.parent;
  }
  return false;
}

/** Text rendering for `snapshot list`: one line per snapshot, box-drawing branches. */
export function renderTree(roots: SnapshotNode[], current: string | undefined): string[] {
  const lines: string[] = [];
  const walk = (nodes: SnapshotNode[], prefix: string, top: boolean): void => {
    nodes.forEach((n, i) => {
      const last = i === nodes.length - 1;
      const branch = top ? '' : last ? '└── ' : '├── ';
      const s = n.snapshot;
      const tags = [s.memory ? 'memory' : 'disk', s.takenWhile, s.createdAt];
      lines.push(`${prefix}${branch}${s.name} (${tags.join(', ')})${s.name === current ? '  <- current' : ''}`);
      walk(n.children, top ? prefix : prefix + (last ? '    ' : '│   '), false);
    });
  };
  walk(roots, '', true);
  if (current === undefined && roots.length) lines.push('(current state descends from no snapshot)');
  return lines;
}

/** The ancestors of `name`, nearest first (excluding itself). */
export function ancestors(records: SnapshotRecord[], name: string): string[] {
  const byName = new Map(records.map((r) => [r.name, r]));
  const out: string[] = [];
  const seen = new Set<string>([name]);
  let p = byName.get(name)?.parent;
  while (p !== undefined && byName.has(p) && !seen.has(p)) {
    out.push(p);
    seen.add(p);
    p = byName.get(p)?.parent;
  }
  return out;
}

/**
 * Deleting `name`: its children move up to its parent, and if it was current, its parent
 * becomes current. Returns the records to rewrite and the new current.
 */
export function planDelete(records: SnapshotRecord[], name: string, current: string | undefined): { reparent: SnapshotRecord[]; current: string | undefined } {
  const victim = records.find((r) => r.name === name);
  if (!victim) return { reparent: [], current };
  const reparent = records
    .filter((r) => r.parent === name)
    .map((r) => {
      const out: SnapshotRecord = { ...r };
      if (victim.parent === undefined) delete out.parent;
      else out.parent = victim.parent;
      return out;
    });
  return { reparent, current: current === name ? victim.parent : current };
}
