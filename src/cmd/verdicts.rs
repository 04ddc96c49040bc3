//! The checker's verdicts, cached by each trace's BLAKE3 digest: a sweep over traces it has seen before (the trace
//! cache of `cargo xtask bench`, a directory of recordings swept under new profiles) hashes each trace instead of
//! checking it again. Hashing reads the bytes once; checking decodes every event.
//!
//! Only valid verdicts are kept, with the checker that gave them (this virtlab's version, the trace format it
//! writes and the checker's rules revision): a cache written by another checker is not trusted, and a trace
//! whose digest the cache does not hold is checked as usual.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use virtlab_engines::PreparedTrace;

use super::replay::{check_and_prepare, open_view};

/// What the cache remembers of a valid trace: what `virtlab check` reports of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    events: u64,
    instructions: u64,
}

pub struct Verdicts {
    path: PathBuf,
    valid: BTreeMap<String, Verdict>,
    changed: bool,
}

/// The checker whose verdicts a cache holds.
fn checker() -> String {
    format!(
        "virtlab {} writing format {}.{}, checker rules revision {}",
        env!("CARGO_PKG_VERSION"),
        virtlab_traces::format::VERSION_MAJOR,
        virtlab_traces::format::VERSION_MINOR,
        virtlab_traces::RULES_REVISION
    )
}

impl Verdicts {
    /// The cache at `path`: empty when the file does not exist yet or another checker wrote it.
    pub fn load(path: &Path) -> anyhow::Result<Verdicts> {
        let mut verdicts = Verdicts { path: path.to_path_buf(), valid: BTreeMap::new(), changed: false };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(verdicts),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let invalid = |what: &str| {
            format!("{} is not a verdict cache ({what}); delete it and the next sweep writes a new one", path.display())
        };
        let document: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", invalid("JSON")))?;
        if document["checker"].as_str() != Some(checker().as_str()) {
            return Ok(verdicts);
        }
        let Some(valid) = document["valid"].as_object() else { bail!(invalid("no object under \"valid\"")) };
        for (digest, verdict) in valid {
            let number = |key: &str| verdict[key].as_u64();
            let (Some(events), Some(instructions), true) =
                (number("events"), number("instructions"), is_digest(digest))
            else {
                bail!(invalid(&format!("entry {digest:?} is not a digest with events and instructions")))
            };
            verdicts.valid.insert(digest.clone(), Verdict { events, instructions });
        }
        Ok(verdicts)
    }

    /// Opens and prepares `bytes` (the trace `name`), checking it unless the cache holds its digest with the
    /// totals its footer states.
    pub fn prepare<'a>(&mut self, bytes: &'a [u8], name: &str) -> anyhow::Result<PreparedTrace<'a>> {
        let digest = blake3::hash(bytes).to_hex().to_string();
        let view = open_view(bytes, name)?;
        let totals = &view.footer().totals;
        let known = Verdict { events: totals.events_total(), instructions: totals.instructions };
        if self.valid.get(&digest) == Some(&known) {
            return PreparedTrace::new(view).with_context(|| format!("{name}: a block does not decode"));
        }
        let (trace, report) = check_and_prepare(view, name)?;
        self.valid.insert(digest, Verdict { events: report.events, instructions: report.instructions });
        self.changed = true;
        Ok(trace)
    }

    /// Writes the cache (atomically) if a trace was checked since it was loaded.
    pub fn save(&self) -> anyhow::Result<()> {
        if !self.changed {
            return Ok(());
        }
        let valid: serde_json::Map<String, Value> = self
            .valid
            .iter()
            .map(|(digest, v)| (digest.clone(), json!({ "events": v.events, "instructions": v.instructions })))
            .collect();
        let text = serde_json::to_string_pretty(&json!({ "checker": checker(), "valid": valid }))?;
        virtlab_traces::atomic::write_atomic(&self.path, text.as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}
