//! `bt`: VMware's software VMM (Adams & Agesen, ASPLOS 2006, §3). Guest user code runs directly; guest kernel
//! code runs from a translation cache (TC): each kernel block is really translated through iced-x86
//! ([`crate::translate`]) the first time it runs (IDENT copies, non-IDENT rewrites), direct exits are chained
//! after one continuation through the translator, indirect ones go through the indirect-branch lookup,
//! privileged instructions become in-TC sequences or callouts. Page-table writes trace until adaptive BT finds
//! the writing instruction guilty and retranslates it to call the monitor's write helper from the TC.
//!
//! The monitor protects itself with segment limits; AMD64 long mode ignores them, so a 64-bit guest is refused
//! unless the host has long-mode segment limits (`--set bt.lmsle=true`, as on the later Opteron/Athlon 64
//! revisions VMware required) — shared refs §8.

use virtlab_traces::Event;

use super::trap_emulate::Deprivileged;
use super::{MonitorCosts, Shadowing, PAGE_FAULT};
use crate::classify::{Exit, Op};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::fasthash::FastMap;
use crate::metrics::{CycleCause, ExitReason};
use crate::profile::{mc, Profile};
use crate::replay::{exit_reason_of, NativeCosts, Plans, Replay, Session, Strategy};
use crate::trace::PreparedTrace;
use crate::translate::{translate, SiteKind, TranslateOptions, Translation};

/// Where translated code lives, by code size: an offset in the TC's 16-bit segment, the top 4 MiB of the 32-bit
/// address space, and the top 4 MiB below 2 GiB for 64-bit code (within rel32 reach of a kernel image in the low
/// 2 GiB).
const TC_BASES: [u64; 3] = [0, 0xffc0_0000, 0x7fc0_0000];

pub struct BinaryTranslation;

/// The refusal for a 64-bit trace on a host without long-mode segment limits.
pub const NEEDS_LMSLE: &str = "bt: the trace runs 64-bit code, and in long mode the processor ignores segment limits, \
which this monitor needs to keep guest code out of its translation cache and trap handlers at the top of the \
address space (paging alone cannot: its two privilege levels are the guest's own kernel/user split). VMware \
required long-mode segment limits (LMSLE, later AMD Opteron/Athlon 64 revisions) for 64-bit guests; pass \
`--set bt.lmsle=true` to model such a host";

impl Engine for BinaryTranslation {
    fn name(&self) -> &'static str {
        "bt"
    }

    fn summary(&self) -> &'static str {
        "VMware-style binary translation of kernel code (iced-x86), direct user code, shadow paging"
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        if trace.has_64_bit_code() && !options.bt_lmsle {
            return Err(EngineError::Unsupported(NEEDS_LMSLE.to_string()));
        }
        let native = NativeCosts::new(profile);
        let monitor = MonitorCosts::new(profile);
        let b = &profile.bt;
        let costs = BtCosts {
            translate: mc(b.translate_per_instruction),
            indirect_lookup: mc(b.indirect_lookup),
            callout: mc(b.callout),
            continuation: mc(b.continuation),
            in_tc_helper: mc(b.in_tc_helper),
            pending_interrupt_check: mc(b.pending_interrupt_check),
        };
        // User code runs directly, exactly as under trap-and-emulate.
        let plans = Plans::build(trace, &Deprivileged { native: &native, monitor: &monitor });
        let engine = BtRun {
            ccfs: (0..trace.facts.len()).map(|_| None).collect(),
            runs: vec![0; trace.facts.len()],
            native,
            monitor,
            costs,
            plans,
            options: options.clone(),
            shadow: Shadowing::default(),
            tc_next: TC_BASES,
            previous: None,
            current: None,
            guilt: FastMap::default(),
            error: None,
        };
        Ok(Box::new(Session::new(trace, engine)))
    }
}

struct BtCosts {
    translate: u64,
    indirect_lookup: u64,
    callout: u64,
    continuation: u64,
    in_tc_helper: u64,
    pending_interrupt_check: u64,
}

/// A compiled code fragment: one kernel block's translation and what running it costs.
struct Ccf {
    translation: Translation,
    /// Cost of a full execution by cause, and the per-site costs for partial ones.
    costs: Vec<(CycleCause, u64)>,
    sites: Vec<SiteCost>,
    indirect_exit: bool,
    /// In-TC emulations and callouts a full execution performs without an event of its own.
    in_tc: u64,
    callouts: Vec<(u32, ExitReason)>,
    /// Blocks this CCF's direct exits have been chained to.
    chained: Vec<usize>,
    /// Instructions adaptive BT turned into calls to the monitor's page-table write helper.
    forced: Vec<u32>,
}

struct SiteCost {
    index: u32,
    cause: CycleCause,
    cost: u64,
}

