// Helpers for the storage integration tests: run a shell command in the tiny guest through its
// serial console (the websocket) and read its output; wait for the Nth boot of a guest.
import type { ApiClient } from '../../src/cli/client.js';

let seq = Math.floor(Math.random() * 100_000);

/**
 * Runs `command` in the guest's console shell and resolves with what it printed. The markers
 * are computed by the guest's shell ($((n+1))), so the echoed command line never matches them.
 */
export async function guestSh(api: ApiClient, name: string, command: string, timeoutMs = 60_000): Promise<string> {
  const n = ++seq * 10;
  const begin = `HFB-${n + 1}`;
  const end = `HFE-${n + 1}`;
  const ws = api.websocket(`/api/v1/instances/${name}/console`);
  let got = '';
  try {
    return await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no answer to "${command}" from ${name} within ${timeoutMs} ms; got: ${got.slice(-800)}`)), timeoutMs);
      ws.on('open', () => ws.send(`echo HFB-$((${n}+1)); ${command}${/&\s*$/.test(command) ? '' : ';'} echo HFE-$((${n}+1))\n`));
      ws.on('message', (b: Buffer) => {
        got += b.toString();
        const m = new RegExp(`${begin}\\r?\\n([\\s\\S]*?)${end}`).exec(got);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]!.replace(/\r/g, ''));
        }
      });
      ws.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  } finally {
    ws.close();
  }
}

/** Waits until the console log shows the ready marker `count` times (boots are appended). */
export async function waitForBoot(api: ApiClient, name: string, count = 1, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let text = '';
  while (Date.now() < deadline) {
    text = await api.request<string>('GET', `/api/v1/instances/${name}/console/log?bytes=1048576`);
    if ((text.match(/^HYPERFOLD-GUEST-READY/gm) ?? []).length >= count) return;
    await new Promise((r) => setTimeout(r, 300));
  }
  throw new Error(`${name} did not reach boot #${count} within ${timeoutMs} ms; tail:\n${text.slice(-1500)}`);
}
