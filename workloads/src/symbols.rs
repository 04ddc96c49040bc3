//! The image's symbol map: each named label of the assembly (kernel routines, the workload's driver, a user
//! program's functions) becomes a range of guest code, so tools can say `sys_getpid+0x12` instead of an address.

use iced_x86::code_asm::{CodeAssembler, CodeAssemblerResult, CodeLabel};
use iced_x86::{BlockEncoderOptions, IcedError};

/// A function of the guest: `start..end` in guest linear addresses (the kernel is identity mapped; a user
/// program's addresses are those it runs at in user space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The labels of one assembly that name functions, and the label where its code ends (its data begins).
#[derive(Default)]
pub(crate) struct FunctionLabels {
    functions: Vec<(String, CodeLabel)>,
    code_end: Option<CodeLabel>,
}

impl FunctionLabels {
    /// Binds a new label to the next instruction and names the code from there to the next function.
    pub fn begin(&mut self, a: &mut CodeAssembler, name: &str) -> Result<(), IcedError> {
        let mut label = a.create_label();
        a.set_label(&mut label)?;
        self.add(name, label);
        Ok(())
    }

    /// Names the code from `label`, which must have been bound (the copy `set_label` was given).
    pub fn add(&mut self, name: &str, label: CodeLabel) {
        self.functions.push((name.to_string(), label));
    }

    /// Marks where the code ends: the label of the first data item, bound.
    pub fn end_code_at(&mut self, label: CodeLabel) {
        self.code_end.get_or_insert(label);
    }

    /// Assembles at `ip` and returns the bytes and the symbols, sorted by address. Two names on one address keep
    /// the first given; each function runs to the next one, the last to the end of the code.
    pub fn assemble(self, a: &mut CodeAssembler, ip: u64) -> Result<(Vec<u8>, Vec<Symbol>), IcedError> {
        let result = a.assemble_options(ip, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let symbols = self.symbols_in(&result, ip)?;
        Ok((result.inner.code_buffer, symbols))
    }

    /// The symbols of an assembly made at `ip` with new instruction offsets.
    pub fn symbols_in(&self, result: &CodeAssemblerResult, ip: u64) -> Result<Vec<Symbol>, IcedError> {
        let code_end = match &self.code_end {
            Some(label) => result.label_ip(label)?,
            None => ip + result.inner.code_buffer.len() as u64,
        };
        self.symbols(result, code_end)
    }

    fn symbols(&self, result: &CodeAssemblerResult, code_end: u64) -> Result<Vec<Symbol>, IcedError> {
        let mut starts: Vec<(u64, usize)> = Vec::new();
        for (order, (_, label)) in self.functions.iter().enumerate() {
            starts.push((result.label_ip(label)?, order));
        }
        starts.sort_unstable();
        starts.dedup_by_key(|(address, _)| *address);
        let mut symbols = Vec::new();
        for (i, &(start, order)) in starts.iter().enumerate() {
            let end = starts.get(i + 1).map_or(code_end, |next| next.0);
            if start < end {
                symbols.push(Symbol { name: self.functions[order].0.clone(), start, end });
            }
        }
        Ok(symbols)
    }
}
