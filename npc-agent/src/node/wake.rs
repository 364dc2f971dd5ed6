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
    /// Turn (or tick) at least this often without changes.
    pub resync: Duration,
}

pub struct Waker {
    runtime: tokio::runtime::Runtime,
    changed: UnboundedReceiver<()>,
    stop: CancellationToken,
    tick: tokio::time::Interval,
    timing: Timing,
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
        })
    }

    /// Waits for the next reason to turn.
    pub fn wait(&mut self) -> Wake {
        let Self {
            runtime,
            changed,
            stop,
            tick,
            timing,
        } = self;
        runtime.block_on(async {
            tokio::select! {
                biased;
                () = stop.cancelled() => Wake::Stop,
                got = changed.recv() => match got {
                    None => Wake::Stop,
                    Some(()) => {
                        // Fold the rest of the burst in: wait out the window, then drain.
                        tokio::select! {
                            () = stop.cancelled() => return Wake::Stop,
                            () = tokio::time::sleep(timing.coalesce) => {}
                        }
                        while changed.try_recv().is_ok() {}
                        tick.reset();
                        Wake::Changed
                    }
                },
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
