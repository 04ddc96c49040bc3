//! 4-level paging: 4 KiB and 2 MiB pages, U/S, R/W with CR0.WP, NX, accessed and dirty bits, and
//! the #PF error codes and CR2 each violation produces.

mod common;
use common::*;
use iced_x86::code_asm::*;
use virtlab_machine::Machine;

const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;

/// Runs kernel code at CODE on a machine with 4 KiB pages in the first 2 MiB after `prepare`;
/// returns (exit status, #PF error code, CR2) where the #PF handler exits with 14.
fn kernel_access(
    prepare: impl FnOnce(&mut Machine),
    build: impl FnOnce(&mut CodeAssembler),
) -> (Machine, u8, u64, u64) {
    let mut machine = long_mode_machine();
    use_small_pages(&mut machine);
    recording_handler(&mut machine, 14, HANDLERS);
    prepare(&mut machine);
    place(&mut machine, CODE, |a| {
        build(a);
        exit(a, 0);
    });
    let outcome = run_prepared(&mut machine).unwrap();
    let (code, fault_address) = (machine.cpu().gpr[13], machine.cpu().gpr[11]);
    (machine, outcome.exit_status as u8, code, fault_address)
}

#[test]
fn not_present_read_and_write() {
    let (_, status, code, fault_address) =
        kernel_access(|m| set_pte(m, DATA, 0), |a| a.mov(rax, qword_ptr(DATA + 8)).unwrap());
    assert_eq!((status, code, fault_address), (14, 0, DATA + 8));
    let (_, status, code, fault_address) =
        kernel_access(|m| set_pte(m, DATA, 0), |a| a.mov(qword_ptr(DATA + 0x10), rax).unwrap());
    assert_eq!((status, code, fault_address), (14, 2, DATA + 0x10));
}

#[test]
fn supervisor_write_to_read_only_page_obeys_cr0_wp() {
    let (_, status, code, fault_address) =
        kernel_access(|m| set_pte(m, DATA, PRESENT), |a| a.mov(qword_ptr(DATA), rax).unwrap());
    assert_eq!((status, code, fault_address), (14, 3, DATA));
    let (machine, status, _, _) = kernel_access(
        |m| {
            set_pte(m, DATA, PRESENT);
            m.cpu_mut().cr0 &= !virtlab_machine::cpu::cr0::WP;
        },
        |a| {
            a.mov(rax, 0x55u64).unwrap();
            a.mov(qword_ptr(DATA), rax).unwrap();
        },
    );
    assert_eq!(status, 0);
    assert_eq!(read_u64(&machine, DATA), 0x55);
}

#[test]
fn no_execute_page_faults_on_fetch_with_instruction_bit() {
    let (_, status, code, fault_address) = kernel_access(
        |m| {
            set_pte(m, DATA, PRESENT | WRITABLE | NX);
            place(m, DATA, |a| a.nop().unwrap());
        },
        |a| {
            a.mov(rax, DATA).unwrap();
            a.call(rax).unwrap();
        },
    );
    assert_eq!((status, code, fault_address), (14, 0x11, DATA));
}

#[test]
fn reserved_bit_fault_when_nx_set_without_efer_nxe() {
    let (_, status, code, _) = kernel_access(
        |m| {
            set_pte(m, DATA, PRESENT | WRITABLE | NX);
            m.cpu_mut().efer &= !virtlab_machine::cpu::efer::NXE;
        },
        |a| a.mov(rax, qword_ptr(DATA)).unwrap(),
    );
    assert_eq!((status, code), (14, 0x9));
}

#[test]
fn user_access_to_supervisor_page() {
    let mut machine = long_mode_machine();
    use_small_pages(&mut machine);
    set_pte(&mut machine, DATA, PRESENT | WRITABLE);
    recording_handler(&mut machine, 14, HANDLERS);
    place(&mut machine, USER_CODE, |a| a.mov(rax, qword_ptr(DATA + 0x20)).unwrap());
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 14);
    assert_eq!((machine.cpu().gpr[13], machine.cpu().gpr[11]), (5, DATA + 0x20));
}

