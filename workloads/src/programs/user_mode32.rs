//! User-mode programs (CPL 3) of the 32-bit kernel, started as process 1 at `kernel32::USER_CODE`. They reach
//! the kernel through `INT 0x80` or, with `sysenter=1`, SYSENTER (and, for `divzero` and `pgfault`, through
//! exceptions), report a failed check on the console, and exit with status 1 when a check fails.
//!
//! System calls: EAX = number (the 64-bit kernel's numbers), arguments in EBX, ESI, EDI; the result in EAX.
//! `INT 0x80` preserves every other register; the SYSENTER path clobbers ECX and EDX too (SYSEXIT takes the
//! user stack and return address from them).

use iced_x86::code_asm::*;

use super::shared_drivers::{emit_flat_lsl_check, emit_lar_check, emit_selector_check};
use super::{emit_register_probes_32, ProbeFailures};
use crate::asm32::{self, selector, LabelAddresses, Pass};
use crate::catalog::ResolvedParams;
use crate::kernel::syscalls::*;
use crate::kernel::AsmResult;
use crate::kernel32::memory::MMAP_BASE;
use crate::kernel32::{gdt, SYSCALL_VECTOR, USER_CODE};
use crate::symbols::{FunctionLabels, Symbol};

/// `pgfault` reads here: user space that nothing maps (its page-directory entry is not present).
pub const PGFAULT_ADDRESS: u32 = 0x6000_0000;
const EFLAGS_IF: u32 = 0x200;
const EFLAGS_IOPL: u32 = 0x3000;
const COMPUTE_SEED: u32 = 0x9E37_79B9;
const COMPUTE_MULTIPLIER: u32 = 31;
/// `mmap` maps this many pages per iteration; `demandzero` this many at a time.
const MMAP_PAGES: u32 = 4;
const DEMANDZERO_CHUNK_PAGES: u32 = 64;
/// `forkwait` children exit with (index mod this) + 1, so a status of 0 is never expected.
const FORKWAIT_STATUS_MODULUS: u32 = 200;
const CTXSWITCH_CHILD_STATUS: u32 = 7;
/// What `cow`'s child writes over each shared page, and the status it exits with.
const COW_CHILD_VALUE: u32 = 0x0C0F_FEE0;
const COW_CHILD_STATUS: u32 = 9;

/// How a program enters the kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    Int80,
    Sysenter,
}

/// One pass of a user program under construction.
struct UserProgram32 {
    a: CodeAssembler,
    labels: LabelAddresses,
    entry: Entry,
    sysenter_stub: CodeLabel,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    failures: Vec<(CodeLabel, String)>,
    functions: FunctionLabels,
}

impl UserProgram32 {
    fn new(known: Vec<u32>, entry: Entry) -> AsmResult<Self> {
        let mut a = CodeAssembler::new(32)?;
        let sysenter_stub = a.create_label();
        let mut functions = FunctionLabels::default();
        functions.begin(&mut a, "main")?;
        Ok(UserProgram32 {
            a,
            labels: LabelAddresses::new(known),
            entry,
            sysenter_stub,
            strings: Vec::new(),
            failures: Vec::new(),
            functions,
        })
    }

    fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    fn bind(&mut self, label: &mut CodeLabel) -> AsmResult {
        self.labels.bind(&mut self.a, label)
    }

    fn address_of(&mut self, label: CodeLabel) -> u32 {
        self.labels.address_of(label)
    }

    /// System call `number` through the program's entry. SYSENTER goes through a stub that makes the return
    /// address and stack SYSEXIT needs: it pops the caller's return address into EDX and the stack it leaves
    /// into ECX, so SYSEXIT resumes after the call with the stack as it was before it.
    fn syscall(&mut self, number: u32) -> AsmResult {
        self.a.mov(eax, number)?;
        match self.entry {
            Entry::Int80 => self.a.int(SYSCALL_VECTOR),
            Entry::Sysenter => self.a.call(self.sysenter_stub),
        }
    }

