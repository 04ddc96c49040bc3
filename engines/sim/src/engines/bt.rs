//! `bt`: VMware's software VMM (Adams & Agesen, ASPLOS 2006, §3). Guest user code runs directly; guest kernel
//! code runs from a translation cache (TC): each kernel block is really translated through iced-x86
//! ([`crate::translate`]) the first time it runs (IDENT copies, non-IDENT rewrites), direct exits are chained
//! after one continuation through the translator, indirect ones go through the indirect-branch lookup,
//! privileged instructions become in-TC sequences, in-TC helper calls or callouts. Page-table writes trace until
//! adaptive BT finds the writing instruction guilty and retranslates it to call the monitor's write helper.
//!
//! The engine charges exactly what the translator emitted: each site's TC instructions at the processor's cost
//! (PUSHF/POPF and RDTSC among them at theirs), plus the mechanism the site's code implements (a helper call, a
//! callout, an indirect lookup). The kernel rows of the table say what the translator emits for each subject; the
//! translator's rules are in [`crate::translate`].
//!
//! The monitor protects itself with segment limits; AMD64 long mode ignores them, so a 64-bit guest is refused
//! unless the host has long-mode segment limits (`--set bt.lmsle=true`, as on the later Opteron/Athlon 64
//! revisions VMware required) — shared refs §8. The monitor sits in the top 4 MiB; the guest's segments are
//! truncated below it, so the guest's segment loads go through the monitor's copies of its descriptors (counted)
//! and a guest touch of the monitor's area is a fault the monitor emulates (counted, with its address).

use super::{d, monitor_tables_visible_to_user, protect, shadow_paging};
use crate::classify::Op;
use crate::engine::{Engine, EngineError, Options, Run};
use crate::mechanism::{Monitor, MonitorParts};
use crate::metrics::{CycleCause, ExitReason as R};
use crate::plan::{native_op_cost, Charge};
use crate::primitive::Primitive as P;
use crate::profile::Profile;
use crate::protection::{GuestWidth, Protection, VMWARE_MONITOR_BYTES};
use crate::replay::{Costs, KernelCode, Replay, Session};
use crate::strategy::{Action, Disposition, Emitted, Mechanism, Mode, Subject, Table, TraceHandling};
use crate::trace::PreparedTrace;
use crate::translate::{translate, SiteKind, TranslateError, TranslateOptions, Translation};
use virtlab_traces::fasthash::FastMap;

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

/// What the translator emits for each kernel subject (its rules: [`crate::translate`]); a test decodes the CCFs
/// of every catalog trace and checks each instruction's site against this.
fn emitted(subject: Subject) -> Emitted {
    match subject {
        // A segment load is copied: the hardware resolves it against the monitor's truncated copies.
        Subject::Instructions | Subject::SegmentLoad => Emitted::Ident,
        Subject::InterruptFlag
        | Subject::FlagsImage
        | Subject::DescriptorRead
        | Subject::SelectorRead
        | Subject::ControlRead
        | Subject::Cr3Read
        | Subject::Cr8Read
        | Subject::Cr8Write
        | Subject::TimeStamp => Emitted::InTc,
        Subject::PostPort | Subject::ConsolePort | Subject::OtherPort => Emitted::PortIo,
        _ => Emitted::Callout,
    }
}

/// Where the translated kernel runs: ring 1 behind segment limits (long-mode ones for a 64-bit guest, which
/// [`BinaryTranslation::start`] refuses without them).
fn protection(width: GuestWidth) -> Protection {
    Protection::deprivileged(width, VMWARE_MONITOR_BYTES, true)
}

