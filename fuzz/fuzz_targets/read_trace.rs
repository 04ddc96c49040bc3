//! Any bytes, resealed (every chunk's lengths and checksums made to match what follows its header, so that
//! mutations reach the decoders), through every reading path: the view (open, cursor, loop, its checker), the
//! streaming reader inside the streaming checker; and a trace the checker accepts through every engine, as
//! `virtlab replay` would. Errors are expected; panics, hangs and runaway allocations are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtlab_engines::{engine, Options, PreparedTrace, Profile};
use virtlab_traces::{check, check_view, format, TraceView};

fuzz_target!(|data: &[u8]| {
    let bytes = format::reseal(data);
    let streaming = check(bytes.as_slice());
    let Ok(view) = TraceView::open(&bytes) else { return };
    for event in view.events() {
        if event.is_err() {
            break;
        }
    }
    let _ = view.for_each_event(|_| {});
    let accepted = check_view(&view).is_ok();
    if accepted && streaming.is_ok() {
        let Ok(trace) = PreparedTrace::new(view) else { return };
        let profile = Profile::load("p4-2006").expect("a built-in profile");
        let mut options = Options::default();
        options.set("bt.lmsle", "true").expect("a known option");
        for engine in engine::all() {
            let _ = engine.replay(&trace, &profile, &options);
        }
    }
});
