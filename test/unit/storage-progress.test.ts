// qemu-img convert -p output arrives in arbitrary chunks: the parser must reassemble records,
// ignore noise and never go backwards.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { parseProgressRecord, QemuImgProgressParser } from '../../src/storage/progress.js';

describe('qemu-img progress parser', () => {
  it('parses single records', () => {
    assert.equal(parseProgressRecord('    (0.00/100%)'), 0);
    assert.equal(parseProgressRecord('    (45.45/100%)'), 45.45);
    assert.equal(parseProgressRecord('    (100.00/100%)'), 100);
    assert.equal(parseProgressRecord('qemu-img: error'), undefined);
    assert.equal(parseProgressRecord('    (250.00/100%)'), undefined);
  });

  it('reassembles records split across chunks and skips duplicates', () => {
    const p = new QemuImgProgressParser();
    const stream = '    (0.00/100%)\r    (9.09/100%)\r    (18.18/100%)\r    (18.18/100%)\r    (100.00/100%)\r\n';
    const seen: number[] = [];
    // Feed it three bytes at a time.
    for (let i = 0; i < stream.length; i += 3) seen.push(...p.push(stream.slice(i, i + 3)));
    assert.deepEqual(seen, [0, 9.09, 18.18, 100]);
    assert.equal(p.percent, 100);
  });

  it('never goes backwards and survives garbage', () => {
    const p = new QemuImgProgressParser();
    assert.deepEqual(p.push('    (50.00/100%)\r'), [50]);
    assert.deepEqual(p.push('    (40.00/100%)\r'), []);
    assert.deepEqual(p.push(Buffer.from('x'.repeat(1000))), []);
    assert.deepEqual(p.push('\r    (75.50/100%)\r'), [75.5]);
  });
});