    fn write(&mut self, text: &str) -> AsmResult {
        let label = self.a.create_label();
        self.strings.push((label, text.as_bytes().to_vec()));
        let address = self.address_of(label);
        self.a.mov(ebx, address)?;
        self.a.mov(esi, text.len() as u32)?;
        self.syscall(SYS_WRITE)
    }

    fn exit(&mut self, status: u32) -> AsmResult {
        self.a.mov(ebx, status)?;
        self.syscall(SYS_EXIT)
    }

    /// A label that prints `check failed: <message>` and exits with status 1.
    fn failure(&mut self, message: &str) -> CodeLabel {
        let label = self.a.create_label();
        self.failures.push((label, message.to_string()));
        label
    }

    /// EBP = iterations; `body`; DEC EBP; JNZ back. The kernel preserves EBP across system calls.
    fn counted_loop(&mut self, iterations: u32, body: impl FnOnce(&mut Self) -> AsmResult) -> AsmResult {
        let mut top = self.label();
        self.a.mov(ebp, iterations)?;
        self.bind(&mut top)?;
        body(self)?;
        self.a.dec(ebp)?;
        self.a.jnz(top)
    }

    /// The failure paths, the SYSENTER stub and the strings; then the bytes at `USER_CODE`, the symbols, and the
    /// addresses the code took.
    fn finish(mut self) -> Pass<(Vec<u8>, Vec<Symbol>)> {
        for (i, (mut label, message)) in std::mem::take(&mut self.failures).into_iter().enumerate() {
            self.bind(&mut label)?;
            if i == 0 {
                self.functions.add("failure_paths", label);
            }
            self.write(&format!("check failed: {message}\n"))?;
            self.exit(1)?;
        }
        if self.entry == Entry::Sysenter {
            let mut stub = self.sysenter_stub;
            self.bind(&mut stub)?;
            self.functions.add("sysenter_stub", stub);
            self.a.pop(edx)?;
            self.a.mov(ecx, esp)?;
            self.a.sysenter()?;
        }
        for (mut label, bytes) in std::mem::take(&mut self.strings) {
            self.bind(&mut label)?;
            self.functions.end_code_at(label);
            self.a.db(&bytes)?;
        }
        let (result, addresses) = self.labels.assemble(&mut self.a, u64::from(USER_CODE))?;
        let symbols = self.functions.symbols_in(&result, u64::from(USER_CODE))?;
        Ok(((result.inner.code_buffer, symbols), addresses))
    }
}

/// The user program of a 32-bit catalog workload: its bytes at `USER_CODE` and its symbols.
pub(crate) fn assemble(name: &str, params: &ResolvedParams, entry: Entry) -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
    let iterations = params.get("iterations") as u32;
    let pages = params.0.iter().find(|(param, _)| *param == "pages").map_or(0, |(_, value)| *value as u32);
    let program: fn(&mut UserProgram32, u32, u32) -> AsmResult = match name {
        "syscall" => |p, iterations, _| null_syscall(p, iterations),
        "pgfault" => |p, iterations, _| page_fault(p, iterations),
        "divzero" => |p, iterations, _| divide_by_zero(p, iterations),
        "compute" => |p, iterations, _| compute(p, iterations),
        "redpill" => |p, iterations, _| red_pill(p, iterations),
        "mmap" => |p, iterations, _| map_touch_unmap(p, iterations),
        "demandzero" => |p, iterations, _| demand_zero(p, iterations),
        "memtouch" => memory_touch,
        "syscall-mix" => |p, iterations, _| syscall_mix(p, iterations),
        "forkwait" => |p, iterations, _| fork_wait(p, iterations),
        "ctxswitch" => |p, iterations, _| context_switch(p, iterations),
        "cow" => copy_on_write,
        _ => unreachable!("user-mode catalog entry `{name}` has no 32-bit program"),
    };
    assemble_program(entry, |p| {
        program(p, iterations, pages)?;
        p.exit(0)
    })
}

