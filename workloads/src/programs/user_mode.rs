//! User-mode programs (CPL 3), each started as process 1 at `layout::USER_CODE`. They reach the
//! kernel only through SYSCALL (and, for `divzero` and `pgfault`, through exceptions), report a
//! failed check on the console, and exit with status 1 when a check fails.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use super::shared_drivers::{emit_flat_lsl_check, emit_lar_check, emit_selector_check};
use super::{emit_register_probes, ProbeFailures};
use crate::catalog::ResolvedParams;
use crate::kernel::boot::USER_CODE_ACCESS_RIGHTS;
use crate::kernel::syscalls::*;
use crate::kernel::AsmResult;
use crate::layout::*;
use crate::symbols::{FunctionLabels, Symbol};

const ERROR: i32 = -1;
/// `demandzero` maps this many pages at a time, touches each once, then unmaps them.
const DEMANDZERO_CHUNK_PAGES: i32 = 64;
/// `pgfault` reads here: user space that no region, the stack or the program covers.
const PGFAULT_ADDRESS: u64 = USER_BASE + 0x2000_0000;
/// What `cow`'s child writes over each shared page.
const COW_CHILD_VALUE: i32 = 0x0C0F_FEE0;
const COW_CHILD_STATUS: i32 = 9;
/// `mmap` maps this many pages per iteration.
const MMAP_PAGES: i32 = 4;
/// `forkwait` children exit with (index mod this) + 1, so a status of 0 is never expected.
const FORKWAIT_STATUS_MODULUS: i32 = 200;
const CTXSWITCH_CHILD_STATUS: i32 = 7;
const RFLAGS_IF: u32 = 0x200;
const RFLAGS_IOPL: u32 = 0x3000;
const COMPUTE_SEED: u64 = 0x9E37_79B9_7F4A_7C15;
const COMPUTE_MULTIPLIER: i32 = 31;

/// A user program under construction.
pub(super) struct UserProgram {
    pub(super) a: CodeAssembler,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    failures: Vec<(CodeLabel, String)>,
    functions: FunctionLabels,
}

impl UserProgram {
    pub(super) fn new() -> AsmResult<Self> {
        let mut a = CodeAssembler::new(64)?;
        let mut functions = FunctionLabels::default();
        functions.begin(&mut a, "main")?;
        Ok(UserProgram { a, strings: Vec::new(), failures: Vec::new(), functions })
    }

    pub(super) fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    pub(super) fn bind(&mut self, label: &mut CodeLabel) -> AsmResult {
        self.a.set_label(label)
    }

    /// Binds `label` and names the code from there to the next named label `name` in the symbol map.
    pub(super) fn bind_function(&mut self, label: &mut CodeLabel, name: &str) -> AsmResult {
        self.a.set_label(label)?;
        self.functions.add(name, *label);
        Ok(())
    }

    pub(super) fn syscall(&mut self, number: u32) -> AsmResult {
        self.a.mov(eax, number)?;
        self.a.syscall()
    }

    pub(super) fn write(&mut self, text: &str) -> AsmResult {
        let label = self.a.create_label();
        self.strings.push((label, text.as_bytes().to_vec()));
        self.a.lea(rdi, ptr(label))?;
        self.a.mov(esi, text.len() as u32)?;
        self.syscall(SYS_WRITE)
    }

    pub(super) fn exit(&mut self, status: u32) -> AsmResult {
        self.a.mov(edi, status)?;
        self.syscall(SYS_EXIT)
    }

    /// A label that prints `check failed: <message>` and exits with status 1.
    pub(super) fn failure(&mut self, message: &str) -> CodeLabel {
        let label = self.a.create_label();
        self.failures.push((label, message.to_string()));
        label
    }

    /// R12 = iterations; `body`; DEC R12; JNZ back. The kernel preserves R12 across system calls.
    pub(super) fn counted_loop(&mut self, iterations: u64, body: impl FnOnce(&mut Self) -> AsmResult) -> AsmResult {
        let mut top = self.label();
        self.a.mov(r12, iterations)?;
        self.bind(&mut top)?;
        body(self)?;
        self.a.dec(r12)?;
        self.a.jnz(top)
    }