struct BtRun {
    ccfs: Vec<Option<Ccf>>,
    /// Full executions of each block's current CCF not yet charged (see [`BtRun::settle`]).
    runs: Vec<u64>,
    native: NativeCosts,
    monitor: MonitorCosts,
    costs: BtCosts,
    plans: Plans,
    options: Options,
    shadow: Shadowing,
    /// Next free TC address for 16-, 32- and 64-bit code.
    tc_next: [u64; 3],
    /// The kernel CCF that ran last, when control went straight from it to the next block.
    previous: Option<usize>,
    /// The kernel CCF running now, which the events that follow a block execution belong to.
    current: Option<usize>,
    /// Tracing faults per (block, instruction index).
    guilt: FastMap<(usize, u32), u32>,
    /// The first translation failure; replay stops charging once there is one.
    error: Option<crate::translate::TranslateError>,
}

impl BtRun {
    fn translate(&mut self, r: &mut Replay, block: usize, forced: Vec<u32>) -> Option<Ccf> {
        let guest = r.trace.block(block);
        let slot = match guest.mode {
            virtlab_traces::CodeMode::Bits16 => 0,
            virtlab_traces::CodeMode::Bits32 => 1,
            virtlab_traces::CodeMode::Bits64 => 2,
        };
        let options = TranslateOptions { in_tc_ports: &self.options.bt_in_tc_ports, forced_callouts: &forced };
        let translation = match translate(guest, self.tc_next[slot], &options) {
            Ok(t) => t,
            Err(error) => {
                self.error.get_or_insert(error);
                return None;
            }
        };
        self.tc_next[slot] += u64::from(translation.tc_bytes).next_multiple_of(16);
        let stats = &mut r.metrics.translation;
        stats.blocks += 1;
        stats.instructions += u64::from(translation.guest_instructions);
        stats.ident += u64::from(translation.ident);
        stats.non_ident += u64::from(translation.non_ident);
        stats.tc_bytes += u64::from(translation.tc_bytes);
        r.charge(CycleCause::Translation, self.costs.translate * u64::from(translation.guest_instructions));
        Some(self.plan(r, block, translation, forced))
    }

    /// What one execution of a translation costs, site by site.
    fn plan(&self, r: &Replay, block: usize, translation: Translation, forced: Vec<u32>) -> Ccf {
        let facts = &r.trace.facts[block];
        let per_instruction = self.native.instruction;
        let mut costs: Vec<(CycleCause, u64)> = Vec::new();
        let mut sites = Vec::new();
        let mut add = |index: u32, cause: CycleCause, cost: u64| {
            sites.push(SiteCost { index, cause, cost });
            match costs.iter_mut().find(|(c, _)| *c == cause) {
                Some((_, total)) => *total += cost,
                None => costs.push((cause, cost)),
            }
        };
        let (mut indirect_exit, mut in_tc, mut callouts) = (false, 0, Vec::new());
        let op_at = |index: u32| facts.ops.iter().find(|(i, _)| *i == index).map_or(Op::Innocuous, |&(_, op)| op);
        let mut site_indices = translation.sites.iter().map(|s| s.index).peekable();
        for index in 0..facts.instructions {
            if site_indices.peek() == Some(&index) {
                site_indices.next();
                continue;
            }
            add(index, CycleCause::GuestInstructions, per_instruction);
        }
        for site in &translation.sites {
            let op = op_at(site.index);
            let emitted = per_instruction * u64::from(site.emitted);
            match site.kind {
                SiteKind::PcRelative | SiteKind::SegmentRewrite | SiteKind::DirectBranch | SiteKind::DirectCall => {
                    add(site.index, CycleCause::TranslatedCode, emitted)
                }
                SiteKind::IndirectBranch => {
                    indirect_exit = true;
                    add(site.index, CycleCause::TranslatedCode, emitted + self.costs.indirect_lookup);
                }
                // Operations with an event are charged at the event, which carries their values.
                SiteKind::InTc | SiteKind::Callout if op.has_event() => {}
                // Adaptive BT's retranslation: every execution calls the monitor's page-table write helper from
                // the TC (the paper's 391-cycle ptemod is far below a full callout), whether or not this execution
                // writes a page table; the shadow update is charged at the write's event.
                SiteKind::Callout if forced.contains(&site.index) => {
                    callouts.push((site.index, ExitReason::TracingFault));
                    add(site.index, CycleCause::Callouts, self.costs.in_tc_helper);
                }
                SiteKind::InTc => {
                    let helper = if op == Op::Rdtsc { self.costs.in_tc_helper } else { 0 };
                    let check = if matches!(op, Op::Sti | Op::Popf) { self.costs.pending_interrupt_check } else { 0 };
                    in_tc += 1;
                    add(site.index, CycleCause::TranslatedCode, emitted + helper + check);
                }
                SiteKind::Callout => {
                    callouts.push((site.index, exit_reason_of(op)));
                    add(site.index, CycleCause::Callouts, self.costs.callout);
                    add(site.index, CycleCause::Emulation, self.monitor.emulate);
                }
            }
        }
        Ccf { translation, costs, sites, indirect_exit, in_tc, callouts, chained: Vec::new(), forced }
    }