/// Assembles the program `emit` writes (in two passes: it must emit the same code both times).
fn assemble_program(entry: Entry, emit: impl Fn(&mut UserProgram32) -> AsmResult) -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
    asm32::assemble_twice(|known| {
        let mut p = UserProgram32::new(known, entry)?;
        emit(&mut p)?;
        p.finish()
    })
}

/// mmap(EBX = length) → EAX = the address, −1 on failure.
fn mmap(p: &mut UserProgram32, failed: CodeLabel) -> AsmResult {
    p.syscall(SYS_MMAP)?;
    p.a.cmp(eax, u32::MAX)?;
    p.a.je(failed)
}

/// munmap(EBX = address, ESI = length) must return 0.
fn munmap(p: &mut UserProgram32, failed: CodeLabel) -> AsmResult {
    p.syscall(SYS_MUNMAP)?;
    p.a.test(eax, eax)?;
    p.a.jnz(failed)
}

/// Maps four pages, checks they read as zero, writes and reads back each page's address, and unmaps them; the
/// mapping is at the same address every time.
fn map_touch_unmap(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let mmap_failed = p.failure("mmap did not reuse the unmapped range");
    let munmap_failed = p.failure("munmap failed");
    let not_zero = p.failure("a fresh page was not zero-filled");
    let lost_write = p.failure("a page did not keep what was written");
    p.counted_loop(iterations, |p| {
        p.a.mov(ebx, MMAP_PAGES * 4096)?;
        mmap(p, mmap_failed)?;
        p.a.cmp(eax, MMAP_BASE)?;
        p.a.jne(mmap_failed)?;
        for page in 0..MMAP_PAGES as i32 {
            p.a.lea(edx, ptr(eax + page * 4096))?;
            p.a.cmp(dword_ptr(edx), 0)?;
            p.a.jne(not_zero)?;
            p.a.mov(dword_ptr(edx), edx)?;
            p.a.cmp(dword_ptr(edx), edx)?;
            p.a.jne(lost_write)?;
        }
        p.a.mov(ebx, eax)?;
        p.a.mov(esi, MMAP_PAGES * 4096)?;
        munmap(p, munmap_failed)
    })
}

/// Maps pages in chunks of 64; the first access to each page (a read that must see zeroes) is a true page fault
/// the kernel resolves with a fresh zeroed frame; unmapping clears the entries again.
fn demand_zero(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let mmap_failed = p.failure("mmap failed");
    let munmap_failed = p.failure("munmap failed");
    let not_zero = p.failure("a fresh page was not zero-filled");
    let (mut chunk, mut touch) = (p.label(), p.label());
    // EBP = pages left, ECX = this chunk's pages, EDX = its address, EDI = the page touched, ESI = pages to touch.
    p.a.mov(ebp, iterations)?;
    p.bind(&mut chunk)?;
    p.a.mov(ecx, DEMANDZERO_CHUNK_PAGES)?;
    p.a.cmp(ebp, ecx)?;
    p.a.cmovb(ecx, ebp)?;
    p.a.mov(ebx, ecx)?;
    p.a.shl(ebx, 12)?;
    mmap(p, mmap_failed)?;
    p.a.mov(edx, eax)?;
    p.a.mov(edi, eax)?;
    p.a.mov(esi, ecx)?;
    p.bind(&mut touch)?;
    p.a.cmp(dword_ptr(edi), 0)?;
    p.a.jne(not_zero)?;
    p.a.mov(dword_ptr(edi), esi)?;
    p.a.add(edi, 4096)?;
    p.a.dec(esi)?;
    p.a.jnz(touch)?;
    p.a.mov(ebx, edx)?;
    p.a.mov(esi, ecx)?;
    p.a.shl(esi, 12)?;
    munmap(p, munmap_failed)?;
    p.a.sub(ebp, ecx)?;
    p.a.jnz(chunk)
}

