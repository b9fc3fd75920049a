// Backend registry: pool type → backend. A new pool type is one folder here plus one line.
import { HfError } from '../../core/errors.js';
import type { BackendDeps, BackendFactory, StorageBackend } from '../backend.js';
import type { PoolRecord, PoolType } from '../model.js';
import { DirBackend } from './dir/index.js';

const FACTORIES: Record<PoolType, BackendFactory> = {
  dir: (pool, deps) => new DirBackend(pool, deps),
};

export function backendFor(pool: PoolRecord, deps: BackendDeps): StorageBackend {
  const f = FACTORIES[pool.type];
  if (!f) throw new HfError('HF_ERR_UNSUPPORTED', `pool ${pool.name}: type "${String(pool.type)}" is not supported on this host`);
  return f(pool, deps);
}
