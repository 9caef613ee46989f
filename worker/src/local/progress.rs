//! Progress of a laptop ingest run on stderr: a bar with the rate and the time left (indicatif)
//! on a terminal, cleared when done; otherwise (a log file, CI) a plain line every few seconds
//! and a last one at the end. The count is the records that reached an outcome (indexed, unchanged, skipped or
//! dead-lettered), not the lines read ahead of them.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::metrics::Metrics;

/// How often a plain line is written when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// A running progress display; [`Progress::finish`] ends it.
pub struct Progress {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// One plain progress line: done of total (when known), the rate and the time left.
pub fn plain_line(done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(1e-3);
    let rate = done as f64 / seconds;
    match total {
        Some(total) => {
            let left = total.saturating_sub(done);
            let eta = if rate > 0.0 {
                format!("{:.0} s left", left as f64 / rate)
            } else {
                "time left unknown".to_owned()
            };
            let percent = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            format!("indexing: {done}/{total} records ({percent:.0} %), {rate:.1} records/s, {eta}")
        }
        None => format!("indexing: {done} records, {rate:.1} records/s"),
    }
}

impl Progress {
    /// Starts showing the progress of `total` records (None: unknown, e.g. stdin).
    pub fn start(total: Option<u64>, metrics: Arc<Metrics>) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let terminal = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let bar = terminal.then(|| match total {
                Some(total) => {
                    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                        .with_style(
                            ProgressStyle::with_template(
                                "indexing {bar:30} {pos}/{len} records, {per_sec}, {eta} left",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        )
                }
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                    .with_style(
                        ProgressStyle::with_template("indexing {spinner} {pos} records, {per_sec}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    ),
            });
            let every = if terminal {
                Duration::from_millis(200)
            } else {
                PLAIN_EVERY
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
                let done = metrics.records_done.get();
                match &bar {
                    Some(bar) => bar.set_position(done),
                    None => eprintln!("{}", plain_line(done, total, started.elapsed())),
                }
            }
            match bar {
                Some(bar) => bar.finish_and_clear(),
                None => eprintln!(
                    "{}",
                    plain_line(metrics.records_done.get(), total, started.elapsed())
                ),
            }
        });
        Self { stop, task }
    }

    /// Ends the display (the run's summary line follows it).
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_give_the_count_rate_and_time_left() {
        assert_eq!(
            plain_line(100, Some(300), Duration::from_secs(10)),
            "indexing: 100/300 records (33 %), 10.0 records/s, 20 s left"
        );
        assert_eq!(
            plain_line(0, Some(300), Duration::from_secs(2)),
            "indexing: 0/300 records (0 %), 0.0 records/s, time left unknown"
        );
        assert_eq!(
            plain_line(50, None, Duration::from_secs(5)),
            "indexing: 50 records, 10.0 records/s"
        );
    }
}