/// Streams over `pages` demand-zero pages `iterations` times, one read-modify-write of each page's first dword
/// per pass; the sum of the values read back is known (modulo 2^32).
fn memory_touch(p: &mut UserProgram32, iterations: u32, pages: u32) -> AsmResult {
    let mmap_failed = p.failure("mmap failed");
    let wrong = p.failure("the sum over the pages is wrong");
    let mut next_page = p.label();
    p.a.mov(ebx, pages * 4096)?;
    mmap(p, mmap_failed)?;
    p.a.mov(esi, eax)?;
    p.a.xor(ebx, ebx)?;
    p.counted_loop(iterations, |p| {
        p.a.mov(edi, esi)?;
        p.a.mov(ecx, pages)?;
        p.bind(&mut next_page)?;
        p.a.mov(eax, dword_ptr(edi))?;
        p.a.inc(eax)?;
        p.a.mov(dword_ptr(edi), eax)?;
        p.a.add(ebx, eax)?;
        p.a.add(edi, 4096)?;
        p.a.dec(ecx)?;
        p.a.jnz(next_page)
    })?;
    let (iterations, pages) = (u64::from(iterations), u64::from(pages));
    let expected = pages * (iterations * (iterations + 1) / 2);
    p.a.cmp(ebx, expected as u32)?;
    p.a.jne(wrong)
}

/// Per iteration: getpid, a one-byte write, and a one-page mmap that is touched and unmapped.
fn syscall_mix(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let wrong_pid = p.failure("getpid did not return 1");
    let wrong_write = p.failure("write did not return its length");
    let mmap_failed = p.failure("mmap failed");
    let munmap_failed = p.failure("munmap failed");
    p.counted_loop(iterations, |p| {
        p.syscall(SYS_GETPID)?;
        p.a.cmp(eax, 1)?;
        p.a.jne(wrong_pid)?;
        p.write(".")?;
        p.a.cmp(eax, 1)?;
        p.a.jne(wrong_write)?;
        p.a.mov(ebx, 4096)?;
        mmap(p, mmap_failed)?;
        p.a.mov(dword_ptr(eax), eax)?;
        p.a.mov(ebx, eax)?;
        p.a.mov(esi, 4096)?;
        munmap(p, munmap_failed)
    })?;
    p.write("\n")
}

/// Child i exits with (i mod 200) + 1; the parent checks every status it reaps. ESI counts the children.
fn fork_wait(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let fork_failed = p.failure("fork failed");
    let wrong_status = p.failure("wait returned the wrong exit status");
    let (mut top, mut child, mut done) = (p.label(), p.label(), p.label());
    // EDX = (ESI mod 200) + 1, the status child ESI exits with.
    let expected_status = |p: &mut UserProgram32| -> AsmResult {
        p.a.mov(eax, esi)?;
        p.a.xor(edx, edx)?;
        p.a.mov(ecx, FORKWAIT_STATUS_MODULUS)?;
        p.a.div(ecx)?;
        p.a.inc(edx)
    };
    p.a.xor(esi, esi)?;
    p.bind(&mut top)?;
    p.syscall(SYS_FORK)?;
    p.a.cmp(eax, u32::MAX)?;
    p.a.je(fork_failed)?;
    p.a.test(eax, eax)?;
    p.a.jz(child)?;
    p.syscall(SYS_WAIT)?;
    p.a.mov(ebx, eax)?;
    expected_status(p)?;
    p.a.cmp(ebx, edx)?;
    p.a.jne(wrong_status)?;
    p.a.inc(esi)?;
    p.a.cmp(esi, iterations)?;
    p.a.jb(top)?;
    p.a.jmp(done)?;
    p.bind(&mut child)?;
    expected_status(p)?;
    p.a.mov(ebx, edx)?;
    p.syscall(SYS_EXIT)?;
    // The exit that `assemble` appends carries the label.
    p.bind(&mut done)
}

