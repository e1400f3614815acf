//! systemd's service protocol: readiness, stopping, and the watchdog.
//!
//! The packaged unit runs the agent with `Type=notify` and `WatchdogSec=`. The agent says
//! `READY=1` once its models are loaded and its workers run (the broker may still be away:
//! the agent retries on its own, a restart would not help), `STOPPING=1` when it starts to
//! drain, and `WATCHDOG=1` every half watchdog period while it is healthy. Healthy means the
//! async runtime still runs this task and the inference workers are not stuck: windows
//! waiting while none finished during a whole period is a stall, and the ping is withheld so
//! that systemd restarts the agent. Without `NOTIFY_SOCKET` every call does nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::pool::QueueProbe;
use crate::telemetry::Counters;

/// Tells systemd the agent serves.
pub fn ready() {
    send(&[sd_notify::NotifyState::Ready]);
}

/// Tells systemd the agent is draining.
pub fn stopping() {
    send(&[sd_notify::NotifyState::Stopping]);
}

fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Whether the workers made progress: nothing waited, or something finished.
pub fn workers_alive(queued: bool, finished_before: u64, finished_now: u64) -> bool {
    !queued || finished_now != finished_before
}

/// Pings systemd's watchdog while the agent is healthy, until `stop`; returns at once when
/// systemd asked for no watchdog.
pub async fn watchdog(queue: QueueProbe, counters: Arc<Counters>, stop: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut ticks = tokio::time::interval(timeout / 2);
    let mut finished = counters.inferences_ok.load(Ordering::Relaxed);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = counters.inferences_ok.load(Ordering::Relaxed);
        if workers_alive(!queue.is_empty(), finished, now) {
            if stalled {
                tracing::info!("inference workers progress again");
                stalled = false;
            }
            send(&[sd_notify::NotifyState::Watchdog]);
        } else if !stalled {
            tracing::error!(
                queued = queue.len(),
                "no window finished while windows waited: withholding the watchdog ping"
            );
            stalled = true;
        }
        finished = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_that_moves_or_is_empty_is_alive_a_full_one_that_does_not_is_stalled() {
        assert!(workers_alive(false, 7, 7));
        assert!(workers_alive(true, 7, 8));
        assert!(!workers_alive(true, 7, 7));
    }
}
