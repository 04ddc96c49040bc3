//! `virtlab dump`: the event stream, one event per line, like `perf script`.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use virtlab_traces::{Block, BlockId, DescriptorLoad, Direction, Event, TraceView};

/// Print the event stream, one event per line: its index, its kind, and its values. Events that happen inside a
/// block show `@ADDRESS`, the guest address of the instruction that caused them (`@end` after the block's last),
/// and blocks and events name the guest function holding that address, `<sys_getpid+0x12>`, when the trace
/// carries a symbol map (see `virtlab record --help`).
///
/// Example: `virtlab dump run.vlt --from 1000 --limit 50 --disasm`
#[derive(clap::Args)]
pub struct Args {
    /// The trace file.
    trace: PathBuf,
    /// Skip this many events first.
    #[arg(long, default_value_t = 0, value_name = "N")]
    from: u64,
    /// Print at most this many events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Under each block execution, print its instructions in Intel syntax (only those that retired, for a
    /// partial block, then the one that was cut short).
    #[arg(long)]
    disasm: bool,
}

/// The decoded instructions of each block seen so far.
struct Disassembly {
    formatter: IntelFormatter,
    instructions: HashMap<BlockId, Vec<Instruction>>,
}

impl Disassembly {
    fn of(&mut self, id: BlockId, block: &Block) -> &[Instruction] {
        self.instructions.entry(id).or_insert_with(|| {
            Decoder::with_ip(block.mode.bitness(), &block.bytes, block.address, DecoderOptions::NONE)
                .into_iter()
                .collect()
        })
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let bytes = super::read_file(&args.trace)?;
    let view = TraceView::open(&bytes).with_context(|| format!("{} is not a readable trace", args.trace.display()))?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = write_events(&view, args, &mut out).and_then(|()| out.flush().map_err(Into::into));
    if let Err(error) = result {
        match error.downcast::<std::io::Error>() {
            Ok(io) => super::finish_output(Err(io))?,
            Err(other) => return Err(other.context(format!("while reading {}", args.trace.display()))),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_events(view: &TraceView<'_>, args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    let mut disassembly = Disassembly { formatter: IntelFormatter::new(), instructions: HashMap::new() };
    let end = args.limit.map_or(u64::MAX, |limit| args.from.saturating_add(limit));
    // The block execution that later events belong to, and how many instructions it retired.
    let mut current: Option<(BlockId, u32)> = None;
    let mut text = String::new();
    for (index, event) in view.events().enumerate() {
        let index = index as u64;
        if index >= end {
            break;
        }
        let event = event?;
        if let Event::Block(id) = event {
            current = Some((id, view.blocks().get(id).instructions));
        } else if let Event::PartialBlock { block, executed } = event {
            current = Some((block, executed));
        }
        if index < args.from {
            continue;
        }
        write!(out, "{index:>10}  {:<18} ", event.kind().name())?;
        match (event, current) {
            (Event::Block(id) | Event::PartialBlock { block: id, .. }, _) => {
                let block = view.blocks().get(id);
                write!(out, "{id} {:#x} {}-bit", block.address, block.mode.bitness())?;
                if let Event::PartialBlock { executed, .. } = event {
                    write!(out, " {executed} of {} instructions retired", block.instructions)?;
                } else {
                    write!(out, " {} instructions", block.instructions)?;
                }
                if block.tag != 0 {
                    write!(out, " (address space {:#x})", block.tag)?;
                }
                writeln!(out, "{}", function(view, block.address))?;
                if args.disasm {
                    let retired = current.map_or(0, |c| c.1) as usize;
                    let shown = if matches!(event, Event::PartialBlock { .. }) { retired + 1 } else { retired };
                    let instructions = disassembly.of(id, block).to_vec();
                    for (position, instruction) in instructions.iter().take(shown).enumerate() {
                        text.clear();
                        disassembly.formatter.format(instruction, &mut text);
                        let mark = if position == retired { "  <- cut short here" } else { "" };
                        writeln!(out, "{:>30}  {:#018x}  {text}{mark}", "", instruction.ip())?;
                    }
                }
            }
            (_, Some((id, retired))) => {
                let at = event.at().expect("non-block events have a position");
                let block = view.blocks().get(id);
                // Past the retired instructions (or past a whole block's last one) the event happened after them.
                let site = match disassembly.of(id, block).get(at as usize) {
                    Some(instruction) if at <= retired => {
                        format!("@{:#x}{}", instruction.ip(), function(view, instruction.ip()))
                    }
                    _ => "@end".to_string(),
                };
                writeln!(out, "{}", format!("{site:<20} {}", describe(&event)).trim_end())?;
            }
            (_, None) => writeln!(out, "{}", format!("{:<20} {}", "@start", describe(&event)).trim_end())?,
        }
    }
    Ok(())
}

/// ` <name+0x1c>`: the guest function holding `address`, or nothing when the trace does not name it.
fn function(view: &TraceView<'_>, address: u64) -> String {
    view.metadata().symbols.describe(address).map_or(String::new(), |name| format!(" <{name}>"))
}

fn direction(direction: Direction, read: &'static str, write: &'static str) -> &'static str {
    match direction {
        Direction::Read => read,
        Direction::Write => write,
    }
}

/// The values of a non-block event.
fn describe(event: &Event) -> String {
    match *event {
        Event::Block(_) | Event::PartialBlock { .. } => unreachable!("block executions are printed by the caller"),
        Event::Context { context, .. } => format!(
            "cpl={} if={} paging={} cr3={:#x}",
            context.cpl,
            u8::from(context.interrupts_enabled),
            context.paging.name(),
            context.cr3
        ),
        Event::Exception { vector, error_code, cr2, walk, .. } => {
            let mut text = format!("vector={vector}");
            if let Some(code) = error_code {
                text += &format!(" error_code={code:#x}");
            }
            if let Some(cr2) = cr2 {
                text += &format!(" cr2={cr2:#x}");
            }
            text + &walk_text(&walk)
        }
        Event::Interrupt { vector, .. } | Event::SoftwareInterrupt { vector, .. } => format!("vector={vector:#x}"),
        Event::Syscall { .. } | Event::Sysret { .. } | Event::Iret { .. } => String::new(),
        Event::CrWrite { cr, old, new, .. } => format!("cr{cr} {old:#x} -> {new:#x}"),
        Event::MsrRead { index, value, .. } => format!("msr={index:#x} value={value:#x}"),
        Event::MsrWrite { index, value, .. } => format!("msr={index:#x} value={value:#x}"),
        Event::Io { port, size, direction: dir, value, .. } => {
            format!("{} port={port:#x} size={size} value={value:#x}", direction(dir, "in", "out"))
        }
        Event::Cpuid { leaf, subleaf, .. } => format!("leaf={leaf:#x} subleaf={subleaf:#x}"),
        Event::Invlpg { address, .. } => format!("address={address:#x}"),
        Event::DescriptorLoad { load, .. } => match load {
            DescriptorLoad::Gdt { base, limit } => format!("gdt base={base:#x} limit={limit:#x}"),
            DescriptorLoad::Idt { base, limit } => format!("idt base={base:#x} limit={limit:#x}"),
            DescriptorLoad::Ldt { selector } => format!("ldt selector={selector:#x}"),
            DescriptorLoad::Tr { selector } => format!("tr selector={selector:#x}"),
        },
        Event::Hlt { idle, .. } => format!("idle={idle}"),
        Event::PageTableWrite { gpa, level, old, new, .. } => {
            format!("gpa={gpa:#x} level={level} {old:#x} -> {new:#x}")
        }
        Event::PageTouch { page, frame, access, user, size, walk, .. } => format!(
            "page={page:#x} frame={frame:#x} access={} {} size={}K{}",
            match access {
                virtlab_traces::Access::Read => "read",
                virtlab_traces::Access::Write => "write",
                virtlab_traces::Access::Execute => "execute",
            },
            if user { "user" } else { "supervisor" },
            size.bytes() >> 10,
            walk_text(&walk)
        ),
        Event::Mmio { gpa, size, direction: dir, value, .. } => {
            format!("{} gpa={gpa:#x} size={size} value={value:#x}", direction(dir, "load", "store"))
        }
        Event::RepString { elements, .. } => format!("elements={elements}"),
    }
}

/// ` walk=0x200000,0x201000,…`: the guest-physical addresses of the tables a page walk read.
fn walk_text(walk: &virtlab_traces::Walk) -> String {
    if walk.levels() == 0 {
        return String::new();
    }
    let tables: Vec<String> = walk.tables().iter().map(|&frame| format!("{:#x}", u64::from(frame) << 12)).collect();
    format!(" walk={}", tables.join(","))
}
