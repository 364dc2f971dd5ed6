//! When the loop turns: a change (a burst coalesced into one), the resync tick, or stop.
//!
//! One `tokio::select!` over the change channel, the tick interval and the stop token (which the
//! CLI cancels on SIGINT/SIGTERM/SIGHUP). It runs on a current-thread runtime of its own and
//! returns to the caller before the turn runs: a turn is blocking work (bpf syscalls, the
//! attacher's netlink runtime), and it stays out of any async context.
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// Why the loop woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Something changed (a watch event, a file write).
    Changed,
    /// The retry timer set after a failed turn ([`Waker::retry_after`]) ran out.
    Retry,
    /// Nothing changed for a resync period: retry what failed, refresh counters.
    Tick,
    Stop,
}

/// How the loop waits.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// After a change, further changes this close together are folded into the same turn (a
    /// relist, a rollout, an editor writing a file in several steps).
    pub coalesce: Duration,
    /// How long a lone change (none in the `coalesce` before it) waits for company: short for the
    /// agent (a single edit should cost its compile, not the window), the whole window for the
    /// lab (an editor's first write is rarely its last). See [`coalesce_window`].
    pub lone: Duration,
    /// Turn (or tick) at least this often without changes.
    pub resync: Duration,
}

pub struct Waker {
    runtime: tokio::runtime::Runtime,
    changed: UnboundedReceiver<()>,
    stop: CancellationToken,
    tick: tokio::time::Interval,
    timing: Timing,
    /// When to retry a failed turn, if one failed.
    retry_at: Option<tokio::time::Instant>,
    /// When the last change arrived (for the adaptive window, see [`coalesce_window`]).
    last_change: Option<std::time::Instant>,
}

impl Waker {
    pub fn new(changed: UnboundedReceiver<()>, stop: CancellationToken, timing: Timing) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        let mut tick = runtime.block_on(async { tokio::time::interval(timing.resync) });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            runtime,
            changed,
            stop,
            tick,
            timing,
            retry_at: None,
            last_change: None,
        })
    }

    /// Turn again after `delay` even if nothing changes (a failed sync must not wait for the next
    /// event, which may be hours away); None cancels.
    pub fn retry_after(&mut self, delay: Option<Duration>) {
        self.retry_at = delay.map(|d| tokio::time::Instant::now() + d);
    }

    /// Waits for the next reason to turn.
    pub fn wait(&mut self) -> Wake {
        let Self {
            runtime,
            changed,
            stop,
            tick,
            timing,
            retry_at,
            last_change,
        } = self;
        runtime.block_on(async {
            tokio::select! {
                biased;
                () = stop.cancelled() => Wake::Stop,
                got = changed.recv() => match got {
                    None => Wake::Stop,
                    Some(()) => {
                        // Fold the rest of the burst in: wait out the window, then drain.
                        let window = coalesce_window(timing, last_change.map(|at| at.elapsed()));
                        *last_change = Some(std::time::Instant::now());
                        tokio::select! {
                            () = stop.cancelled() => return Wake::Stop,
                            () = tokio::time::sleep(window) => {}
                        }
                        while changed.try_recv().is_ok() {}
                        tick.reset();
                        Wake::Changed
                    }
                },
                () = async {
                    match *retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    *retry_at = None;
                    Wake::Retry
                }
                _ = tick.tick() => Wake::Tick,
            }
        })
    }
}

/// A stop token cancelled by SIGINT, SIGTERM or SIGHUP (for the CLI's long-running commands).
pub fn stop_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut streams = runtime.block_on(async {
        [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()]
            .into_iter()
            .map(signal)
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let cancel = token.clone();
    std::thread::Builder::new().name("npc-signals".into()).spawn(move || {
        runtime.block_on(async move {
            let [a, b, c] = &mut streams[..] else { return };
            tokio::select! {
                _ = a.recv() => {}
                _ = b.recv() => {}
                _ = c.recv() => {}
                () = cancel.cancelled() => {}
            }
            cancel.cancel();
        });
    })?;
    Ok(token)
}

/// How long a change waits for more to fold into its turn, given how long ago the previous
/// change came: one that follows another within `Timing::coalesce` is part of a burst (a
/// rollout, a relist) and waits the window out; a lone one waits `Timing::lone`.
pub fn coalesce_window(timing: &Timing, since_previous: Option<Duration>) -> Duration {
    let in_burst = since_previous.is_some_and(|d| d < timing.coalesce);
    if in_burst { timing.coalesce } else { timing.lone }
}

/// The delay before retrying after `failures` failed turns in a row: doubling from 200 ms up to
/// 30 s; None when the last turn went through.
pub fn retry_delay(failures: u32) -> Option<Duration> {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);
    let n = failures.checked_sub(1)?;
    Some(FIRST.saturating_mul(1u32 << n.min(16)).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_change_waits_briefly_and_a_burst_waits_the_window() {
        let timing = Timing {
            coalesce: Duration::from_millis(100),
            lone: Duration::from_millis(5),
            resync: Duration::from_secs(60),
        };
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(coalesce_window(&timing, None)), 5, "the first change");
        assert_eq!(
            ms(coalesce_window(&timing, Some(Duration::from_secs(3)))),
            5,
            "after a quiet spell"
        );
        assert_eq!(
            ms(coalesce_window(&timing, Some(Duration::from_millis(30)))),
            100,
            "in a burst"
        );
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        assert_eq!(retry_delay(0), None);
        let delays: Vec<u64> = (1..=10).map(|n| retry_delay(n).unwrap().as_millis() as u64).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        assert_eq!(retry_delay(u32::MAX), Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_retry_wakes_the_loop_without_any_change() {
        let (send, changed) = tokio::sync::mpsc::unbounded_channel();
        let timing = Timing {
            coalesce: Duration::from_millis(10),
            lone: Duration::from_millis(10),
            resync: Duration::from_secs(3600),
        };
        let mut waker = Waker::new(changed, CancellationToken::new(), timing).unwrap();
        // The interval's first tick is immediate.
        assert_eq!(waker.wait(), Wake::Tick);
        waker.retry_after(Some(Duration::from_millis(20)));
        assert_eq!(waker.wait(), Wake::Retry);
        // Once: the next wake is the hourly tick, so check with a change instead.
        send.send(()).unwrap();
        assert_eq!(waker.wait(), Wake::Changed);
    }
}
