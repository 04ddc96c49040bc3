//! `virtlab run`: boot a guest image and let it run to its end.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use virtlab_machine::{Machine, MachineConfig, MachineError, NullObserver, RunLimits};

/// Boot a Multiboot image, print its serial output, and exit with the status the guest wrote to the exit port
/// (0x F4). The same image boots under `qemu-system-x86_64 -kernel`, whose own exit status is (status << 1) | 1.
///
/// Exit status: the guest's (values above 255 are reported as 255); 124 when --max-instructions or --timeout
/// stopped it; 125 when it could not run (not a Multiboot image, triple fault, an instruction the reference
/// machine does not model, no usable KVM).
#[derive(clap::Args)]
pub struct Args {
    /// The guest image (for example from `virtlab workloads export`).
    image: PathBuf,
    /// `ref`: the reference machine (deterministic interpreter); `kvm`: the host's KVM.
    #[arg(long, value_enum, default_value = "ref")]
    machine: MachineKind,
    /// Stop the reference machine after this many instructions.
    #[arg(long, default_value_t = 2_000_000_000, value_name = "N")]
    max_instructions: u64,
    /// Stop after this many seconds of wall-clock time.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    timeout: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MachineKind {
    Ref,
    Kvm,
}

pub const EXIT_STOPPED: u8 = 124;
pub const EXIT_CANNOT_RUN: u8 = 125;

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let image = super::read_file(&args.image)?;
    let timeout = Duration::from_secs_f64(args.timeout.max(0.0));
    let (status, serial) = match args.machine {
        MachineKind::Ref => match run_reference(&image, args.max_instructions, timeout) {
            Ok(outcome) => outcome,
            Err(error) => return Ok(stopped(&error)),
        },
        MachineKind::Kvm => {
            let config = virtlab_kvm::KvmConfig { timeout, ..virtlab_kvm::KvmConfig::default() };
            match virtlab_kvm::run(&image, &config) {
                Ok(outcome) => (outcome.exit_status, outcome.serial),
                Err(error) => {
                    eprintln!("error: {error}");
                    let code = if matches!(error, virtlab_kvm::KvmError::Timeout { .. }) {
                        EXIT_STOPPED
                    } else {
                        EXIT_CANNOT_RUN
                    };
                    return Ok(ExitCode::from(code));
                }
            }
        }
    };
    let mut out = std::io::stdout().lock();
    super::finish_output(out.write_all(&serial).and_then(|()| out.flush()))?;
    Ok(ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX)))
}

/// Runs on the reference machine until the guest exits, the instruction limit, or the wall-clock deadline.
fn run_reference(image: &[u8], max_instructions: u64, timeout: Duration) -> Result<(u32, Vec<u8>), RunError> {
    let mut machine =
        Machine::from_multiboot(image, MachineConfig::default()).map_err(|e| RunError::Failed(e.to_string()))?;
    machine.set_deadline(Some(std::time::Instant::now() + timeout));
    match machine.run(&mut NullObserver, RunLimits { max_instructions }) {
        Ok(outcome) => Ok((outcome.exit_status, outcome.serial)),
        Err(error @ (MachineError::InstructionLimit { .. } | MachineError::Deadline { .. })) => {
            Err(RunError::Stopped(error.to_string(), machine.serial_output().to_vec()))
        }
        Err(error) => Err(RunError::Failed(format!(
            "{error}\nserial output so far:\n{}",
            String::from_utf8_lossy(machine.serial_output())
        ))),
    }
}

enum RunError {
    /// Stopped by a limit; what the guest printed so far.
    Stopped(String, Vec<u8>),
    Failed(String),
}

fn stopped(error: &RunError) -> ExitCode {
    match error {
        RunError::Stopped(message, serial) => {
            let _ = std::io::stdout().write_all(serial);
            eprintln!("error: {message}");
            ExitCode::from(EXIT_STOPPED)
        }
        RunError::Failed(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_CANNOT_RUN)
        }
    }
}
