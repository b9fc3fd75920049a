// etcd kept healthy between compactions: each host that runs an etcd member looks at its
// database size against the space quota now and then, and raises an alert (an event and a log
// line) once it passes a share of it: at the quota etcd refuses every write (its NOSPACE alarm).
// Compaction itself is etcd's own (revision mode, see cluster/etcd-args.ts); a defragment after
// compaction gives the space back to the file system.
import type { EventBus } from '../events.js';
import type { Logger } from '../../util/log.js';

export interface EtcdSpace {
  dbSizeBytes: number;
  quotaBytes: number;
}

export type SpaceLevel = 'ok' | 'warning' | 'critical';

/** ok below `warnAt` of the quota, warning from there, critical from `criticalAt` (defaults 80 % and 95 %). */
export function spaceLevel(s: EtcdSpace, warnAt = 0.8, criticalAt = 0.95): SpaceLevel {
  const used = s.quotaBytes > 0 ? s.dbSizeBytes / s.quotaBytes : 0;
  return used >= criticalAt ? 'critical' : used >= warnAt ? 'warning' : 'ok';
}

export interface EtcdHealthOptions {
  host: string;
  events: EventBus;
  log: Logger;
  /** The member's database size now (etcd's maintenance status) and its quota. */
  space: () => Promise<EtcdSpace>;
  intervalMs?: number;
}

/** Raises `cluster.etcd-space` when the level changes (also when it goes back to ok). */
export class EtcdHealth {
  private level: SpaceLevel = 'ok';
  private last: EtcdSpace | undefined;
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly o: EtcdHealthOptions) {}

  start(): void {
    this.timer = setInterval(() => void this.check(), this.o.intervalMs ?? 60_000);
    this.timer.unref();
    void this.check();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  get status(): { level: SpaceLevel; space?: EtcdSpace } {
    return this.last ? { level: this.level, space: this.last } : { level: this.level };
  }

  async check(): Promise<SpaceLevel> {
    try {
      const s = await this.o.space();
      this.last = s;
      const level = spaceLevel(s);
      if (level !== this.level) {
        this.level = level;
        const data = { host: this.o.host, level, dbSizeBytes: s.dbSizeBytes, quotaBytes: s.quotaBytes, percent: Math.round((100 * s.dbSizeBytes) / s.quotaBytes) };
        this.o.events.publish('cluster.etcd-space', data);
        if (level === 'ok') this.o.log.info('etcd space back under the warning level', data);
        else this.o.log.warn(`etcd database at ${data.percent}% of its quota: writes stop at 100% (compact and defragment, or raise the quota)`, data);
      }
    } catch (e) {
      this.o.log.debug('etcd status unavailable', { error: (e as Error).message });
    }
    return this.level;
  }
}