pub(crate) fn table(_options: &Options, width: GuestWidth) -> Table {
    let mut table = Table::filled(d(Mechanism::Native));
    for &subject in Subject::ALL {
        table.set_in(subject, Mode::Kernel, d(Mechanism::Translated(emitted(subject))));
    }
    // User code runs directly, as under trap-and-emulate.
    monitor_tables_visible_to_user(&mut table);
    table.set_in(Subject::TimeStamp, Mode::User, d(Mechanism::Detectable("rdtsc_shows_monitor_time")));
    table.set_in(Subject::Syscall, Mode::User, d(Mechanism::Reflect(R::SystemCall)));
    for subject in [Subject::SoftwareInterrupt, Subject::SystemCallGate] {
        table.set_in(subject, Mode::User, d(Mechanism::Reflect(R::SystemCall)));
        table.set_in(subject, Mode::Kernel, d(Mechanism::TranslatedTransfer));
    }
    table.set_in(Subject::Cpuid, Mode::User, d(Mechanism::Detectable("cpuid_reports_host")));
    let translated = |actions| Disposition::with(Mechanism::Translated(Emitted::Callout), actions);
    table.set_in(Subject::Cr3Write, Mode::Kernel, translated(&[Action::ShadowSwitch]));
    table.set_in(Subject::Cr3Reload, Mode::Kernel, translated(&[Action::ShadowSwitch]));
    table.set_in(Subject::Cr0WriteOwned, Mode::Kernel, translated(&[Action::ShadowRebuild]));
    table.set_in(Subject::Cr4WriteOwned, Mode::Kernel, translated(&[Action::ShadowRebuild]));
    table.set_in(Subject::Invlpg, Mode::Kernel, translated(&[Action::ShadowInvalidate]));
    for port in [Subject::ConsolePort, Subject::OtherPort] {
        table.set_in(port, Mode::Kernel, Disposition::with(Mechanism::Translated(Emitted::PortIo), &[Action::Device]));
    }
    table.set_in(Subject::RepString, Mode::Kernel, d(Mechanism::Native));
    table.set(Subject::Mmio, Disposition::with(Mechanism::Trap(R::Mmio), &[Action::Device]));
    shadow_paging(&mut table, TraceHandling::Trap, TraceHandling::Adaptive);
    table.set_in(Subject::PageTableWrite, Mode::User, d(Mechanism::Traced(TraceHandling::Trap)));
    for subject in [Subject::EnterKernel, Subject::ReturnToUser] {
        table.set(subject, d(Mechanism::Native));
    }
    protect(&mut table, protection(width));
    // Kernel code's segment loads are counted by the CCFs that copy them.
    table.set_in(Subject::SegmentLoad, Mode::Kernel, d(Mechanism::Translated(Emitted::Ident)));
    table
}

impl Engine for BinaryTranslation {
    fn name(&self) -> &'static str {
        "bt"
    }

    fn summary(&self) -> &'static str {
        "VMware-style binary translation of kernel code (iced-x86), direct user code, shadow paging"
    }

    fn table(&self, options: &Options, width: GuestWidth) -> Table {
        table(options, width)
    }

    fn protection(&self, _options: &Options, width: GuestWidth) -> Protection {
        protection(width)
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
        let cache = TranslationCache {
            ccfs: (0..trace.facts.len()).map(|_| None).collect(),
            runs: vec![0; trace.facts.len()],
            costs: Costs::new(profile),
            options: options.clone(),
            tc_next: TC_BASES,
            previous: None,
            current: None,
            guilt: FastMap::default(),
            error: None,
        };
        let width = trace.width();
        let protection = protection(width);
        let monitor = Monitor::new(MonitorParts { shadow: true, protection, ..MonitorParts::default() }, profile);
        Ok(Box::new(Session::new(trace, profile, table(options, width), monitor, Some(Box::new(cache)))))
    }
}

/// A compiled code fragment: one kernel block's translation and what running it costs.
struct Ccf {
    /// Cost of a full execution, and each instruction's share for partial ones.
    costs: Vec<Charge>,
    per_instruction: Vec<(u32, Charge)>,
    indirect_exit: bool,
    /// In-TC sequences and helper calls a full execution runs, and its callouts with their reasons.
    in_tc: u64,
    helper_calls: u64,
    /// Segment-register loads, resolved by the hardware against the monitor's copies of the descriptors.
    segment_loads: Vec<u32>,
    callouts: Vec<(u32, R)>,
    /// Whether the CCF ends in continuation stubs (a direct branch or a fall-through) that can be chained; a CCF
    /// that ends in an indirect lookup or a callout that leaves has none.
    chainable: bool,
    /// Blocks this CCF's direct exits have been chained to.
    chained: Vec<usize>,
    /// Instructions adaptive BT turned into calls to the monitor's page-table write helper.
    guilty: Vec<u32>,
}

