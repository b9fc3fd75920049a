// Host, operation, image and daemon verbs.
import { isFinished, type Operation } from '../../core/model/operation.js';
import { formatBytes, formatMiB } from '../../core/units.js';
import type { HostInfo } from '../../core/model/host.js';
import type { ImageView } from '../../core/model/image.js';
import type { CliContext } from '../context.js';
import { table } from '../format.js';

export function registerSystemCommands(ctx: CliContext): void {
// ---- host, operations, images -----------------------------------------------------------------
  
  const host = ctx.program.command('host').description('this host');
  host
    .command('info')
    .description('CPUs, memory and the accelerator verdict')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (o: { format: string }) => {
      const { host: h } = await ctx.client().request<{ host: HostInfo }>('GET', '/api/v1/host');
      ctx.print(h, o.format, () =>
        [
          `Host:        ${h.name} (kernel ${h.kernel})`,
          `CPUs:        ${h.cpus.count} × ${h.cpus.model}`,
          `Memory:      ${formatMiB(h.memory.totalMiB)} total, ${formatMiB(h.memory.freeMiB)} free`,
          `Overcommit:  CPU ×${h.overcommit.cpu}, memory ×${h.overcommit.memory}`,
          `KVM:         ${h.accelerator.kvm.usable ? 'usable' : 'NOT usable'}: ${h.accelerator.kvm.reason}`,
          `TCG:         ${h.accelerator.tcg.usable ? 'usable' : 'NOT usable'}: ${h.accelerator.tcg.reason}`,
          `Default:     ${h.accelerator.default}`,
          `QEMU:        ${h.qemuVersion ?? 'unknown'}`,
          `Instances:   ${h.instances.total} (${h.instances.running} running; committed ${h.instances.committedVcpus} vCPUs, ${formatMiB(h.instances.committedMemoryMiB)})`,
          `Daemon:      v${h.daemon.version}, pid ${h.daemon.pid}, RSS ${formatMiB(Math.round(h.daemon.rssBytes / 1048576))}`,
        ].join('\n'),
      );
    });
  
  const operation = ctx.program.command('operation').alias('op').description('long-running operations');
  operation
    .command('list')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (o: { format: string }) => {
      const { operations } = await ctx.client().request<{ operations: Operation[] }>('GET', '/api/v1/operations');
      ctx.print(operations, o.format, () =>
        table(
          ['ID', 'TYPE', 'TARGET', 'STATUS', 'PROGRESS', 'CREATED'],
          operations.map((op) => [op.id, op.type, op.target.name, op.status, `${op.progress.percent}%`, op.createdAt]),
        ),
      );
    });
  operation
    .command('show <id>')
    .option('--format <fmt>', 'table or json', 'json')
    .action(async (id: string, o: { format: string }) => {
      const { operation: op } = await ctx.client().request<{ operation: Operation }>('GET', `/api/v1/operations/${id}`);
      ctx.print(op, o.format, () => describeOperation(op));
    });
  operation
    .command('wait <id>')
    .action(async (id: string) => {
      const { operation: op } = await ctx.client().request<{ operation: Operation }>('GET', `/api/v1/operations/${id}`);
      const done = await ctx.follow(op);
      console.log(describeOperation(done));
    });
  
  operation
    .command('cancel <id>')
    .description('cancel an operation: a queued one at once, a running one if it can stop (e.g. a graceful stop, an image build)')
    .option('--no-wait', 'do not wait for a running operation to end')
    .action(async (id: string, o: { wait: boolean }) => {
      let { operation: op } = await ctx.client().request<{ operation: Operation }>('DELETE', `/api/v1/operations/${id}`);
      if (!isFinished(op) && o.wait) op = await ctx.client().waitOperation(op.id);
      console.log(isFinished(op) ? `operation ${op.id} (${op.type} ${op.target.name}): ${op.status}` : `operation ${op.id}: cancel requested`);
    });

  function describeOperation(op: Operation): string {
    return [
      `ID:       ${op.id}`,
      `Type:     ${op.type}`,
      `Target:   ${op.target.kind} ${op.target.name}`,
      `Status:   ${op.status}`,
      `Progress: ${op.progress.percent}% ${op.progress.message}`,
      ...(op.error ? [`Error:    ${op.error.code}: ${op.error.message}`] : []),
      `Created:  ${op.createdAt}`,
      ...(op.finishedAt ? [`Finished: ${op.finishedAt}`] : []),
    ].join('\n');
  }
  
  const image = ctx.program.command('image').description('images');
  image
    .command('list')
    .description('list images (in a cluster: every host\'s, with the hosts that hold each)')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (o: { format: string }) => {
      const { images } = await ctx.client().request<{ images: ImageView[] }>('GET', '/api/v1/images');
      const clustered = images.some((i) => i.hosts !== undefined);
      const size = (i: ImageView) => formatMiB(Math.round(i.sizeBytes / 1048576));
      ctx.print(images, o.format, () =>
        clustered
          ? table(['NAME', 'TYPE', 'SOURCE', 'SIZE', 'HOSTS', 'CREATED', 'DESCRIPTION'], images.map((i) => [i.name, i.type, i.source, size(i), (i.hosts ?? []).join(','), i.createdAt, i.description]))
          : table(['NAME', 'TYPE', 'SOURCE', 'SIZE', 'CREATED', 'DESCRIPTION'], images.map((i) => [i.name, i.type, i.source, size(i), i.createdAt, i.description])),
      );
    });
  image
    .command('info <name>')
    .alias('show')
    .description('show an image (in a cluster also one only other hosts hold, with the hosts that hold it)')
    .action(async (name: string) => {
      const { image: i } = await ctx.client().request<{ image: ImageView }>('GET', `/api/v1/images/${name}`);
      console.log(JSON.stringify(i, null, 2));
    });
  image
    .command('fetch <name>')
    .description('fetch an image from another host of the cluster (checked against its SHA-256 checksums)')
    .option('--from <host>', 'the host to fetch it from (default: any online host that holds it)')
    .action(async (name: string, o: { from?: string }) => {
      const { operation: op } = await ctx.client().request<{ operation: Operation }>('POST', `/api/v1/images/${name}/fetch`, o.from ? { from: o.from } : {});
      const done = await ctx.follow(op);
      const r = done.result as { from: string; sizeBytes: number };
      console.log(`image ${name} fetched from ${r.from} (${formatBytes(r.sizeBytes)})`);
    });
  image
    .command('build <name>')
    .description('build (or rebuild) a built-in image, e.g. tiny')
    .action(async (name: string) => {
      const { operation: op } = await ctx.client().request<{ operation: Operation }>('POST', `/api/v1/images/${name}/build`, {});
      await ctx.follow(op);
      console.log(`image ${name} built`);
    });
  image
    .command('delete <name>')
    .action(async (name: string) => {
      await ctx.client().request('DELETE', `/api/v1/images/${name}`);
      console.log(`image ${name} deleted`);
    });
  
  // ---- the daemon -------------------------------------------------------------------------------
  
  ctx.program
    .command('serve')
    .description('run the daemon in the foreground')
    .option('--listen <addr>', 'TCP address for the API (host:port)')
    .option('--no-build-image', 'do not build the tiny image at start')
    .action(async (o: { listen?: string; buildImage: boolean }) => {
      const { serve } = await import('../../daemon/serve.js');
      await serve({ dataDir: ctx.program.opts<{ dataDir?: string }>().dataDir, listen: o.listen, buildImage: o.buildImage });
    });
  
  
}
