// Where a daemon and its clients meet when nobody says otherwise. Shared by the daemon's
// configuration and the CLI, which finds the daemon's unix socket and token in the data directory.
export const DEFAULT_DATA_DIR = '/var/lib/hyperfold';
export const DEFAULT_LISTEN = '127.0.0.1:8006';
