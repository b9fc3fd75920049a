// `hyperfold serve`: the daemon in the foreground until SIGTERM/SIGINT. Guests keep running
// when it stops (or is killed): the next start re-attaches to them.
import { isHfError } from '../core/errors.js';
import { defaultConfig, splitListen } from './config.js';
import { startDaemon } from './daemon.js';

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
  let daemon;
  try {
    daemon = await startDaemon(config);
  } catch (e) {
    console.error(`hyperfold: ${(e as Error).message}${isHfError(e) ? ` (${e.code})` : ''}`);
    process.exit(1);
  }
  process.stdout.write(
    [
      '',
      `Hyperfold ${daemon.services.version} is running.`,
      `  API:         ${daemon.url}/api/v1   (OpenAPI: ${daemon.url}/api/v1/openapi.json)`,
      `  Admin token: ${daemon.token}`,
      `  Unix socket: ${daemon.paths.socket} (root only, no token needed)`,
      `  Data:        ${daemon.paths.root}`,
      `Try: npx hyperfold launch tiny web1 --cpus 1 --memory 256M`,
      '',
    ].join('\n') + '\n',
  );
  const stop = (sig: string) => {
    process.stderr.write(`hyperfold: ${sig}: stopping the daemon (guests keep running)\n`);
    void daemon.close().then(() => process.exit(0));
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
}
