//! Cost profiles: the primitive costs, in cycles, that engines multiply by the events their mechanism produces.
//!
//! A profile is a TOML file; every primitive carries its source or its derivation in a comment (see `profiles/`).
//! The loader is strict: an unknown key, a missing key or a value that is not a finite non-negative number is
//! an error naming the file and the key. A profile never stores a benchmark's answer; totals emerge from
//! primitives times mechanism.

use std::path::Path;

use serde::Deserialize;

/// Profiles shipped with the lab, by name.
pub const BUILT_IN: [(&str, &str); 3] = [
    ("p4-2006", include_str!("../profiles/p4-2006.toml")),
    ("core2-2006", include_str!("../profiles/core2-2006.toml")),
    ("sandybridge-2011", include_str!("../profiles/sandybridge-2011.toml")),
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub clock_ghz: f64,
    pub native: Native,
    pub monitor: Monitor,
    pub bt: BinaryTranslation,
    pub paravirt: Paravirt,
    pub hw: Hardware,
}

/// What the bare processor charges.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Native {
    pub cycles_per_instruction: f64,
    pub call_return: f64,
    pub divide: f64,
    pub multiply: f64,
    pub rep_startup: f64,
    pub rep_movs_bytes_per_cycle: f64,
    pub rep_stos_bytes_per_cycle: f64,
    pub rep_element: f64,
    pub syscall: f64,
    pub sysret: f64,
    pub exception: f64,
    pub iret: f64,
    pub mov_to_cr: f64,
    pub mov_from_cr: f64,
    pub cli_sti: f64,
    pub popf_pushf: f64,
    pub invlpg: f64,
    pub tlb_fill: f64,
    pub port_io: f64,
    pub mmio: f64,
    pub cpuid: f64,
    pub rdtsc: f64,
    pub msr: f64,
    pub descriptor_load: f64,
    pub descriptor_store: f64,
    pub swapgs: f64,
    pub hlt: f64,
}

