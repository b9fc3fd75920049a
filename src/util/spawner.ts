// Starting programs without forking the daemon. Node forks the whole daemon for every child
// process, and fork copies its page tables: with the daemon's ~100 MiB resident that costs about
// 5 ms a process (against 0.5 ms from a small shell), a tenth of a container start. So runc, QEMU
// and the helper commands of the daemon (ip, nft, qemu-img, runc state…; see util/exec.ts) go
// through small shells (dash: ~1 MiB) that the daemon keeps for this: each reads one request a
// line, runs the program with the stdio the request names and answers with its pid and then its
// exit status. Two kinds of request: a console one (stdin opened read-write — runc's console
// FIFO —, stdout and stderr appended to one log) and a captured one (stdin read from a file,
// stdout and stderr written to two files the caller reads). It is not a shim: runc exits once the
// container runs (`run --detach`), the shell is no ancestor of the container afterwards, and
// nothing of the container depends on it. It ends when the daemon does (end of file on its input).
import { spawn, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import { HfError } from '../core/errors.js';

/**
 * Fields are separated by tabs (no globbing, `set -f`); the subshell pair detaches each request
 * from the loop (the loop reaps the outer one at once), so requests run side by side. Console
 * requests run under umask 077 (their log is private); captured ones under the daemon's umask,
 * as a directly spawned command would.
 */
const SCRIPT = `set -f
inherited=$(umask)
umask 077
IFS='	'
while read -r line; do
  set -- $line
  seq=$1; kind=$2; in=$3; out=$4; err=$5; shift 5
  if [ "$kind" = console ]; then
    ( (
      "$@" <>"$in" >>"$out" 2>&1 &
      echo "$seq pid $!"
      wait $!
      echo "$seq exit $?"
    ) & )
  else
    ( (
      umask "$inherited"
      "$@" <"$in" >"$out" 2>"$err" &
      echo "$seq pid $!"
      wait $!
      echo "$seq exit $?"
    ) & )
  fi
done
`;

/** The spawner could not run the command at all (it never started it): the caller may run it another way. */
export class SpawnerUnavailable extends Error {}

interface Pending {
  pid?: number;
  onPid?: (pid: number) => void;
  resolve: (code: number) => void;
  reject: (e: Error) => void;
}

export class Spawner {
  private proc: ChildProcess | undefined;
  private broken = false;
  private buf = '';
  private seq = 0;
  private readonly pending = new Map<number, Pending>();

  constructor(private readonly shell = '/bin/sh') {}

  /** Whether `argv` and the paths can travel in one request line (else the caller spawns itself). */
  usable(argv: string[], ...paths: string[]): boolean {
    return !this.broken && [...argv, ...paths].every((a) => a !== '' && !/[\t\n\r]/.test(a));
  }

  private ensure(): ChildProcess {
    if (this.proc) return this.proc;
    const p = spawn(this.shell, ['-c', SCRIPT], { stdio: ['pipe', 'pipe', 'ignore'] });
    p.stdout!.setEncoding('utf8');
    p.stdout!.on('data', (d: string) => this.onData(d));
    const gone = (why: string) => {
      if (this.proc === p) this.proc = undefined;
      for (const x of this.pending.values()) x.reject(x.pid === undefined ? new SpawnerUnavailable(`the spawner ${why}`) : new HfError('HF_ERR_HYPERVISOR', `the spawner ${why} while pid ${x.pid} ran`));
      this.pending.clear();
    };
    p.once('error', (e) => {
      this.broken = true;
      gone(`failed: ${e.message}`);
    });
    p.once('exit', (code, signal) => gone(`exited (${signal ?? code})`));
    p.stdin!.on('error', () => undefined);
    // It must not keep the daemon alive, and it ends with it.
    p.unref();
    (p.stdin as unknown as Socket).unref?.();
    (p.stdout as unknown as Socket).unref?.();
    this.proc = p;
    return p;
  }

  private onData(d: string): void {
    this.buf += d;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      const m = /^(\d+) (pid|exit) (\d+)$/.exec(line);
      const p = m ? this.pending.get(Number(m[1])) : undefined;
      if (!m || !p) continue;
      if (m[2] === 'pid') {
        p.pid = Number(m[3]);
        p.onPid?.(p.pid);
      }
      else {
        this.pending.delete(Number(m[1]));
        p.resolve(Number(m[3]));
      }
    }
  }

  /**
   * Runs `argv` (argv[0] an absolute path) with stdin = `stdin` opened read-write and stdout and
   * stderr appended to `out`; resolves with its exit status (128 + n for signal n).
   */
  run(argv: string[], stdin: string, out: string, timeoutMs: number, label = argv[0]): Promise<number> {
    return this.runRequest(['console', stdin, out, '-'], argv, timeoutMs, label);
  }

  /**
   * Runs `argv` with stdin read from `files.stdin` and stdout and stderr written to their own files
   * (created or truncated); resolves with its exit status (127 when the program is not found).
   */
  capture(argv: string[], files: { stdin: string; stdout: string; stderr: string }, timeoutMs: number, label = argv[0]): Promise<number> {
    return this.runRequest(['capture', files.stdin, files.stdout, files.stderr], argv, timeoutMs, label);
  }

  private runRequest(head: string[], argv: string[], timeoutMs: number, label = argv[0]): Promise<number> {
    const p = this.ensure();
    const seq = ++this.seq;
    return new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        const x = this.pending.get(seq);
        this.pending.delete(seq);
        if (x?.pid) {
          try {
            process.kill(x.pid, 'SIGKILL');
          } catch {
            // gone
          }
        }
        reject(new HfError('HF_ERR_TIMEOUT', `${label} did not finish within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(seq, {
        resolve: (code) => {
          clearTimeout(timer);
          resolve(code);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      p.stdin!.write([String(seq), ...head, ...argv].join('\t') + '\n');
    });
  }

  /**
   * Starts a long-running `argv` (a VM's QEMU) the same way and resolves once it has a pid; `exit`
   * resolves with its exit status while the spawner lives (it rejects if the spawner goes first,
   * e.g. with the daemon: then the caller falls back to watching the process itself).
   */
  start(argv: string[], stdin: string, out: string, timeoutMs: number): Promise<{ pid: number; exit: Promise<number> }> {
    const p = this.ensure();
    const seq = ++this.seq;
    return new Promise((resolvePid, rejectPid) => {
      let resolveExit!: (code: number) => void;
      let rejectExit!: (e: Error) => void;
      const exit = new Promise<number>((res, rej) => {
        resolveExit = res;
        rejectExit = rej;
      });
      exit.catch(() => undefined);
      let started = false;
      const timer = setTimeout(() => {
        if (started) return;
        this.pending.delete(seq);
        rejectPid(new HfError('HF_ERR_TIMEOUT', `${argv[0]} did not start within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(seq, {
        onPid: (pid) => {
          started = true;
          clearTimeout(timer);
          resolvePid({ pid, exit });
        },
        resolve: (code) => {
          clearTimeout(timer);
          if (!started) rejectPid(new SpawnerUnavailable(`${argv[0]} exited (${code}) before it reported a pid`));
          resolveExit(code);
        },
        reject: (e) => {
          clearTimeout(timer);
          if (!started) rejectPid(e);
          rejectExit(e);
        },
      });
      p.stdin!.write([String(seq), 'console', stdin, out, '-', ...argv].join('\t') + '\n');
    });
  }
}
