// `hyperfold cluster …`: init, token, join, list, remove, backup.
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { formatMiB } from '../../core/units.js';
import type { HostView } from '../../core/model/cluster.js';
import type { CliContext } from '../context.js';
import { table } from '../format.js';

interface ClusterStatus {
  clustered: boolean;
  host: string;
  cluster?: { clusterId: string; name: string };
  address?: string;
  etcd?: { endpoints: string[]; managed: boolean; member: boolean; space?: { level: string; space?: { dbSizeBytes: number; quotaBytes: number } } };
}

/** `12.3 MiB of 512 MiB (2%), ok` */
function describeSpace(s: NonNullable<NonNullable<ClusterStatus['etcd']>['space']>): string {
  if (!s.space) return `not measured yet (${s.level})`;
  const mib = (b: number) => `${(b / 1024 ** 2).toFixed(1)} MiB`;
  return `${mib(s.space.dbSizeBytes)} of ${mib(s.space.quotaBytes)} (${Math.round((100 * s.space.dbSizeBytes) / s.space.quotaBytes)}%), ${s.level}`;
}

function ago(iso: string | undefined): string {
  if (!iso) return '-';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return s < 120 ? `${s}s ago` : `${Math.round(s / 60)}m ago`;
}

export function registerClusterCommands(ctx: CliContext): void {
  const cluster = ctx.program.command('cluster').description('several hosts as one: membership, tokens, etcd');

  /** Init and join restart the daemon: wait until it answers again as a member. */
  const waitClustered = async (deadlineMs = 120_000): Promise<ClusterStatus> => {
    const until = Date.now() + deadlineMs;
    let last = '';
    for (;;) {
      try {
        const { cluster: st } = await ctx.client().request<{ cluster: ClusterStatus }>('GET', '/api/v1/cluster');
        if (st.clustered) return st;
      } catch (e) {
        last = (e as Error).message; // the daemon is restarting
      }
      if (Date.now() > until) throw new Error(`the daemon did not come back as a cluster member within ${deadlineMs / 1000} s${last ? ` (${last})` : ''}: see its log`);
      await new Promise((r) => setTimeout(r, 250));
    }
  };

  cluster
    .command('init')
    .description('make this host a one-member cluster (starts etcd here, moves the state into it; guests keep running)')
    .option('--name <name>', 'cluster name', 'hyperfold')
    .option('--address <ip>', 'address the other hosts reach this one at (default: the listen address)')
    .option('--lease-ttl <seconds>', 'heartbeat TTL: a host silent this long is offline', (v) => Number(v))
    .option('--etcd <urls>', "use an etcd you run (comma-separated https URLs) instead of starting one")
    .option('--etcd-ca <file>', 'CA of that etcd')
    .option('--etcd-cert <file>', 'client certificate for that etcd')
    .option('--etcd-key <file>', 'client key for that etcd')
    .action(async (o: { name: string; address?: string; leaseTtl?: number; etcd?: string; etcdCa?: string; etcdCert?: string; etcdKey?: string }) => {
      const body: Record<string, unknown> = { name: o.name };
      if (o.address) body.address = o.address;
      if (o.leaseTtl) body.leaseTtl = o.leaseTtl;
      if (o.etcd) {
        if (!o.etcdCa || !o.etcdCert || !o.etcdKey) throw new Error('--etcd needs --etcd-ca, --etcd-cert and --etcd-key');
        body.etcd = { endpoints: o.etcd.split(',').map((s) => s.trim()), ca: resolve(o.etcdCa), cert: resolve(o.etcdCert), key: resolve(o.etcdKey) };
      }
      await ctx.client().request('POST', '/api/v1/cluster/init', body);
      const st = await waitClustered();
      console.log(`Cluster ${st.cluster?.name} initialised; this host is ${st.host} (${st.address}).`);
      console.log('Add a host: `hyperfold cluster token` here, then on the new host: `hyperfold cluster join https://' + st.address + ':8444 --token TOKEN`');
    });

  cluster
    .command('token')
    .description('print a single-use join token')
    .option('--ttl <seconds>', 'how long it is valid', (v) => Number(v), 3600)
    .action(async (o: { ttl: number }) => {
      const out = await ctx.client().request<{ token: string; expiresAt: string }>('POST', '/api/v1/cluster/tokens', { ttl: o.ttl });
      console.log(out.token);
      process.stderr.write(`(single use, expires ${out.expiresAt})\n`);
    });

  cluster
    .command('join <url>')
    .description('join this host to the cluster of the member at URL (https://HOST:8444)')
    .requiredOption('--token <token>', 'join token from `hyperfold cluster token` (or @FILE)')
    .option('--address <ip>', 'address the other hosts reach this one at (default: the listen address)')
    .action(async (url: string, o: { token: string; address?: string }) => {
      const token = o.token.startsWith('@') ? (await readFile(o.token.slice(1), 'utf8')).trim() : o.token;
      await ctx.client().request('POST', '/api/v1/cluster/join', { url, token, ...(o.address ? { address: o.address } : {}) });
      const st = await waitClustered();
      console.log(`Joined cluster ${st.cluster?.name} as ${st.host}${st.etcd?.member ? ' (runs an etcd member)' : ''}.`);
    });

  cluster
    .command('list')
    .alias('ls')
    .description('every host: state, address, CPUs and memory, instances, versions, last heartbeat')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (o: { format: string }) => {
      const { members } = await ctx.client().request<{ members: HostView[] }>('GET', '/api/v1/cluster/members');
      ctx.print(members, o.format, () =>
        table(
          ['HOST', 'STATE', 'ADDRESS', 'ETCD', 'CPUS (ALLOC)', 'MEMORY (ALLOC / USED)', 'INSTANCES', 'VERSION', 'QEMU', 'HEARTBEAT'],
          members.map((m) => [
            m.name,
            m.state,
            m.address,
            m.etcdMember ? 'member' : 'client',
            `${m.cpus} (${m.allocated.vcpus})`,
            `${formatMiB(m.memoryMiB)} (${formatMiB(m.allocated.memoryMiB)} / ${m.memoryUsedMiB === undefined ? '-' : formatMiB(m.memoryUsedMiB)})`,
            String(m.instances),
            m.version,
            m.qemuVersion ?? '-',
            ago(m.lastHeartbeat),
          ]),
        ),
      );
    });

  cluster
    .command('remove <host>')
    .description('remove a host from the cluster (refused while it holds instances)')
    .option('--force', 'remove it even though instances are recorded on it')
    .action(async (host: string, o: { force?: boolean }) => {
      await ctx.client().request('DELETE', `/api/v1/cluster/members/${encodeURIComponent(host)}${o.force ? '?force=true' : ''}`);
      console.log(`host ${host} removed`);
    });

  cluster
    .command('status')
    .description('whether this host is in a cluster, and how it reaches etcd')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (o: { format: string }) => {
      const { cluster: st } = await ctx.client().request<{ cluster: ClusterStatus }>('GET', '/api/v1/cluster');
      ctx.print(st, o.format, () =>
        st.clustered
          ? [`Cluster: ${st.cluster?.name} (${st.cluster?.clusterId})`, `Host:    ${st.host} (${st.address})`, `etcd:    ${st.etcd?.endpoints.join(', ')}${st.etcd?.managed ? '' : ' (yours)'}${st.etcd?.member ? '; a member runs here' : ''}`,
              ...(st.etcd?.space ? [`Space:   ${describeSpace(st.etcd.space)}`] : []),
            ].join('\n')
          : `Host ${st.host} is not in a cluster.`,
      );
    });

  cluster
    .command('backup <file>')
    .description("write an etcd snapshot of the cluster's state to FILE on the daemon's host (restore: docs/cluster.md)")
    .action(async (file: string) => {
      const out = await ctx.client().request<{ file: string; bytes: number }>('POST', '/api/v1/cluster/backup', { file: resolve(file) });
      console.log(`snapshot written: ${out.file} (${out.bytes} bytes)`);
    });
}
