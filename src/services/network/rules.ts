// Per-instance firewalls and host port forwards. Both are records in the store that the one
// nftables ruleset is rebuilt from: a change writes the record, rebuilds the ruleset, and when
// the kernel refuses it the undo puts the record back and rebuilds again.
import { HfError, isHfError } from '../../core/errors.js';
import { parseInput } from '../../core/validate.js';
import { parseFirewallRule } from '../../network/firewall.js';
import { addFirewallRuleSchema, createForwardSchema, firewallPolicySchema, type Firewall, type Forward } from '../../network/model.js';
import { UndoStack } from '../../util/undo.js';
import { LOCK, type NetContext } from './context.js';

export class RuleService {
  constructor(private readonly c: NetContext) {}

  // ---- firewall ------------------------------------------------------------------------------

  async firewall(instance: string): Promise<Firewall> {
    await this.c.instances.get(instance);
    return (await this.c.firewalls.get(instance))?.value ?? { instance, inbound: 'allow', rules: [] };
  }

  async addFirewallRule(instance: string, body: unknown): Promise<Firewall> {
    const req = parseInput(addFirewallRuleSchema, body);
    const rule = parseFirewallRule(req);
    return this.changeFirewall(instance, (fw) => {
      const rules = [...fw.rules];
      const pos = req.position === undefined ? rules.length : Math.min(req.position, rules.length);
      rules.splice(pos, 0, rule);
      return { ...fw, rules };
    });
  }

  async removeFirewallRule(instance: string, index: number): Promise<Firewall> {
    return this.changeFirewall(instance, (fw) => {
      if (!Number.isInteger(index) || index < 0 || index >= fw.rules.length) {
        throw new HfError('HF_ERR_NOT_FOUND', `instance ${instance} has no firewall rule ${index} (it has ${fw.rules.length}; they are numbered from 0)`);
      }
      return { ...fw, rules: fw.rules.filter((_, i) => i !== index) };
    });
  }

  async setFirewallPolicy(instance: string, body: unknown): Promise<Firewall> {
    const { inbound } = parseInput(firewallPolicySchema, body);
    return this.changeFirewall(instance, (fw) => ({ ...fw, inbound }));
  }

  private async changeFirewall(instance: string, fn: (fw: Firewall) => Firewall): Promise<Firewall> {
    const c = this.c;
    await c.instances.get(instance);
    const next = await c.lock.run(LOCK, 'firewall', () =>
      UndoStack.run(async (undo) => {
        const prev = await c.firewalls.get(instance);
        const fw = fn(prev?.value ?? { instance, inbound: 'allow', rules: [] });
        if (prev) {
          const written = await c.firewalls.replace(instance, fw, prev.revision);
          undo.add('restore the firewall', async () => {
            await c.firewalls.replace(instance, prev.value, written.revision);
            await c.applyLocked();
          });
        } else {
          const written = await c.firewalls.create(instance, fw);
          undo.add('remove the firewall', async () => {
            await c.firewalls.delete(instance, written.revision);
            await c.applyLocked();
          });
        }
        await c.applyLocked();
        return fw;
      }, c.d.log),
    );
    c.d.events.publish('instance.firewall', { name: instance, inbound: next.inbound, rules: next.rules.length });
    return next;
  }

  // ---- port forwards -------------------------------------------------------------------------

  async listForwards(instance?: string): Promise<Forward[]> {
    return (await this.c.forwards.list()).map((v) => v.value).filter((f) => !instance || f.instance === instance);
  }

  async addForward(body: unknown): Promise<Forward> {
    const c = this.c;
    const req = parseInput(createForwardSchema, body);
    const inst = await c.instances.get(req.instance);
    const nets = new Map((await c.networks.list()).map((v) => [v.value.name, v.value]));
    const nic = req.nic
      ? inst.config.nics.find((n) => n.name === req.nic)
      : inst.config.nics.find((n) => nets.get(n.network)?.mode !== 'bridged' && n.ip);
    if (!nic) throw new HfError('HF_ERR_VALIDATION', req.nic ? `instance ${inst.name} has no NIC named ${req.nic}` : `instance ${inst.name} has no NIC on a Hyperfold-managed (nat or isolated) network to forward to`);
    if (!nic.ip || nets.get(nic.network)?.mode === 'bridged') throw new HfError('HF_ERR_VALIDATION', `NIC ${nic.name} of ${inst.name} is on a bridged network: its address is not managed here`);
    if (await c.d.host.localPortInUse(req.protocol, req.hostPort)) {
      throw new HfError('HF_ERR_ADDRESS_IN_USE', `${req.protocol} port ${req.hostPort} is in use by a service on this host`);
    }
    const f: Forward = { protocol: req.protocol, hostPort: req.hostPort, instance: inst.name, nic: nic.name, port: req.port, createdAt: new Date().toISOString() };
    const key = c.forwardKey(f);
    await c.lock.run(LOCK, 'forward add', () =>
      UndoStack.run(async (undo) => {
        let written: number;
        try {
          written = (await c.forwards.create(key, f)).revision;
        } catch (e) {
          if (!isHfError(e, 'HF_ERR_ALREADY_EXISTS')) throw e;
          const cur = (await c.forwards.get(key))?.value;
          throw new HfError('HF_ERR_ADDRESS_IN_USE', `${f.protocol} port ${f.hostPort} is already forwarded${cur ? ` to ${cur.instance}:${cur.port}` : ''}`);
        }
        undo.add(`remove the forward of ${key}`, async () => {
          await c.forwards.delete(key, written);
          await c.applyLocked();
        });
        await c.applyLocked();
      }, c.d.log),
    );
    c.d.events.publish('network.forward', { action: 'add', ...f });
    return f;
  }

  async removeForward(protocol: string, hostPort: number): Promise<void> {
    const c = this.c;
    await c.lock.run(LOCK, 'forward remove', async () => {
      const key = `${protocol}-${hostPort}`;
      if (!(await c.forwards.get(key).catch(() => undefined))) throw new HfError('HF_ERR_NOT_FOUND', `no ${protocol} forward on host port ${hostPort}`);
      await c.forwards.delete(key);
      await c.applyLocked();
    });
    c.d.events.publish('network.forward', { action: 'remove', protocol, hostPort });
  }
}