    /// The program's bytes at `USER_CODE` and its symbols.
    pub(super) fn finish(mut self) -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
        for (i, (mut label, message)) in std::mem::take(&mut self.failures).into_iter().enumerate() {
            self.bind(&mut label)?;
            if i == 0 {
                self.functions.add("failure_paths", label);
            }
            self.write(&format!("check failed: {message}\n"))?;
            self.exit(1)?;
        }
        for (mut label, bytes) in std::mem::take(&mut self.strings) {
            self.a.set_label(&mut label)?;
            self.functions.end_code_at(label);
            self.a.db(&bytes)?;
        }
        self.functions.assemble(&mut self.a, USER_CODE)
    }
}

pub(crate) fn assemble(name: &str, params: &ResolvedParams) -> Result<(Vec<u8>, Vec<Symbol>), IcedError> {
    let iterations = params.get("iterations");
    let mut p = UserProgram::new()?;
    match name {
        "syscall" => null_syscall(&mut p, iterations)?,
        "pgfault" => page_fault(&mut p, iterations)?,
        "demandzero" => demand_zero(&mut p, iterations)?,
        "cow" => copy_on_write(&mut p, iterations, params.get("pages"))?,
        "divzero" => divide_by_zero(&mut p, iterations)?,
        "redpill" => red_pill(&mut p, iterations)?,
        "forkwait" => fork_wait(&mut p, iterations)?,
        "ctxswitch" => context_switch(&mut p, iterations)?,
        "mmap" => map_touch_unmap(&mut p, iterations)?,
        "compute" => compute(&mut p, iterations)?,
        "memtouch" => memory_touch(&mut p, iterations, params.get("pages"))?,
        "syscall-mix" => syscall_mix(&mut p, iterations)?,
        _ => unreachable!("user-mode catalog entry `{name}` has no program"),
    }
    p.exit(0)?;
    p.finish()
}

fn null_syscall(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let wrong = p.failure("getpid did not return 1");
    p.counted_loop(iterations, |p| {
        p.syscall(SYS_GETPID)?;
        p.a.cmp(rax, 1)?;
        p.a.jne(wrong)
    })
}

/// Adams & Agesen's pgfault: each iteration reads a user address nothing maps; the kernel finds no page to give
/// and delivers the fault to the program's trap handler (as a #DE is), which skips the read. No page-table
/// entry is written.
fn page_fault(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let wrong_address = p.failure("the trap handler got the wrong faulting address");
    let wrong_count = p.failure("not every read faulted");
    emit_trapping_loop(
        p,
        iterations,
        wrong_address,
        wrong_count,
        |p| p.a.mov(rcx, PGFAULT_ADDRESS),
        |p| p.a.mov(rax, qword_ptr(rcx)),
    )
}

/// A loop whose faulting instruction (`fault`, after `setup`) traps on every iteration; the registered handler
/// checks the faulting address, counts the trap in R13 and resumes after it. Checks every iteration trapped.
fn emit_trapping_loop(
    p: &mut UserProgram,
    iterations: u64,
    wrong_address: CodeLabel,
    wrong_count: CodeLabel,
    setup: impl FnOnce(&mut UserProgram) -> AsmResult,
    fault: impl FnOnce(&mut UserProgram) -> AsmResult,
) -> AsmResult {
    let mut handler = p.label();
    let mut faulting = p.label();
    let mut resume = p.label();
    let mut done = p.label();
    let mut top = p.label();
    p.a.lea(rdi, ptr(handler))?;
    p.syscall(SYS_SET_TRAP_HANDLER)?;
    p.a.xor(r13d, r13d)?;
    p.a.mov(r12, iterations)?;
    p.bind(&mut top)?;
    setup(p)?;
    p.bind(&mut faulting)?;
    fault(p)?;
    p.bind(&mut resume)?;
    p.a.dec(r12)?;
    p.a.jnz(top)?;
    p.a.mov(rax, iterations)?;
    p.a.cmp(r13, rax)?;
    p.a.jne(wrong_count)?;
    p.a.jmp(done)?;
    p.bind_function(&mut handler, "trap_handler")?;
    p.a.lea(rax, ptr(faulting))?;
    p.a.cmp(rdi, rax)?;
    p.a.jne(wrong_address)?;
    p.a.inc(r13)?;
    p.a.jmp(resume)?;
    p.bind_function(&mut done, "main")?;
    p.a.xor(edi, edi)?;
    p.syscall(SYS_SET_TRAP_HANDLER)
}