    /// A direct exit from the previous CCF into `block`: the first time through the translator, then chained.
    fn chain(&mut self, r: &mut Replay, block: usize) {
        let Some(previous) = self.previous.take() else { return };
        let Some(ccf) = self.ccfs[previous].as_mut() else { return };
        let exit = r.trace.facts[previous].exit;
        if ccf.indirect_exit || !matches!(exit, Exit::Direct | Exit::DirectCall | Exit::FallThrough) {
            return;
        }
        if !ccf.chained.contains(&block) {
            ccf.chained.push(block);
            r.metrics.translation.chain_links += 1;
            r.charge(CycleCause::TranslatedCode, self.costs.continuation);
        }
    }

    fn kernel_block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        if self.ccfs[block].is_none() {
            self.ccfs[block] = self.translate(r, block, Vec::new());
        }
        self.chain(r, block);
        let Some(ccf) = self.ccfs[block].as_ref() else { return };
        if full {
            self.runs[block] += 1;
        } else {
            for site in ccf.sites.iter().filter(|s| s.index < executed) {
                r.charge(site.cause, site.cost);
            }
            for &(index, reason) in ccf.callouts.iter().filter(|(i, _)| *i < executed) {
                let address = r.site(index);
                r.metrics.callout(reason, address);
            }
        }
        self.previous = if full { Some(block) } else { None };
        self.current = Some(block);
    }

    /// Charge the full executions of `block`'s current CCF counted so far: a CCF costs the same every run.
    fn settle(&mut self, r: &mut Replay, block: usize) {
        let count = std::mem::take(&mut self.runs[block]);
        let Some(ccf) = self.ccfs[block].as_ref().filter(|_| count > 0) else { return };
        for &(cause, cost) in &ccf.costs {
            r.charge(cause, cost * count);
        }
        r.metrics.translation.in_tc_emulations += ccf.in_tc * count;
        if ccf.indirect_exit {
            r.metrics.translation.indirect_lookups += count;
        }
        let facts = &r.trace.facts[block];
        for &(index, reason) in &ccf.callouts {
            r.metrics.callouts_at(reason, facts.address_of(index), count);
        }
    }

    /// A privileged operation the translation turned into a callout.
    fn callout(&self, r: &mut Replay, reason: ExitReason, at: u32) {
        let address = r.site(at);
        r.metrics.callout(reason, address);
        r.charge(CycleCause::Callouts, self.costs.callout);
        r.charge(CycleCause::Emulation, self.monitor.emulate);
        r.metrics.emulated_instructions += 1;
    }

    /// A privileged operation: a callout from kernel code, a trap from user code.
    fn privileged(&self, r: &mut Replay, reason: ExitReason, at: u32) {
        if r.kernel() {
            self.callout(r, reason, at);
        } else {
            self.monitor.emulate(r, reason, at, self.monitor.trap);
        }
    }

    /// Cost of the in-TC sequence the translator emitted for instruction `at` of the running CCF.
    fn emitted_at(&self, at: u32) -> u64 {
        let current = self.current.and_then(|b| self.ccfs[b].as_ref());
        let emitted = current
            .and_then(|ccf| ccf.translation.sites.iter().find(|s| s.index == at))
            .map_or(1, |s| u64::from(s.emitted));
        emitted * self.native.instruction
    }

    fn page_table_write(&mut self, r: &mut Replay, at: u32, write: (u64, u8, u64, u64)) {
        let (gpa, level, old, new) = write;
        let m = &self.monitor;
        let current = if r.kernel() { self.current } else { None };
        let forced = current.and_then(|b| self.ccfs[b].as_ref()).is_some_and(|ccf| ccf.forced.contains(&at));
        if forced {
            self.shadow.write(r, m, gpa, level, old, new);
            return;
        }
        m.emulate(r, ExitReason::TracingFault, at, m.trap);
        self.shadow.write(r, m, gpa, level, old, new);
        let Some(block) = current else { return };
        let faults = self.guilt.entry((block, at)).or_insert(0);
        *faults += 1;
        if *faults >= self.options.bt_adaptive_threshold {
            let mut forced = self.ccfs[block].as_ref().map(|c| c.forced.clone()).unwrap_or_default();
            forced.push(at);
            forced.sort_unstable();
            let chained = self.ccfs[block].as_ref().map(|c| c.chained.clone()).unwrap_or_default();
            self.settle(r, block);
            if let Some(mut ccf) = self.translate(r, block, forced) {
                ccf.chained = chained;
                r.metrics.translation.retranslations += 1;
                self.ccfs[block] = Some(ccf);
            }
        }
    }
}

