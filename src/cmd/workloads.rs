//! `virtlab workloads`: the benchmark catalog, listed or exported as bootable images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use virtlab_workloads::{catalog, ParamKind, Privilege};

/// The workload catalog: list it, or export a workload as a Multiboot image that boots on the reference
/// machine, under KVM and under `qemu-system-x86_64 -kernel`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Every workload with its description and parameters (name, default, accepted range).
    List {
        /// One JSON array: [{"name", "description", "privilege", "params": [{"name", "description", "default",
        /// "min", "max"}]}].
        #[arg(long)]
        json: bool,
    },
    /// Build a workload's guest image.
    ///
    /// Example: `virtlab workloads export syscall --param iterations=1000 -o syscall.bin`, then
    /// `qemu-system-x86_64 -kernel syscall.bin -device isa-debug-exit,iobase=0xf4,iosize=0x04 -nographic -no-reboot`.
    Export {
        /// Workload name (see `virtlab workloads list`).
        name: String,
        /// A parameter as key=value; repeat for several.
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = super::parse_param)]
        params: Vec<(String, String)>,
        /// Where to write the image.
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::List { json } => list(*json),
        Command::Export { name, params, output } => {
            let image = virtlab_workloads::build(name, params)?;
            virtlab_traces::atomic::write_atomic(output, &image.bytes)
                .with_context(|| format!("cannot write {}", output.display()))?;
            let params: Vec<String> = image.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!("{}: {} bytes, {} [{}]", output.display(), image.bytes.len(), image.workload, params.join(" "));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn privilege_name(privilege: Privilege) -> &'static str {
    match privilege {
        Privilege::Kernel => "kernel",
        Privilege::User => "user",
    }
}

fn list(as_json: bool) -> anyhow::Result<ExitCode> {
    let text = if as_json {
        let entries: Vec<_> = catalog()
            .iter()
            .map(|spec| {
                let params: Vec<_> = spec
                    .params
                    .iter()
                    .map(|p| {
                        let mut entry = json!({"name": p.name, "description": p.description, "default": p.default, "min": p.min, "max": p.max});
                        // A choice's value is the index of its name in `choices`; the default is given by name.
                        if let ParamKind::Choice(choices) = p.kind {
                            entry["choices"] = json!(choices);
                            entry["default"] = json!(p.value_text(p.default));
                        }
                        entry
                    })
                    .collect();
                json!({"name": spec.name, "description": spec.description, "privilege": privilege_name(spec.privilege), "params": params})
            })
            .collect();
        serde_json::to_string_pretty(&entries)?
    } else {
        let mut lines = Vec::new();
        for spec in catalog() {
            lines.push(format!("{:<18} {:<6} {}", spec.name, privilege_name(spec.privilege), spec.description));
            for p in spec.params {
                lines.push(format!(
                    "{:<18}        --param {}={} ({}): {}",
                    "",
                    p.name,
                    p.value_text(p.default),
                    p.accepted(),
                    p.description
                ));
            }
        }
        lines.join("\n")
    };
    super::finish_output(super::print_line(&text))?;
    Ok(ExitCode::SUCCESS)
}
