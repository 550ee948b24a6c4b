//! Progress of a conversion, for people watching a terminal and for cluster logs.
//!
//! On a terminal: an indicatif bar per stage (entries, bytes, throughput, ETA). Elsewhere
//! (cluster job logs): a plain `progress` log event at most every `interval`, never carriage
//! returns. Stages report through `entry_read`, called once per source entry read; the runner
//! sets which stage that counts for (one stage runs at a time), so stage code stays unaware.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bars on stderr (a terminal).
    Bars,
    /// Log events at intervals (not a terminal).
    Lines { interval: Duration },
    /// Nothing (`-q`).
    Off,
}

pub struct StageProgress {
    stage: String,
    total_entries: u64,
    total_bytes: u64,
    entries: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
    mode: ProgressMode,
    last_line: Mutex<Instant>,
}

impl StageProgress {
    pub fn new(
        mode: ProgressMode,
        stage: &str,
        total_entries: u64,
        total_bytes: u64,
    ) -> StageProgress {
        let bar = match mode {
            ProgressMode::Bars => {
                let bar =
                    ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template("{prefix:>14} [{bar:30}] {binary_bytes:>9}/{binary_total_bytes:<9} {binary_bytes_per_sec:>11} ETA {eta:>4} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(stage.to_string());
                Some(bar)
            }
            _ => None,
        };
        StageProgress {
            stage: stage.to_string(),
            total_entries,
            total_bytes,
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            bar,
            mode,
            last_line: Mutex::new(Instant::now()),
        }
    }

    /// A reporter that shows nothing (library use, tests).
    pub fn hidden() -> StageProgress {
        StageProgress::new(ProgressMode::Off, "", 0, 0)
    }

    /// One more entry of `bytes` (as stored in the source) was read.
    pub fn inc(&self, bytes: u64) {
        let entries = self.entries.fetch_add(1, Ordering::Relaxed) + 1;
        let done = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        match self.mode {
            ProgressMode::Bars => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done);
                    bar.set_message(format!("{entries}/{} entries", self.total_entries));
                }
            }
            ProgressMode::Lines { interval } => {
                let Ok(mut last) = self.last_line.try_lock() else {
                    return;
                };
                if last.elapsed() < interval {
                    return;
                }
                *last = Instant::now();
                let seconds = self.started.elapsed().as_secs_f64();
                let rate = done as f64 / seconds.max(1e-9);
                let eta = if rate > 0.0 {
                    self.total_bytes.saturating_sub(done) as f64 / rate
                } else {
                    0.0
                };
                tracing::info!(
                    stage = %self.stage,
                    entries,
                    total_entries = self.total_entries,
                    bytes = done,
                    total_bytes = self.total_bytes,
                    mb_per_s = (rate / 1e6 * 10.0).round() / 10.0,
                    eta_s = eta.round(),
                    "progress"
                );
            }
            ProgressMode::Off => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

static CURRENT: RwLock<Option<Arc<StageProgress>>> = RwLock::new(None);

/// Makes `progress` the stage that `entry_read` counts for (`None` when no stage runs).
pub fn set_current(progress: Option<Arc<StageProgress>>) {
    if let Ok(mut current) = CURRENT.write() {
        if let Some(old) = current.take() {
            old.finish();
        }
        *current = progress;
    }
}

/// Counts one source entry of `bytes` for the running stage.
pub fn entry_read(bytes: u64) {
    if let Ok(current) = CURRENT.read() {
        if let Some(p) = current.as_ref() {
            p.inc(bytes);
        }
    }
}
