// Daemon configuration: embedded defaults, overridden by environment and flags. Every path the
// daemon uses is derived here from the data directory.
import { hostname } from 'node:os';
import { join } from 'node:path';
import { DEFAULT_DATA_DIR, DEFAULT_LISTEN } from '../core/defaults.js';

export interface DaemonConfig {
  dataDir: string;
  listenHost: string;
  listenPort: number;
  /** This host's name in instance records and operations (a cluster has several). */
  hostName: string;
  qemuBinary: string;
  qemuImgBinary: string;
  overcommit: { cpu: number; memory: number };
  /** Graceful stop waits this long before a forced stop. */
  stopTimeoutMs: number;
  consoleLogMaxBytes: number;
  kvmProbeDeadlineMs: number;
  /** Build the tiny image at start when it is missing. */
  buildTinyImage: boolean;
}

export { DEFAULT_DATA_DIR, DEFAULT_LISTEN };

export function defaultConfig(overrides: Partial<DaemonConfig> = {}): DaemonConfig {
  const env = process.env;
  const [h, p] = splitListen(env.HYPERFOLD_LISTEN ?? DEFAULT_LISTEN);
  return {
    dataDir: env.HYPERFOLD_DATA ?? DEFAULT_DATA_DIR,
    listenHost: h,
    listenPort: p,
    hostName: env.HYPERFOLD_HOST_NAME ?? hostname(),
    qemuBinary: env.HYPERFOLD_QEMU ?? 'qemu-system-x86_64',
    qemuImgBinary: env.HYPERFOLD_QEMU_IMG ?? 'qemu-img',
    overcommit: {
      cpu: Number(env.HYPERFOLD_CPU_OVERCOMMIT ?? 8),
      memory: Number(env.HYPERFOLD_MEMORY_OVERCOMMIT ?? 1),
    },
    stopTimeoutMs: Number(env.HYPERFOLD_STOP_TIMEOUT_MS ?? 30_000),
    consoleLogMaxBytes: 1024 * 1024,
    kvmProbeDeadlineMs: 3000,
    buildTinyImage: true,
    ...overrides,
  };
}

export function splitListen(listen: string): [string, number] {
  const i = listen.lastIndexOf(':');
  if (i < 0) return ['127.0.0.1', Number(listen)];
  return [listen.slice(0, i).replace(/^\[|\]$/g, ''), Number(listen.slice(i + 1))];
}

/** Where everything lives under the data directory. */
export class DataPaths {
  constructor(readonly root: string) {}
  get stateDb(): string { return join(this.root, 'state.db'); }
  get socket(): string { return join(this.root, 'hyperfold.sock'); }
  get tokenFile(): string { return join(this.root, 'admin.token'); }
  get accelCache(): string { return join(this.root, 'accel.json'); }
  get cacheDir(): string { return join(this.root, 'cache'); }
  get imagesDir(): string { return join(this.root, 'images'); }
  get instancesDir(): string { return join(this.root, 'instances'); }
  get logFile(): string { return join(this.root, 'hyperfold.log'); }
  /** Input and output files of the helper commands in flight (util/exec.ts); emptied at start. */
  get commandsDir(): string { return join(this.root, 'commands'); }
  image(name: string): string { return join(this.imagesDir, name); }
  instance(name: string): string { return join(this.instancesDir, name); }
}
