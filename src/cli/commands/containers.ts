// Container verbs: exec, container info, and importing container images. The lifecycle verbs
// (launch --container, list, start, stop, pause, console, config set, snapshot, copy, delete) are
// shared with VMs.
import { resolve } from 'node:path';
import { Option, type Command } from 'commander';
import type { Instance } from '../../core/model/instance.js';
import type { Operation } from '../../core/model/operation.js';
import { formatBytes, formatMiB } from '../../core/units.js';
import { ApiError } from '../client.js';
import type { CliContext } from '../context.js';

interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  truncated: boolean;
}

async function readStdin(): Promise<string | undefined> {
  if (process.stdin.isTTY) return undefined;
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return chunks.length ? Buffer.concat(chunks).toString('utf8') : undefined;
}

/**
 * Runs a command in a terminal of its own, over the exec websocket: this terminal goes raw, its
 * keys go in, the output comes out, size changes follow, and the command's status is returned.
 */
function terminalSession(ctx: CliContext, name: string, body: Record<string, unknown>): Promise<number> {
  const stdin = process.stdin;
  const stdout = process.stdout;
  const size = () => ({ cols: stdout.columns || 80, rows: stdout.rows || 24 });
  const ws = ctx.client().websocket(`/api/v1/containers/${encodeURIComponent(name)}/exec`);
  return new Promise<number>((resolve, reject) => {
    let exitCode: number | undefined;
    const onResize = () => ws.send(JSON.stringify({ resize: size() }));
    const restore = () => {
      stdout.off('resize', onResize);
      if (stdin.isTTY) stdin.setRawMode(false);
      stdin.pause();
    };
    ws.on('open', () => {
      ws.send(JSON.stringify({ ...body, tty: true, ...size() }));
      if (stdin.isTTY) stdin.setRawMode(true);
      stdin.on('data', (d: Buffer) => ws.send(d));
      stdin.on('end', () => ws.send(JSON.stringify({ eof: true })));
      stdin.resume();
      stdout.on('resize', onResize);
    });
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        (data[0] === 2 ? process.stderr : stdout).write(data.subarray(1));
        return;
      }
      const msg = JSON.parse(data.toString()) as { exit?: number; error?: { code: string; message: string } };
      if (msg.error) {
        restore();
        reject(new ApiError(0, msg.error.code, msg.error.message));
      } else if (typeof msg.exit === 'number') exitCode = msg.exit;
    });
    ws.on('close', () => {
      restore();
      resolve(exitCode ?? 255);
    });
    ws.on('error', (e) => {
      restore();
      reject(e);
    });
  });
}