/// Parent and child each yield `iterations` times; with two runnable processes every yield switches to the other
/// one.
fn context_switch(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let fork_failed = p.failure("fork did not return pid 2");
    let wrong_status = p.failure("the child's exit status was wrong");
    let (mut child, mut parent_done) = (p.label(), p.label());
    p.syscall(SYS_FORK)?;
    p.a.test(eax, eax)?;
    p.a.jz(child)?;
    p.a.cmp(eax, 2)?;
    p.a.jne(fork_failed)?;
    p.counted_loop(iterations, |p| p.syscall(SYS_YIELD))?;
    p.syscall(SYS_WAIT)?;
    p.a.cmp(eax, CTXSWITCH_CHILD_STATUS)?;
    p.a.jne(wrong_status)?;
    p.a.jmp(parent_done)?;
    p.bind(&mut child)?;
    p.counted_loop(iterations, |p| p.syscall(SYS_YIELD))?;
    p.exit(CTXSWITCH_CHILD_STATUS)?;
    // The exit that `assemble` appends carries the label.
    p.bind(&mut parent_done)
}

/// For each of `pages` pages from EBX: ECX = the page's index, EDX = its address, then `body`.
fn emit_page_loop(p: &mut UserProgram32, pages: u32, body: impl FnOnce(&mut UserProgram32) -> AsmResult) -> AsmResult {
    let mut next = p.label();
    p.a.xor(ecx, ecx)?;
    p.a.mov(edx, ebx)?;
    p.bind(&mut next)?;
    body(p)?;
    p.a.inc(ecx)?;
    p.a.add(edx, 4096)?;
    p.a.cmp(ecx, pages)?;
    p.a.jb(next)
}

/// Copy-on-write after fork: the parent fills `pages` pages; each iteration forks a child that checks it sees
/// the parent's values and writes every page (a copy-on-write fault that copies: the parent still shares it) and
/// exits; the parent waits, checks its own values survived, and writes every page again (a copy-on-write fault
/// that copies nothing: the parent is the last sharer).
fn copy_on_write(p: &mut UserProgram32, iterations: u32, pages: u32) -> AsmResult {
    let mmap_failed = p.failure("mmap failed");
    let fork_failed = p.failure("fork failed");
    let child_saw_wrong = p.failure("the child did not see the parent's values");
    let parent_saw_wrong = p.failure("the child's writes reached the parent");
    let wrong_status = p.failure("the child's exit status was wrong");
    let (mut top, mut child, mut done) = (p.label(), p.label(), p.label());
    p.a.mov(ebx, pages * 4096)?;
    mmap(p, mmap_failed)?;
    p.a.mov(ebx, eax)?;
    // Page i holds ESI + i, where ESI counts the iterations the parent has begun.
    p.a.xor(esi, esi)?;
    emit_page_loop(p, pages, |p| {
        p.a.lea(eax, ptr(esi + ecx))?;
        p.a.mov(dword_ptr(edx), eax)
    })?;
    p.a.mov(ebp, iterations)?;
    p.bind(&mut top)?;
    p.syscall(SYS_FORK)?;
    p.a.cmp(eax, u32::MAX)?;
    p.a.je(fork_failed)?;
    p.a.test(eax, eax)?;
    p.a.jz(child)?;
    p.syscall(SYS_WAIT)?;
    p.a.cmp(eax, COW_CHILD_STATUS)?;
    p.a.jne(wrong_status)?;
    emit_page_loop(p, pages, |p| {
        p.a.lea(eax, ptr(esi + ecx))?;
        p.a.cmp(dword_ptr(edx), eax)?;
        p.a.jne(parent_saw_wrong)?;
        p.a.inc(eax)?;
        p.a.mov(dword_ptr(edx), eax)
    })?;
    p.a.inc(esi)?;
    p.a.dec(ebp)?;
    p.a.jnz(top)?;
    p.a.jmp(done)?;
    p.bind(&mut child)?;
    emit_page_loop(p, pages, |p| {
        p.a.lea(eax, ptr(esi + ecx))?;
        p.a.cmp(dword_ptr(edx), eax)?;
        p.a.jne(child_saw_wrong)?;
        p.a.mov(dword_ptr(edx), COW_CHILD_VALUE)
    })?;
    p.exit(COW_CHILD_STATUS)?;
    // The exit that `assemble` appends carries the label.
    p.bind(&mut done)
}

