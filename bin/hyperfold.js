#!/usr/bin/env node
// Entry point of the `hyperfold` command: runs the compiled CLI (npm install builds it).
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const main = new URL('../dist/src/cli/main.js', import.meta.url);
if (!existsSync(fileURLToPath(main))) {
  console.error('hyperfold is not built yet: run `npm install` (or `npm run build`) in the project directory');
  process.exit(1);
}
await import(main.href);
