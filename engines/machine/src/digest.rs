//! The 32-byte digest of a machine's final state.

use crate::interp::Machine;

/// Domain separator and version of the serialization below; change it when the layout changes.
const DIGEST_DOMAIN: &[u8] = b"virtlab-machine state digest v2\0";

impl Machine {
    /// BLAKE3 over a canonical little-endian serialization: the domain string; RAX..R15, RIP,
    /// RFLAGS; ES, CS, SS, DS, FS, GS, LDTR, TR as (selector u16, base u64, limit u32, attributes
    /// u16); GDTR and IDTR as (base u64, limit u16); CR0, CR2, CR3, CR4, CR8, EFER; the MSRs STAR,
    /// LSTAR, CSTAR, FMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP, APIC_BASE, TSC offset, PAT; CPL
    /// (u8); retired user and kernel instructions and idle time (u64); RAM size (u64); then each
    /// 4 KiB page of RAM that is not all zero, in address order, as its frame number (u64) and its
    /// bytes. The pages left out are known to be zero, so this says everything RAM holds, and a
    /// guest that uses a few megabytes of its RAM costs a few megabytes of hashing. Device state and
    /// the serial output are not included (the outcome carries the serial bytes separately).
    pub fn state_digest(&self) -> [u8; 32] {
        let cpu = &self.cpu;
        let mut hasher = blake3::Hasher::new();
        hasher.update(DIGEST_DOMAIN);
        for value in cpu.gpr.iter().chain([&cpu.rip, &cpu.rflags]) {
            hasher.update(&value.to_le_bytes());
        }
        for segment in cpu.segments.iter().chain([&cpu.ldtr, &cpu.tr]) {
            hasher.update(&segment.selector.to_le_bytes());
            hasher.update(&segment.base.to_le_bytes());
            hasher.update(&segment.limit.to_le_bytes());
            hasher.update(&segment.attributes.to_le_bytes());
        }
        for table in [&cpu.gdtr, &cpu.idtr] {
            hasher.update(&table.base.to_le_bytes());
            hasher.update(&table.limit.to_le_bytes());
        }
        let msr = &cpu.msr;
        let registers = [
            cpu.cr0,
            cpu.cr2,
            cpu.cr3,
            cpu.cr4,
            cpu.cr8,
            cpu.efer,
            msr.star,
            msr.lstar,
            msr.cstar,
            msr.fmask,
            msr.kernel_gs_base,
            msr.sysenter_cs,
            msr.sysenter_esp,
            msr.sysenter_eip,
            msr.apic_base,
            msr.tsc_offset,
            msr.pat,
        ];
        for value in registers {
            hasher.update(&value.to_le_bytes());
        }
        hasher.update(&[cpu.cpl]);
        for value in [self.retired_user, self.retired_kernel, self.idle_time, self.memory.ram_size()] {
            hasher.update(&value.to_le_bytes());
        }
        for (frame, bytes) in self.memory.nonzero_frames() {
            hasher.update(&frame.to_le_bytes());
            hasher.update(bytes);
        }
        *hasher.finalize().as_bytes()
    }
}
