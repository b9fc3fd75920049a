import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { EventBus } from '../../src/services/events.js';

describe('event bus', () => {
  it('replays what was true when each event happened, although the publisher mutates its object', () => {
    const bus = new EventBus('host-a', 10);
    const op = { id: 'op1', progress: { percent: 0 } };
    const live: number[] = [];
    bus.subscribe((ev) => live.push((ev.data.operation as typeof op).progress.percent));
    for (const p of [10, 60, 100]) {
      op.progress.percent = p;
      bus.publish('operation', { operation: op });
    }
    assert.deepEqual(live, [10, 60, 100]);
    assert.deepEqual(bus.since(0).map((e) => (e.data.operation as typeof op).progress.percent), [10, 60, 100]);
    assert.deepEqual(bus.since(0).map((e) => [e.seq, e.host]), [[1, 'host-a'], [2, 'host-a'], [3, 'host-a']]);
  });

  it('keeps a bounded buffer and survives a throwing listener', () => {
    const bus = new EventBus('h', 3);
    let got = 0;
    bus.subscribe(() => {
      throw new Error('broken');
    });
    bus.subscribe(() => got++);
    for (let i = 0; i < 5; i++) bus.publish('t', { i });
    assert.equal(got, 5);
    assert.deepEqual(bus.since(0).map((e) => e.data.i), [2, 3, 4]);
    assert.deepEqual(bus.since(4).map((e) => e.seq), [5]);
  });
});