struct TranslationCache {
    ccfs: Vec<Option<Ccf>>,
    /// Full executions of each block's current CCF not yet charged (see [`TranslationCache::settle`]).
    runs: Vec<u64>,
    costs: Costs,
    options: Options,
    /// Next free TC address for 16-, 32- and 64-bit code.
    tc_next: [u64; 3],
    /// The kernel CCF that ran last, when control went straight from it to the next block.
    previous: Option<usize>,
    /// The kernel CCF running now, which the events that follow a block execution belong to.
    current: Option<usize>,
    /// Tracing faults per (block, instruction index).
    guilt: FastMap<(usize, u32), u32>,
    /// The first translation failure; replay stops charging once there is one.
    error: Option<TranslateError>,
}

impl TranslationCache {
    fn translate(&mut self, r: &mut Replay, block: usize, guilty: Vec<u32>) -> Option<Ccf> {
        let guest = r.trace.block(block);
        let slot = match guest.mode {
            virtlab_traces::CodeMode::Bits16 => 0,
            virtlab_traces::CodeMode::Bits32 => 1,
            virtlab_traces::CodeMode::Bits64 => 2,
        };
        let options = TranslateOptions { in_tc_ports: &self.options.bt_in_tc_ports, guilty: &guilty };
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
        r.pay(CycleCause::Translation, P::TranslatePerInstruction, u64::from(translation.guest_instructions));
        Some(self.plan(r, block, &translation, guilty))
    }

    /// What one execution of a translation costs, instruction by instruction: exactly what its code does.
    fn plan(&self, r: &Replay, block: usize, translation: &Translation, guilty: Vec<u32>) -> Ccf {
        let facts = &r.trace.facts[block];
        let c = &self.costs;
        let mut per_instruction: Vec<(u32, Charge)> = Vec::new();
        let mut add = |index: u32, cause: CycleCause, primitive: P, cost: u64| {
            if cost > 0 {
                per_instruction.push((index, (cause, primitive, cost)));
            }
        };
        let (mut indirect_exit, mut in_tc, mut helper_calls, mut callouts) = (false, 0, 0, Vec::new());
        let op_at = |index: u32| facts.ops.iter().find(|(i, _)| *i == index).map_or(Op::Innocuous, |&(_, op)| op);
        let mut sites = translation.sites.iter().peekable();
        for index in 0..facts.instructions {
            let Some(site) = sites.next_if(|s| s.index == index) else {
                // IDENT: the instruction itself, at its native cost.
                add(index, CycleCause::GuestInstructions, P::CyclesPerInstruction, c.mc(P::CyclesPerInstruction));
                for &(_, class) in facts.priced.iter().filter(|(i, _)| *i == index) {
                    let primitive = [P::CallReturn, P::Divide, P::Multiply][class as usize];
                    add(index, CycleCause::GuestInstructions, primitive, c.mc(primitive));
                }
                continue;
            };
            let emitted = u64::from(site.emitted) * c.mc(P::CyclesPerInstruction);
            add(index, CycleCause::TranslatedCode, P::CyclesPerInstruction, emitted);
            for &op in &site.native_ops {
                if let Some((_, primitive, cost)) = native_op_cost(op, c) {
                    add(index, CycleCause::TranslatedCode, primitive, cost);
                }
            }
            match site.kind {
                SiteKind::IndirectBranch => {
                    indirect_exit = true;
                    add(index, CycleCause::TranslatedCode, P::IndirectLookup, c.mc(P::IndirectLookup));
                }
                SiteKind::InTc => in_tc += 1,
                SiteKind::HelperCall => {
                    helper_calls += 1;
                    add(index, CycleCause::TranslatedCode, P::InTcHelper, c.mc(P::InTcHelper));
                }
                SiteKind::Callout => {
                    callouts.push((index, super::exit_reason_of(op_at(index))));
                    add(index, CycleCause::Callouts, P::Callout, c.mc(P::Callout));
                    add(index, CycleCause::Emulation, P::Emulate, c.mc(P::Emulate));
                }
                SiteKind::PcRelative | SiteKind::SegmentRewrite | SiteKind::DirectBranch | SiteKind::DirectCall => {}
            }
        }
        let mut costs: Vec<Charge> = Vec::new();
        for &(_, (cause, primitive, cost)) in &per_instruction {
            match costs.iter_mut().find(|(c, p, _)| *c == cause && *p == primitive) {
                Some((_, _, total)) => *total += cost,
                None => costs.push((cause, primitive, cost)),
            }
        }
        let chainable = translation.chain_slots > 0;
        let segment_loads = facts.ops.iter().filter(|(_, op)| *op == Op::SegmentLoad).map(|&(i, _)| i).collect();
        Ccf {
            costs,
            per_instruction,
            indirect_exit,
            in_tc,
            helper_calls,
            segment_loads,
            callouts,
            chainable,
            chained: Vec::new(),
            guilty,
        }
    }

