// QMP (QEMU Machine Protocol): the connection core, the typed commands and the command log.
export * from './client.js';
export * from './commands.js';
export * from './log.js';