/// Copy-on-write after fork: the parent fills `pages` pages; each iteration forks a child that checks it sees
/// the parent's values and writes every page (a copy-on-write fault that copies: the parent still shares it)
/// and exits; the parent waits, checks its own values survived, and writes every page again (a copy-on-write
/// fault that copies nothing: the parent is the last sharer).
fn copy_on_write(p: &mut UserProgram, iterations: u64, pages: u64) -> AsmResult {
    let mmap_failed = p.failure("mmap failed");
    let fork_failed = p.failure("fork failed");
    let child_saw_wrong = p.failure("the child did not see the parent's values");
    let parent_saw_wrong = p.failure("the child's writes reached the parent");
    let wrong_status = p.failure("the child's exit status was wrong");
    let mut top = p.label();
    let mut child = p.label();
    let mut done = p.label();
    p.a.mov(rdi, pages * 4096)?;
    p.syscall(SYS_MMAP)?;
    p.a.cmp(rax, ERROR)?;
    p.a.je(mmap_failed)?;
    p.a.mov(rbx, rax)?;
    // Page i holds R13 + i, where R13 counts the iterations the parent has begun.
    p.a.xor(r13d, r13d)?;
    emit_page_loop(p, pages, |p| {
        p.a.lea(rax, ptr(r13 + rcx))?;
        p.a.mov(qword_ptr(rdx), rax)
    })?;
    p.a.mov(r12, iterations)?;
    p.bind(&mut top)?;
    p.syscall(SYS_FORK)?;
    p.a.cmp(rax, ERROR)?;
    p.a.je(fork_failed)?;
    p.a.test(rax, rax)?;
    p.a.jz(child)?;
    p.syscall(SYS_WAIT)?;
    p.a.cmp(rax, COW_CHILD_STATUS)?;
    p.a.jne(wrong_status)?;
    emit_page_loop(p, pages, |p| {
        p.a.lea(rax, ptr(r13 + rcx))?;
        p.a.cmp(qword_ptr(rdx), rax)?;
        p.a.jne(parent_saw_wrong)?;
        p.a.inc(rax)?;
        p.a.mov(qword_ptr(rdx), rax)
    })?;
    p.a.inc(r13)?;
    p.a.dec(r12)?;
    p.a.jnz(top)?;
    p.a.jmp(done)?;
    p.bind(&mut child)?;
    emit_page_loop(p, pages, |p| {
        p.a.lea(rax, ptr(r13 + rcx))?;
        p.a.cmp(qword_ptr(rdx), rax)?;
        p.a.jne(child_saw_wrong)?;
        p.a.mov(qword_ptr(rdx), COW_CHILD_VALUE)
    })?;
    p.exit(COW_CHILD_STATUS as u32)?;
    // The exit that `assemble` appends carries the label.
    p.bind(&mut done)
}

/// For each of `pages` pages from RBX: RCX = the page's index, RDX = its address, then `body`.
fn emit_page_loop(p: &mut UserProgram, pages: u64, body: impl FnOnce(&mut UserProgram) -> AsmResult) -> AsmResult {
    let mut next = p.label();
    p.a.xor(ecx, ecx)?;
    p.a.mov(rdx, rbx)?;
    p.bind(&mut next)?;
    body(p)?;
    p.a.inc(rcx)?;
    p.a.add(rdx, 4096)?;
    p.a.cmp(rcx, pages as i32)?;
    p.a.jb(next)
}

