//! Booting an image under stock QEMU (TCG), the way `README.md` tells users to: the third machine the
//! differential tests compare the reference machine and KVM against.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::machine::MACHINE;

pub const QEMU: &str = "qemu-system-x86_64";
/// SeaBIOS's last words before the guest runs; only what follows is the guest's. The firmware sometimes
/// prints a third dot or ends the line (seen without a terminal on standard input); no guest starts its output
/// with either.
const FIRMWARE_LAST_LINE: &str = "Booting from ROM..";

/// How a QEMU boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuRun {
    /// What the guest wrote to COM1 (SeaBIOS's banner removed).
    pub serial: String,
    /// The value the guest wrote to isa-debug-exit, from QEMU's status (v << 1) | 1; `None` when QEMU ended
    /// otherwise (timeout, triple fault reset with -no-reboot, QEMU error).
    pub exit_status: Option<u32>,
    /// QEMU's own exit status.
    pub qemu_status: i32,
}

/// `Err` with the reason (and how to fix it) when QEMU cannot be run here.
pub fn available() -> Result<(), String> {
    match Command::new(QEMU).arg("--version").output() {
        Ok(output) if output.status.success() => Ok(()),
        _ => Err(format!("{QEMU} is not installed (apt-get install qemu-system-x86)")),
    }
}

/// Boots `image` with `-kernel`, the exit device and the RAM of [`MACHINE`], for at most `timeout`.
pub fn boot(image: &[u8], timeout: Duration) -> std::io::Result<QemuRun> {
    // Callers boot in parallel: each image gets its own file.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let run = NEXT.fetch_add(1, Ordering::Relaxed);
    let path: PathBuf = std::env::temp_dir().join(format!("virtlab-qemu-{}-{run}.bin", std::process::id()));
    std::fs::write(&path, image)?;
    let output = Command::new("timeout")
        .arg(timeout.as_secs().max(1).to_string())
        .arg(QEMU)
        .arg("-kernel")
        .arg(&path)
        .arg("-device")
        .arg(format!("isa-debug-exit,iobase={:#x},iosize=0x04", MACHINE.debug_exit_port))
        .args(["-nographic", "-no-reboot", "-m"])
        .arg(format!("{}M", MACHINE.ram_bytes >> 20))
        .output();
    std::fs::remove_file(&path).ok();
    let output = output?;
    let serial = String::from_utf8_lossy(&output.stdout).into_owned();
    let serial = match serial.rfind(FIRMWARE_LAST_LINE) {
        Some(position) => {
            serial[position + FIRMWARE_LAST_LINE.len()..].trim_start_matches(['.', '\r', '\n']).to_string()
        }
        None => serial,
    };
    let qemu_status = output.status.code().unwrap_or(-1);
    let exit_status =
        (qemu_status > 0 && qemu_status & 1 == 1 && qemu_status != 125).then_some((qemu_status >> 1) as u32);
    Ok(QemuRun { serial, exit_status, qemu_status })
}
