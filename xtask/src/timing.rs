//! Timing for the benchmark tasks: best of several runs.

use std::time::{Duration, Instant};

/// Runs `run` `repeat` times (at least once), each timing itself, and keeps the fastest.
pub fn best_of<T>(
    repeat: u32,
    mut run: impl FnMut() -> anyhow::Result<(Duration, T)>,
) -> anyhow::Result<(Duration, T)> {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..repeat.max(1) {
        let (elapsed, value) = run()?;
        if best.as_ref().is_none_or(|(time, _)| elapsed < *time) {
            best = Some((elapsed, value));
        }
    }
    Ok(best.expect("at least one run"))
}

/// [`best_of`] timing the whole of `run`.
pub fn fastest<T>(repeat: u32, mut run: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(Duration, T)> {
    best_of(repeat, || {
        let start = Instant::now();
        let value = run()?;
        Ok((start.elapsed(), value))
    })
}
