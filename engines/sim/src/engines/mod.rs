//! The seven engines. Each follows DESIGN.md's strategy-by-event table; the helpers here are the software
//! monitor's pieces they share (entering the monitor to emulate or reflect, shadow paging).

pub mod bt;
pub mod hw;
pub mod hybrid;
pub mod native;
pub mod paravirt;
pub mod trap_emulate;

use virtlab_traces::Context;

use crate::metrics::{CycleCause, ExitReason};
use crate::profile::{mc, Profile};
use crate::replay::Replay;
use crate::shadow::{paging_bits_changed, ShadowMmu, Touch};

/// The software monitor's primitive costs in millicycles.
#[derive(Debug, Clone)]
pub(crate) struct MonitorCosts {
    pub trap: u64,
    pub decode: u64,
    pub emulate: u64,
    pub reflect: u64,
    pub device: u64,
    pub interpret: u64,
    pub shadow_fill: u64,
    pub shadow_switch: u64,
    pub shadow_invalidate: u64,
    pub shadow_update: u64,
}

impl MonitorCosts {
    pub fn new(profile: &Profile) -> MonitorCosts {
        let m = &profile.monitor;
        MonitorCosts {
            trap: mc(m.trap),
            decode: mc(m.decode),
            emulate: mc(m.emulate),
            reflect: mc(m.reflect),
            device: mc(m.device),
            interpret: mc(m.interpret),
            shadow_fill: mc(m.shadow_fill),
            shadow_switch: mc(m.shadow_switch),
            shadow_invalidate: mc(m.shadow_invalidate),
            shadow_update: mc(m.shadow_update),
        }
    }

    /// Enter the monitor (at `entry` cost) for an instruction it decodes and emulates.
    pub fn emulate(&self, r: &mut Replay, reason: ExitReason, at: u32, entry: u64) {
        r.exit(reason, at);
        r.charge(CycleCause::Exits, entry);
        r.charge(CycleCause::Emulation, self.decode + self.emulate);
        r.metrics.emulated_instructions += 1;
    }

    /// Enter the monitor for a transfer (system call, exception, interrupt) it reflects into the guest.
    pub fn reflect(&self, r: &mut Replay, reason: ExitReason, at: u32, entry: u64) {
        r.exit(reason, at);
        r.charge(CycleCause::Exits, entry);
        r.charge(CycleCause::Reflection, self.reflect);
    }
}

/// Shadow paging as the software monitors (and first-generation VT-x) run it.
#[derive(Debug, Default)]
pub(crate) struct Shadowing {
    mmu: ShadowMmu,
}

impl Shadowing {
    /// Follow the guest's address space.
    pub fn context(&mut self, context: &Context) {
        self.mmu.switch(context.cr3);
    }

    /// A first touch; true when it is a hidden fault (the caller charges entering the monitor).
    pub fn touch(&mut self, r: &mut Replay, costs: &MonitorCosts, page: u64, frame: u64) -> bool {
        if !r.paging() {
            return false;
        }
        match self.mmu.touch(page, frame) {
            Touch::HiddenFault => {
                r.metrics.shadow.hidden_faults += 1;
                r.charge(CycleCause::ShadowPaging, costs.shadow_fill);
                true
            }
            Touch::Hit | Touch::Propagated => false,
        }
    }

    /// Propagate a guest page-table write into the shadow.
    pub fn write(&mut self, r: &mut Replay, costs: &MonitorCosts, gpa: u64, level: u8, old: u64, new: u64) {
        let propagation = self.mmu.write(gpa, level, old, new);
        if propagation.newly_traced {
            r.metrics.shadow.traced_pages += 1;
        }
        r.metrics.shadow.invalidations += propagation.invalidated;
        r.charge(CycleCause::ShadowPaging, costs.shadow_update + propagation.invalidated * costs.shadow_invalidate);
    }

    /// A control-register write: CR3 switches roots, paging-mode changes drop them all.
    pub fn cr_write(&mut self, r: &mut Replay, costs: &MonitorCosts, cr: u8, old: u64, new: u64) {
        if cr == 3 {
            self.mmu.switch(new);
            r.metrics.shadow.root_switches += 1;
            r.charge(CycleCause::ShadowPaging, costs.shadow_switch);
        } else if paging_bits_changed(cr, old, new) {
            let dropped = self.mmu.flush();
            r.metrics.shadow.invalidations += dropped;
            r.charge(CycleCause::ShadowPaging, dropped * costs.shadow_invalidate);
        }
    }

    pub fn invlpg(&mut self, r: &mut Replay, costs: &MonitorCosts, address: u64) {
        if self.mmu.invlpg(address) {
            r.metrics.shadow.invalidations += 1;
        }
        r.charge(CycleCause::ShadowPaging, costs.shadow_invalidate);
    }
}

/// The exit reason of a descriptor-table load.
pub(crate) fn descriptor_reason(load: &virtlab_traces::DescriptorLoad) -> ExitReason {
    match load {
        virtlab_traces::DescriptorLoad::Gdt { .. } | virtlab_traces::DescriptorLoad::Idt { .. } => ExitReason::GdtrIdtr,
        virtlab_traces::DescriptorLoad::Ldt { .. } | virtlab_traces::DescriptorLoad::Tr { .. } => ExitReason::LdtrTr,
    }
}

/// CPUID run directly: the guest sees the host processor's identity.
pub(crate) fn host_cpuid(r: &mut Replay, native_cost: u64, at: u32) {
    r.charge(CycleCause::NativeTransitions, native_cost);
    let site = r.site(at);
    r.metrics.detectable("cpuid_reports_host", site, 1);
}

/// Page faults are vector 14.
pub(crate) const PAGE_FAULT: u8 = 14;