impl Strategy for BtRun {
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        if self.error.is_some() {
            return;
        }
        if r.kernel() {
            self.kernel_block(r, block, executed, full);
        } else {
            self.previous = None;
            self.current = None;
            self.plans.apply(r, block, executed, full);
        }
    }

    // Out of line: the block path, which runs for most events, stays a tight loop.
    #[inline(never)]
    fn event(&mut self, r: &mut Replay, event: &Event) {
        if self.error.is_some() {
            return;
        }
        let m = &self.monitor;
        let kernel = r.kernel();
        match *event {
            Event::Block(_) | Event::PartialBlock { .. } => {}
            Event::Context { context, .. } => {
                self.shadow.context(&context);
                self.previous = None;
            }
            Event::Syscall { at } => m.reflect(r, ExitReason::SystemCall, at, m.trap),
            Event::SoftwareInterrupt { at, .. } => {
                if kernel {
                    self.callout(r, ExitReason::SystemCall, at);
                    r.charge(CycleCause::Reflection, m.reflect);
                } else {
                    m.reflect(r, ExitReason::SystemCall, at, m.trap);
                }
            }
            Event::Sysret { at } => self.privileged(r, ExitReason::SystemCall, at),
            Event::Iret { at } => self.privileged(r, ExitReason::Iret, at),
            Event::Exception { at, vector, .. } => {
                if vector == PAGE_FAULT {
                    r.metrics.shadow.true_faults += 1;
                }
                m.reflect(r, ExitReason::ExceptionNmi, at, m.trap);
                self.previous = None;
            }
            Event::Interrupt { at, .. } => {
                m.reflect(r, ExitReason::ExternalInterrupt, at, m.trap);
                self.previous = None;
            }
            Event::CrWrite { at, cr: 8, .. } if kernel => {
                // The virtual TPR lives in the VCPU area; lowering it may unmask a pending interrupt.
                let cost = self.emitted_at(at) + self.costs.pending_interrupt_check;
                r.charge(CycleCause::TranslatedCode, cost);
                r.metrics.translation.in_tc_emulations += 1;
            }
            Event::CrWrite { at, cr, old, new } => {
                self.privileged(r, ExitReason::CrAccess, at);
                self.shadow.cr_write(r, m, cr, old, new);
            }
            Event::MsrRead { at, .. } => self.privileged(r, ExitReason::MsrRead, at),
            Event::MsrWrite { at, .. } => self.privileged(r, ExitReason::MsrWrite, at),
            Event::Io { at, port, .. } if kernel && self.options.bt_in_tc_ports.contains(&port) => {
                let cost = self.emitted_at(at) + self.costs.in_tc_helper;
                r.charge(CycleCause::TranslatedCode, cost);
                r.metrics.translation.in_tc_emulations += 1;
            }
            Event::Io { at, .. } => {
                self.privileged(r, ExitReason::IoInstruction, at);
                r.charge(CycleCause::DeviceEmulation, m.device);
            }
            Event::Mmio { at, .. } => {
                m.emulate(r, ExitReason::Mmio, at, m.trap);
                r.charge(CycleCause::DeviceEmulation, m.device);
            }
            Event::Cpuid { at, .. } if kernel => self.callout(r, ExitReason::Cpuid, at),
            Event::Cpuid { at, .. } => super::host_cpuid(r, self.native.cpuid, at),
            Event::Invlpg { at, address } => {
                self.privileged(r, ExitReason::Invlpg, at);
                self.shadow.invlpg(r, m, address);
            }
            Event::DescriptorLoad { at, load } => self.privileged(r, super::descriptor_reason(&load), at),
            Event::Hlt { at, .. } => self.privileged(r, ExitReason::Hlt, at),
            Event::PageTableWrite { at, gpa, level, old, new } => {
                if r.paging() {
                    self.page_table_write(r, at, (gpa, level, old, new));
                }
            }
            // Translated IDENT: the string instruction runs in the translation cache at native speed.
            Event::RepString { at, elements } => self.native.charge_rep_string(r, at, elements),
            Event::PageTouch { at, page, frame, .. } => {
                r.charge(CycleCause::TlbFills, self.native.tlb_fill);
                if self.shadow.touch(r, m, page, frame) {
                    r.exit(ExitReason::ShadowPageFault, at);
                    r.charge(CycleCause::Exits, m.trap);
                }
            }
        }
    }

    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError> {
        if let Some(error) = self.error.take() {
            return Err(error.into());
        }
        self.plans.settle(r);
        for block in 0..self.ccfs.len() {
            self.settle(r, block);
        }
        Ok(())
    }
}
