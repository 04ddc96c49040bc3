//! Any text as a profile file (`virtlab replay --profile FILE`): a profile, or an error that names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtlab_engines::Profile;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Profile::parse(&text, "fuzzed.toml", &[]) {
        Ok(profile) => assert!(profile.clock_ghz > 0.0, "a parsed profile has a clock"),
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains("fuzzed.toml") || message.contains("--set"), "names nothing: {message}");
        }
    }
});
