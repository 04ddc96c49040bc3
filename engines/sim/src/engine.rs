//! The engine interface, the engine options and the registry of engines.

use virtlab_traces::{CheckError, TraceError, ViewChecker};

use crate::metrics::Metrics;
use crate::profile::Profile;
use crate::protection::{GuestWidth, Protection};
use crate::strategy::Table;
use crate::trace::PreparedTrace;

/// A virtualization strategy replayed on a recorded execution. Object-safe, `Send + Sync`: `virtlab replay`
/// runs engines in parallel on one shared trace.
pub trait Engine: Send + Sync {
    /// The name `--engine` takes.
    fn name(&self) -> &'static str;
    /// One line on the strategy, for `--help` and reports.
    fn summary(&self) -> &'static str;
    /// What the engine does with each instruction class and event under `options`, for a guest kernel of the
    /// given width: the table its replay derives from.
    fn table(&self, options: &Options, width: GuestWidth) -> Table;
    /// Where the engine runs a guest kernel of the given width and how its monitor guards itself.
    fn protection(&self, _options: &Options, _width: GuestWidth) -> Protection {
        Protection::SEPARATE
    }
    /// Begin replaying `trace` with `profile`'s costs. An engine that cannot model this trace with these options
    /// returns [`EngineError::Unsupported`] with the reason.
    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError>;

    /// Replay the whole trace.
    fn replay(&self, trace: &PreparedTrace, profile: &Profile, options: &Options) -> Result<Metrics, EngineError> {
        let mut run = self.start(trace, profile, options)?;
        for chunk in 0..trace.view.event_chunk_count() {
            run.feed(chunk)?;
        }
        run.finish()
    }
}

/// A replay in progress, fed one events chunk at a time so that a scheduler can interleave engines at chunk
/// granularity ([`crate::replay_many`]).
pub trait Run: Send {
    /// Replay events chunk `chunk`; chunks must come in order, each once.
    fn feed(&mut self, chunk: usize) -> Result<(), EngineError>;
    /// Replay the events chunk `checker` checks next, in the checker's own decoding pass: each event once it has
    /// passed the rules ([`ViewChecker::check_next_chunk_into`]). The chunk must be the one this run would
    /// be fed next. False once there are no chunks left; after an error the run must be dropped.
    fn feed_checked(&mut self, checker: &mut ViewChecker) -> Result<bool, CheckError>;
    /// The results, after the last chunk.
    fn finish(self: Box<Self>) -> Result<Metrics, EngineError>;
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Translate(#[from] crate::translate::TranslateError),
}

/// How a paravirtualized kernel is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestBits {
    /// From the trace: 64-bit when the guest ran any 64-bit code.
    Auto,
    Bits32,
    Bits64,
}

/// Engine options, set with `--set key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The host has long-mode segment limits (AMD's LMSLE), which a binary translator needs to protect itself
    /// from a 64-bit guest.
    pub bt_lmsle: bool,
    /// Tracing faults from one guest instruction before adaptive BT retranslates it.
    pub bt_adaptive_threshold: u32,
    /// Ports with no device behind them that binary translation emulates inside the translation cache.
    pub bt_in_tc_ports: Vec<u16>,
    pub paravirt_guest_bits: GuestBits,
    /// VT-x TPR shadow / AMD-V virtual TPR: CR8 accesses do not exit.
    pub hw_tpr_shadow: bool,
    /// An MSR bitmap that lets FS_BASE, GS_BASE, KERNEL_GS_BASE and SYSENTER_CS/ESP/EIP through without exits.
    pub hw_msr_bitmap: bool,
    /// Port I/O and MMIO exits are completed by a device model in user space (as with QEMU).
    pub hw_user_space_devices: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bt_lmsle: false,
            bt_adaptive_threshold: 4,
            bt_in_tc_ports: vec![crate::strategy::POST_PORT],
            paravirt_guest_bits: GuestBits::Auto,
            hw_tpr_shadow: true,
            hw_msr_bitmap: true,
            hw_user_space_devices: true,
        }
    }
}

/// Every option key, its default and what it does, for `--help`.
pub const OPTION_KEYS: [(&str, &str); 7] = [
    ("bt.lmsle", "false: the host has long-mode segment limits; without them bt refuses 64-bit guests"),
    (
        "bt.adaptive_threshold",
        "4: tracing faults from one instruction before adaptive BT makes it call the write helper",
    ),
    ("bt.in_tc_ports", "0x80: comma-separated ports emulated inside the translation cache"),
    ("paravirt.guest_bits", "auto: 32 or 64, the paravirtualized kernel's width (auto: from the trace)"),
    ("hw.tpr_shadow", "true: CR8 accesses do not exit"),
    ("hw.msr_bitmap", "true: FS_BASE, GS_BASE, KERNEL_GS_BASE and SYSENTER_CS/ESP/EIP accesses do not exit"),
    ("hw.user_space_devices", "true: device exits go on to a user-space device model"),
];

