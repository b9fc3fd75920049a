#!/usr/bin/env node
// The `hyperfold` command line. Every verb is a thin call to the REST API; `serve` runs the
// daemon in the foreground. Each area adds its verbs from its own module in commands/.
import { Command } from 'commander';
import { ApiError } from './client.js';
import { createContext } from './context.js';
import { registerClusterCommands } from './commands/cluster.js';
import { registerContainerCommands } from './commands/containers.js';
import { registerInstanceCommands } from './commands/instances.js';
import { registerNetworkCommands } from './commands/networks.js';
import { registerSystemCommands } from './commands/system.js';
import { registerStorageCommands } from './commands/storage.js';

const program = new Command();
program
  .name('hyperfold')
  .description('Virtual machines and system containers: one daemon, one API, one CLI')
  .option('--url <url>', 'API URL (default: the unix socket in the data directory, else http://127.0.0.1:8006)')
  .option('--token <token>', 'API token (default: HYPERFOLD_TOKEN or the admin token file)')
  .option('--data-dir <dir>', 'data directory (default /var/lib/hyperfold or HYPERFOLD_DATA)')
  // Global options go before the verb: after it, an option belongs to the verb (`cluster join --token`).
  .enablePositionalOptions()
  .showHelpAfterError();

const ctx = createContext(program);
registerInstanceCommands(ctx);
registerNetworkCommands(ctx);
registerSystemCommands(ctx);
registerStorageCommands(ctx);
registerContainerCommands(ctx);
registerClusterCommands(ctx);

program.parseAsync(process.argv).catch((e: unknown) => {
  if (e instanceof ApiError) {
    console.error(`Error: ${e.message} (${e.code})`);
  } else {
    console.error(`Error: ${(e as Error).message}`);
  }
  process.exit(1);
});
