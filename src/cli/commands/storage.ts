// Storage verbs: storage (pools), volume, image import, export, publish, copy, snapshot.
import { Option, type Command } from 'commander';
import { resolve } from 'node:path';
import type { Instance } from '../../core/model/instance.js';
import type { Operation } from '../../core/model/operation.js';
import { formatBytes } from '../../core/units.js';
import type { PoolView, SnapshotListing, SnapshotRecord, VolumeView } from '../../storage/model.js';
import { ApiError } from '../client.js';
import type { CliContext } from '../context.js';
import { table } from '../format.js';

function splitRef(ref: string): [string, string] {
  const parts = ref.split('/');
  if (parts.length !== 2 || !parts[0] || !parts[1]) throw new ApiError(400, 'HF_ERR_INVALID_NAME', `"${ref}" is not a volume reference: use POOL/NAME`);
  return [parts[0], parts[1]];
}

const enc = encodeURIComponent;

/** Where a pool can be used: a host's own pool here; a shared one on the hosts that reach it. */
function availability(p: PoolView): string {
  if (!p.shared) return 'yes';
  const hosts = p.hosts ?? [];
  const up = hosts.filter((h) => h.available).map((h) => h.host);
  const down = hosts.filter((h) => !h.available).map((h) => h.host);
  return [up.length ? up.join(',') : 'no host', ...(down.length ? [`(not ${down.join(',')})`] : [])].join(' ');
}

