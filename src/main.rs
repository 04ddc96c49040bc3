//! `virtlab`: the lab's command-line tool. One subcommand per job; see `virtlab --help`.

mod cmd;
mod help;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Subcommand};

const EXIT_CODES: &str = "\
Exit status:
  0  success (for `check`: the trace is valid)
  1  the trace is malformed or breaks an invariant
     (the message names the rule and the byte offset);
     `report`: a results file is missing, corrupt, empty or from a newer schema
  2  bad command line (including an unknown workload or parameter)
  3  a file could not be read or written
  4  `replay`: an engine refused the trace (the others ran; its result says why)
  5  `validate`: a cell or an ordering missed the published result
     (`validate kvm`: a model missed KVM's count, or KVM did not reproduce a trace)
  6  `gate`: a budget is exceeded, or a budgeted pair is missing from the results
  7  `gate`: the budget file is malformed, or names an engine, metric or workload
     the gate does not know (the message names the line)
  `run` exits with the guest's own status; `run` and `record` use 124 (stopped by a limit)
  and 125 (the guest could not run): see their --help. `calibrate` exits 1 when KVM is
  not usable here or a run failed.";

#[derive(clap::Parser)]
#[command(
    name = "virtlab",
    version,
    about = "A trace-driven performance lab for x86 virtualization strategies",
    long_about = "A trace-driven performance lab for x86 virtualization strategies.\n\n\
        A guest runs once on a reference machine and its execution is recorded as a trace: every basic block, \
        every privileged operation with its values, every page-table write and first page touch. Engines replay \
        that one trace under each strategy (trap-and-emulate, binary translation, paravirtualization, hardware \
        assist) and report what it costs.\n\n\
        `virtlab workloads list` shows the benchmark guests; `virtlab run` boots one and `virtlab record syscall \
        -o syscall.vlt` records its trace. `virtlab inspect TRACE` summarizes a trace, `virtlab dump TRACE --disasm | less` shows its \
        execution event by event, and `virtlab check TRACE` validates a trace you did not make. `virtlab engines \
        --table` shows what each strategy does with each instruction class and event, and `virtlab replay TRACE` \
        replays a trace through them. `virtlab sweep TRACE... -o DIR` tabulates every engine and profile, \
        `virtlab report DIR -o REPORT` draws the report, and `cargo xtask bench` does it all for the whole catalog. \
        `virtlab gate BUDGETS TRACE...` fails when a guest exits more than its budgets allow and names the guest \
        instructions that did it (`cargo xtask gate` gates the catalog).",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Workloads(cmd::workloads::Args),
    Run(cmd::run::Args),
    Record(cmd::record::Args),
    Inspect(cmd::inspect::Args),
    Dump(cmd::dump::Args),
    Check(cmd::check::Args),
    Engines(cmd::engines::Args),
    Replay(cmd::replay::Args),
    Validate(cmd::validate::Args),
    Calibrate(cmd::calibrate::Args),
    Sweep(cmd::sweep::Args),
    Report(cmd::report::Args),
    Gate(cmd::gate::Args),
    Story(cmd::story::Args),
}

fn main() -> ExitCode {
    let matches = help::reflowed(Cli::command(), help::width()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let result = match cli.command {
        Command::Workloads(args) => cmd::workloads::run(&args),
        Command::Run(args) => cmd::run::run(&args),
        Command::Record(args) => cmd::record::run(&args),
        Command::Inspect(args) => cmd::inspect::run(&args),
        Command::Dump(args) => cmd::dump::run(&args),
        Command::Check(args) => cmd::check::run(&args),
        Command::Engines(args) => cmd::engines::run(&args),
        Command::Replay(args) => cmd::replay::run(&args),
        Command::Validate(args) => cmd::validate::run(&args),
        Command::Story(args) => cmd::story::run(&args),
        Command::Calibrate(args) => cmd::calibrate::run(&args),
        Command::Sweep(args) => cmd::sweep::run(&args),
        Command::Report(args) => cmd::report::run(&args),
        Command::Gate(args) => cmd::gate::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            cmd::exit_code_for(&error)
        }
    }
}