#[derive(Debug, thiserror::Error)]
#[error("--set {key}={value}: {message}")]
pub struct OptionError {
    pub key: String,
    pub value: String,
    pub message: String,
}

impl Options {
    /// Whether `key` is an engine option (as opposed to a profile primitive).
    pub fn has_key(key: &str) -> bool {
        OPTION_KEYS.iter().any(|(k, _)| *k == key)
    }

    pub fn set(&mut self, key: &str, value: &str) -> Result<(), OptionError> {
        let error = |message: &str| OptionError { key: key.into(), value: value.into(), message: message.into() };
        let boolean = || match value {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(error("expected true or false")),
        };
        match key {
            "bt.lmsle" => self.bt_lmsle = boolean()?,
            "bt.adaptive_threshold" => {
                self.bt_adaptive_threshold =
                    value.parse().ok().filter(|&n| n >= 1).ok_or_else(|| error("expected a whole number >= 1"))?
            }
            "bt.in_tc_ports" => {
                self.bt_in_tc_ports = value
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| parse_port(p.trim()).ok_or_else(|| error("expected ports such as 0x80,0x61")))
                    .collect::<Result<_, _>>()?
            }
            "paravirt.guest_bits" => {
                self.paravirt_guest_bits = match value {
                    "auto" => GuestBits::Auto,
                    "32" => GuestBits::Bits32,
                    "64" => GuestBits::Bits64,
                    _ => return Err(error("expected auto, 32 or 64")),
                }
            }
            "hw.tpr_shadow" => self.hw_tpr_shadow = boolean()?,
            "hw.msr_bitmap" => self.hw_msr_bitmap = boolean()?,
            "hw.user_space_devices" => self.hw_user_space_devices = boolean()?,
            _ => return Err(error("unknown option; see `virtlab replay --help` for options and profile keys")),
        }
        Ok(())
    }
}

fn parse_port(text: &str) -> Option<u16> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Every engine, in the order reports list them.
pub fn all() -> Vec<Box<dyn Engine>> {
    vec![
        Box::new(crate::engines::native::Native),
        Box::new(crate::engines::trap_emulate::TrapEmulate),
        Box::new(crate::engines::hybrid::Hybrid),
        Box::new(crate::engines::bt::BinaryTranslation),
        Box::new(crate::engines::paravirt::Paravirt),
        Box::new(crate::engines::hw::HardwareAssist { nested_paging: true }),
        Box::new(crate::engines::hw::HardwareAssist { nested_paging: false }),
    ]
}

/// Every engine's strategy table under `options`, titled by engine, in the order of [`all`]; an engine whose
/// table depends on the guest's width (where it runs the kernel, what guards its monitor) gives two, titled
/// `name (x86-64)` and `name (x86-32)`.
pub fn tables(options: &Options) -> Vec<(String, Table)> {
    let mut tables = Vec::new();
    for engine in all() {
        let [wide, narrow] = GuestWidth::ALL.map(|width| engine.table(options, width));
        if wide == narrow {
            tables.push((engine.name().to_string(), wide));
        } else {
            tables.push((format!("{} ({})", engine.name(), GuestWidth::Bits64.arch()), wide));
            tables.push((format!("{} ({})", engine.name(), GuestWidth::Bits32.arch()), narrow));
        }
    }
    tables
}

/// The engine called `name`.
pub fn by_name(name: &str) -> Option<Box<dyn Engine>> {
    all().into_iter().find(|e| e.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject_by_name() {
        let mut options = Options::default();
        options.set("bt.lmsle", "true").unwrap();
        options.set("bt.in_tc_ports", "0x80,97").unwrap();
        options.set("paravirt.guest_bits", "32").unwrap();
        assert!(options.bt_lmsle);
        assert_eq!(options.bt_in_tc_ports, vec![0x80, 97]);
        assert_eq!(options.paravirt_guest_bits, GuestBits::Bits32);
        let err = options.set("bt.lmsle", "maybe").unwrap_err().to_string();
        assert!(err.contains("bt.lmsle=maybe") && err.contains("true or false"), "{err}");
        assert!(options.set("bt.adaptive_threshold", "0").is_err());
        assert!(options.set("hw.turbo", "1").is_err());
        assert!(OPTION_KEYS.iter().all(|(k, _)| Options::has_key(k)));
    }

    #[test]
    fn engine_names_are_unique_and_found() {
        let names: Vec<_> = all().iter().map(|e| e.name()).collect();
        assert_eq!(names, ["native", "trap-emulate", "hybrid", "bt", "paravirt", "hw-ept", "hw-shadow"]);
        assert!(by_name("bt").is_some() && by_name("vmx").is_none());
    }
}