export function registerContainerCommands(ctx: CliContext): void {
  const enc = encodeURIComponent;

  ctx.program
    .command('exec <name> <command...>')
    .description(
      'run a command in a running container, e.g. `hyperfold exec c1 -- ps`; exits with its status. From a terminal it runs in a terminal of its own ' +
      '(interactive: `hyperfold exec c1 -- sh`); piped input goes to its stdin',
    )
    .option('-e, --env <KEY=VALUE>', 'environment variable (repeatable)', (v: string, acc: string[]) => [...acc, v], [])
    .option('--cwd <dir>', 'working directory inside the container')
    .option('--timeout <seconds>', 'kill the command after this long (default 300; not for terminal sessions)', (v) => Number(v))
    .option('-t, --force-interactive', 'give the command a terminal even when this one is not a terminal')
    .option('-T, --force-noninteractive', 'no terminal: run, then print its output and exit with its status')
    .action(async (name: string, command: string[], o: { env: string[]; cwd?: string; timeout?: number; forceInteractive?: boolean; forceNoninteractive?: boolean }) => {
      const body: Record<string, unknown> = { command };
      if (o.env.length) {
        const env: Record<string, string> = {};
        for (const e of o.env) {
          const i = e.indexOf('=');
          if (i <= 0) throw new ApiError(400, 'HF_ERR_VALIDATION', `--env "${e}" is not KEY=VALUE`);
          env[e.slice(0, i)] = e.slice(i + 1);
        }
        body.env = env;
      }
      if (o.cwd) body.cwd = o.cwd;
      const terminal = o.forceInteractive || (!o.forceNoninteractive && process.stdin.isTTY === true && process.stdout.isTTY === true);
      if (terminal) {
        process.exitCode = await terminalSession(ctx, name, body);
        return;
      }
      if (o.timeout !== undefined) body.timeout = o.timeout;
      const input = await readStdin();
      if (input !== undefined) body.stdin = input;
      const r = await ctx.client().request<ExecResult>('POST', `/api/v1/containers/${enc(name)}/exec`, body);
      process.stdout.write(r.stdout);
      process.stderr.write(r.stderr);
      if (r.truncated) process.stderr.write('hyperfold: output truncated (8 MiB limit)\n');
      if (r.timedOut) process.stderr.write('hyperfold: the command timed out and was killed\n');
      process.exitCode = r.exitCode;
    });

  const container = ctx.program.command('container').description('container details');
  container
    .command('info <name>')
    .description('privilege, id map, init and live cgroup usage of a container')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (name: string, o: { format: string }) => {
      const r = await ctx.client().request<{ instance: Instance; container: Record<string, unknown> }>('GET', `/api/v1/containers/${enc(name)}`);
      ctx.print(r, o.format, () => {
        const c = r.container;
        const idmap = c.idmap as { hostId: number; size: number } | null;
        const live = c.live as { pid?: number; usage?: Record<string, number | string | boolean | undefined> } | null;
        const u = live?.usage ?? {};
        const lines = [
          `Name:        ${r.instance.name} (${r.instance.state})`,
          `Privileged:  ${c.privileged ? 'YES (no user namespace: root inside is root on the host)' : 'no'}`,
          `ID map:      ${idmap ? `container 0-${idmap.size - 1} → host ${idmap.hostId}-${idmap.hostId + idmap.size - 1}` : 'none (host ids)'}`,
          `Init:        ${Array.isArray(c.init) ? (c.init as string[]).join(' ') : '-'} (stop signal ${String(c.stopSignal ?? 'SIGTERM')})`,
          `Cgroups:     ${String(c.cgroupMode)}`,
          `Snapshots:   ${String(c.snapshots)}`,
        ];
        if (live) {
          lines.push(
            `Init pid:    ${live.pid}`,
            `Memory:      ${typeof u.memoryBytes === 'number' ? formatBytes(u.memoryBytes) : '-'} of ${typeof u.memoryLimitBytes === 'number' ? formatBytes(u.memoryLimitBytes) : 'unlimited'}`,
            `CPU quota:   ${typeof u.cpuQuotaUs === 'number' && u.cpuQuotaUs > 0 && typeof u.cpuPeriodUs === 'number' ? `${u.cpuQuotaUs / u.cpuPeriodUs} CPUs` : 'unlimited'}`,
            `Processes:   ${u.pids ?? '-'} (limit ${u.pidsLimit ?? 'max'})`,
            `OOM kills:   ${u.oomKills ?? 0}`,
          );
        } else lines.push(`Limits:      ${r.instance.config.vcpus} CPUs, ${formatMiB(r.instance.config.memoryMiB)}${r.instance.config.pidsLimit ? `, ${r.instance.config.pidsLimit} processes` : ''}`);
        return lines.join('\n');
      });
    });

  // Container images: added to the `image` verb (its `import` is for disk images).
  const image = ctx.program.commands.find((c: Command) => c.name() === 'image') ?? ctx.program.command('image').description('images');
  image
    .command('import-container <source>')
    .description('import a container image: an OCI layout directory, a docker-archive tarball (docker save) or a root filesystem tarball')
    .requiredOption('--name <name>', 'image name')
    .addOption(new Option('--format <fmt>', 'source format (default: detected)').choices(['oci-layout', 'docker-archive', 'rootfs-tar']))
    .option('--description <text>')
    .option('--no-wait', 'return once the import is queued')
    .action(async (source: string, o: { name: string; format?: string; description?: string; wait?: boolean }) => {
      const body: Record<string, unknown> = { name: o.name, source: resolve(source) };
      if (o.format) body.format = o.format;
      if (o.description) body.description = o.description;
      const { operation } = await ctx.client().request<{ operation: Operation }>('POST', '/api/v1/containers/images', body);
      const done = await ctx.follow(operation, { wait: o.wait });
      if (done.status !== 'success') return;
      const r = done.result as { format: string; init: string[]; sizeBytes: number };
      console.log(`container image ${o.name} imported from ${r.format} (${formatBytes(r.sizeBytes)}; init: ${r.init.join(' ')})`);
    });
}
