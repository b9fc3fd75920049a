// The logger keeps its interface (message first, fields second) over pino: one JSON object a line
// with t, level and msg, child fields on every line, the level filter, and the terminal form.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createLogger, pretty, silentLogger } from '../../src/util/log.js';

function capture(level?: 'debug' | 'info' | 'warn' | 'error') {
  const lines: string[] = [];
  const log = createLogger({ level, write: (l) => lines.push(l) });
  return { log, lines, parsed: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

test('a line is one JSON object: t, level as a word, msg and the fields', () => {
  const { log, lines, parsed } = capture();
  log.info('vm started', { id: 'web1', pid: 42 });
  assert.equal(lines.length, 1);
  assert.ok(!lines[0]!.includes('\n'), 'no newline inside the line');
  const [e] = parsed();
  assert.equal(e!.level, 'info');
  assert.equal(e!.msg, 'vm started');
  assert.equal(e!.id, 'web1');
  assert.equal(e!.pid, 42);
  assert.match(String(e!.t), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.equal('hostname' in e!, false, 'no pino defaults added');
});

test('child loggers add their fields to every line; the parent stays as it was', () => {
  const { log, parsed } = capture();
  const qemu = log.child({ component: 'qemu' });
  qemu.child({ instance: 'web1' }).warn('slow', { ms: 5 });
  log.error('plain');
  const [a, b] = parsed();
  assert.deepEqual([a!.component, a!.instance, a!.ms, a!.level], ['qemu', 'web1', 5, 'warn']);
  assert.equal(b!.component, undefined);
  assert.equal(b!.level, 'error');
});

test('lines under the level are dropped', () => {
  const { log, parsed } = capture('warn');
  log.debug('d');
  log.info('i');
  log.warn('w');
  log.child({ c: 1 }).info('child i');
  log.error('e');
  assert.deepEqual(parsed().map((e) => e.msg), ['w', 'e']);
});

test('the pino instance is exposed for Fastify; the silent logger has none and writes nothing', () => {
  assert.equal(typeof capture().log.pino?.info, 'function');
  assert.equal(silentLogger.pino, undefined);
  assert.equal(silentLogger.child({ a: 1 }), silentLogger);
});

test('on a terminal a line reads as time, level, message and key=value fields', () => {
  const { log, lines } = capture();
  log.child({ component: 'net' }).info('bridge up', { bridge: 'hfbr0', mtu: 1500 });
  assert.match(pretty(lines[0]!), /^\d\d:\d\d:\d\d info  bridge up component=net bridge=hfbr0 mtu=1500$/);
});
