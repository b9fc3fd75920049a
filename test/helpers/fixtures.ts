// Shared test data.
import type { InstanceConfig } from '../../src/core/model/instance.js';

/** A small kernel-boot VM config with memory and vCPU ceilings (256M→1G, 1→2 vCPUs). */
export function vmConfig(overrides: Partial<InstanceConfig> = {}): InstanceConfig {
  return {
    vcpus: 1,
    maxVcpus: 2,
    memoryMiB: 256,
    maxMemoryMiB: 1024,
    disks: [],
    nics: [],
    boot: { kind: 'kernel', kernel: '/k', cmdline: '' },
    accel: 'tcg',
    devices: 'virtio',
    restartPolicy: 'never',
    autostart: false,
    ...overrides,
  };
}