/// Maps pages in chunks; the first access to each page (a read that must see zeroes) is a true page fault the
/// kernel resolves with a fresh zeroed frame; unmapping clears the entries again.
fn demand_zero(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let mmap_failed = p.failure("mmap failed");
    let munmap_failed = p.failure("munmap failed");
    let not_zero = p.failure("a fresh page was not zero-filled");
    let mut chunk = p.label();
    let mut touch = p.label();
    p.a.mov(r12, iterations)?;
    p.bind(&mut chunk)?;
    p.a.mov(r13d, DEMANDZERO_CHUNK_PAGES as u32)?;
    p.a.cmp(r12, r13)?;
    p.a.cmovb(r13, r12)?;
    p.a.mov(rdi, r13)?;
    p.a.shl(rdi, 12)?;
    p.syscall(SYS_MMAP)?;
    p.a.cmp(rax, ERROR)?;
    p.a.je(mmap_failed)?;
    p.a.mov(rbx, rax)?;
    p.a.mov(r14, rbx)?;
    p.a.mov(r15, r13)?;
    p.bind(&mut touch)?;
    p.a.cmp(qword_ptr(r14), 0)?;
    p.a.jne(not_zero)?;
    p.a.mov(qword_ptr(r14), r15)?;
    p.a.add(r14, 4096)?;
    p.a.dec(r15)?;
    p.a.jnz(touch)?;
    p.a.mov(rdi, rbx)?;
    p.a.mov(rsi, r13)?;
    p.a.shl(rsi, 12)?;
    p.syscall(SYS_MUNMAP)?;
    p.a.test(rax, rax)?;
    p.a.jnz(munmap_failed)?;
    p.a.sub(r12, r13)?;
    p.a.jnz(chunk)
}

/// Each iteration divides by zero; the kernel delivers #DE to the registered handler with the
/// faulting address in RDI, and the handler resumes after the DIV.
fn divide_by_zero(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let wrong_address = p.failure("the trap handler got the wrong faulting address");
    let wrong_count = p.failure("not every division trapped");
    emit_trapping_loop(
        p,
        iterations,
        wrong_address,
        wrong_count,
        |p| {
            p.a.mov(eax, 1)?;
            p.a.xor(edx, edx)?;
            p.a.xor(ecx, ecx)
        },
        |p| p.a.div(ecx),
    )
}

/// The readable sensitive instructions from user mode, each checked against the guest's own
/// descriptor tables and CR0.
fn red_pill(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let probe_failures = ProbeFailures::new(|message| p.failure(message));
    let wrong_flags = p.failure("PUSHF did not show IF set and IOPL 0");
    let wrong_lar = p.failure("LAR did not return the user code segment's access rights");
    let wrong_lsl = p.failure("LSL did not return the flat user data segment limit");
    let wrong_verify = p.failure("VERR/VERW disagreed with the segments' privilege");
    let wrong_selectors = p.failure("MOV from CS/SS did not return the user selectors");
    p.a.sub(rsp, 16)?;
    p.counted_loop(iterations, |p| {
        emit_register_probes(&mut p.a, &probe_failures)?;
        p.a.pushfq()?;
        p.a.pop(rax)?;
        p.a.and(eax, RFLAGS_IF | RFLAGS_IOPL)?;
        p.a.cmp(eax, RFLAGS_IF)?;
        p.a.jne(wrong_flags)?;
        emit_lar_check(&mut p.a, USER_CODE_SELECTOR, USER_CODE_ACCESS_RIGHTS, wrong_lar)?;
        p.a.verr(cx)?;
        p.a.jnz(wrong_verify)?;
        emit_flat_lsl_check(&mut p.a, USER_DATA_SELECTOR, wrong_lsl)?;
        p.a.verw(cx)?;
        p.a.jnz(wrong_verify)?;
        // The kernel's code segment is DPL 0: not readable from CPL 3.
        p.a.mov(ecx, KERNEL_CODE_SELECTOR as u32)?;
        p.a.verr(cx)?;
        p.a.jz(wrong_verify)?;
        emit_selector_check(&mut p.a, USER_CODE_SELECTOR, USER_DATA_SELECTOR, wrong_selectors)
    })?;
    p.a.add(rsp, 16)
}