export function registerStorageCommands(ctx: CliContext): void {
  const api = () => ctx.client();

  // ---- pools -----------------------------------------------------------------------------------
  const storage = ctx.program.command('storage').description('storage pools');
  storage
    .command('list')
    .alias('ls')
    .description('pools with capacity, used and free space')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (o: { format: string }) => {
      const { pools } = await api().request<{ pools: PoolView[] }>('GET', '/api/v1/storage/pools');
      ctx.print(pools, o.format, () =>
        table(
          ['NAME', 'TYPE', 'PATH', 'SIZE', 'USED', 'FREE', 'VOLUMES', 'ALLOCATED', 'SCOPE', 'AVAILABLE'],
          pools.map((p) => [p.name, p.type, p.path, formatBytes(p.usage.totalBytes), formatBytes(p.usage.usedBytes), formatBytes(p.usage.freeBytes), String(p.usage.volumes), formatBytes(p.usage.allocatedBytes), p.shared ? 'shared' : 'host', availability(p)]),
        ),
      );
    });
  storage
    .command('info <pool>')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (name: string, o: { format: string }) => {
      const { pool: p } = await api().request<{ pool: PoolView }>('GET', `/api/v1/storage/pools/${enc(name)}`);
      ctx.print(p, o.format, () =>
        [
          `Name:         ${p.name}`,
          `Type:         ${p.type}`,
          `Scope:        ${p.shared ? `shared by the cluster's hosts (id ${p.id ?? '?'}, made by ${p.createdBy ?? '?'})` : 'this host'}`,
          `Path:         ${p.path}`,
          `Available:    ${p.available ? 'yes' : `no: ${p.reason ?? 'unknown'}`}`,
          ...(p.hosts ? ['Hosts:', ...p.hosts.map((h) => `  ${h.host.padEnd(12)}${h.available ? 'available' : `unavailable: ${h.reason ?? 'unknown'}`} (since ${h.since})`)] : []),
          `Capacity:     ${formatBytes(p.usage.totalBytes)}`,
          `Used:         ${formatBytes(p.usage.usedBytes)}`,
          `Free:         ${formatBytes(p.usage.freeBytes)}`,
          `Volumes:      ${p.usage.volumes} (allocated ${formatBytes(p.usage.allocatedBytes)}, provisioned ${formatBytes(p.usage.provisionedBytes)}, overcommit ×${p.usage.overcommit})`,
          `Created:      ${p.createdAt}`,
        ].join('\n'),
      );
    });
  storage
    .command('create <name>')
    .description('create a pool, e.g. `storage create fast --type dir --path /srv/fast`, or `storage create nfs1 --path /mnt/nfs1 --shared`')
    .addOption(new Option('--type <type>', 'pool type').choices(['dir']).default('dir'))
    .requiredOption('--path <path>', 'directory (created if missing)')
    .option('--shared', 'storage every host of the cluster mounts at this path (NFS, CephFS…): one pool for all hosts')
    .option('--description <text>')
    .action(async (name: string, o: { type: string; path: string; shared?: boolean; description?: string }) => {
      const body: Record<string, unknown> = { name, type: o.type, path: resolve(o.path) };
      if (o.shared) body.shared = true;
      if (o.description) body.description = o.description;
      const { pool: p } = await api().request<{ pool: PoolView }>('POST', '/api/v1/storage/pools', body);
      console.log(`${p.shared ? 'shared ' : ''}pool ${p.name} created (${p.type} ${p.path}, ${formatBytes(p.usage.freeBytes)} free)`);
    });
  storage
    .command('delete <name>')
    .description('delete an empty pool (its directory stays)')
    .action(async (name: string) => {
      await api().request('DELETE', `/api/v1/storage/pools/${enc(name)}`);
      console.log(`pool ${name} deleted`);
    });

  // ---- volumes ---------------------------------------------------------------------------------
  const volume = ctx.program.command('volume').description('storage volumes (POOL/NAME)');
  volume
    .command('create <ref>')
    .description('create a volume, e.g. `volume create default/data1 --size 1G`')
    .requiredOption('--size <size>', 'virtual size, e.g. 512M or 10G')
    .addOption(new Option('--format <fmt>', 'qcow2 (thin, snapshots) or raw').choices(['qcow2', 'raw']).default('qcow2'))
    .option('--description <text>')
    .action(async (ref: string, o: { size: string; format: string; description?: string }) => {
      const [pool, name] = splitRef(ref);
      const body: Record<string, unknown> = { name, size: o.size, format: o.format };
      if (o.description) body.description = o.description;
      const { volume: v } = await api().request<{ volume: VolumeView }>('POST', `/api/v1/storage/pools/${enc(pool)}/volumes`, body);
      console.log(`volume ${v.ref} created (${v.format}, ${formatBytes(v.sizeBytes)})`);
    });
  volume
    .command('list [pool]')
    .alias('ls')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (pool: string | undefined, o: { format: string }) => {
      const { volumes } = await api().request<{ volumes: VolumeView[] }>('GET', `/api/v1/storage/volumes${pool ? `?pool=${enc(pool)}` : ''}`);
      ctx.print(volumes, o.format, () =>
        table(
          ['VOLUME', 'FORMAT', 'SIZE', 'ALLOCATED', 'ATTACHED TO'],
          volumes.map((v) => [v.ref, v.format, formatBytes(v.sizeBytes), formatBytes(v.allocatedBytes), v.attachedTo ? `${v.attachedTo.instance} (${v.attachedTo.disk})` : '-']),
        ),
      );
    });
  volume
    .command('info <ref>')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (ref: string, o: { format: string }) => {
      const [pool, name] = splitRef(ref);
      const { volume: v } = await api().request<{ volume: VolumeView }>('GET', `/api/v1/storage/pools/${enc(pool)}/volumes/${enc(name)}`);
      ctx.print(v, o.format, () =>
        [
          `Volume:      ${v.ref}`,
          `Format:      ${v.format}`,
          `Size:        ${formatBytes(v.sizeBytes)}`,
          `Allocated:   ${formatBytes(v.allocatedBytes)}`,
          `Path:        ${v.path}`,
          `Attached to: ${v.attachedTo ? `${v.attachedTo.instance} (disk ${v.attachedTo.disk})` : '-'}`,
          `Created:     ${v.createdAt}`,
        ].join('\n'),
      );
    });
  volume
    .command('resize <ref> <size>')
    .description('grow a volume (live when its VM runs)')
    .action(async (ref: string, size: string) => {
      const [pool, name] = splitRef(ref);
      const { volume: v } = await api().request<{ volume: VolumeView }>('POST', `/api/v1/storage/pools/${enc(pool)}/volumes/${enc(name)}/resize`, { size });
      console.log(`volume ${v.ref} is now ${formatBytes(v.sizeBytes)}${v.attachedTo ? ` (${v.attachedTo.instance} sees it)` : ''}`);
    });
  volume
    .command('delete <ref>')
    .alias('rm')
    .description('delete a volume (refused while attached)')
    .action(async (ref: string) => {
      const [pool, name] = splitRef(ref);
      await api().request('DELETE', `/api/v1/storage/pools/${enc(pool)}/volumes/${enc(name)}`);
      console.log(`volume ${ref} deleted`);
    });
  volume
    .command('attach <instance> <ref>')
    .description('attach a volume (hot-plugged when the VM runs)')
    .option('--as <disk>', 'disk name inside the instance (default: the volume name)')
    .action(async (instance: string, ref: string, o: { as?: string }) => {
      splitRef(ref);
      const body: Record<string, unknown> = { volume: ref };
      if (o.as) body.disk = o.as;
      const r = await api().request<{ disk: { name: string }; live: boolean }>('POST', `/api/v1/instances/${enc(instance)}/volumes`, body);
      console.log(`volume ${ref} attached to ${instance} as disk ${r.disk.name}${r.live ? ' (hot-plugged)' : ''}`);
    });
  volume
    .command('detach <instance> <ref>')
    .description('detach a volume (hot-unplugged when the VM runs)')
    .action(async (instance: string, ref: string) => {
      const [pool, name] = splitRef(ref);
      const r = await api().request<{ live: boolean }>('DELETE', `/api/v1/instances/${enc(instance)}/volumes/${enc(pool)}/${enc(name)}`);
      console.log(`volume ${ref} detached from ${instance}${r.live ? ' (hot-unplugged)' : ''}`);
    });

  // ---- image import ------------------------------------------------------------------------------
  const image = ctx.program.commands.find((c: Command) => c.name() === 'image') ?? ctx.program.command('image').description('images');
  image
    .command('import <source>')
    .description('import a disk image (qcow2, raw, vmdk, vhd, vhdx, vdi) or an OVA from a file or an http(s) URL')
    .requiredOption('--name <name>', 'image name')
    .addOption(new Option('--format <fmt>', 'source format (default: detected)').choices(['qcow2', 'raw', 'vmdk', 'vhd', 'vhdx', 'vdi', 'ova']))
    .option('--pool <pool>', 'storage pool to keep it in', 'default')
    .option('--description <text>')
    .option('--instance <name>', 'also create a stopped VM from it (OVA: with the OVF\'s CPUs, memory and disks)')
    .option('--cpus <n>', 'default vCPUs of VMs made from it', (v) => Number(v))
    .option('--memory <size>', 'default memory of VMs made from it')
    .option('--kernel <path>', 'boot VMs made from it with this kernel (with --initrd, --cmdline)')
    .option('--initrd <path>')
    .option('--cmdline <text>')
    .option('--uefi', 'boot from disk with UEFI firmware')
    .option('--no-wait', 'return once the import is queued')
    .action(async (source: string, o: { name: string; format?: string; pool: string; description?: string; instance?: string; cpus?: number; memory?: string; kernel?: string; initrd?: string; cmdline?: string; uefi?: boolean; wait?: boolean }) => {
      const body: Record<string, unknown> = { name: o.name, source: /^https?:\/\//i.test(source) ? source : resolve(source), pool: o.pool };
      if (o.format) body.format = o.format;
      if (o.description) body.description = o.description;
      if (o.instance) body.instance = o.instance;
      if (o.cpus !== undefined) body.vcpus = o.cpus;
      if (o.memory) body.memory = o.memory;
      if (o.kernel) body.boot = { kind: 'kernel', kernel: resolve(o.kernel), ...(o.initrd ? { initrd: resolve(o.initrd) } : {}), cmdline: o.cmdline ?? '' };
      else if (o.uefi) body.boot = { kind: 'disk', firmware: 'uefi' };
      const { operation } = await api().request<{ operation: Operation }>('POST', '/api/v1/images/import', body);
      const done = await ctx.follow(operation, { wait: o.wait });
      if (done.status !== 'success') return;
      const r = done.result as { sizeBytes: number; sha256: Record<string, string>; instance?: string };
      console.log(`image ${o.name} imported (${formatBytes(r.sizeBytes)}, sha256 ${r.sha256['disk.qcow2']?.slice(0, 16)}…)${r.instance ? `; instance ${r.instance} created` : ''}`);
      for (const m of done.messages) console.log(`  ${m.text}`);
    });

  // ---- export, publish, copy ------------------------------------------------------------------------
  ctx.program
    .command('export <instance> <file>')
    .description("write a stopped VM's disk to a file (qcow2, raw or vmdk)")
    .addOption(new Option('--format <fmt>', 'output format').choices(['qcow2', 'raw', 'vmdk']).default('qcow2'))
    .option('--disk <name>', 'which disk (default: the first)')
    .action(async (instance: string, file: string, o: { format: string; disk?: string }) => {
      const body: Record<string, unknown> = { file: resolve(file), format: o.format };
      if (o.disk) body.disk = o.disk;
      const { operation } = await api().request<{ operation: Operation }>('POST', `/api/v1/instances/${enc(instance)}/export`, body);
      const done = await ctx.follow(operation);
      const r = done.result as { file: string; sizeBytes: number; sha256: string };
      console.log(`exported ${instance} to ${r.file} (${o.format}, ${formatBytes(r.sizeBytes)}, sha256 ${r.sha256})`);
    });
  ctx.program
    .command('publish <instance>')
    .description("turn a stopped VM's disk into a read-only image (a template)")
    .requiredOption('--as <image>', 'name of the new image')
    .option('--description <text>')
    .action(async (instance: string, o: { as: string; description?: string }) => {
      const body: Record<string, unknown> = { as: o.as };
      if (o.description) body.description = o.description;
      const { operation } = await api().request<{ operation: Operation }>('POST', `/api/v1/instances/${enc(instance)}/publish`, body);
      const done = await ctx.follow(operation);
      const r = done.result as { sizeBytes: number };
      console.log(`image ${o.as} published from ${instance} (${formatBytes(r.sizeBytes)})`);
    });
  ctx.program
    .command('copy <source> <destination>')
    .alias('cp')
    .description('copy an instance: a stopped VM in full, or --linked (a qcow2 delta on the same image); a container (frozen while copied if it runs)')
    .option('--linked', 'share the image through a qcow2 backing file (fast, small)')
    .action(async (source: string, destination: string, o: { linked?: boolean }) => {
      const { operation } = await api().request<{ operation: Operation }>('POST', `/api/v1/instances/${enc(source)}/copy`, { name: destination, linked: Boolean(o.linked) });
      await ctx.follow(operation);
      const { instance } = await api().request<{ instance: Instance }>('GET', `/api/v1/instances/${enc(destination)}`);
      console.log(`${o.linked ? 'linked ' : ''}copy ${instance.name} of ${source} created (${instance.state})`);
    });

  // ---- snapshots ----------------------------------------------------------------------------------
  const snapshot = ctx.program.command('snapshot').description('instance snapshots');
  snapshot
    .command('create <instance> <name>')
    .description('take a snapshot; --memory also saves RAM and device state of a running VM')
    .option('--memory', 'include memory: revert returns to the running moment')
    .option('--description <text>')
    .action(async (instance: string, name: string, o: { memory?: boolean; description?: string }) => {
      const body: Record<string, unknown> = { name, memory: Boolean(o.memory) };
      if (o.description) body.description = o.description;
      const { operation } = await api().request<{ operation: Operation }>('POST', `/api/v1/instances/${enc(instance)}/snapshots`, body);
      await ctx.follow(operation);
      console.log(`snapshot ${name} of ${instance} created${o.memory ? ' (with memory)' : ''}`);
    });
  snapshot
    .command('list <instance>')
    .alias('ls')
    .description('the snapshot tree')
    .option('--format <fmt>', 'tree or json', 'tree')
    .action(async (instance: string, o: { format: string }) => {
      const r = await api().request<SnapshotListing>('GET', `/api/v1/instances/${enc(instance)}/snapshots`);
      ctx.print(r, o.format, () => (r.text.length ? r.text.join('\n') : `${instance} has no snapshots`));
    });
  snapshot
    .command('info <instance> <name>')
    .action(async (instance: string, name: string) => {
      const { snapshot: s } = await api().request<{ snapshot: SnapshotRecord }>('GET', `/api/v1/instances/${enc(instance)}/snapshots/${enc(name)}`);
      console.log(JSON.stringify(s, null, 2));
    });
  snapshot
    .command('revert <instance> <name>')
    .description('go back to a snapshot (a disk-only revert restarts a running VM)')
    .action(async (instance: string, name: string) => {
      const { operation } = await api().request<{ operation: Operation }>('POST', `/api/v1/instances/${enc(instance)}/snapshots/${enc(name)}/revert`);
      await ctx.follow(operation);
      console.log(`${instance} reverted to ${name}`);
    });
  snapshot
    .command('delete <instance> <name>')
    .alias('rm')
    .action(async (instance: string, name: string) => {
      const { operation } = await api().request<{ operation: Operation }>('DELETE', `/api/v1/instances/${enc(instance)}/snapshots/${enc(name)}`);
      await ctx.follow(operation);
      console.log(`snapshot ${name} of ${instance} deleted`);
    });
}
