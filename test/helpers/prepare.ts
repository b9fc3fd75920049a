// Builds the tiny image once into the shared test cache, before the suite runs.
import { ensureTestImage } from './image.js';

const t0 = Date.now();
const dir = await ensureTestImage();
console.log(`tiny image ready in ${dir} (${Date.now() - t0} ms)`);