/// Child i exits with (i mod 200) + 1; the parent checks every status it reaps.
fn fork_wait(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let fork_failed = p.failure("fork failed");
    let wrong_status = p.failure("wait returned the wrong exit status");
    let mut top = p.label();
    let mut child = p.label();
    let mut done = p.label();
    p.a.xor(r13d, r13d)?;
    p.bind(&mut top)?;
    p.syscall(SYS_FORK)?;
    p.a.cmp(rax, ERROR)?;
    p.a.je(fork_failed)?;
    p.a.test(rax, rax)?;
    p.a.jz(child)?;
    p.syscall(SYS_WAIT)?;
    p.a.mov(rbx, rax)?;
    p.a.mov(rax, r13)?;
    p.a.xor(edx, edx)?;
    p.a.mov(ecx, FORKWAIT_STATUS_MODULUS as u32)?;
    p.a.div(rcx)?;
    p.a.inc(rdx)?;
    p.a.cmp(rbx, rdx)?;
    p.a.jne(wrong_status)?;
    p.a.inc(r13)?;
    p.a.mov(rax, iterations)?;
    p.a.cmp(r13, rax)?;
    p.a.jb(top)?;
    p.a.jmp(done)?;
    p.bind(&mut child)?;
    p.a.mov(rax, r13)?;
    p.a.xor(edx, edx)?;
    p.a.mov(ecx, FORKWAIT_STATUS_MODULUS as u32)?;
    p.a.div(rcx)?;
    p.a.lea(rdi, ptr(rdx + 1))?;
    p.syscall(SYS_EXIT)?;
    // The exit that `assemble` appends carries the label.
    p.bind(&mut done)
}

/// Parent and child each yield `iterations` times; with two runnable processes every yield
/// switches to the other one.
fn context_switch(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let fork_failed = p.failure("fork did not return pid 2");
    let wrong_status = p.failure("the child's exit status was wrong");
    let mut child = p.label();
    let mut parent_done = p.label();
    p.syscall(SYS_FORK)?;
    p.a.test(rax, rax)?;
    p.a.jz(child)?;
    p.a.cmp(rax, 2)?;
    p.a.jne(fork_failed)?;
    p.counted_loop(iterations, |p| p.syscall(SYS_YIELD))?;
    p.syscall(SYS_WAIT)?;
    p.a.cmp(rax, CTXSWITCH_CHILD_STATUS)?;
    p.a.jne(wrong_status)?;
    p.a.jmp(parent_done)?;
    p.bind(&mut child)?;
    p.counted_loop(iterations, |p| p.syscall(SYS_YIELD))?;
    p.exit(CTXSWITCH_CHILD_STATUS as u32)?;
    // The exit that `assemble` appends carries the label.
    p.bind(&mut parent_done)
}

/// Maps four pages, checks they read as zero, writes and reads back each page's address, and
/// unmaps them; the address range is reused every time.
fn map_touch_unmap(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let mmap_failed = p.failure("mmap did not reuse the unmapped range");
    let munmap_failed = p.failure("munmap failed");
    let not_zero = p.failure("a fresh page was not zero-filled");
    let lost_write = p.failure("a page did not keep what was written");
    p.counted_loop(iterations, |p| {
        p.a.mov(edi, (MMAP_PAGES * 4096) as u32)?;
        p.syscall(SYS_MMAP)?;
        p.a.mov(rcx, USER_MMAP_BASE)?;
        p.a.cmp(rax, rcx)?;
        p.a.jne(mmap_failed)?;
        for page in 0..MMAP_PAGES {
            p.a.lea(rdx, ptr(rax + page * 4096))?;
            p.a.cmp(qword_ptr(rdx), 0)?;
            p.a.jne(not_zero)?;
            p.a.mov(qword_ptr(rdx), rdx)?;
            p.a.cmp(qword_ptr(rdx), rdx)?;
            p.a.jne(lost_write)?;
        }
        p.a.mov(rdi, rax)?;
        p.a.mov(esi, (MMAP_PAGES * 4096) as u32)?;
        p.syscall(SYS_MUNMAP)?;
        p.a.test(rax, rax)?;
        p.a.jnz(munmap_failed)
    })
}

