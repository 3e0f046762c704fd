//! systemd notifications (sd_notify) and the watchdog.
//!
//! When `NOTIFY_SOCKET` is unset every call is a no-op, so the daemon runs the same outside
//! systemd.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `STATUS=` line shown by `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

pub fn ready(status_text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status_text)]);
}

/// Asks systemd for `extra` more time before the start (or stop) times out.
pub fn extend_timeout(extra: Duration) {
    let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

pub fn stopping(status_text: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status_text)]);
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` that systemd 253+ requires next to it.
pub fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading configuration")]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading configuration")]),
    }
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings `WATCHDOG=1` every `period / 2` while `alive` says the daemon works. `alive` returns
/// `Err(reason)` to withhold the ping; systemd then restarts the daemon after `period`.
pub async fn watchdog<F, Fut>(period: Duration, alive: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match alive().await {
            Ok(()) => {
                if failing {
                    tracing::info!("liveness restored; watchdog pings resume");
                    failing = false;
                }
                send(&[NotifyState::Watchdog]);
            }
            Err(reason) => {
                if !failing {
                    tracing::error!(reason = %reason, "liveness check failed; withholding watchdog pings");
                    failing = true;
                }
            }
        }
    }
}