/// The software monitor's own work, shared by trap-and-emulate, hybrid, BT and the hardware-assisted VMM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    pub trap: f64,
    pub decode: f64,
    pub emulate: f64,
    pub reflect: f64,
    pub device: f64,
    pub interpret: f64,
    pub shadow_fill: f64,
    pub shadow_switch: f64,
    pub shadow_invalidate: f64,
    pub shadow_update: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryTranslation {
    pub translate_per_instruction: f64,
    pub indirect_lookup: f64,
    pub callout: f64,
    pub continuation: f64,
    pub in_tc_helper: f64,
    pub pending_interrupt_check: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paravirt {
    pub hypercall: f64,
    pub update_validation: f64,
    pub page_table_switch: f64,
    pub upcall: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    pub exit: f64,
    pub entry: f64,
    pub vmread: f64,
    pub vmreads_per_exit: f64,
    pub vmwrite: f64,
    pub vmwrites_per_injection: f64,
    pub ept_violation: f64,
    pub user_space_exit: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("no built-in profile named `{0}`; built-in profiles: p4-2006, core2-2006, sandybridge-2011 (or give a path to a .toml file)")]
    UnknownName(String),
    #[error("cannot read profile {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("profile {origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("profile {origin}: `{key}` = {value} is out of range: expected {expected}")]
    BadValue { origin: String, key: String, value: f64, expected: &'static str },
    #[error("--set {key}: {message}")]
    BadOverride { key: String, message: String },
}

impl Profile {
    /// A built-in profile by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Profile, ProfileError> {
        Profile::load_with(name_or_path, &[])
    }

    /// Like [`Profile::load`], with `section.key=value` overrides applied before validation.
    pub fn load_with(name_or_path: &str, overrides: &[(String, String)]) -> Result<Profile, ProfileError> {
        if let Some((_, text)) = BUILT_IN.iter().find(|(name, _)| *name == name_or_path) {
            return Profile::parse(text, name_or_path, overrides);
        }
        let path = Path::new(name_or_path);
        if !path.extension().is_some_and(|ext| ext == "toml") && !path.exists() {
            return Err(ProfileError::UnknownName(name_or_path.to_string()));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProfileError::Read { path: name_or_path.to_string(), source })?;
        Profile::parse(&text, name_or_path, overrides)
    }

    /// Parse profile text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, overrides: &[(String, String)]) -> Result<Profile, ProfileError> {
        let invalid = |message: String| ProfileError::Invalid { origin: origin.to_string(), message };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        for (key, value) in overrides {
            apply_override(&mut table, key, value)?;
        }
        let profile: Profile = table.try_into().map_err(|e: toml::de::Error| invalid(e.message().to_string()))?;
        profile.validate(origin)?;
        Ok(profile)
    }

    /// Whether `section.key` names a primitive of a profile (as opposed to an engine option).
    pub fn has_key(key: &str) -> bool {
        let Some((section, field)) = key.split_once('.') else { return false };
        let table: toml::Table = BUILT_IN[0].1.parse().expect("built-in profiles parse");
        table.get(section).and_then(|s| s.as_table()).is_some_and(|s| s.contains_key(field))
    }

    fn validate(&self, origin: &str) -> Result<(), ProfileError> {
        for (key, value) in self.primitives() {
            if !(0.0..=MAX_PRIMITIVE).contains(&value) {
                return Err(ProfileError::BadValue {
                    origin: origin.to_string(),
                    key: key.to_string(),
                    value,
                    expected: "cycles from 0 to 1e9",
                });
            }
        }
        let rates = [
            ("native.rep_movs_bytes_per_cycle", self.native.rep_movs_bytes_per_cycle),
            ("native.rep_stos_bytes_per_cycle", self.native.rep_stos_bytes_per_cycle),
        ];
        for (key, value) in rates {
            // A rate divides: zero would make a copy infinitely slow.
            if value < MIN_RATE {
                return Err(ProfileError::BadValue {
                    origin: origin.to_string(),
                    key: key.to_string(),
                    value,
                    expected: "a rate of at least 0.001 bytes per cycle",
                });
            }
        }
        if !(self.clock_ghz > 0.0 && self.clock_ghz <= 1e3) {
            return Err(ProfileError::BadValue {
                origin: origin.to_string(),
                key: "clock_ghz".into(),
                value: self.clock_ghz,
                expected: "a clock above 0 and at most 1000 GHz",
            });
        }
        Ok(())
    }

    /// Every primitive with its `section.key` name, in file order.
    pub fn primitives(&self) -> Vec<(&'static str, f64)> {
        let n = &self.native;
        let m = &self.monitor;
        let b = &self.bt;
        let p = &self.paravirt;
        let h = &self.hw;
        vec![
            ("native.cycles_per_instruction", n.cycles_per_instruction),
            ("native.call_return", n.call_return),
            ("native.divide", n.divide),
            ("native.multiply", n.multiply),
            ("native.rep_startup", n.rep_startup),
            ("native.rep_movs_bytes_per_cycle", n.rep_movs_bytes_per_cycle),
            ("native.rep_stos_bytes_per_cycle", n.rep_stos_bytes_per_cycle),
            ("native.rep_element", n.rep_element),
            ("native.syscall", n.syscall),
            ("native.sysret", n.sysret),
            ("native.exception", n.exception),
            ("native.iret", n.iret),
            ("native.mov_to_cr", n.mov_to_cr),
            ("native.mov_from_cr", n.mov_from_cr),
            ("native.cli_sti", n.cli_sti),
            ("native.popf_pushf", n.popf_pushf),
            ("native.invlpg", n.invlpg),
            ("native.tlb_fill", n.tlb_fill),
            ("native.port_io", n.port_io),
            ("native.mmio", n.mmio),
            ("native.cpuid", n.cpuid),
            ("native.rdtsc", n.rdtsc),
            ("native.msr", n.msr),
            ("native.descriptor_load", n.descriptor_load),
            ("native.descriptor_store", n.descriptor_store),
            ("native.swapgs", n.swapgs),
            ("native.hlt", n.hlt),
            ("monitor.trap", m.trap),
            ("monitor.decode", m.decode),
            ("monitor.emulate", m.emulate),
            ("monitor.reflect", m.reflect),
            ("monitor.device", m.device),
            ("monitor.interpret", m.interpret),
            ("monitor.shadow_fill", m.shadow_fill),
            ("monitor.shadow_switch", m.shadow_switch),
            ("monitor.shadow_invalidate", m.shadow_invalidate),
            ("monitor.shadow_update", m.shadow_update),
            ("bt.translate_per_instruction", b.translate_per_instruction),
            ("bt.indirect_lookup", b.indirect_lookup),
            ("bt.callout", b.callout),
            ("bt.continuation", b.continuation),
            ("bt.in_tc_helper", b.in_tc_helper),
            ("bt.pending_interrupt_check", b.pending_interrupt_check),
            ("paravirt.hypercall", p.hypercall),
            ("paravirt.update_validation", p.update_validation),
            ("paravirt.page_table_switch", p.page_table_switch),
            ("paravirt.upcall", p.upcall),
            ("hw.exit", h.exit),
            ("hw.entry", h.entry),
            ("hw.vmread", h.vmread),
            ("hw.vmreads_per_exit", h.vmreads_per_exit),
            ("hw.vmwrite", h.vmwrite),
            ("hw.vmwrites_per_injection", h.vmwrites_per_injection),
            ("hw.ept_violation", h.ept_violation),
            ("hw.user_space_exit", h.user_space_exit),
        ]
    }
}

