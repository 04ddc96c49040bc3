//! Developer tasks: `cargo xtask <task>`. One module per task.

mod bench;
mod bench_engines;
mod bench_kvm;
mod bench_machine;
mod bench_qemu;
mod bench_trace;
mod bench_wait;
mod catalog_traces;
mod fuzz_corpus;
mod gate;
mod ratios;
mod scale;
mod synth_trace;
mod timing;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "virtlab developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The lab's main job: record the workload catalog (traces cached under target/virtlab-bench/traces by
    /// image digest and recorder version), sweep every engine × profile, run the Adams & Agesen validation, and
    /// write the results table and the HTML report. Prints the path of the report's index.html.
    Bench(bench::Args),
    /// Measure the engines: replay speed per engine on one thread and the speed-up of all engines on two,
    /// on recorded catalog traces, with a correctness column. Prints a Markdown table for BENCHMARKS.md.
    BenchEngines(bench_engines::Args),
    /// Measure the KVM engine's run loop against a bare KVM_RUN loop on the same exit-heavy guests: the cost of
    /// one more exit under each, with a correctness column. Prints a Markdown table for BENCHMARKS.md.
    BenchKvm(bench_kvm::Args),
    /// Measure the reference machine on the workload catalog: interpreting and recording speed, trace size,
    /// with a correctness column. Prints a Markdown table for BENCHMARKS.md.
    BenchMachine(bench_machine::Args),
    /// The reference machine against QEMU's TCG JIT on the same guest images, at two iteration counts so that
    /// start-up cancels, with a correctness column; stops, saying why, without qemu-system-x86_64. Prints a
    /// Markdown table for BENCHMARKS.md.
    BenchQemu(bench_qemu::Args),
    /// Measure the trace format: write and read speed, bytes per instruction, with a correctness column.
    ///
    /// Generates synthetic traces (virtlab_traces::synth) in memory and prints a Markdown table for
    /// BENCHMARKS.md. Run it in release mode (the `cargo xtask` alias does).
    BenchTrace(bench_trace::Args),
    /// What a user waits for: the wall time of `virtlab record`, `check`, `replay --engine X` for each engine,
    /// `replay` of all seven engines and `sweep` on large catalog traces, each beside the raw read of the trace
    /// and the same work done in this process, as ratios measured in one run, with a correctness column. Prints a
    /// Markdown table for BENCHMARKS.md.
    BenchWait(bench_wait::Args),
    /// Write the seed corpus of the cargo-fuzz targets (fuzz/README.md): recorded traces with every chunk stored,
    /// the built-in profiles, catalog guest images; into fuzz/corpus/<target>/ unless --out says otherwise.
    FuzzCorpus(fuzz_corpus::Args),
    /// The lab gates itself: record the catalog at small iteration counts (traces cached under
    /// target/virtlab-gate/traces) and check `budgets/catalog.toml` with `virtlab gate`, using the binary
    /// `cargo test --workspace` builds. Exits with the gate's status (6 over budget, 7 malformed budgets);
    /// writes results/, gate.xml (JUnit) and gate.md (Markdown). `--update` rewrites the budgets instead.
    Gate(gate::Args),
    /// Every catalog workload at its default parameters under every engine, as cycles relative to native.
    /// Prints the Markdown table README.md and BENCHMARKS.md carry.
    Ratios(ratios::Args),
    /// Write a synthetic trace file (a model of a trace's shape, not a guest execution).
    SynthTrace(synth_trace::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Bench(args) => bench::run(&args),
        Task::BenchEngines(args) => bench_engines::run(&args),
        Task::BenchKvm(args) => bench_kvm::run(&args),
        Task::BenchMachine(args) => bench_machine::run(&args),
        Task::BenchQemu(args) => bench_qemu::run(&args),
        Task::BenchTrace(args) => bench_trace::run(&args),
        Task::BenchWait(args) => bench_wait::run(&args),
        Task::FuzzCorpus(args) => fuzz_corpus::run(&args),
        Task::Gate(args) => gate::run(&args),
        Task::Ratios(args) => ratios::run(&args),
        Task::SynthTrace(args) => synth_trace::run(&args),
    }
}
