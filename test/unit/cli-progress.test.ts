// The CLI's progress line for an operation, and that nothing is drawn when stderr is no terminal.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import type { Operation } from '../../src/core/model/operation.js';
import { ProgressView, progressLine } from '../../src/cli/format.js';

const op = (percent: number, message = 'copying'): Operation =>
  ({ id: 'o1', type: 'image.build', target: { kind: 'image', name: 'tiny' }, status: 'running', progress: { percent, message } }) as unknown as Operation;

test('a bar with the percentage once the operation reports one, a spinner before', () => {
  assert.equal(progressLine(op(50), 0), `[${'#'.repeat(12)}${'.'.repeat(12)}]  50% image.build tiny: copying`);
  assert.equal(progressLine(op(100), 0), `[${'#'.repeat(24)}] 100% image.build tiny: copying`);
  assert.equal(progressLine(op(0, 'waiting'), 0), '⠋ image.build tiny: waiting');
  assert.notEqual(progressLine(op(0), 1).slice(0, 1), progressLine(op(0), 0).slice(0, 1), 'the spinner turns');
  assert.match(progressLine(op(250), 0), /\] 100%/, 'clamped');
});

test('draws on a terminal and clears the line at the end; writes nothing to a pipe', () => {
  const tty = Object.assign(new PassThrough(), { isTTY: true, columns: 80 }) as unknown as NodeJS.WriteStream;
  let drawn = '';
  (tty as unknown as PassThrough).on('data', (c: Buffer) => (drawn += c.toString()));
  const v = new ProgressView(tty);
  v.update(op(50));
  v.done();
  assert.match(drawn, /\]  50% image\.build tiny: copying/);

  const pipe = Object.assign(new PassThrough(), { isTTY: false }) as unknown as NodeJS.WriteStream;
  let piped = '';
  (pipe as unknown as PassThrough).on('data', (c: Buffer) => (piped += c.toString()));
  const quiet = new ProgressView(pipe);
  quiet.update(op(50));
  quiet.done();
  assert.equal(piped, '');
});