fn null_syscall(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let wrong = p.failure("getpid did not return 1");
    p.counted_loop(iterations, |p| {
        p.syscall(SYS_GETPID)?;
        p.a.cmp(eax, 1)?;
        p.a.jne(wrong)
    })
}

/// Adams & Agesen's pgfault: each iteration reads a user address nothing maps; the kernel has no page to give and
/// delivers the fault to the program's trap handler, which skips the read.
fn page_fault(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let wrong_address = p.failure("the trap handler got the wrong faulting address");
    let wrong_count = p.failure("not every read faulted");
    emit_trapping_loop(
        p,
        iterations,
        (wrong_address, wrong_count),
        |p| p.a.mov(ecx, PGFAULT_ADDRESS),
        |p| p.a.mov(eax, dword_ptr(ecx)),
    )
}

/// Each iteration divides by zero; the kernel delivers #DE to the registered handler.
fn divide_by_zero(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let wrong_address = p.failure("the trap handler got the wrong faulting address");
    let wrong_count = p.failure("not every division trapped");
    emit_trapping_loop(
        p,
        iterations,
        (wrong_address, wrong_count),
        |p| {
            p.a.mov(eax, 1)?;
            p.a.xor(edx, edx)?;
            p.a.xor(ecx, ecx)
        },
        |p| p.a.div(ecx),
    )
}

/// A loop whose faulting instruction (`fault`, after `setup`) traps on every iteration; the registered handler
/// (entered with EDI = the faulting EIP) checks the address, counts the trap in ESI and resumes after it.
fn emit_trapping_loop(
    p: &mut UserProgram32,
    iterations: u32,
    (wrong_address, wrong_count): (CodeLabel, CodeLabel),
    setup: impl FnOnce(&mut UserProgram32) -> AsmResult,
    fault: impl FnOnce(&mut UserProgram32) -> AsmResult,
) -> AsmResult {
    let (mut handler, mut faulting, mut resume, mut done, mut top) =
        (p.label(), p.label(), p.label(), p.label(), p.label());
    let handler_address = p.address_of(handler);
    p.a.mov(ebx, handler_address)?;
    p.syscall(SYS_SET_TRAP_HANDLER)?;
    p.a.xor(esi, esi)?;
    p.a.mov(ebp, iterations)?;
    p.bind(&mut top)?;
    setup(p)?;
    p.bind(&mut faulting)?;
    fault(p)?;
    p.bind(&mut resume)?;
    p.a.dec(ebp)?;
    p.a.jnz(top)?;
    p.a.cmp(esi, iterations)?;
    p.a.jne(wrong_count)?;
    p.a.jmp(done)?;
    p.bind(&mut handler)?;
    p.functions.add("trap_handler", handler);
    let faulting_address = p.address_of(faulting);
    p.a.mov(eax, faulting_address)?;
    p.a.cmp(edi, eax)?;
    p.a.jne(wrong_address)?;
    p.a.inc(esi)?;
    p.a.jmp(resume)?;
    p.bind(&mut done)?;
    p.functions.add("main", done);
    p.a.xor(ebx, ebx)?;
    p.syscall(SYS_SET_TRAP_HANDLER)
}

/// What `compute` must arrive at: xorshift32 steps folded by multiply-accumulate.
fn compute_expected(iterations: u32) -> u32 {
    let mut state = COMPUTE_SEED;
    let mut sum = 0u32;
    for _ in 0..iterations {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        sum = sum.wrapping_mul(COMPUTE_MULTIPLIER).wrapping_add(state);
    }
    sum
}

