//! Any bytes through every reading path: the view (open, cursor, loop, its checker), the streaming reader
//! (inside the streaming checker) and that checker. Errors are expected; panics, hangs and runaway allocations are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtlab_traces::{check, check_view, TraceView};

fuzz_target!(|data: &[u8]| {
    if let Ok(view) = TraceView::open(data) {
        for event in view.events() {
            if event.is_err() {
                break;
            }
        }
        let _ = view.for_each_event(|_| {});
        let _ = check_view(&view);
    }
    let _ = check(data);
});
