// The default seccomp profile of a system container, in OCI form. System containers run a whole
// distribution (init, mounts inside their own namespaces, setuid tools), so like LXC and Incus
// the profile allows by default and refuses the calls that reach kernel-global state which no
// namespace isolates: module loading, kexec, the kernel keyring, clock setting, raw I/O ports,
// swap, accounting, BPF and perf, handle-based opens (the "shocker" escape) and userfaultfd.
// These are the calls Docker's default profile also refuses; the keyring calls answer ENOSYS
// (as in Docker and Incus) so that programs fall back instead of failing.

export interface OciSeccomp {
  defaultAction: string;
  defaultErrnoRet?: number;
  architectures: string[];
  syscalls: Array<{ names: string[]; action: string; errnoRet?: number }>;
}

const EPERM = 1;
const ENOSYS = 38;

/** Kernel-global: refused with EPERM. */
export const DENIED_SYSCALLS = [
  'acct',
  'bpf',
  'clock_adjtime',
  'clock_settime',
  'create_module',
  'delete_module',
  'finit_module',
  'get_kernel_syms',
  'init_module',
  'ioperm',
  'iopl',
  'kexec_file_load',
  'kexec_load',
  'lookup_dcookie',
  'name_to_handle_at',
  'nfsservctl',
  'open_by_handle_at',
  'perf_event_open',
  'query_module',
  'quotactl',
  'settimeofday',
  'stime',
  'swapoff',
  'swapon',
  '_sysctl',
  'uselib',
  'userfaultfd',
  'ustat',
  'vm86',
  'vm86old',
] as const;

/** The kernel keyring is not namespaced: ENOSYS makes programs fall back quietly. */
export const ENOSYS_SYSCALLS = ['add_key', 'keyctl', 'request_key'] as const;

export function defaultSeccompProfile(): OciSeccomp {
  return {
    defaultAction: 'SCMP_ACT_ALLOW',
    architectures: ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32'],
    syscalls: [
      { names: [...DENIED_SYSCALLS], action: 'SCMP_ACT_ERRNO', errnoRet: EPERM },
      { names: [...ENOSYS_SYSCALLS], action: 'SCMP_ACT_ERRNO', errnoRet: ENOSYS },
    ],
  };
}