    /// A direct exit from the previous CCF into `block`: the first time through the translator, then chained.
    fn chain(&mut self, r: &mut Replay, block: usize) {
        let Some(previous) = self.previous.take() else { return };
        let Some(ccf) = self.ccfs[previous].as_mut().filter(|ccf| ccf.chainable) else { return };
        if !ccf.chained.contains(&block) {
            ccf.chained.push(block);
            r.metrics.translation.chain_links += 1;
            r.pay(CycleCause::TranslatedCode, P::Continuation, 1);
        }
    }

    /// Charge the full executions of `block`'s current CCF counted so far: a CCF costs the same every run.
    fn settle(&mut self, r: &mut Replay, block: usize) {
        let count = std::mem::take(&mut self.runs[block]);
        let Some(ccf) = self.ccfs[block].as_ref().filter(|_| count > 0) else { return };
        for &(cause, primitive, cost) in &ccf.costs {
            r.metrics.charge(cause, primitive, cost * count);
        }
        let stats = &mut r.metrics.translation;
        stats.in_tc_emulations += ccf.in_tc * count;
        stats.helper_calls += ccf.helper_calls * count;
        r.metrics.protection.shadow_descriptor_loads += ccf.segment_loads.len() as u64 * count;
        if ccf.indirect_exit {
            stats.indirect_lookups += count;
        }
        let facts = &r.trace.facts[block];
        for &(index, reason) in &ccf.callouts {
            r.metrics.callouts_at(reason, facts.address_of(index), count);
            r.metrics.emulated_instructions += count;
        }
    }

    /// Adaptive BT: the instruction at `at` of `block` took one more tracing fault; at the threshold its block
    /// is retranslated with the instruction calling the write helper.
    fn convict(&mut self, r: &mut Replay, block: usize, at: u32) {
        let faults = self.guilt.entry((block, at)).or_insert(0);
        *faults += 1;
        if *faults < self.options.bt_adaptive_threshold {
            return;
        }
        let mut guilty = self.ccfs[block].as_ref().map(|c| c.guilty.clone()).unwrap_or_default();
        if guilty.contains(&at) {
            return;
        }
        guilty.push(at);
        guilty.sort_unstable();
        let chained = self.ccfs[block].as_ref().map(|c| c.chained.clone()).unwrap_or_default();
        self.settle(r, block);
        if let Some(mut ccf) = self.translate(r, block, guilty) {
            ccf.chained = chained;
            r.metrics.translation.retranslations += 1;
            self.ccfs[block] = Some(ccf);
        }
    }
}

impl KernelCode for TranslationCache {
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        if self.error.is_some() {
            return;
        }
        if self.ccfs[block].is_none() {
            self.ccfs[block] = self.translate(r, block, Vec::new());
        }
        self.chain(r, block);
        let Some(ccf) = self.ccfs[block].as_ref() else { return };
        if full {
            self.runs[block] += 1;
        } else {
            for &(_, (cause, primitive, cost)) in ccf.per_instruction.iter().filter(|(i, _)| *i < executed) {
                r.metrics.charge(cause, primitive, cost);
            }
            r.metrics.protection.shadow_descriptor_loads +=
                ccf.segment_loads.iter().filter(|&&i| i < executed).count() as u64;
            for &(index, reason) in ccf.callouts.iter().filter(|(i, _)| *i < executed) {
                let address = r.site(index);
                r.metrics.callout(reason, address);
                r.metrics.emulated_instructions += 1;
            }
        }
        self.previous = if full { Some(block) } else { None };
        self.current = Some(block);
    }

    fn traced_write(&mut self, r: &mut Replay, at: u32) -> bool {
        let Some(block) = self.current.filter(|&b| b == r.current_block()) else { return false };
        if self.ccfs[block].as_ref().is_some_and(|ccf| ccf.guilty.contains(&at)) {
            return true;
        }
        self.convict(r, block, at);
        false
    }

    fn interrupted(&mut self) {
        self.previous = None;
    }

    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError> {
        if let Some(error) = self.error.take() {
            return Err(error.into());
        }
        for block in 0..self.ccfs.len() {
            self.settle(r, block);
        }
        Ok(())
    }
}
