// Internal (qcow2) snapshots of a running VM over QMP.
//  - disk-only: one `transaction` of blockdev-snapshot-internal-sync actions, so every disk is
//    captured at the same instant (crash-consistent; the guest keeps running);
//  - with memory: QEMU's snapshot-save / snapshot-load jobs (RAM and device state go into the
//    vmstate disk's image), so a revert returns to the exact running moment;
//  - delete: a snapshot-delete job (works for both kinds).
// Job progress is polled from query-jobs and reported as 0-100.
import { randomUUID } from 'node:crypto';
import { diskIds } from './argv.js';
import type { QmpClient } from './qmp/client.js';
import { Qmp } from './qmp/commands.js';

export const SNAPSHOT_JOB_TIMEOUT_MS = 10 * 60_000;

export async function snapshotDisksLive(client: QmpClient, tag: string, diskNames: string[]): Promise<void> {
  const actions = diskNames.map((d) => ({ type: 'blockdev-snapshot-internal-sync', data: { device: diskIds(d).formatNode, name: tag } }));
  await client.run('transaction', { actions }, { timeoutMs: 60_000 });
}

async function runJob(client: QmpClient, jobId: string, start: (qmp: Qmp) => Promise<void>, progress?: (percent: number) => void): Promise<void> {
  const qmp = new Qmp(client);
  await start(qmp);
  const timer = progress
    ? setInterval(() => {
        void qmp
          .queryJobs()
          .then((jobs) => {
            const j = jobs.find((x) => x.id === jobId);
            if (j && j['total-progress'] > 0) progress(Math.min(100, (j['current-progress'] / j['total-progress']) * 100));
          })
          .catch(() => undefined);
      }, 250)
    : undefined;
  try {
    await qmp.waitForJob(jobId, SNAPSHOT_JOB_TIMEOUT_MS);
  } finally {
    if (timer) clearInterval(timer);
  }
}

export async function saveSnapshotLive(client: QmpClient, tag: string, vmstateDisk: string, diskNames: string[], progress?: (p: number) => void): Promise<void> {
  const jobId = `hf-save-${randomUUID().slice(0, 8)}`;
  const devices = diskNames.map((d) => diskIds(d).formatNode);
  await runJob(client, jobId, (q) => q.snapshotSave({ jobId, tag, vmstate: diskIds(vmstateDisk).formatNode, devices }), progress);
}

export async function loadSnapshotLive(client: QmpClient, tag: string, vmstateDisk: string, diskNames: string[], progress?: (p: number) => void): Promise<void> {
  const jobId = `hf-load-${randomUUID().slice(0, 8)}`;
  const devices = diskNames.map((d) => diskIds(d).formatNode);
  await runJob(client, jobId, (q) => q.snapshotLoad({ jobId, tag, vmstate: diskIds(vmstateDisk).formatNode, devices }), progress);
}

export async function deleteSnapshotLive(client: QmpClient, tag: string, diskNames: string[]): Promise<void> {
  const jobId = `hf-del-${randomUUID().slice(0, 8)}`;
  const devices = diskNames.map((d) => diskIds(d).formatNode);
  await runJob(client, jobId, (q) => q.snapshotDelete({ jobId, tag, devices }));
}
