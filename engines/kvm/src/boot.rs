//! Where a VM's first state comes from: a Multiboot image loaded by the reference machine's own loader, or a
//! trace's embedded guest memory and boot state.

use virtlab_machine::cpu::Segment;
use virtlab_machine::multiboot::{ENTRY_CODE_SELECTOR, ENTRY_DATA_SELECTOR};
use virtlab_machine::{Machine, SegmentRegister};
use virtlab_traces::{BootState, CodeMode, TraceView};

use crate::vm::{BootSpec, EntryState};
use crate::KvmError;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;

/// The machine's RAM and registers after its Multiboot loader ran, so that KVM and the reference machine start
/// from the same state.
pub fn from_machine(machine: &Machine) -> BootSpec<'_> {
    let cpu = machine.cpu();
    let segment = |register: SegmentRegister| *cpu.segment(register);
    let mut gpr = [0; 8];
    gpr.copy_from_slice(&cpu.gpr[..8]);
    BootSpec {
        ram_size: machine.ram().len() as u64,
        memory: vec![(0, machine.ram())],
        entry: EntryState {
            gpr,
            rip: cpu.rip,
            rflags: cpu.rflags,
            cr0: cpu.cr0,
            cr3: cpu.cr3,
            cr4: cpu.cr4,
            efer: cpu.efer,
            segments: [
                segment(SegmentRegister::Es),
                segment(SegmentRegister::Cs),
                segment(SegmentRegister::Ss),
                segment(SegmentRegister::Ds),
                segment(SegmentRegister::Fs),
                segment(SegmentRegister::Gs),
            ],
            gdtr: (cpu.gdtr.base, cpu.gdtr.limit),
            idtr: (cpu.idtr.base, cpu.idtr.limit),
        },
    }
}

/// The guest memory and boot state a trace embeds. Traces record the Multiboot entry state (32-bit protected
/// mode, paging off, flat segments with the selectors QEMU's loader leaves); anything else is refused.
///
/// Multiboot leaves GDTR undefined ("the OS image must not load any segment registers until it sets up its own
/// GDT"), and the trace does not record it: the VM starts with an empty GDT, so a guest that breaks that rule
/// faults here instead of running on a table it never set up.
pub fn from_trace<'v>(view: &'v TraceView<'_>) -> Result<BootSpec<'v>, KvmError> {
    let boot: &BootState = view.boot();
    if boot.mode != CodeMode::Bits32 || boot.cr0 & CR0_PE == 0 || boot.cr0 & CR0_PG != 0 {
        return Err(KvmError::Unrunnable(format!(
            "the trace boots in {}-bit code with CR0 = {:#x}; the KVM engine starts guests in the Multiboot entry \
             state only (32-bit protected mode, paging off)",
            boot.mode.bitness(),
            boot.cr0
        )));
    }
    let data = Segment::flat(ENTRY_DATA_SELECTOR, false);
    let mut gpr = [0; 8];
    (gpr[0], gpr[3], gpr[4]) = (boot.rax, boot.rbx, boot.rsp);
    Ok(BootSpec {
        ram_size: boot.ram_bytes,
        memory: view.image().iter().map(|segment| (segment.gpa, segment.bytes.as_slice())).collect(),
        entry: EntryState {
            gpr,
            rip: boot.rip,
            rflags: boot.rflags,
            cr0: boot.cr0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            segments: [data, Segment::flat(ENTRY_CODE_SELECTOR, true), data, data, data, data],
            gdtr: (0, 0),
            idtr: (0, 0),
        },
    })
}
