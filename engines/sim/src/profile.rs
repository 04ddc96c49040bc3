//! Cost profiles: the primitives ([`Primitive`]) that engines multiply by what their mechanism does on a trace.
//!
//! A profile is a TOML file. Every primitive is an inline table with its value, its provenance and its source:
//!
//! ```toml
//! [hw]
//! exit = { value = 1931, provenance = "published", source = "Adams & Agesen 2006, Table 1: page-fault VM exit" }
//! ```
//!
//! Provenance says how far a value can be trusted as evidence ([`Provenance`]): a `calibrated` primitive was set
//! from a column of a table the lab validates against, so the cells it dominates are not evidence. The loader
//! is strict: an unknown key, a missing key, a primitive without provenance or source, or a value outside its
//! unit's range is an error naming the file and the key. A profile never stores a benchmark's answer; totals
//! emerge from primitives times mechanism.

use std::fmt::Write as _;

pub use crate::primitive::{Primitive, Unit};

/// Profiles shipped with the lab, by name.
pub const BUILT_IN: [(&str, &str); 3] = [
    ("p4-2006", include_str!("../profiles/p4-2006.toml")),
    ("core2-2006", include_str!("../profiles/core2-2006.toml")),
    ("sandybridge-2011", include_str!("../profiles/sandybridge-2011.toml")),
];

/// Where a primitive's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provenance {
    /// A figure published for this processor (or monitor), cited in `source`.
    Published,
    /// Computed from published figures or from code, with the computation in `source`.
    Derived,
    /// No published figure at hand: reasoning in `source`; fixed from sources outside any validated table.
    Estimate,
    /// Set from a column of a table the lab validates against (the paper's native column): the cells it
    /// dominates are not evidence.
    Calibrated,
    /// Measured on the machine at hand (`virtlab calibrate host`).
    Measured,
    /// Given on the command line (`--set`).
    Set,
}

impl Provenance {
    pub const ALL: [Provenance; 6] = [
        Provenance::Published,
        Provenance::Derived,
        Provenance::Estimate,
        Provenance::Calibrated,
        Provenance::Measured,
        Provenance::Set,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Provenance::Published => "published",
            Provenance::Derived => "derived",
            Provenance::Estimate => "estimate",
            Provenance::Calibrated => "calibrated",
            Provenance::Measured => "measured",
            Provenance::Set => "set",
        }
    }

    fn parse(text: &str) -> Option<Provenance> {
        Provenance::ALL.into_iter().find(|p| p.name() == text && *p != Provenance::Set)
    }
}

/// One primitive's value, provenance and source.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: f64,
    pub provenance: Provenance,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub clock_ghz: f64,
    entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("no built-in profile named `{0}`; built-in profiles: p4-2006, core2-2006, sandybridge-2011 (or give a path to a .toml file)")]
    UnknownName(String),
    #[error("profile {origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("profile {origin}: `{key}` = {value} is out of range: expected {expected}")]
    BadValue { origin: String, key: String, value: f64, expected: &'static str },
    #[error("--set {key}: {message}")]
    BadOverride { key: String, message: String },
}

const TOP_LEVEL: [&str; 3] = ["name", "description", "clock_ghz"];
const ENTRY_FIELDS: [&str; 3] = ["value", "provenance", "source"];

impl Profile {
    /// A built-in profile by name. Profile files are read by the caller (engines do no I/O) and given to
    /// [`Profile::parse`].
    pub fn load(name: &str) -> Result<Profile, ProfileError> {
        Profile::load_with(name, &[])
    }

    /// Like [`Profile::load`], with `section.key=value` overrides applied before validation.
    pub fn load_with(name: &str, overrides: &[(String, String)]) -> Result<Profile, ProfileError> {
        let (_, text) = BUILT_IN
            .iter()
            .find(|(built_in, _)| *built_in == name)
            .ok_or_else(|| ProfileError::UnknownName(name.to_string()))?;
        Profile::parse(text, name, overrides)
    }

