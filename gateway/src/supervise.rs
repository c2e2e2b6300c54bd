//! Background tasks that must outlive their own bugs: each runs under [`supervise`], which starts
//! it again after a short back-off if it ever returns or panics before it is told to stop, and
//! counts (`otpgate_task_restarts_total{task}`) and logs each restart.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::metrics::{Metrics, Task};

/// The first pause before a restart; it doubles with each restart in a row, up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A task that ran this long before it ended starts again after the shortest pause.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Runs the task `start` makes until `stop` fires; whenever it returns or panics before that,
/// counts and logs it, waits (100 ms, doubling up to 5 s while it keeps failing at once) and
/// starts a fresh one. Each run is a task of its own, so a panic is caught, and dropping the
/// supervisor aborts it.
pub async fn supervise<F, Fut>(task: Task, metrics: Metrics, stop: CancellationToken, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        let result = AbortOnDropHandle::new(tokio::spawn(start())).await;
        if stop.is_cancelled() {
            return;
        }
        match result {
            Err(error) if error.is_panic() => {
                tracing::error!(
                    task = task.name(),
                    "background task panicked; restarting it"
                );
            }
            _ => tracing::error!(task = task.name(), "background task ended; restarting it"),
        }
        metrics.task_restarted(task);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn restarts(metrics: &Metrics, task: &str) -> String {
        let series = format!("otpgate_task_restarts_total{{task=\"{task}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()).map(str::to_owned))
            .unwrap_or_default()
    }

    /// A task that panics, then one that returns, are both started again and counted; the run
    /// after them lasts until `stop`, and then the supervisor ends without a restart.
    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_returns_is_restarted_and_counted() {
        let metrics = Metrics::new(&[], &[], &[], &[]);
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let supervisor = tokio::spawn(supervise(Task::Sweeper, metrics.clone(), stop.clone(), {
            let runs = runs.clone();
            let stop = stop.clone();
            move || {
                let run = runs.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                async move {
                    match run {
                        0 => panic!("a bug in the task"),
                        1 => {}
                        _ => stop.cancelled().await,
                    }
                }
            }
        }));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts(&metrics, "sweeper"), "2");
        assert_eq!(restarts(&metrics, "feed"), "0");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), supervisor)
            .await
            .expect("the supervisor ends once stopped")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts(&metrics, "sweeper"), "2");
    }

    /// A task that keeps failing at once is started again less and less often, never faster
    /// than every 100 ms nor slower than every 5 s.
    #[tokio::test(start_paused = true)]
    async fn restarts_back_off() {
        let metrics = Metrics::new(&[], &[], &[], &[]);
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let _supervisor = AbortOnDropHandle::new(tokio::spawn(supervise(
            Task::Feed,
            metrics.clone(),
            stop.clone(),
            {
                let runs = runs.clone();
                move || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    async {}
                }
            },
        )));
        // Pauses of 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, then 5 s: runs start at 0, 0.1, 0.3, 0.7,
        // 1.5, 3.1, 6.3, 11.3, 16.3 s.
        tokio::time::sleep(Duration::from_millis(6_350)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 7);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 8);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 9);
        assert_eq!(restarts(&metrics, "feed"), "9");
        stop.cancel();
    }
}
