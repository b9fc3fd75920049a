// `hyperfold serve`: the daemon in the foreground until SIGTERM/SIGINT. Guests keep running
// when it stops (or is killed): the next start re-attaches to them.
import { isHfError } from '../core/errors.js';
import { defaultConfig, splitListen } from './config.js';
import { startDaemon, type Daemon } from './daemon.js';

export async function serve(opts: { dataDir?: string; listen?: string; buildImage?: boolean }): Promise<void> {
  const overrides: Parameters<typeof defaultConfig>[0] = {};
  if (opts.dataDir) overrides.dataDir = opts.dataDir;
  if (opts.listen) {
    const [h, p] = splitListen(opts.listen);
    overrides.listenHost = h;
    overrides.listenPort = p;
  }
  if (opts.buildImage === false) overrides.buildTinyImage = false;
  const config = defaultConfig(overrides);
  let daemon: Daemon;
  // `cluster init` and `cluster join` restart the daemon in this process (the new incarnation opens
  // the cluster's store); guests keep running across it as across any daemon restart.
  let restart: () => void = () => undefined;
  const launch = async (): Promise<Daemon> => startDaemon(config, { requestRestart: () => restart() });
  try {
    daemon = await launch();
  } catch (e) {
    console.error(`hyperfold: ${(e as Error).message}${isHfError(e) ? ` (${e.code})` : ''}`);
    process.exit(1);
  }
  const banner = (d: Daemon) =>
    process.stdout.write(
      [
        '',
        `Hyperfold ${d.services.version} is running.`,
        `  API:         ${d.url}/api/v1   (OpenAPI: ${d.url}/api/v1/openapi.json)`,
        `  Admin token: ${d.token}`,
        `  Unix socket: ${d.paths.socket} (root only, no token needed)`,
        `  Data:        ${d.paths.root}`,
        `Try: npx hyperfold launch tiny web1 --cpus 1 --memory 256M`,
        '',
      ].join('\n') + '\n',
    );
  banner(daemon);
  let restarting: Promise<void> | undefined;
  restart = () => {
    restarting ??= (async () => {
      process.stderr.write('hyperfold: restarting the daemon into cluster mode (guests keep running)\n');
      await daemon.close();
      try {
        daemon = await launch();
        banner(daemon);
      } catch (e) {
        console.error(`hyperfold: cannot start after the cluster change: ${(e as Error).message}${isHfError(e) ? ` (${e.code})` : ''}`);
        process.exit(1);
      } finally {
        restarting = undefined;
      }
    })();
  };
  const stop = (sig: string) => {
    process.stderr.write(`hyperfold: ${sig}: stopping the daemon (guests keep running)\n`);
    void (restarting ?? Promise.resolve()).then(() => daemon.close()).then(() => process.exit(0));
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
}
