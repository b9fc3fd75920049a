// The storage services: pools and volumes (volumes.ts; each host's check of the shared pools in
// shared-pools.ts), image transfer — import, export, download, publish (transfer.ts) — and instance
// copies (copies.ts).
export { StorageService, type StorageServiceDeps } from './volumes.js';
export { ImageTransferService, type ImageTransferDeps } from './transfer.js';
export { CopyService, type CopyServiceDeps } from './copies.js';