fn compute(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let wrong = p.failure("the computed checksum is wrong");
    p.a.mov(eax, COMPUTE_SEED)?;
    p.a.xor(ebx, ebx)?;
    p.counted_loop(iterations, |p| {
        for (shift_left, amount) in [(true, 13), (false, 17), (true, 5)] {
            p.a.mov(edx, eax)?;
            if shift_left {
                p.a.shl(edx, amount)?;
            } else {
                p.a.shr(edx, amount)?;
            }
            p.a.xor(eax, edx)?;
        }
        p.a.imul_3(ebx, ebx, COMPUTE_MULTIPLIER as i32)?;
        p.a.add(ebx, eax)
    })?;
    p.a.cmp(ebx, compute_expected(iterations))?;
    p.a.jne(wrong)
}

/// The readable sensitive instructions from user mode, each checked against the guest's own descriptor tables
/// and CR0.
fn red_pill(p: &mut UserProgram32, iterations: u32) -> AsmResult {
    let probes = ProbeFailures::new(|message| p.failure(message));
    let wrong_flags = p.failure("PUSHFD did not show IF set and IOPL 0");
    let wrong_lar = p.failure("LAR did not return the user code segment's access rights");
    let wrong_lsl = p.failure("LSL did not return the flat user data segment limit");
    let wrong_verify = p.failure("VERR/VERW disagreed with the segments' privilege");
    let wrong_selectors = p.failure("MOV from CS/SS did not return the user selectors");
    let user_code_access_rights = (gdt()[usize::from(selector::USER_CODE >> 3)] >> 32) as u32 & 0x00F0_FF00;
    p.a.sub(esp, 8)?;
    p.counted_loop(iterations, |p| {
        emit_register_probes_32(&mut p.a, &probes)?;
        p.a.pushfd()?;
        p.a.pop(eax)?;
        p.a.and(eax, EFLAGS_IF | EFLAGS_IOPL)?;
        p.a.cmp(eax, EFLAGS_IF)?;
        p.a.jne(wrong_flags)?;
        emit_lar_check(&mut p.a, selector::USER_CODE, user_code_access_rights, wrong_lar)?;
        p.a.verr(cx)?;
        p.a.jnz(wrong_verify)?;
        emit_flat_lsl_check(&mut p.a, selector::USER_DATA, wrong_lsl)?;
        p.a.verw(cx)?;
        p.a.jnz(wrong_verify)?;
        // The kernel's code segment is DPL 0: not readable from CPL 3.
        p.a.mov(ecx, u32::from(selector::KERNEL_CODE))?;
        p.a.verr(cx)?;
        p.a.jz(wrong_verify)?;
        emit_selector_check(&mut p.a, selector::USER_CODE, selector::USER_DATA, wrong_selectors)
    })?;
    p.a.add(esp, 8)
}

/// Paths no 32-bit workload takes when it passes: a user fault that kills process 1, a kernel panic, a system
/// call refused. Booted under QEMU (skipped with the reason when it is missing).
#[cfg(test)]
mod path_tests {
    use std::time::Duration;

    use super::*;
    use crate::catalog::Arch;
    use crate::image::GuestImage;
    use crate::kernel32::{self, process::start_first_process, Kernel32};
    use crate::machine::exit_code;
    use crate::qemu;

    const BANNER: &str = "virtlab: fault-test-32";

    fn boot(kernel: (Vec<u8>, Vec<Symbol>)) -> Option<(String, Option<u32>, Vec<Symbol>)> {
        if let Err(reason) = qemu::available() {
            eprintln!("skipping: {reason}");
            return None;
        }
        let first_page = asm32::first_page().unwrap();
        let image = GuestImage::new("fault-test-32", Vec::new(), Arch::X86_32, first_page, kernel.0, kernel.1);
        let run = qemu::boot(&image.bytes, Duration::from_secs(60)).unwrap();
        let banner_at = run.serial.find(BANNER).expect("the guest printed its banner");
        Some((run.serial[banner_at..].to_string(), run.exit_status, image.symbols))
    }

