// What the API tells about the hosts of a cluster (`GET /api/v1/cluster/members`). Types only:
// the cluster service fills them in, the CLI prints them.

export type HostState = 'online' | 'offline' | 'maintenance';

export interface HostView {
  name: string;
  state: HostState;
  address: string;
  etcdMember: boolean;
  cpus: number;
  memoryMiB: number;
  /** What the host's active instances hold. */
  allocated: { vcpus: number; memoryMiB: number };
  /** Memory in use on the host, from its last heartbeat. */
  memoryUsedMiB?: number;
  instances: number;
  version: string;
  qemuVersion?: string;
  lastHeartbeat?: string;
}
