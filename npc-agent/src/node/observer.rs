//! The observer: drains the datapath's verdict events (the `NPC_EVENTS` ring buffer), names both
//! ends, logs blocked connections at a bounded rate and counts them by reason.
//!
//! A flood of blocked packets (a scan, a misconfigured client retrying) must not become a flood
//! of log lines: a token bucket lets a burst through, then at most `per_second` lines a second,
//! and says how many it held back. The per-CPU drop counters (and so the Prometheus counter)
//! count every drop whatever the log does.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use npc_common::{VerdictEvent, drop_reason, event_kind};
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

use crate::node::metrics::Metrics;
use npc_policy::model::{ObjectRef, addr_from_bytes, protocol_name};
use npc_policy::policy::direction_name;

/// Who is behind an address or an interface, as of the agent's last turn.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub by_addr: BTreeMap<IpAddr, ObjectRef>,
    /// Service VIPs: a pod's blocked connection to one names the Service.
    pub services: BTreeMap<IpAddr, ObjectRef>,
    pub by_ifindex: BTreeMap<u32, ObjectRef>,
}

pub type SharedNames = Arc<RwLock<Names>>;

/// One event as a log line: what, between whom, and why.
pub fn describe(ev: &VerdictEvent, names: &Names) -> String {
    let (src, dst) = (addr_from_bytes(ev.src), addr_from_bytes(ev.dst));
    let who = |ip: IpAddr| match (names.by_addr.get(&ip), names.services.get(&ip)) {
        (Some(pod), _) => format!(" ({pod})"),
        (None, Some(svc)) => format!(" (svc/{svc})"),
        (None, None) => String::new(),
    };
    let protocol = protocol_name(ev.protocol).map_or_else(|| format!("protocol {}", ev.protocol), str::to_string);
    let endpoint = |ip: IpAddr, port: u16| match ip {
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
        IpAddr::V4(_) => format!("{ip}:{port}"),
    };
    let verdict = if ev.kind == event_kind::AUDIT {
        "would block (audit mode)"
    } else {
        "blocked"
    };
    let direction = direction_name(ev.direction);
    let at = names
        .by_ifindex
        .get(&ev.ifindex)
        .map_or_else(|| format!("ifindex {}", ev.ifindex), ToString::to_string);
    let reason = match ev.reason {
        drop_reason::POLICY => "no policy rule allows it",
        drop_reason::UNPARSEABLE => "the packet could not be parsed",
        drop_reason::POLICY_CHANGED => "a policy change no longer allows this established connection",
        drop_reason::NOT_IP => "not IPv4, IPv6 or ARP (VLAN-tagged or an unknown ethertype)",
        drop_reason::SPOOFED => "its source address is not the pod's own (forged)",
        drop_reason::FRAGMENT => {
            "a fragment whose first fragment was not allowed here, or that overlaps its transport header"
        }
        _ => "unknown reason",
    };
    // A forgery is the sending pod's doing, not a policy's verdict: say who sent it.
    let judged = if ev.reason == drop_reason::SPOOFED {
        format!("sent by {at}")
    } else {
        format!("{direction} policy of {at}")
    };
    format!(
        "{verdict} {protocol} {}{} -> {}{}: {judged}: {reason}",
        endpoint(src, ev.sport),
        who(src),
        endpoint(dst, ev.dport),
        who(dst)
    )
}

/// Lets `burst` lines through at once and then `per_second`; counts what it held back.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    held_back: u64,
}

impl RateLimit {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
            held_back: 0,
        }
    }

    /// May a line be logged at `now`?
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.held_back += 1;
            false
        }
    }

    /// Lines held back since the last call.
    pub fn take_held_back(&mut self) -> u64 {
        std::mem::take(&mut self.held_back)
    }
}