    fn run_user(emit: impl Fn(&mut UserProgram32) -> AsmResult) -> Option<(String, Option<u32>)> {
        let (program, _) = assemble_program(Entry::Int80, emit).unwrap();
        let kernel = kernel32::assemble(BANNER, |k| start_first_process(k, program.clone())).unwrap();
        boot(kernel).map(|(serial, status, _)| (serial, status))
    }

    #[test]
    fn user_page_fault_without_a_handler_kills_process_1() {
        // MOV ECX, imm32 is 5 bytes: the read after it faults.
        let Some((serial, status)) = run_user(|p| {
            p.a.mov(ecx, PGFAULT_ADDRESS)?;
            p.a.mov(eax, dword_ptr(ecx))
        }) else {
            return;
        };
        assert_eq!(
            serial,
            format!(
                "{BANNER}\nprocess 1 killed by vector 14 at eip 0x{:x}\nFAIL: first process exited with status 142\n",
                USER_CODE + 5
            )
        );
        assert_eq!(status, Some(exit_code::CHECK_FAILED));
    }

    #[test]
    fn write_refuses_a_buffer_outside_the_process_and_exit_reports_the_status() {
        let Some((serial, status)) = run_user(|p| {
            p.a.mov(ebx, 0x10_0000)?;
            p.a.mov(esi, 4)?;
            p.syscall(SYS_WRITE)?;
            p.a.mov(ebx, eax)?;
            p.a.neg(ebx)?;
            p.syscall(SYS_EXIT)
        }) else {
            return;
        };
        assert_eq!(serial, format!("{BANNER}\nFAIL: first process exited with status 1\n"));
        assert_eq!(status, Some(exit_code::CHECK_FAILED));
    }

    /// One mapping at a time: a second mmap is refused, and munmap must name the mapping exactly.
    #[test]
    fn mmap_and_munmap_refuse_what_the_kernel_does_not_have() {
        let Some((serial, status)) = run_user(|p| {
            p.a.mov(ebx, 4096)?;
            p.syscall(SYS_MMAP)?;
            p.a.mov(edi, eax)?;
            p.a.mov(ebx, 4096)?;
            p.syscall(SYS_MMAP)?;
            p.a.add(edi, eax)?;
            p.a.mov(ebx, MMAP_BASE)?;
            p.a.mov(esi, 8192)?;
            p.syscall(SYS_MUNMAP)?;
            p.a.add(edi, eax)?;
            p.a.mov(ebx, MMAP_BASE)?;
            p.a.mov(esi, 4096)?;
            p.syscall(SYS_MUNMAP)?;
            p.a.add(edi, eax)?;
            // EDI = MMAP_BASE + (−1) + (−1) + 0 when each call did as it should: exit with EDI − MMAP_BASE + 9 = 7.
            p.a.lea(ebx, ptr(edi + 9))?;
            p.a.sub(ebx, MMAP_BASE)?;
            p.syscall(SYS_EXIT)
        }) else {
            return;
        };
        assert_eq!(serial, format!("{BANNER}\nFAIL: first process exited with status 7\n"));
        assert_eq!(status, Some(exit_code::CHECK_FAILED));
    }

    #[test]
    fn an_exception_in_the_kernel_is_a_panic() {
        let kernel = kernel32::assemble(BANNER, |k: &mut Kernel32| k.a.ud2()).unwrap();
        let Some((serial, status, symbols)) = boot(kernel) else { return };
        let driver = symbols.iter().find(|s| s.name == "driver").unwrap().start;
        assert_eq!(serial, format!("{BANNER}\npanic: vector 6 error 0x0 eip 0x{driver:x} cr2 0x0\n"));
        assert_eq!(status, Some(exit_code::KERNEL_PANIC));
    }
}
