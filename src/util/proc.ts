// Process liveness from /proc. A dead orphan can stay a zombie for seconds on these hosts and
// still answers kill(pid, 0), so liveness is judged from /proc/PID/stat: missing or state Z
// (zombie) or X (dead) means gone. The start time (field 22) guards against PID reuse.
import { readFileSync } from 'node:fs';

export interface ProcStat {
  pid: number;
  comm: string;
  state: string;
  ppid: number;
  startTime: number;
}

export function readProcStat(pid: number): ProcStat | undefined {
  let raw: string;
  try {
    raw = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  return parseProcStat(raw);
}

/** Parses /proc/PID/stat. comm may contain spaces and parentheses, so split at the last ')'. */
export function parseProcStat(raw: string): ProcStat | undefined {
  const open = raw.indexOf('(');
  const close = raw.lastIndexOf(')');
  if (open < 0 || close < open) return undefined;
  const pid = Number(raw.slice(0, open).trim());
  const comm = raw.slice(open + 1, close);
  const rest = raw.slice(close + 2).split(' ');
  // rest[0] is field 3 (state); field N is rest[N - 3].
  const state = rest[0] ?? '?';
  const ppid = Number(rest[1]);
  const startTime = Number(rest[19]);
  if (!Number.isFinite(pid) || !Number.isFinite(startTime)) return undefined;
  return { pid, comm, state, ppid, startTime };
}

/** True when the process exists, is not a zombie, and (if given) started at `startTime`. */
export function isProcessAlive(pid: number, startTime?: number): boolean {
  const st = readProcStat(pid);
  if (!st) return false;
  if (st.state === 'Z' || st.state === 'X' || st.state === 'x') return false;
  if (startTime !== undefined && st.startTime !== startTime) return false;
  return true;
}

/** Polls until the process is gone (or a zombie); resolves false on timeout. */
export async function waitForProcessExit(pid: number, startTime: number | undefined, timeoutMs: number, intervalMs = 50): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!isProcessAlive(pid, startTime)) return true;
    if (Date.now() >= deadline) return false;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Resident set size of a process in bytes (from /proc/PID/statm), or undefined. */
export function processRssBytes(pid: number): number | undefined {
  try {
    const pages = Number(readFileSync(`/proc/${pid}/statm`, 'utf8').split(' ')[1]);
    return pages * 4096;
  } catch {
    return undefined;
  }
}