fn apply_override(table: &mut toml::Table, key: &str, value: &str) -> Result<(), ProfileError> {
    let bad = |message: &str| ProfileError::BadOverride { key: key.to_string(), message: message.to_string() };
    let (section, field) = key
        .split_once('.')
        .ok_or_else(|| bad("expected section.key, for example native.cycles_per_instruction=0.3"))?;
    let number: f64 = value.parse().map_err(|_| bad(&format!("`{value}` is not a number")))?;
    let slot = table
        .get_mut(section)
        .and_then(|s| s.as_table_mut())
        .and_then(|s| s.get_mut(field))
        .ok_or_else(|| bad("no such primitive in the profile (see `virtlab replay --help` for the keys)"))?;
    *slot = toml::Value::Float(number);
    Ok(())
}

/// The largest primitive the loader accepts, in cycles: far above any real cost, and small enough that no sum of
/// millicycles over a trace's events can overflow.
const MAX_PRIMITIVE: f64 = 1e9;

/// The slowest string bandwidth the loader accepts, in bytes per cycle.
const MIN_RATE: f64 = 0.001;

/// Millicycles of a cycle count, rounded: the unit engines add up.
pub(crate) fn mc(cycles: f64) -> u64 {
    (cycles * 1000.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_loads() {
        for (name, _) in BUILT_IN {
            let profile = Profile::load(name).unwrap();
            assert_eq!(profile.name, name);
            assert_eq!(profile.primitives().len(), 55);
        }
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let text = BUILT_IN[0].1;
        let extra = text.replace("[native]\n", "[native]\nturbo = 1\n");
        let err = Profile::parse(&extra, "x.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("turbo"), "{err}");

        let missing: String = text.lines().filter(|l| !l.starts_with("iret ")).collect::<Vec<_>>().join("\n");
        let err = Profile::parse(&missing, "y.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("y.toml") && err.contains("iret"), "{err}");

        let negative = text.replace("swapgs = ", "swapgs = -");
        let err = Profile::parse(&negative, "z.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("native.swapgs"), "{err}");

        let stalled = Profile::load_with("p4-2006", &[("native.rep_movs_bytes_per_cycle".into(), "0".into())]);
        let err = stalled.unwrap_err().to_string();
        assert!(err.contains("native.rep_movs_bytes_per_cycle") && err.contains("at least"), "{err}");
    }

    #[test]
    fn overrides_replace_one_primitive_and_reject_unknown_keys() {
        let set = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let profile = Profile::load_with("p4-2006", &set("bt.callout", "999")).unwrap();
        assert_eq!(profile.bt.callout, 999.0);
        let err = Profile::load_with("p4-2006", &set("bt.warp", "1")).unwrap_err().to_string();
        assert!(err.contains("bt.warp"), "{err}");
        let err = Profile::load_with("p4-2006", &set("bt.callout", "fast")).unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
        assert!(Profile::has_key("hw.exit") && !Profile::has_key("bt.lmsle"));
        let err = Profile::load_with("p4-2006", &set("hw.exit", "1e300")).unwrap_err().to_string();
        assert!(err.contains("hw.exit") && err.contains("0 to 1e9"), "{err}");
    }

    #[test]
    fn a_profile_file_loads_by_path_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("virtlab-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mine.toml");
        std::fs::write(&path, BUILT_IN[2].1.replace("name = \"sandybridge-2011\"", "name = \"mine\"")).unwrap();
        let profile = Profile::load(path.to_str().unwrap()).unwrap();
        assert_eq!((profile.name.as_str(), profile.hw.exit), ("mine", 438.0));
        let missing = dir.join("gone.toml");
        let err = Profile::load(missing.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, ProfileError::Read { .. }) && err.to_string().contains("gone.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unknown_name_lists_the_built_in_profiles() {
        let err = Profile::load("pentium-pro").unwrap_err().to_string();
        assert!(err.contains("p4-2006") && err.contains("sandybridge-2011"), "{err}");
    }
}