/// The draining thread; stops (and joins) on drop.
///
/// The ring buffer's fd is watched with tokio's `AsyncFd` on a small runtime of the thread's own:
/// it wakes on data, on the once-a-second summary of held-back lines, or on stop, and never
/// polls on a timer.
pub struct Observer {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    pub fn start(events: RingBuf<MapData>, names: SharedNames, metrics: Metrics, per_second: u32) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("npc-observer".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => return tracing::error!(error = %e, "observer: no runtime; verdict events are not logged"),
                };
                runtime.block_on(drain(events, names, metrics, per_second, token));
            })
            .expect("spawning the observer thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

async fn drain(
    events: RingBuf<MapData>,
    names: SharedNames,
    metrics: Metrics,
    per_second: u32,
    stop: CancellationToken,
) {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, until it is dropped,
    // and the AsyncFd owns the ring buffer.
    let mut events = match unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return tracing::error!(error = %e, "observer: cannot watch the events ring buffer"),
    };
    let mut limit = RateLimit::new(per_second, per_second * 2);
    let mut summary = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = summary.tick() => {
                let held = limit.take_held_back();
                if held > 0 {
                    tracing::warn!(
                        "... and {held} more blocked packets (log rate limit; all are counted in npc_blocked_connections_total)"
                    );
                }
            }
            ready = events.readable_mut() => {
                let Ok(mut guard) = ready else { return };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() < size_of::<VerdictEvent>() {
                        continue;
                    }
                    // SAFETY: the kernel wrote a whole VerdictEvent (repr(C), no padding holes);
                    // read unaligned because ring buffer records are only 8-byte aligned by luck.
                    let ev: VerdictEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    metrics.verdict_event(ev.kind, ev.reason);
                    if limit.allow(Instant::now()) {
                        let names = names.read().expect("not poisoned");
                        tracing::warn!("{}", describe(&ev, &names));
                    }
                }
                guard.clear_ready();
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use npc_common::{DIR_INGRESS, PROTO_TCP};

    use super::*;

    fn event() -> VerdictEvent {
        VerdictEvent {
            src: npc_common::v4_mapped([10, 0, 0, 2]),
            dst: npc_common::v4_mapped([10, 0, 0, 1]),
            ifindex: 7,
            local_identity: 256,
            peer_identity: 257,
            sport: 40000,
            dport: 80,
            protocol: PROTO_TCP,
            direction: DIR_INGRESS,
            kind: event_kind::DROP,
            reason: drop_reason::POLICY,
        }
    }

    #[test]
    fn names_both_ends_and_the_reason() {
        let mut names = Names::default();
        names
            .by_addr
            .insert("10.0.0.2".parse().unwrap(), ObjectRef::new("shop", "client"));
        names
            .by_addr
            .insert("10.0.0.1".parse().unwrap(), ObjectRef::new("shop", "web"));
        names.by_ifindex.insert(7, ObjectRef::new("shop", "web"));
        assert_eq!(
            describe(&event(), &names),
            "blocked TCP 10.0.0.2:40000 (shop/client) -> 10.0.0.1:80 (shop/web): ingress policy of shop/web: no policy rule allows it"
        );
        // A connection to a Service's VIP names the Service.
        names
            .services
            .insert("10.96.0.80".parse().unwrap(), ObjectRef::new("shop", "web"));
        let mut to_vip = event();
        to_vip.dst = npc_common::v4_mapped([10, 96, 0, 80]);
        assert!(
            describe(&to_vip, &names).contains("-> 10.96.0.80:80 (svc/shop/web)"),
            "{}",
            describe(&to_vip, &names)
        );
        let mut ev = event();
        ev.src = "fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets();
        ev.reason = drop_reason::POLICY_CHANGED;
        let text = describe(&ev, &Names::default());
        assert!(
            text.starts_with("blocked TCP [fd00::9]:40000 -> 10.0.0.1:80: ingress policy of ifindex 7"),
            "{text}"
        );
        assert!(text.ends_with("no longer allows this established connection"));
    }

    #[test]
    fn a_forged_packet_names_the_pod_that_sent_it() {
        let mut names = Names::default();
        names
            .by_addr
            .insert("10.0.0.2".parse().unwrap(), ObjectRef::new("shop", "client"));
        names.by_ifindex.insert(7, ObjectRef::new("shop", "attacker"));
        let mut ev = event();
        (ev.direction, ev.reason) = (npc_common::DIR_EGRESS, drop_reason::SPOOFED);
        assert_eq!(
            describe(&ev, &names),
            "blocked TCP 10.0.0.2:40000 (shop/client) -> 10.0.0.1:80: sent by shop/attacker: its source address is not the pod's own (forged)"
        );
    }

    #[test]
    fn rate_limit_lets_a_burst_through_then_a_steady_trickle() {
        let mut limit = RateLimit::new(10, 20);
        let t0 = Instant::now();
        let first: usize = (0..100).filter(|_| limit.allow(t0)).count();
        assert_eq!(first, 20, "the burst");
        assert_eq!(limit.take_held_back(), 80);
        // One second later: ten more.
        let t1 = t0 + Duration::from_secs(1);
        let next: usize = (0..100).filter(|_| limit.allow(t1)).count();
        assert_eq!(next, 10);
        assert_eq!(limit.take_held_back(), 90);
        assert_eq!(limit.take_held_back(), 0);
    }
}
