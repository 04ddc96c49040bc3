//! Where each strategy puts the guest kernel and how its monitor keeps the guest out of its own memory — the part
//! of the story that depends on the guest's width (shared refs §7–8, the seeds).
//!
//! A software monitor lives inside every guest address space (its trap handlers, its translation cache) and runs
//! the guest kernel deprivileged. On x86-32 it has two tools: rings 1 and 2, which paging treats as supervisor, so
//! U/S still separates the guest kernel from guest user code as on real hardware; and segment limits, which keep
//! the ring-1 kernel out of the top of the address space where the monitor sits (VMware: the top 4 MiB; Xen: the
//! top 64 MiB). The monitor loads its own copies of the guest's descriptors, with the privilege level raised to
//! the ring the kernel runs in and the limit truncated below the monitor. In long mode the processor ignores data
//! segment limits, so a monitor without them (AMD's LMSLE) can protect itself only with paging, whose two levels
//! the guest's kernel/user split already uses: the kernel goes to ring 3 with user code, and the monitor keeps two
//! page tables per guest address space, switching on every entry to the guest kernel and every return to user
//! mode (Xen on x86-64 does exactly this).

/// The width of the guest kernel a strategy runs: what decides its protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestWidth {
    Bits32,
    Bits64,
}

impl GuestWidth {
    pub const ALL: [GuestWidth; 2] = [GuestWidth::Bits64, GuestWidth::Bits32];

    /// `x86-32` or `x86-64`, as the catalog's `arch` parameter spells it.
    pub fn arch(self) -> &'static str {
        match self {
            GuestWidth::Bits32 => "x86-32",
            GuestWidth::Bits64 => "x86-64",
        }
    }
}

/// Where the guest kernel's code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPlacement {
    /// Directly, at this privilege level (0 on the bare processor and in VMX non-root mode).
    Ring(u8),
    /// Nowhere on the processor: the monitor interprets it.
    Interpreted,
}

/// How the monitor keeps guest code out of its own memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Nothing to guard: there is no monitor, or it runs in its own address space (VMX root mode).
    Separate,
    /// The monitor occupies the top `bytes` of every guest address space, from `base` up; the guest's segments
    /// are truncated below it.
    SegmentLimits { base: u64, bytes: u64 },
    /// The monitor's pages are supervisor pages; the guest kernel runs in ring 3 beside user code, with a page
    /// table of its own that the monitor switches to on every kernel entry and away from on every return.
    TwoPageTables,
    /// The monitor's pages are supervisor pages and only user code runs directly (the kernel is interpreted).
    SupervisorPages,
}

/// VMware's monitor: the top 4 MiB of the address space (Adams & Agesen 2006, §3; the seeds).
pub const VMWARE_MONITOR_BYTES: u64 = 4 << 20;
/// Xen's hypervisor area on x86-32: the top 64 MiB (Barham et al., SOSP 2003).
pub const XEN_MONITOR_BYTES: u64 = 64 << 20;

/// One strategy's protection for one guest width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    pub kernel: KernelPlacement,
    pub guard: Guard,
}

impl Protection {
    /// No monitor in the guest's address space, the kernel in ring 0.
    pub const SEPARATE: Protection = Protection { kernel: KernelPlacement::Ring(0), guard: Guard::Separate };

    /// A monitor that deprivileges the kernel: ring 1 behind segment limits on x86-32; on x86-64, ring 1 behind
    /// long-mode segment limits when the host has them, ring 3 with two page tables otherwise.
    pub fn deprivileged(width: GuestWidth, monitor_bytes: u64, long_mode_limits: bool) -> Protection {
        let top = |address_bits: u32| Guard::SegmentLimits {
            base: (u64::MAX >> (64 - address_bits)) - (monitor_bytes - 1),
            bytes: monitor_bytes,
        };
        match width {
            GuestWidth::Bits32 => Protection { kernel: KernelPlacement::Ring(1), guard: top(32) },
            GuestWidth::Bits64 if long_mode_limits => Protection { kernel: KernelPlacement::Ring(1), guard: top(64) },
            GuestWidth::Bits64 => Protection { kernel: KernelPlacement::Ring(3), guard: Guard::TwoPageTables },
        }
    }

    /// The lowest address of the monitor's area when segment limits guard it.
    pub fn monitor_base(&self) -> Option<u64> {
        match self.guard {
            Guard::SegmentLimits { base, .. } => Some(base),
            _ => None,
        }
    }

    /// The ring the guest kernel runs in, `None` when it is interpreted.
    pub fn kernel_ring(&self) -> Option<u8> {
        match self.kernel {
            KernelPlacement::Ring(ring) => Some(ring),
            KernelPlacement::Interpreted => None,
        }
    }

    /// Whether the monitor truncates the guest's segments (and so loads its own copies of the guest's
    /// descriptors on every segment-register load).
    pub fn truncates_segments(&self) -> bool {
        matches!(self.guard, Guard::SegmentLimits { .. })
    }

    /// One sentence on where the kernel runs and what guards the monitor, for `virtlab story` and reports.
    pub fn describe(&self) -> String {
        let kernel = match self.kernel {
            KernelPlacement::Ring(0) => "kernel in ring 0".to_string(),
            KernelPlacement::Ring(ring) => format!("kernel deprivileged to ring {ring}"),
            KernelPlacement::Interpreted => "kernel interpreted by the monitor".to_string(),
        };
        let guard = match self.guard {
            Guard::Separate => "no monitor in the guest's address space".to_string(),
            Guard::SegmentLimits { base, bytes } => {
                format!("monitor in the top {} MiB, guest segments truncated below {base:#x}", bytes >> 20)
            }
            Guard::TwoPageTables => {
                "monitor guarded by paging alone: kernel and user in ring 3, two page tables switched on every kernel \
                 entry and return"
                    .to_string()
            }
            Guard::SupervisorPages => "monitor in supervisor pages; only user code runs directly".to_string(),
        };
        format!("{kernel}; {guard}")
    }
}

impl Default for Protection {
    fn default() -> Self {
        Protection::SEPARATE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_guards_sit_at_the_top_of_the_address_space() {
        let vmware = Protection::deprivileged(GuestWidth::Bits32, VMWARE_MONITOR_BYTES, false);
        assert_eq!((vmware.kernel_ring(), vmware.monitor_base()), (Some(1), Some(0xffc0_0000)));
        let xen = Protection::deprivileged(GuestWidth::Bits32, XEN_MONITOR_BYTES, false);
        assert_eq!(xen.monitor_base(), Some(0xfc00_0000));
        let lmsle = Protection::deprivileged(GuestWidth::Bits64, VMWARE_MONITOR_BYTES, true);
        assert_eq!(lmsle.monitor_base(), Some(0xffff_ffff_ffc0_0000));
        let compressed = Protection::deprivileged(GuestWidth::Bits64, XEN_MONITOR_BYTES, false);
        assert_eq!((compressed.kernel_ring(), compressed.guard), (Some(3), Guard::TwoPageTables));
        assert!(vmware.describe().contains("top 4 MiB") && xen.describe().contains("below 0xfc000000"));
    }
}