/// What `compute` must arrive at: xorshift64 steps folded by multiply-accumulate.
fn compute_expected(iterations: u64) -> u64 {
    let mut state = COMPUTE_SEED;
    let mut sum = 0u64;
    for _ in 0..iterations {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        sum = sum.wrapping_mul(COMPUTE_MULTIPLIER as u64).wrapping_add(state);
    }
    sum
}

pub(super) fn compute(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let wrong = p.failure("the computed checksum is wrong");
    p.a.mov(rax, COMPUTE_SEED)?;
    p.a.xor(ebx, ebx)?;
    p.counted_loop(iterations, |p| {
        for (shift_left, amount) in [(true, 13), (false, 7), (true, 17)] {
            p.a.mov(rdx, rax)?;
            if shift_left {
                p.a.shl(rdx, amount)?;
            } else {
                p.a.shr(rdx, amount)?;
            }
            p.a.xor(rax, rdx)?;
        }
        p.a.imul_3(rbx, rbx, COMPUTE_MULTIPLIER)?;
        p.a.add(rbx, rax)
    })?;
    p.a.mov(rcx, compute_expected(iterations))?;
    p.a.cmp(rbx, rcx)?;
    p.a.jne(wrong)
}

/// Each pass increments one quadword in every page and sums the new values; after n passes the
/// sum is pages * n(n+1)/2.
fn memory_touch(p: &mut UserProgram, iterations: u64, pages: u64) -> AsmResult {
    let mmap_failed = p.failure("mmap failed");
    let wrong = p.failure("the sum over the pages is wrong");
    let mut next_page = p.label();
    p.a.mov(rdi, pages * 4096)?;
    p.syscall(SYS_MMAP)?;
    p.a.cmp(rax, ERROR)?;
    p.a.je(mmap_failed)?;
    p.a.mov(r13, rax)?;
    p.a.xor(ebx, ebx)?;
    p.counted_loop(iterations, |p| {
        p.a.mov(rdi, r13)?;
        p.a.mov(rcx, pages)?;
        p.bind(&mut next_page)?;
        p.a.mov(rax, qword_ptr(rdi))?;
        p.a.inc(rax)?;
        p.a.mov(qword_ptr(rdi), rax)?;
        p.a.add(rbx, rax)?;
        p.a.add(rdi, 4096)?;
        p.a.dec(rcx)?;
        p.a.jnz(next_page)
    })?;
    let expected = pages * (iterations * (iterations + 1) / 2);
    p.a.mov(rcx, expected)?;
    p.a.cmp(rbx, rcx)?;
    p.a.jne(wrong)
}

/// Per iteration: getpid, a one-byte write, and a one-page mmap that is touched and unmapped.
fn syscall_mix(p: &mut UserProgram, iterations: u64) -> AsmResult {
    let wrong_pid = p.failure("getpid did not return 1");
    let wrong_write = p.failure("write did not return its length");
    let mmap_failed = p.failure("mmap failed");
    let munmap_failed = p.failure("munmap failed");
    p.counted_loop(iterations, |p| {
        p.syscall(SYS_GETPID)?;
        p.a.cmp(rax, 1)?;
        p.a.jne(wrong_pid)?;
        p.write(".")?;
        p.a.cmp(rax, 1)?;
        p.a.jne(wrong_write)?;
        p.a.mov(edi, 4096)?;
        p.syscall(SYS_MMAP)?;
        p.a.cmp(rax, ERROR)?;
        p.a.je(mmap_failed)?;
        p.a.mov(qword_ptr(rax), rax)?;
        p.a.mov(rdi, rax)?;
        p.a.mov(esi, 4096)?;
        p.syscall(SYS_MUNMAP)?;
        p.a.test(rax, rax)?;
        p.a.jnz(munmap_failed)
    })?;
    p.write("\n")
}
