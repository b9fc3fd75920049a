// `npm run bench [-- AREA…]`: runs each area's benchmark and prints its table. Every benchmark
// measures a baseline in the same run (raw QEMU, raw runc, …) and reports the ratio to it:
// these machines are shared and noisy, so absolute numbers alone mean little.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ensureTestImage } from '../test/helpers/image.js';

const AREAS = ['core', 'storage', 'containers', 'network', 'live', 'cluster'];

const wanted = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const areas = wanted.length ? wanted : AREAS;
await ensureTestImage();
let failed = false;
for (const area of areas) {
  const file = new URL(`./${area}.js`, import.meta.url);
  if (!existsSync(fileURLToPath(file))) {
    console.log(`## ${area}\n\n(no benchmark)\n`);
    continue;
  }
  const mod = (await import(file.href)) as { run: () => Promise<string> };
  const t0 = Date.now();
  try {
    const table = await mod.run();
    console.log(`## ${area} (${((Date.now() - t0) / 1000).toFixed(0)} s)\n\n${table}\n`);
  } catch (e) {
    failed = true;
    console.log(`## ${area}\n\nFAILED: ${(e as Error).stack ?? String(e)}\n`);
  }
}
process.exit(failed ? 1 : 0);
