// Instance verbs: launch, create, list, info, start/stop/restart/pause/resume, delete, console.
import { Option, type Command } from 'commander';
import { formatVmLiveInfo, isVmLiveInfo } from '../../core/live-plan.js';
import type { Instance } from '../../core/model/instance.js';
import type { Operation } from '../../core/model/operation.js';
import { formatMiB } from '../../core/units.js';
import { ApiError } from '../client.js';
import type { CliContext } from '../context.js';
import { table } from '../format.js';

export function registerInstanceCommands(ctx: CliContext): void {
// ---- instances -----------------------------------------------------------------------------
  
  function instanceOptions(cmd: Command): Command {
    return cmd
      .option('--cpus <n>', 'vCPUs', (v) => Number(v))
      .option('--max-cpus <n>', 'vCPU ceiling for hot-plug', (v) => Number(v))
      .option('--memory <size>', 'memory, e.g. 256M or 1G')
      .option('--max-memory <size>', 'memory ceiling for hot-plug')
      .option('--disk <name=size>', 'add a blank disk (repeatable), e.g. data=1G', (v: string, acc: string[]) => [...acc, v], [])
      .option('--storage <pool>', 'VMs: keep the disks (root and --disk) in this storage pool (a shared pool: on storage every host reaches)')
      .addOption(new Option('--accel <accel>', 'accelerator').choices(['auto', 'kvm', 'tcg']))
      .addOption(new Option('--devices <model>', 'device model: virtio (paravirtual) or emulated (e1000, IDE)').choices(['virtio', 'emulated']))
      .addOption(new Option('--restart-policy <policy>', 'what happens when it stops by itself').choices(['never', 'on-failure', 'always']))
      .option('--autostart', 'start when the host boots')
      .option('--description <text>', 'free text')
      .option('--kernel <path>', 'boot this kernel directly (with --initrd, --cmdline)')
      .option('--initrd <path>')
      .option('--cmdline <text>')
      .option('--format <fmt>', 'output format: table or json', 'table')
      .option('--container', 'a system container (runc) instead of a VM; --cpus may be a fraction, e.g. 0.5')
      .option('--privileged', 'containers: no user namespace (root inside is root on the host)')
      .option('--pids-limit <n>', 'containers: maximum number of processes', (v) => Number(v))
      .option('--network <name>', 'attach a NIC on this network (repeatable: one NIC each)', (v: string, acc: string[]) => [...acc, v], [])
      .option('--ip <ip>', 'reserve this address for the NIC of the --network at the same position (repeatable)', (v: string, acc: string[]) => [...acc, v], [])
      .option('--target <host>', 'create it on this host (default: the host placement picks)')
      .option('--group <name>', 'placement group: its instances prefer different hosts')
      .option('--spread', 'with --group: never on a host that already holds an instance of the group');
  }
  
  interface InstanceOpts {
    cpus?: number;
    maxCpus?: number;
    memory?: string;
    maxMemory?: string;
    disk: string[];
    storage?: string;
    accel?: string;
    devices?: string;
    restartPolicy?: string;
    autostart?: boolean;
    description?: string;
    kernel?: string;
    initrd?: string;
    cmdline?: string;
    format?: string;
    wait?: boolean;
    container?: boolean;
    privileged?: boolean;
    pidsLimit?: number;
    network: string[];
    ip: string[];
    target?: string;
    group?: string;
    spread?: boolean;
  }
  
  function createBody(image: string | undefined, name: string, o: InstanceOpts, start: boolean): Record<string, unknown> {
    const body: Record<string, unknown> = { name, start };
    if (image && image !== 'none') body.image = image;
    if (o.container) body.type = 'container';
    if (o.privileged) body.privileged = true;
    if (o.pidsLimit !== undefined) body.pidsLimit = o.pidsLimit;
    if (o.cpus !== undefined) body.vcpus = o.cpus;
    if (o.maxCpus !== undefined) body.maxVcpus = o.maxCpus;
    if (o.memory !== undefined) body.memory = o.memory;
    if (o.maxMemory !== undefined) body.maxMemory = o.maxMemory;
    if (o.accel) body.accel = o.accel;
    if (o.devices) body.devices = o.devices;
    if (o.restartPolicy) body.restartPolicy = o.restartPolicy;
    if (o.autostart) body.autostart = true;
    if (o.description) body.description = o.description;
    if (o.storage !== undefined) body.storage = o.storage;
    if (o.target !== undefined) body.target = o.target;
    if (o.group !== undefined) body.group = o.group;
    if (o.spread) body.spread = true;
    if (o.kernel) body.boot = { kind: 'kernel', kernel: o.kernel, initrd: o.initrd, cmdline: o.cmdline ?? '' };
    if (o.ip.length > o.network.length) throw new ApiError(400, 'HF_ERR_VALIDATION', 'each --ip belongs to a --network (give as many --network as --ip)');
    if (o.network.length) body.nics = o.network.map((network, i) => (o.ip[i] ? { network, ip: o.ip[i] } : { network }));
    if (o.disk.length) {
      body.disks = o.disk.map((d) => {
        const [n, size] = d.split('=');
        return { name: n, size };
      });
    }
    return body;
  }
  
  /** Addresses instances hold now (DHCP leases, containers' static addresses), by instance. */
  async function instanceIps(instance?: string): Promise<Map<string, Array<{ nic: string; ip: string; source?: string }>>> {
    const out = new Map<string, Array<{ nic: string; ip: string; source?: string }>>();
    try {
      const { addresses } = await ctx.client().request<{ addresses: Array<{ instance: string; nic: string; ip?: string; source?: string }> }>(
        'GET',
        `/api/v1/addresses${instance ? `?instance=${encodeURIComponent(instance)}` : ''}`,
      );
      for (const a of addresses) if (a.ip) out.set(a.instance, [...(out.get(a.instance) ?? []), { nic: a.nic, ip: a.ip, source: a.source }]);
    } catch {
      // networking unavailable: no addresses to show
    }
    return out;
  }

  async function createCommand(image: string, name: string, o: InstanceOpts, start: boolean): Promise<void> {
    const post = () => ctx.client().request<{ instance: Instance; operation?: Operation }>('POST', `/api/v1/instances${start && o.wait !== false ? '?wait=1' : ''}`, createBody(image, name, o, start));
    let res: { instance: Instance; operation?: Operation };
    try {
      res = await post();
    } catch (e) {
      // Right after `npm start` the built-in image may still be building: follow that, then go on.
      const building = e instanceof ApiError && e.code === 'HF_ERR_IMAGE_BUILDING' ? (e.details as { operation?: string } | undefined)?.operation : undefined;
      if (!building || o.wait === false) throw e;
      process.stderr.write(`image ${image} is being built (operation ${building}): waiting for it\n`);
      await ctx.follow((await ctx.client().request<{ operation: Operation }>('GET', `/api/v1/operations/${building}`)).operation);
      res = await post();
    }
    if (res.operation) await ctx.follow(res.operation, { wait: o.wait });
    const inst = (await ctx.client().request<{ instance: Instance }>('GET', `/api/v1/instances/${name}`)).instance;
    ctx.print(inst, o.format, () => `${start ? 'launched' : 'created'} ${inst.type} ${inst.name} (${inst.state})`);
  }
  
  instanceOptions(ctx.program.command('launch <image> <name>').description('create and start an instance from an image'))
    .option('--no-wait', 'return once the start operation is queued')
    .action((image: string, name: string, o: InstanceOpts) => createCommand(image, name, o, true));
  
  instanceOptions(ctx.program.command('create <image> <name>').description('create an instance without starting it')).action((image: string, name: string, o: InstanceOpts) =>
    createCommand(image, name, o, false),
  );
  
  ctx.program
    .command('list')
    .alias('ls')
    .description('list instances')
    .option('--format <fmt>', 'table or json', 'table')
    .option('--type <type>', 'vm or container')
    .action(async (o: { format: string; type?: string }) => {
      const { instances } = await ctx.client().request<{ instances: Instance[] }>('GET', `/api/v1/instances${o.type ? `?type=${o.type}` : ''}`);
      const ips = await instanceIps();
      ctx.print(instances, o.format, () =>
        table(
          ['NAME', 'TYPE', 'STATE', 'CPUS', 'MEMORY', 'IMAGE', 'HOST', 'PID', 'IPV4'],
          instances.map((i) => [i.name, i.type, i.state, String(i.config.vcpus), formatMiB(i.config.memoryMiB), i.image ?? '-', i.host, i.runtime ? String(i.runtime.pid) : '-', (ips.get(i.name) ?? []).map((a) => `${a.ip} (${a.nic})`).join(', ') || '-']),
        ),
      );
    });
  
  ctx.program
    .command('info <name>')
    .description('show an instance')
    .option('--format <fmt>', 'table or json', 'table')
    .action(async (name: string, o: { format: string }) => {
      const { instance: i, live } = await ctx.client().request<{ instance: Instance; live?: Record<string, unknown> }>('GET', `/api/v1/instances/${name}`);
      const ips = await instanceIps(name);
      ctx.print(i, o.format, () => {
        const c = i.config;
        const lines = [
          `Name:           ${i.name}`,
          `ID:             ${i.id}`,
          `Type:           ${i.type}`,
          `State:          ${i.state}${i.runtime ? ` (pid ${i.runtime.pid}, ${i.runtime.accel ?? ''}, since ${i.runtime.startedAt})` : ''}`,
          `Host:           ${i.host}`,
          ...(i.placement ? [`Placement:      ${placementLine(i.placement)}`] : []),
          `Image:          ${i.image ?? '-'}`,
          ...(i.storage ? [`Storage:        pool ${i.storage}`] : []),
          `vCPUs:          ${c.vcpus}${c.maxVcpus ? ` (max ${c.maxVcpus})` : ''}`,
          `Memory:         ${formatMiB(c.memoryMiB)}${c.maxMemoryMiB ? ` (max ${formatMiB(c.maxMemoryMiB)})` : ''}`,
          `Accelerator:    ${c.accel}`,
          `Devices:        ${c.devices}`,
          `Boot:           ${c.boot.kind === 'kernel' ? `kernel ${c.boot.kernel}` : `${c.boot.kind} (${c.boot.firmware})`}`,
          `Restart policy: ${c.restartPolicy}${i.restartCount ? ` (restarted ${i.restartCount}×)` : ''}`,
          `Autostart:      ${c.autostart ? 'yes' : 'no'}`,
          ...(i.type === 'container' ? [`Privileged:     ${c.privileged ? 'YES (no user namespace)' : 'no (user namespace)'}${c.pidsLimit ? `; process limit ${c.pidsLimit}` : ''}`] : []),
          `Disks:`,
          ...(c.disks.length ? c.disks.map((d) => `  ${d.name}: ${d.path} (${d.format}, ${d.media}${d.readonly ? ', read-only' : ''})`) : ['  (none)']),
          `NICs:`,
          ...(c.nics.length
            ? c.nics.map((n) => {
                const a = ips.get(i.name)?.find((x) => x.nic === n.name);
                return `  ${n.name}: ${n.network} ${n.mac}${a?.ip ? ` ${a.ip} (${a.source})` : n.ip ? ` ${n.ip} (reserved)` : ''}`;
              })
            : ['  (none)']),
        ];
        if (isVmLiveInfo(live)) lines.push('Live (from the hypervisor):', ...formatVmLiveInfo(live));
        const pend = Object.entries(i.pending);
        if (pend.length) lines.push('Pending (applies at next boot):', ...pend.map(([k, v]) => `  ${k} = ${JSON.stringify(v)}`));
        if (i.lastExit) lines.push(`Last exit:      ${i.lastExit.at} ${i.lastExit.clean ? 'clean' : 'unclean'}: ${i.lastExit.reason}`);
        return lines.join('\n');
      });
    });
  
  for (const action of ['start', 'stop', 'restart', 'pause', 'resume'] as const) {
    const cmd = ctx.program.command(`${action} <names...>`).description(`${action} instances`);
    if (action === 'stop' || action === 'restart') {
      cmd.option('-f, --force', 'kill instead of a graceful shutdown').option('--timeout <seconds>', 'graceful shutdown timeout before forcing', (v) => Number(v));
    }
    cmd.option('--no-wait', 'return once the operation is queued');
    cmd.action(async (names: string[], o: { force?: boolean; timeout?: number; wait?: boolean }) => {
      for (const name of names) {
        const body: Record<string, unknown> = {};
        if (o.force) body.force = true;
        if (o.timeout !== undefined) body.timeout = o.timeout;
        // ?wait=1: a quick action answers finished in this one round trip; a longer one is followed.
        const { operation } = await ctx.client().request<{ operation: Operation }>('POST', `/api/v1/instances/${name}/${action}${o.wait === false ? '' : '?wait=1'}`, body);
        await ctx.follow(operation, { wait: o.wait });
      }
    });
  }
  
  const config = ctx.program.command('config').description("an instance's configuration");
  config
    .command('set <name> <settings...>')
    .description('change settings, e.g. `config set web1 memory=1G cpus=2`; what cannot apply live is kept until the next start')
    .action(async (name: string, settings: string[]) => {
      const body: Record<string, unknown> = {};
      const keys: Record<string, string> = {
        cpus: 'vcpus', vcpus: 'vcpus', 'max-cpus': 'maxVcpus', memory: 'memory', 'max-memory': 'maxMemory',
        pids: 'pidsLimit', 'restart-policy': 'restartPolicy', autostart: 'autostart', description: 'description', accel: 'accel', devices: 'devices',
      };
      for (const s of settings) {
        const i = s.indexOf('=');
        if (i <= 0) throw new ApiError(400, 'HF_ERR_VALIDATION', `"${s}" is not key=value`);
        const k = s.slice(0, i);
        const v = s.slice(i + 1);
        const field = keys[k];
        if (!field) throw new ApiError(400, 'HF_ERR_VALIDATION', `unknown setting "${k}" (known: ${Object.keys(keys).join(', ')})`);
        if (field === 'vcpus' || field === 'maxVcpus' || field === 'pidsLimit') {
          const n = Number(v);
          if (!Number.isFinite(n)) throw new ApiError(400, 'HF_ERR_VALIDATION', `${k}: "${v}" is not a number`);
          body[field] = n;
        } else if (field === 'autostart') body[field] = v === 'true' || v === '1' || v === 'yes';
        else body[field] = v;
      }
      const r = await ctx.client().request<{ applied: string[]; pending: string[]; notes: string[] }>('PATCH', `/api/v1/instances/${name}`, body);
      if (r.applied.length) console.log(`applied now: ${r.applied.join(', ')}`);
      if (r.pending.length) console.log(`applies at next boot: ${r.pending.join(', ')}`);
      for (const n of r.notes ?? []) console.log(`note: ${n}`);
    });
  config
    .command('show <name>')
    .description('the configuration as JSON (with pending changes and live details)')
    .action(async (name: string) => {
      const r = await ctx.client().request<{ instance: Instance; live?: unknown }>('GET', `/api/v1/instances/${name}`);
      console.log(JSON.stringify({ config: r.instance.config, pending: r.instance.pending, live: r.live }, null, 2));
    });

  ctx.program
    .command('delete <names...>')
    .alias('rm')
    .description('delete instances (refused while running unless --force)')
    .option('-f, --force', 'stop it first if it runs')
    .action(async (names: string[], o: { force?: boolean }) => {
      for (const name of names) {
        const { operation } = await ctx.client().request<{ operation: Operation }>('DELETE', `/api/v1/instances/${name}${o.force ? '?force=true' : ''}`);
        await ctx.follow(operation);
      }
    });
  
  ctx.program
    .command('console <name>')
    .description('attach to the serial console (Ctrl-] to detach); --log prints the kept console output')
    .option('--log', 'print the bounded console log and exit')
    .option('--bytes <n>', 'with --log: how much of the end to print', (v) => Number(v))
    .action(async (name: string, o: { log?: boolean; bytes?: number }) => {
      if (o.log) {
        const text = await ctx.client().request<string>('GET', `/api/v1/instances/${name}/console/log${o.bytes ? `?bytes=${o.bytes}` : ''}`);
        process.stdout.write(text);
        return;
      }
      await interactiveConsole(name);
    });
  
  async function interactiveConsole(name: string): Promise<void> {
    // Fail early with the API's error when the instance is unknown or stopped.
    const { instance } = await ctx.client().request<{ instance: Instance }>('GET', `/api/v1/instances/${name}`);
    if (instance.state !== 'running' && instance.state !== 'paused') throw new ApiError(409, 'HF_ERR_INSTANCE_NOT_RUNNING', `instance "${name}" is ${instance.state}, not running`);
    const ws = ctx.client().websocket(`/api/v1/instances/${name}/console`);
    const stdin = process.stdin;
    await new Promise<void>((resolve, reject) => {
      ws.on('open', () => {
        if (stdin.isTTY) {
          stdin.setRawMode(true);
          process.stderr.write(`Connected to ${name}'s console. Press Ctrl-] to detach.\r\n`);
        }
        stdin.on('data', (d: Buffer) => {
          if (d.includes(0x1d)) {
            ws.close();
            return;
          }
          ws.send(d);
        });
        stdin.resume();
      });
      ws.on('message', (data: Buffer, isBinary: boolean) => {
        if (!isBinary && data.toString().startsWith('{"error"')) {
          const e = JSON.parse(data.toString()) as { error: { code: string; message: string } };
          reject(new ApiError(0, e.error.code, e.error.message));
          return;
        }
        process.stdout.write(data);
      });
      ws.on('close', () => {
        if (stdin.isTTY) stdin.setRawMode(false);
        stdin.pause();
        resolve();
      });
      ws.on('error', reject);
    });
  }
  
  
}

/** The `info` line of an instance's placement: its group (and spread), then why it went where it is. */
export function placementLine(p: NonNullable<Instance['placement']>): string {
  const parts: string[] = [];
  if (p.group !== undefined) parts.push(`group ${p.group}${p.spread ? ' (spread: one per host)' : ''}`);
  if (p.reason) parts.push(p.reason);
  return parts.join('; ') || '-';
}
