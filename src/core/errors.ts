// Every error a user can see is defined here, once: a stable code, an HTTP status and a
// default message. Services throw `HfError`s; one API error handler maps them to responses.

export const ERROR_CODES = {
  HF_ERR_VALIDATION: 400,
  HF_ERR_BAD_JSON: 400,
  HF_ERR_INVALID_NAME: 400,
  HF_ERR_INVALID_SIZE: 400,
  HF_ERR_UNAUTHORIZED: 401,
  HF_ERR_FORBIDDEN: 403,
  HF_ERR_NOT_FOUND: 404,
  HF_ERR_INSTANCE_NOT_FOUND: 404,
  HF_ERR_IMAGE_NOT_FOUND: 404,
  HF_ERR_OPERATION_NOT_FOUND: 404,
  HF_ERR_NETWORK_NOT_FOUND: 404,
  HF_ERR_POOL_NOT_FOUND: 404,
  HF_ERR_VOLUME_NOT_FOUND: 404,
  HF_ERR_SNAPSHOT_NOT_FOUND: 404,
  HF_ERR_ALREADY_EXISTS: 409,
  HF_ERR_INSTANCE_RUNNING: 409,
  HF_ERR_INSTANCE_NOT_RUNNING: 409,
  HF_ERR_INVALID_STATE: 409,
  HF_ERR_BUSY: 409,
  /** The image is being built right now: its operation is in `details.operation`. */
  HF_ERR_IMAGE_BUILDING: 409,
  HF_ERR_CONFLICT: 409,
  /** A network still has NICs attached. */
  HF_ERR_NETWORK_IN_USE: 409,
  /** A subnet overlaps another network or collides with a host route. */
  HF_ERR_SUBNET_CONFLICT: 409,
  /** An IP address, MAC address or host port is already taken. */
  HF_ERR_ADDRESS_IN_USE: 409,
  HF_ERR_INSUFFICIENT_RESOURCES: 422,
  HF_ERR_ACCEL_UNAVAILABLE: 422,
  HF_ERR_UNSUPPORTED: 422,
  /** A file that is not a usable disk image (unknown, truncated, corrupt). */
  HF_ERR_BAD_IMAGE: 422,
  /** A file fetched from another host does not match the SHA-256 its image record carries. */
  HF_ERR_CHECKSUM_MISMATCH: 422,
  /** A storage pool has no room for what was asked. */
  HF_ERR_POOL_FULL: 507,
  /** A shared storage pool this host cannot use now: its path is missing or holds other storage (the message says which). */
  HF_ERR_POOL_UNAVAILABLE: 409,
  HF_ERR_MISSING_DEPENDENCY: 500,
  HF_ERR_DATA_DIR: 500,
  HF_ERR_HYPERVISOR: 500,
  HF_ERR_QMP_DISCONNECTED: 500,
  HF_ERR_QMP_TIMEOUT: 504,
  HF_ERR_QMP_COMMAND: 500,
  HF_ERR_TIMEOUT: 504,
  HF_ERR_INTERNAL: 500,
  /** A state-store lease expired, was revoked or never existed. */
  HF_ERR_LEASE_NOT_FOUND: 404,
  /** A state-store revision is older than the history kept (etcd's ErrCompacted): list again. */
  HF_ERR_STATE_COMPACTED: 410,
  /** The state store cannot be reached (a remote store lost its connection). */
  HF_ERR_STATE_UNAVAILABLE: 503,
  /** The operation was cancelled by a user (the error of a `cancelled` operation). */
  HF_ERR_CANCELLED: 409,
  /** The operation runs work that cannot stop half-way: it was not cancelled. */
  HF_ERR_NOT_CANCELLABLE: 409,
  /** The operation has already ended: there is nothing to cancel. */
  HF_ERR_OPERATION_FINISHED: 409,
  /** Another daemon holds the data directory's lock (daemon.lock). */
  HF_ERR_DAEMON_RUNNING: 409,
  /** The cluster's store (etcd) cannot be reached: writes are refused, reads are served stale. */
  HF_ERR_CLUSTER_UNAVAILABLE: 503,
  /** This host is not part of a cluster (a cluster command on a single host). */
  HF_ERR_NOT_CLUSTERED: 409,
  /** This host is already part of a cluster (init or join twice, or join a host of another cluster). */
  HF_ERR_ALREADY_CLUSTERED: 409,
  /** A join token is malformed, unknown, expired or already used (the message says which). */
  HF_ERR_TOKEN_INVALID: 401,
  /** No host of that name is a member of the cluster. */
  HF_ERR_HOST_NOT_FOUND: 404,
  /** The host that holds the record is offline: the request cannot be forwarded to it. */
  HF_ERR_HOST_OFFLINE: 503,
  /** The host still holds instances (remove refused without --force). */
  HF_ERR_HOST_IN_USE: 409,
  /** Records of a joining host clash with the cluster's (the details list what to rename). */
  HF_ERR_NAME_CLASH: 409,
  /** etcd could not start (port in use, damaged data directory…; the message says which). */
  HF_ERR_ETCD_START: 500,
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class HfError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly details?: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, opts: { cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'HfError';
    this.code = code;
    this.status = ERROR_CODES[code];
    if (opts.details) this.details = opts.details;
  }

  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details ? { code: this.code, message: this.message, details: this.details } : { code: this.code, message: this.message };
  }
}

export function isHfError(e: unknown, code?: ErrorCode): e is HfError {
  return e instanceof HfError && (code === undefined || e.code === code);
}

/** Wraps anything thrown into an HfError, keeping the original as `cause`. */
export function toHfError(e: unknown, fallback: ErrorCode = 'HF_ERR_INTERNAL'): HfError {
  if (e instanceof HfError) return e;
  const message = e instanceof Error ? e.message : String(e);
  return new HfError(fallback, message, { cause: e });
}