    /// Parse profile text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, overrides: &[(String, String)]) -> Result<Profile, ProfileError> {
        let invalid = |message: String| ProfileError::Invalid { origin: origin.to_string(), message };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        let known_sections: Vec<&str> = Primitive::ALL.iter().map(|p| p.section()).collect();
        for (key, value) in &table {
            match value {
                toml::Value::Table(section) if known_sections.contains(&key.as_str()) => {
                    for name in section.keys() {
                        if !Primitive::ALL.iter().any(|p| p.section() == key && p.name() == name) {
                            return Err(invalid(format!("unknown primitive `{key}.{name}`")));
                        }
                    }
                }
                _ if TOP_LEVEL.contains(&key.as_str()) => {}
                _ => return Err(invalid(format!("unknown key `{key}`"))),
            }
        }
        let string = |key: &str| -> Result<String, ProfileError> {
            match table.get(key) {
                Some(toml::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(invalid(format!("`{key}` must be a string"))),
                None => Err(invalid(format!("missing `{key}`"))),
            }
        };
        let name = string("name")?;
        let description = string("description")?;
        let clock_ghz = match table.get("clock_ghz").and_then(number) {
            Some(clock) => clock,
            None => return Err(invalid("missing or non-numeric `clock_ghz`".into())),
        };
        let mut entries = Vec::with_capacity(Primitive::COUNT);
        for &primitive in Primitive::ALL {
            let field = table.get(primitive.section()).and_then(|s| s.as_table()).and_then(|s| s.get(primitive.name()));
            entries.push(entry(primitive, field).map_err(invalid)?);
        }
        let mut profile = Profile { name, description, clock_ghz, entries };
        for (key, value) in overrides {
            profile.apply_override(key, value)?;
        }
        profile.validate(origin)?;
        Ok(profile)
    }

    /// Whether `section.key` names a primitive of a profile (as opposed to an engine option).
    pub fn has_key(key: &str) -> bool {
        Primitive::ALL.iter().any(|p| p.key() == key)
    }

    pub fn entry(&self, primitive: Primitive) -> &Entry {
        &self.entries[primitive as usize]
    }

    pub fn get(&self, primitive: Primitive) -> f64 {
        self.entry(primitive).value
    }

    /// The primitive in millicycles, rounded: the unit engines add up.
    pub fn mc(&self, primitive: Primitive) -> u64 {
        mc(self.get(primitive))
    }

    /// A flag primitive.
    pub fn flag(&self, primitive: Primitive) -> bool {
        self.get(primitive) != 0.0
    }

    /// A count primitive.
    pub fn count(&self, primitive: Primitive) -> u64 {
        self.get(primitive) as u64
    }

    /// Replace a primitive (what `calibrate host` measured); the profile stays valid only for in-range values,
    /// which [`Profile::parse`] of [`Profile::to_toml`] checks.
    pub fn set(&mut self, primitive: Primitive, entry: Entry) {
        self.entries[primitive as usize] = entry;
    }

    /// Every primitive with its entry, in profile order.
    pub fn entries(&self) -> impl Iterator<Item = (Primitive, &Entry)> {
        Primitive::ALL.iter().map(move |&p| (p, self.entry(p)))
    }

    /// The profile as TOML that [`Profile::parse`] reads back, `header` lines first as comments.
    pub fn to_toml(&self, header: &[String]) -> String {
        let mut out = String::new();
        for line in header {
            let _ = writeln!(out, "# {line}");
        }
        let _ = writeln!(out, "\nname = {}", quoted(&self.name));
        let _ = writeln!(out, "description = {}", quoted(&self.description));
        let _ = writeln!(out, "clock_ghz = {}", self.clock_ghz);
        let mut section = "";
        for (primitive, entry) in self.entries() {
            if primitive.section() != section {
                section = primitive.section();
                let _ = writeln!(out, "\n[{section}]");
            }
            let _ = writeln!(
                out,
                "{} = {{ value = {}, provenance = \"{}\", source = {} }}",
                primitive.name(),
                entry.value,
                entry.provenance.name(),
                quoted(&entry.source)
            );
        }
        out
    }