#[test]
fn accessed_and_dirty_bits_follow_reads_and_writes() {
    let read_page = DATA;
    let write_page = DATA + 0x1000;
    let (machine, status, _, _) = kernel_access(
        |_| {},
        |a| {
            a.mov(rax, qword_ptr(read_page)).unwrap();
            a.mov(qword_ptr(write_page), rax).unwrap();
        },
    );
    assert_eq!(status, 0);
    assert_eq!(pte(&machine, read_page) & (ACCESSED | DIRTY), ACCESSED);
    assert_eq!(pte(&machine, write_page) & (ACCESSED | DIRTY), ACCESSED | DIRTY);
    assert_eq!(pte(&machine, DATA + 0x2000) & (ACCESSED | DIRTY), 0, "untouched page");
    assert_eq!(read_u64(&machine, PD) & ACCESSED, ACCESSED);
    assert_eq!(read_u64(&machine, PML4) & ACCESSED, ACCESSED);
}

#[test]
fn two_megabyte_pages_get_dirty_bit_on_the_directory_entry() {
    let mut machine = long_mode_machine();
    place(&mut machine, CODE, |a| {
        a.mov(rax, 1u64).unwrap();
        a.mov(qword_ptr(0x40_0000 + 0x1234), rax).unwrap();
        exit(a, 0);
    });
    run_prepared(&mut machine).unwrap();
    let pde = read_u64(&machine, PD + 2 * 8);
    assert_eq!(pde & (ACCESSED | DIRTY), ACCESSED | DIRTY);
    assert_eq!(read_u64(&machine, 0x40_1234), 1);
}

#[test]
fn invlpg_makes_a_changed_mapping_visible() {
    let (machine, status, _, _) = kernel_access(
        |m| write_u64(m, DATA + 0x3000, 0xAAAA),
        |a| {
            a.mov(rax, qword_ptr(DATA)).unwrap();
            // Remap DATA to DATA + 0x3000; without INVLPG the stale translation could be used.
            a.mov(rbx, (DATA + 0x3000) | 0x7).unwrap();
            a.mov(qword_ptr(PT_LOW + (DATA >> 12) * 8), rbx).unwrap();
            a.invlpg(byte_ptr(DATA)).unwrap();
            a.mov(rcx, qword_ptr(DATA)).unwrap();
        },
    );
    assert_eq!(status, 0);
    assert_eq!(machine.cpu().gpr[1], 0xAAAA);
}

#[test]
fn mov_cr3_flushes_translations() {
    let (machine, status, _, _) = kernel_access(
        |m| write_u64(m, DATA + 0x3000, 0xBBBB),
        |a| {
            a.mov(rax, qword_ptr(DATA)).unwrap();
            a.mov(rbx, (DATA + 0x3000) | 0x7).unwrap();
            a.mov(qword_ptr(PT_LOW + (DATA >> 12) * 8), rbx).unwrap();
            a.mov(rax, cr3).unwrap();
            a.mov(cr3, rax).unwrap();
            a.mov(rcx, qword_ptr(DATA)).unwrap();
        },
    );
    assert_eq!(status, 0);
    assert_eq!(machine.cpu().gpr[1], 0xBBBB);
}

#[test]
fn non_canonical_address_is_a_general_protection_fault() {
    let mut machine = long_mode_machine();
    recording_handler(&mut machine, 13, HANDLERS);
    place(&mut machine, CODE, |a| {
        a.mov(rax, 0x0000_8000_0000_0000u64).unwrap();
        a.mov(rbx, qword_ptr(rax)).unwrap();
    });
    assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 13);
}

#[test]
fn access_crossing_a_page_boundary_checks_both_pages() {
    let (_, status, code, fault_address) = kernel_access(
        |m| set_pte(m, DATA + 0x1000, PRESENT),
        |a| {
            a.mov(rax, u64::MAX).unwrap();
            a.mov(qword_ptr(DATA + 0xFFC), rax).unwrap();
        },
    );
    assert_eq!((status, code, fault_address), (14, 3, DATA + 0x1000));
}
