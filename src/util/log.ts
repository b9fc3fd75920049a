// Structured logs: one JSON object a line (`log.info('vm started', { id })`), written by pino
// (which Fastify carries anyway). The interface keeps the message first and the fields second, as
// every call site has it; pino's own order (fields, message) stays behind this file.
import { pino, type DestinationStream, type Logger as PinoLogger } from 'pino';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
  /** The pino logger underneath, for libraries that take one (Fastify); none when silent. */
  readonly pino?: PinoLogger;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** Where each line goes (without its newline). Default: stderr, made readable on a terminal. */
  write?: (line: string) => void;
  /** Fields on every line. */
  base?: Record<string, unknown>;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  return wrap(
    pino(
      {
        level: opts.level ?? 'info',
        // No pid/hostname on every line (as before pino): the daemon is one process per host.
        base: opts.base ?? null,
        timestamp: () => `,"t":"${new Date().toISOString()}"`,
        formatters: { level: (label) => ({ level: label }) },
        messageKey: 'msg',
      },
      destination(opts.write),
    ),
  );
}

function wrap(p: PinoLogger): Logger {
  const at =
    (level: LogLevel) =>
    (msg: string, fields?: Record<string, unknown>): void => {
      if (fields) p[level](fields, msg);
      else p[level](msg);
    };
  return { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error'), child: (fields) => wrap(p.child(fields)), pino: p };
}

function destination(write: ((line: string) => void) | undefined): DestinationStream {
  const lines = (fn: (line: string) => void): DestinationStream => ({ write: (chunk: string) => fn(chunk.replace(/\n$/, '')) });
  if (write) return lines(write);
  if (process.stderr.isTTY) return lines((line) => process.stderr.write(pretty(line) + '\n'));
  // Synchronous: the last lines before a process.exit() (a failed start) must not be lost.
  return pino.destination({ fd: 2, sync: true });
}

export const silentLogger: Logger = {
  debug: () => undefined,
  info: () => undefined,
  warn: () => undefined,
  error: () => undefined,
  child: () => silentLogger,
};

/** On a terminal: "14:59:01 info  instance started name=web1 pid=123" instead of JSON. */
export function pretty(line: string): string {
  const { t, level, msg, ...rest } = JSON.parse(line) as { t: string; level: string; msg: string } & Record<string, unknown>;
  const fields = Object.entries(rest)
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
    .join(' ');
  return `${t.slice(11, 19)} ${level.padEnd(5)} ${msg}${fields ? ` ${fields}` : ''}`;
}