    fn apply_override(&mut self, key: &str, value: &str) -> Result<(), ProfileError> {
        let bad = |message: String| ProfileError::BadOverride { key: key.to_string(), message };
        let primitive =
            Primitive::ALL.iter().copied().find(|p| p.key() == key).ok_or_else(|| {
                bad("no such primitive in the profile (`virtlab replay --help` lists the keys)".into())
            })?;
        let number: f64 = value.parse().map_err(|_| bad(format!("`{value}` is not a number")))?;
        self.entries[primitive as usize] =
            Entry { value: number, provenance: Provenance::Set, source: format!("--set {key}={value}") };
        Ok(())
    }

    fn validate(&self, origin: &str) -> Result<(), ProfileError> {
        for (primitive, entry) in self.entries() {
            let (range, expected) = match primitive.unit() {
                Unit::Cycles => (0.0..=MAX_PRIMITIVE, "cycles from 0 to 1e9"),
                // A rate divides: zero would make a copy infinitely slow.
                Unit::BytesPerCycle => (MIN_RATE..=1e6, "a rate from 0.001 to 1e6 bytes per cycle"),
                Unit::Count => (0.0..=1e6, "a whole count from 0 to 1e6"),
                Unit::Flag => (0.0..=1.0, "0 or 1"),
            };
            let whole = !matches!(primitive.unit(), Unit::Count | Unit::Flag) || entry.value.fract() == 0.0;
            if !range.contains(&entry.value) || !whole {
                return Err(ProfileError::BadValue {
                    origin: origin.to_string(),
                    key: primitive.key().to_string(),
                    value: entry.value,
                    expected,
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
}

fn number(value: &toml::Value) -> Option<f64> {
    match value {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    }
}

fn entry(primitive: Primitive, field: Option<&toml::Value>) -> Result<Entry, String> {
    let key = primitive.key();
    let expected = "an inline table { value = …, provenance = \"published|derived|estimate|calibrated|measured\", \
                    source = \"…\" }";
    let Some(field) = field else { return Err(format!("missing primitive `{key}`")) };
    let Some(table) = field.as_table() else { return Err(format!("`{key}` must be {expected}")) };
    if let Some(unknown) = table.keys().find(|k| !ENTRY_FIELDS.contains(&k.as_str())) {
        return Err(format!("`{key}` has an unknown field `{unknown}`; expected {expected}"));
    }
    let value = table
        .get("value")
        .and_then(number)
        .ok_or_else(|| format!("`{key}` has no numeric `value`; expected {expected}"))?;
    let provenance = table
        .get("provenance")
        .and_then(|p| p.as_str())
        .and_then(Provenance::parse)
        .ok_or_else(|| format!("`{key}` has no valid `provenance`; expected {expected}"))?;
    let source = table
        .get("source")
        .and_then(|s| s.as_str())
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| format!("`{key}` has no `source`; expected {expected}"))?;
    Ok(Entry { value, provenance, source: source.to_string() })
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The largest primitive the loader accepts, in cycles: far above any real cost, and small enough that no sum of
/// millicycles over a trace's events can overflow.
const MAX_PRIMITIVE: f64 = 1e9;

/// The slowest string bandwidth the loader accepts, in bytes per cycle.
const MIN_RATE: f64 = 0.001;

/// Millicycles of a cycle count, rounded.
pub(crate) fn mc(cycles: f64) -> u64 {
    (cycles * 1000.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_loads_with_a_provenance_and_source_for_every_primitive() {
        for (name, text) in BUILT_IN {
            let profile = Profile::load(name).unwrap();
            assert_eq!(profile.name, name);
            assert_eq!(profile.entries().count(), Primitive::COUNT);
            assert!(profile.entries().all(|(_, e)| !e.source.is_empty()));
            // What to_toml writes reads back to the same profile.
            let again = Profile::parse(&profile.to_toml(&["round trip".into()]), "again", &[]).unwrap();
            assert_eq!(again, profile, "{name}");
            assert!(text.contains("provenance"));
        }
    }

    #[test]
    fn unknown_missing_and_unsourced_primitives_are_named() {
        let text = BUILT_IN[0].1;
        let extra =
            text.replace("[native]\n", "[native]\nturbo = { value = 1, provenance = \"estimate\", source = \"x\" }\n");
        let err = Profile::parse(&extra, "x.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("native.turbo"), "{err}");

        let missing: String = text.lines().filter(|l| !l.starts_with("iret ")).collect::<Vec<_>>().join("\n");
        let err = Profile::parse(&missing, "y.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("y.toml") && err.contains("native.iret"), "{err}");

        let unsourced: String = text
            .lines()
            .map(|l| if l.starts_with("iret ") { "iret = { value = 300, provenance = \"estimate\" }" } else { l })
            .collect::<Vec<_>>()
            .join("\n");
        let err = Profile::parse(&unsourced, "z.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("native.iret") && err.contains("no `source`"), "{err}");

        let unknown_provenance = text.replacen("provenance = \"estimate\"", "provenance = \"guess\"", 1);
        let err = Profile::parse(&unknown_provenance, "w.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("no valid `provenance`"), "{err}");

        let bare = text.replacen("swapgs = {", "swapgs = 20\nignored = {", 1);
        let err = Profile::parse(&bare, "v.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("v.toml"), "{err}");
    }

    #[test]
    fn overrides_replace_one_primitive_mark_it_set_and_reject_unknown_keys() {
        let set = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let profile = Profile::load_with("p4-2006", &set("bt.callout", "999")).unwrap();
        assert_eq!(profile.get(Primitive::Callout), 999.0);
        assert_eq!(profile.entry(Primitive::Callout).provenance, Provenance::Set);
        let err = Profile::load_with("p4-2006", &set("bt.warp", "1")).unwrap_err().to_string();
        assert!(err.contains("bt.warp"), "{err}");
        let err = Profile::load_with("p4-2006", &set("bt.callout", "fast")).unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
        assert!(Profile::has_key("hw.exit") && !Profile::has_key("bt.lmsle"));
        let err = Profile::load_with("p4-2006", &set("hw.exit", "1e300")).unwrap_err().to_string();
        assert!(err.contains("hw.exit") && err.contains("0 to 1e9"), "{err}");
        let err = Profile::load_with("p4-2006", &set("native.rep_movs_bytes_per_cycle", "0")).unwrap_err().to_string();
        assert!(err.contains("native.rep_movs_bytes_per_cycle") && err.contains("0.001"), "{err}");
        let err = Profile::load_with("p4-2006", &set("hw.vpid", "0.5")).unwrap_err().to_string();
        assert!(err.contains("hw.vpid") && err.contains("0 or 1"), "{err}");
    }

    #[test]
    fn profile_text_parses_under_its_own_name_and_errors_name_the_origin() {
        let text = BUILT_IN[2].1.replace("name = \"sandybridge-2011\"", "name = \"mine\"");
        let profile = Profile::parse(&text, "mine.toml", &[]).unwrap();
        assert_eq!((profile.name.as_str(), profile.get(Primitive::Exit)), ("mine", 438.0));
        let err = Profile::parse(&text.replace("clock_ghz", "clock"), "mine.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("mine.toml") && err.contains("clock"), "{err}");
    }

    #[test]
    fn an_unknown_name_lists_the_built_in_profiles() {
        let err = Profile::load("pentium-pro").unwrap_err().to_string();
        assert!(err.contains("p4-2006") && err.contains("sandybridge-2011"), "{err}");
    }
}
