// "Every layer only talks to the one below it" (docs/architecture.md), checked on the sources:
// every relative import in src/**/*.ts (static, `export … from`, dynamic `import()` and
// `import('…').Type`) must go to a folder its layer may use. A new import that breaks the rule
// fails this test; the few known ones are listed in KNOWN_VIOLATIONS below.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root: this file runs from dist/test/unit/. */
const ROOT = fileURLToPath(new URL('../../../', import.meta.url));

/**
 * The layer a source file belongs to: its first folder under src/, except that drivers/driver.ts
 * (the interface services use) is a layer of its own and each driver's folder is another.
 */
export function layerOf(file: string): string {
  const parts = file.split('/');
  if (parts[0] !== 'src' || parts.length < 3) return file;
  if (parts[1] === 'drivers') return file === 'src/drivers/driver.ts' ? 'drivers/driver.ts' : `drivers/${parts[2]}`;
  return parts[1]!;
}

const LIBRARIES = ['storage', 'network', 'images', 'cluster'];
/** What each layer may import besides itself. A driver may not reach into another driver. */
function mayImport(from: string, to: string, target: string): boolean {
  if (from === to) return true;
  switch (from) {
    case 'core':
      return false;
    case 'util':
    case 'state':
    case 'storage':
    case 'network':
    case 'images':
    case 'cluster':
    case 'drivers/driver.ts':
      return ['core', 'util'].includes(to);
    case 'services':
      return ['core', 'state', 'util', 'drivers/driver.ts', ...LIBRARIES].includes(to);
    case 'api':
      // Request schemas of the storage and network areas are pure zod models, like core's.
      return ['core', 'services', 'util', 'drivers/driver.ts'].includes(to) || target === 'src/network/model.ts' || target === 'src/storage/model.ts';
    case 'cli':
      // An API client: its types come from the API's models (core's, and the zod request and view
      // models of the storage and network areas), nothing else.
      return to === 'core' || target === 'src/network/model.ts' || target === 'src/storage/model.ts';
    case 'daemon':
      return true; // the wiring: knows every layer
    default:
      if (from.startsWith('drivers/')) return ['core', 'util', 'drivers/driver.ts', ...LIBRARIES].includes(to);
      return false;
  }
}

/** Relative import specifiers of a TypeScript source (comments removed first). */
export function importsOf(source: string): string[] {
  const code = source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/(^|[^:'"`])\/\/.*$/gm, '$1');
  const out: string[] = [];
  const re = /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)['"](\.{1,2}\/[^'"]+)['"]/g;
  for (const m of code.matchAll(re)) out.push(m[1]!);
  return out;
}

/** Builtins core may not use: it is pure logic, no I/O. */
function importsIo(source: string): string[] {
  return [...source.matchAll(/(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)['"](node:[^'"]+|fs|child_process|net|os)['"]/g)].map((m) => m[1]!);
}

export interface Violation {
  file: string;
  imports: string;
}

/** Every import of `files` (repo-relative path → source) that its layer may not make. */
export function findViolations(files: Map<string, string>): Violation[] {
  const out: Violation[] = [];
  for (const [file, source] of files) {
    const from = layerOf(file);
    for (const spec of importsOf(source)) {
      const target = normalize(join(dirname(file), spec)).replace(/\.js$/, '.ts');
      if (!mayImport(from, layerOf(target), target)) out.push({ file, imports: target });
    }
    if (from === 'core') for (const m of importsIo(source)) out.push({ file, imports: m });
  }
  return out;
}

/**
 * Imports that break the rule today, each with who removes it. Delete an entry once its import is
 * gone (the last test fails on entries that no longer match, so that the list stays exact).
 */
const KNOWN_VIOLATIONS: Array<Violation & { why: string }> = [
  // Permanent: one binary; its `serve` verb starts the daemon in this process (a lazy import).
  { file: 'src/cli/commands/system.ts', imports: 'src/daemon/serve.ts', why: 'serve verb' },
  // Permanent: the firewall rule syntax the CLI accepts ("allow tcp 22 from 10.0.0.0/8") is parsed by
  // the same pure parser the API uses, so both reject the same input with the same message.
  { file: 'src/cli/commands/networks.ts', imports: 'src/network/firewall.ts', why: 'rule syntax parser' },
];

function sourcesUnder(dir: string): Map<string, string> {
  const files = new Map<string, string>();
  const walk = (d: string): void => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) files.set(relative(ROOT, p), readFileSync(p, 'utf8'));
    }
  };
  walk(join(ROOT, dir));
  return files;
}

const key = (v: Violation): string => `${v.file} -> ${v.imports}`;

test('the checker finds imports of every form and flags each kind of layer break', () => {
  assert.deepEqual(
    importsOf(`import a from './a.js';\nimport type { B } from '../b.js';\nexport { c } from "./c.js";\nimport './side.js';\n// import x from './commented.js';\nconst d = await import('../d.js');\ntype E = import('./e.js').E;\nimport z from 'zod';`),
    ['./a.js', '../b.js', './c.js', './side.js', '../d.js', './e.js'],
  );
  const files = new Map([
    ['src/services/x.ts', `import { y } from '../api/routes.js';\nimport type { Q } from '../drivers/qemu/qmp/client.js';\nimport type { D } from '../drivers/driver.js';`],
    ['src/core/x.ts', `import { readFile } from 'node:fs/promises';\nimport { s } from '../state/store.js';\nimport { u } from './units.js';`],
    ['src/cli/x.ts', `import type { I } from '../services/instances.js';\nimport type { M } from '../core/model/instance.js';`],
    ['src/drivers/qemu/x.ts', `import { c } from '../container/runc.js';\nimport { d } from '../driver.js';`],
    ['src/daemon/x.ts', `import { q } from '../drivers/qemu/driver.js';`],
  ]);
  assert.deepEqual(findViolations(files).map(key).sort(), [
    'src/cli/x.ts -> src/services/instances.ts',
    'src/core/x.ts -> node:fs/promises',
    'src/core/x.ts -> src/state/store.ts',
    'src/drivers/qemu/x.ts -> src/drivers/container/runc.ts',
    'src/services/x.ts -> src/api/routes.ts',
    'src/services/x.ts -> src/drivers/qemu/qmp/client.ts',
  ]);
});

test('every layer of src/ imports only the layers below it (besides the known violations)', () => {
  const found = findViolations(sourcesUnder('src'));
  assert.ok(sourcesUnder('src/core').size > 5, 'the sources were found');
  const known = new Set(KNOWN_VIOLATIONS.map(key));
  const fresh = found.filter((v) => !known.has(key(v)));
  assert.deepEqual(fresh.map(key), [], 'imports that break the layering (see docs/architecture.md)');
});

test('the known violations are still there (delete entries that were fixed)', () => {
  const found = new Set(findViolations(sourcesUnder('src')).map(key));
  const stale = KNOWN_VIOLATIONS.map(key).filter((k) => !found.has(k));
  assert.deepEqual(stale, [], 'remove these entries from KNOWN_VIOLATIONS: the imports are gone');
});
