//! Packet-by-packet tests of the TC programs in the real kernel (BPF_PROG_TEST_RUN), against maps
//! filled by the real compiler and MapSync.
//!
//! In a test run the packet arrives on loopback (ifindex 1), so the local pod "server" is given
//! ifindex 1. Both hooks see the same interface: `ToPod` judges the server's ingress, `FromPod`
//! its egress.
use std::net::{IpAddr, Ipv4Addr};

use npc_agent::datapath::Hook;
use npc_common::{DIR_EGRESS, DIR_INGRESS, DropKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use npc_integration::packet::{self, L4, TCP_ACK, TCP_FIN, TCP_SYN};
use npc_integration::{TestDatapath, compile_for};
use npc_policy::model::ObjectRef;

const PASS: i32 = -1; // TC_ACT_UNSPEC: "next program", or pass when none
const SHOT: i32 = 2; // TC_ACT_SHOT

/// The addresses CLUSTER gives the client and the (local) server.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 20));
const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10));

const CLUSTER: &str = include_str!("fixtures/shop.yaml");

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports:
        - {port: 80}
        - {port: 53, protocol: UDP}
        - {port: 9000, protocol: SCTP}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-out, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 8080}]
"#;

struct Fixture {
    t: TestDatapath,
}

impl Fixture {
    fn new(name: &str) -> Self {
        Self {
            t: TestDatapath::load(name),
        }
    }

    /// A fixture with POLICIES applied.
    fn policed(name: &str) -> Self {
        let mut fx = Self::new(name);
        fx.apply(POLICIES);
        fx
    }

    /// Compiles CLUSTER plus `policies` and syncs it, with the server behind ifindex 1.
    fn apply(&mut self, policies: &str) {
        self.apply_cluster(CLUSTER, policies);
    }

    fn apply_cluster(&mut self, cluster: &str, policies: &str) {
        let compiled = compile_for("node-a", &[("cluster.yaml", cluster), ("policies.yaml", policies)]);
        let server = ObjectRef::new("shop", "server");
        self.t
            .dp
            .sync(&compiled.maps, |pod| (*pod == server).then_some(1))
            .expect("sync");
    }

    fn run(&self, hook: Hook, pkt: &[u8]) -> i32 {
        self.t.dp.test_run(hook, pkt).expect("BPF_PROG_TEST_RUN")
    }

    /// Asserts `hook`'s verdict on `pkt`.
    #[track_caller]
    fn expect(&self, hook: Hook, pkt: &[u8], verdict: i32) {
        assert_eq!(self.run(hook, pkt), verdict, "{hook:?}");
    }

    /// Opens a TCP connection from `client` to the server: its SYN passes in, the SYN-ACK out.
    #[track_caller]
    fn handshake(&self, client: IpAddr, server: IpAddr, sport: u16, dport: u16) {
        self.expect(Hook::ToPod, &packet::tcp(client, server, sport, dport, TCP_SYN), PASS);
        self.expect(
            Hook::FromPod,
            &packet::tcp(server, client, dport, sport, TCP_SYN | TCP_ACK),
            PASS,
        );
    }

    fn drops(&self, direction: u8, protocol: u8, dport: u16) -> u64 {
        self.t.dp.drop_count(DropKey {
            direction,
            protocol,
            dport,
        })
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn unknown_interface_passes_untouched() {
    let fx = Fixture::new("unknown");
    // No sync yet: ifindex 1 is not an endpoint of ours.
    let syn = packet::tcp(ip("10.9.9.9"), SERVER, 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &syn, PASS);
    assert!(fx.t.dp.drops().unwrap().is_empty());
}

#[test]
fn allowed_tcp_syn_passes_and_is_counted_as_allowed_not_dropped() {
    let fx = Fixture::policed("allowed");
    let syn = packet::tcp(CLIENT, SERVER, 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &syn, PASS);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 80), 0);
    assert_eq!(
        fx.t.dp.allowed_connections().unwrap(),
        (1, 0),
        "one new connection at ingress"
    );
    // Its next packet is a conntrack hit, not a new connection; a denied one is not counted.
    let ack = packet::tcp(CLIENT, SERVER, 40000, 80, TCP_ACK);
    fx.expect(Hook::ToPod, &ack, PASS);
    let denied = packet::tcp(ip("10.0.0.99"), SERVER, 40001, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &denied, SHOT);
    assert_eq!(fx.t.dp.allowed_connections().unwrap(), (1, 0));
}

#[test]
fn denied_tcp_syn_is_dropped_and_counted() {
    let fx = Fixture::policed("denied");
    // Not a client pod.
    let syn = packet::tcp(ip("10.0.0.99"), SERVER, 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &syn, SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 80), 1);
    // Its retransmission is the same connection: one more packet, no more connections.
    let syn = packet::tcp(ip("10.0.0.99"), SERVER, 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &syn, SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 80), 1);
    assert_eq!(fx.t.dp.denied_packets().unwrap(), 2);
    // A client, but on a port no rule allows, no Service and no pod names: counted, under port 0.
    let syn = packet::tcp(CLIENT, SERVER, 40000, 81, TCP_SYN);
    fx.expect(Hook::ToPod, &syn, SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 0), 1);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 81), 0);
}

/// A port scan cannot fill the drop counters: a thousand ports nobody declares are one counter
/// (port 0) of a thousand connections; the declared port keeps its own (issue 14).
#[test]
fn a_port_scan_counts_its_connections_under_port_zero() {
    let fx = Fixture::policed("scan");
    for dport in 20_000..21_000 {
        let syn = packet::tcp(ip("10.0.0.99"), SERVER, 40000, dport, TCP_SYN);
        fx.expect(Hook::ToPod, &syn, SHOT);
    }
    let syn = packet::tcp(ip("10.0.0.99"), SERVER, 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &syn, SHOT);
    let drops = fx.t.dp.drops().unwrap();
    assert_eq!(drops.len(), 2, "{drops:?}");
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 0), 1000);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 80), 1);
    assert_eq!(fx.t.dp.denied_packets().unwrap(), 1001);
}

#[test]
fn reply_of_an_allowed_connection_passes_the_isolated_direction() {
    let fx = Fixture::policed("reply");
    // The SERVER is egress-isolated and allows out only TCP 8080; its SYN-ACK is a reply.
    fx.handshake(CLIENT, SERVER, 40000, 80);
    // The same packet without the connection would be a new egress connection: denied.
    fx.expect(
        Hook::FromPod,
        &packet::tcp(SERVER, CLIENT, 80, 40001, TCP_SYN | TCP_ACK),
        SHOT,
    );
    // Counted, but not under the client's ephemeral port (a reply's dport is no label).
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_TCP, 0), 1);
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_TCP, 40001), 0);
}

#[test]
fn both_directions_of_a_connection_share_one_conntrack_entry() {
    let fx = Fixture::policed("shared");
    // Opened by the higher address (the client, into the server) and by the lower one (the
    // server, out to the client's 8080): one entry each, found by both directions.
    fx.handshake(CLIENT, SERVER, 40000, 80);
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 45000, 8080, TCP_SYN), PASS);
    fx.expect(
        Hook::ToPod,
        &packet::tcp(CLIENT, SERVER, 8080, 45000, TCP_SYN | TCP_ACK),
        PASS,
    );
    for _ in 0..2 {
        fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40000, 80, TCP_ACK), PASS);
        fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 80, 40000, TCP_ACK), PASS);
        fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 45000, 8080, TCP_ACK), PASS);
        fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 8080, 45000, TCP_ACK), PASS);
    }
    let mut tracked = fx.t.dp.conntrack_entries().unwrap();
    tracked.sort_by_key(|(k, v)| v.opener(k).2);
    let ip16 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let openers: Vec<_> = tracked
        .iter()
        .map(|(k, v)| (k.is_normal(), v.opener(k), v.direction))
        .collect();
    assert_eq!(
        openers,
        vec![
            (true, (ip16(CLIENT), ip16(SERVER), 40000, 80), DIR_INGRESS),
            (true, (ip16(SERVER), ip16(CLIENT), 45000, 8080), DIR_EGRESS),
        ],
        "one entry per connection, in the shared orientation, opener kept: {tracked:?}"
    );
    assert_eq!(
        fx.drops(DIR_INGRESS, PROTO_TCP, 80) + fx.drops(DIR_EGRESS, PROTO_TCP, 8080),
        0
    );
}

#[test]
fn the_conntrack_count_is_of_live_connections_only() {
    let mut fx = Fixture::policed("live");
    fx.handshake(CLIENT, SERVER, 40000, 80);
    // The same connection again on another port, idle past its state's timeout: dead to the
    // programs (its next packet is judged as new), though the LRU keeps it until it needs room.
    let (mut key, mut value) = fx.t.dp.conntrack_entries().unwrap()[0];
    key.sport += 1;
    value.state = npc_common::ct_state::TCP_CLOSED;
    value.last_seen_ns =
        npc_agent::datapath::monotonic_coarse_ns() - npc_common::ct_timeout::TCP_CLOSED - 1_000_000_000;
    let pin = fx.t.pin_root().join(npc_common::map_names::CONNTRACK4);
    let data = aya::maps::MapData::from_pin(pin).unwrap();
    let mut ct: aya::maps::HashMap<_, npc_common::ConntrackKey4, npc_common::ConntrackValue> =
        aya::maps::Map::LruHashMap(data).try_into().unwrap();
    let key = npc_common::ConntrackKey4::from_mapped(&key).expect("an IPv4 connection");
    ct.insert(key, value, 0).unwrap();
    assert_eq!(fx.t.dp.conntrack_entries().unwrap().len(), 2);
    let sweep = fx.t.dp.conntrack_sweep().unwrap();
    assert_eq!((sweep.live(), sweep.rewritten), (1, 0), "{sweep:?}");
}

#[test]
fn syncs_write_what_changed_and_a_full_reconcile_repairs_drift() {
    let mut fx = Fixture::new("drift");
    fx.apply(POLICIES);
    fx.handshake(CLIENT, SERVER, 40000, 80);
    // Someone removes the client's identity by hand (bpftool map delete, say).
    let pin = fx.t.pin_root().join(npc_common::map_names::IDENTITIES);
    let mut identities: aya::maps::HashMap<_, [u8; 16], u32> =
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(pin).unwrap())
            .try_into()
            .unwrap();
    let client = match CLIENT {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    identities.remove(&client).unwrap();
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40001, 80, TCP_SYN), SHOT);

    // A sync with nothing new writes nothing and reads nothing back: the hole stays...
    let compiled = compile_for("node-a", &[("cluster.yaml", CLUSTER), ("policies.yaml", POLICIES)]);
    let server = ObjectRef::new("shop", "server");
    let ifindex = |pod: &ObjectRef| (*pod == server).then_some(1);
    let stats = fx.t.dp.sync(&compiled.maps, ifindex).unwrap();
    assert_eq!((stats.upserts, stats.deletes, stats.repaired), (0, 0, 0), "{stats:?}");
    assert!(identities.get(&client, 0).is_err(), "a quiet sync read the maps back");
    // ...until the periodic full reconcile, which rewrites it and counts the repair.
    fx.t.dp.reconcile_next_sync();
    assert!(fx.t.dp.reconcile_due());
    let stats = fx.t.dp.sync(&compiled.maps, ifindex).unwrap();
    assert_eq!((stats.upserts, stats.repaired), (1, 1), "{stats:?}");
    assert!(!fx.t.dp.reconcile_due());
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40002, 80, TCP_SYN), PASS);
}

#[test]
fn a_full_map_still_converges_and_an_overfull_one_is_refused_whole() {
    let mut fx = Fixture::new("full");
    let capacity = npc_common::capacity::ENDPOINTS;
    // Endpoints behind made-up interface numbers (the maps do not check them): pod pN is behind N.
    let endpoints = |range: std::ops::RangeInclusive<u32>| npc_policy::compiler::DesiredMaps {
        endpoints: range
            .map(|i| {
                (
                    ObjectRef::new("full", format!("p{i}")),
                    npc_common::EndpointInfo::new(7, 0, &[]),
                )
            })
            .collect(),
        ..Default::default()
    };
    let ifindex = |pod: &ObjectRef| pod.name.strip_prefix('p')?.parse::<u32>().ok();
    fx.t.dp.sync(&endpoints(1..=capacity), ifindex).expect("a full map");
    // A hundred pods replaced by a hundred others: old and new together do not fit.
    let stats =
        fx.t.dp
            .sync(&endpoints(101..=capacity + 100), ifindex)
            .expect("a full map converges");
    assert_eq!((stats.upserts, stats.deletes), (100, 100));
    let now: Vec<u32> = fx.t.dp.endpoints().unwrap().into_keys().collect();
    assert_eq!(now, (101..=capacity + 100).collect::<Vec<_>>());
    // One more than it holds: refused, naming the map, and nothing written.
    let err = fx.t.dp.sync(&endpoints(1..=capacity + 1), ifindex).unwrap_err();
    assert!(
        matches!(
            err,
            npc_agent::datapath::DatapathError::MapFull {
                map: "NPC_ENDPOINTS",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was written"), "{err}");
    assert_eq!(fx.t.dp.endpoints().unwrap().len(), capacity as usize);
    assert!(fx.t.dp.endpoints().unwrap().contains_key(&(capacity + 100)));
}

#[test]
fn established_connection_passes_and_a_tightened_policy_cuts_it() {
    let mut fx = Fixture::policed("established");
    fx.handshake(CLIENT, SERVER, 40000, 80);
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40000, 80, TCP_ACK), PASS);
    let tracked = fx.t.dp.conntrack_entries().unwrap();
    assert!(
        tracked
            .iter()
            .any(|(k, v)| v.opener(k).2 == 40000 && v.opener(k).3 == 80),
        "connection is tracked: {tracked:?}"
    );

    // Same policy re-synced: nothing changed, no epoch bump, the connection carries on.
    fx.apply(POLICIES);
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40000, 80, TCP_ACK), PASS);

    // Deny-all replaces the allow: the established connection is judged again and cut.
    fx.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {}}\n",
    );
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40000, 80, TCP_ACK), SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 80), 1);
}

#[test]
fn connection_opened_before_any_policy_is_cut_by_deny_all() {
    let mut fx = Fixture::new("before");
    fx.apply("");
    // Not isolated: anything goes, and is tracked.
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 41000, 7777, TCP_SYN), PASS);
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 41000, 7777, TCP_ACK), PASS);
    fx.apply(POLICIES);
    fx.expect(
        Hook::ToPod,
        &packet::tcp(CLIENT, SERVER, 41000, 7777, TCP_ACK | TCP_FIN),
        SHOT,
    );
}

/// Why conntrack is kept for pods no policy isolates (docs/datapath.md, "Choices"): a pod that
/// becomes isolated keeps the connections it had opened (their replies come in on the entry, and
/// are judged again as the egress connections they are), and the ones opened to it (their
/// replies go out). Untracked, both would be judged as new connections and cut: a watch on the
/// API server, say, when a namespace gets its default-deny.
#[test]
fn a_pod_that_becomes_isolated_keeps_the_connections_it_had() {
    let mut fx = Fixture::new("becomes");
    fx.apply("");
    // Opened by the server to an outside address, and by the client to the server's 7777.
    let outside = ip("192.0.2.7");
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, outside, 42000, 443, TCP_SYN), PASS);
    fx.expect(
        Hook::ToPod,
        &packet::tcp(outside, SERVER, 443, 42000, TCP_SYN | TCP_ACK),
        PASS,
    );
    fx.handshake(CLIENT, SERVER, 41000, 7777);

    // Ingress isolated, egress open: the server's own connection keeps its replies.
    fx.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-in, namespace: shop}\nspec: {podSelector: {}}\n",
    );
    fx.expect(Hook::ToPod, &packet::tcp(outside, SERVER, 443, 42000, TCP_ACK), PASS);
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, outside, 42000, 443, TCP_ACK), PASS);
    // A packet from the same peer that belongs to no connection is judged, and denied.
    fx.expect(Hook::ToPod, &packet::tcp(outside, SERVER, 443, 42001, TCP_ACK), SHOT);

    // Egress isolated, ingress open: the connection opened to the server keeps its replies.
    fx.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-out, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress]}\n",
    );
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 7777, 41000, TCP_ACK), PASS);
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 41000, 7777, TCP_ACK), PASS);
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 7777, 41001, TCP_ACK), SHOT);
}

#[test]
fn tagged_frames_and_unknown_ethertypes_never_leave_a_pod_and_enter_only_one_not_isolated() {
    let mut fx = Fixture::new("vlan");
    // An allowed flow, so that only the tags can be why it is dropped.
    let allowed = packet::tcp(CLIENT, SERVER, 41000, 80, TCP_SYN);
    let allowed_v6 = packet::tcp(ip("fd00::20"), ip("fd00::10"), 41000, 80, TCP_SYN);
    let frames = [
        ("802.1Q VID 0", packet::vlan_tagged(&[0x8100], &allowed)),
        ("802.1ad + 802.1Q", packet::vlan_tagged(&[0x88a8, 0x8100], &allowed)),
        ("802.1Q, IPv6 inside", packet::vlan_tagged(&[0x8100], &allowed_v6)),
        ("unknown ethertype", packet::with_ethertype(0x88b5, &allowed)),
    ];
    // Not isolated: everything passes in (nothing to protect), and nothing out (a pod never has
    // a reason to send them, and stacked tags would hide a forged source).
    fx.apply("");
    for (what, frame) in &frames {
        assert_eq!(fx.run(Hook::ToPod, frame), PASS, "{what}, not isolated");
        assert_eq!(fx.run(Hook::FromPod, frame), SHOT, "{what} from a pod not isolated");
    }
    assert_eq!(fx.drops(DIR_EGRESS, 0, 0), frames.len() as u64);
    fx.apply(POLICIES);
    fx.expect(Hook::ToPod, &allowed, PASS);
    for (what, frame) in &frames {
        assert_eq!(fx.run(Hook::ToPod, frame), SHOT, "{what} to an isolated pod");
        assert_eq!(fx.run(Hook::FromPod, frame), SHOT, "{what} from an isolated pod");
    }
    assert_eq!(fx.drops(DIR_INGRESS, 0, 0), frames.len() as u64, "each counted");
    assert_eq!(fx.drops(DIR_EGRESS, 0, 0), 2 * frames.len() as u64, "each counted");
}

#[test]
fn arp_passes_an_isolated_pod() {
    let fx = Fixture::policed("arp");
    fx.expect(Hook::ToPod, &packet::arp(), PASS);
    fx.expect(Hook::FromPod, &packet::arp(), PASS);
    assert!(fx.t.dp.drops().unwrap().is_empty());
}

#[test]
fn icmpv6_neighbour_discovery_passes_an_isolated_pod() {
    let fx = Fixture::policed("nd");
    for icmp_type in 133..=137u8 {
        let pkt = packet::ip(ip("fe80::1"), ip("ff02::1"), L4::Icmp { icmp_type, id: 0 });
        assert_eq!(fx.run(Hook::ToPod, &pkt), PASS, "ND type {icmp_type}");
        assert_eq!(fx.run(Hook::FromPod, &pkt), PASS, "ND type {icmp_type}");
    }
    // An echo request from a stranger is not ND: isolated, no rule, dropped.
    let ping = packet::ip(ip("fd00::99"), ip("fd00::10"), L4::Icmp { icmp_type: 128, id: 7 });
    fx.expect(Hook::ToPod, &ping, SHOT);
}

#[test]
fn truncated_headers_are_dropped_and_counted_for_isolated_pods() {
    let fx = Fixture::policed("truncated");
    let full = packet::tcp(CLIENT, SERVER, 40000, 80, TCP_SYN);
    // BPF_PROG_TEST_RUN itself refuses an IPv4 frame shorter than a whole IPv4 header (EINVAL),
    // so the shortest frames tested here carry the fixed header and lie about what follows.
    // Header length claims 60 bytes of options that are not there.
    let mut lying = full[..14 + 20].to_vec();
    lying[14] = 0x4f;
    fx.expect(Hook::ToPod, &lying, SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 0), 1);
    // Full IPv4 header, TCP header cut after the ports.
    fx.expect(Hook::ToPod, &full[..14 + 20 + 6], SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 0), 2);
    // IHL below 5 words is malformed.
    let mut bad = full.clone();
    bad[14] = 0x44;
    fx.expect(Hook::ToPod, &bad, SHOT);
    // IPv6: a hop-by-hop header that claims more than the frame holds.
    let v6 = packet::ipv6_with(
        ip6("fd00::20"),
        ip6("fd00::10"),
        L4::Udp { sport: 1, dport: 53 },
        &[(0u8, vec![0, 200, 0, 0, 0, 0, 0, 0])],
    );
    fx.expect(Hook::ToPod, &v6, SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_UDP, 0), 1);
    // Not isolated for egress? It is (SERVER-out): the same garbage leaving the pod (from its own
    // address: any other would be dropped as spoofed first) is dropped too.
    let mut lying = packet::tcp(SERVER, CLIENT, 80, 40000, TCP_SYN)[..14 + 20].to_vec();
    lying[14] = 0x4f;
    fx.expect(Hook::FromPod, &lying, SHOT);
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_TCP, 0), 1);
}

#[test]
fn ipv4_options_shift_the_transport_header() {
    let fx = Fixture::policed("options");
    let nop = [1u8; 8];
    for (dport, verdict) in [(80, PASS), (81, SHOT)] {
        let syn = L4::Tcp {
            sport: 1,
            dport,
            flags: TCP_SYN,
        };
        let pkt = packet::ipv4_with([10, 0, 0, 20], [10, 0, 0, 10], syn, &nop, 0);
        fx.expect(Hook::ToPod, &pkt, verdict);
    }
}

#[test]
fn ipv6_tcp_is_judged_like_ipv4() {
    let fx = Fixture::policed("v6");
    fx.expect(
        Hook::ToPod,
        &packet::tcp(ip("fd00::20"), ip("fd00::10"), 40000, 80, TCP_SYN),
        PASS,
    );
    fx.expect(
        Hook::ToPod,
        &packet::tcp(ip("fd00::99"), ip("fd00::10"), 40000, 80, TCP_SYN),
        SHOT,
    );
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 80), 1);
    // Behind a hop-by-hop and a destination-options header.
    let ext = [(0u8, vec![0u8; 8]), (60u8, vec![0u8; 8])];
    for (dport, verdict) in [(80, PASS), (81, SHOT)] {
        let syn = L4::Tcp {
            sport: 1,
            dport,
            flags: TCP_SYN,
        };
        let pkt = packet::ipv6_with(ip6("fd00::20"), ip6("fd00::10"), syn, &ext);
        fx.expect(Hook::ToPod, &pkt, verdict);
    }
}

fn ip6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

#[test]
fn udp_is_allowed_on_its_port_only_and_replies_pass() {
    let fx = Fixture::policed("udp");
    fx.expect(
        Hook::ToPod,
        &packet::ip(CLIENT, SERVER, L4::Udp { sport: 5000, dport: 53 }),
        PASS,
    );
    fx.expect(
        Hook::FromPod,
        &packet::ip(SERVER, CLIENT, L4::Udp { sport: 53, dport: 5000 }),
        PASS,
    );
    fx.expect(
        Hook::ToPod,
        &packet::ip(CLIENT, SERVER, L4::Udp { sport: 5000, dport: 54 }),
        SHOT,
    );
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_UDP, 0), 1, "54 is no label: port 0");
    // TCP 53 is not UDP 53.
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 5000, 53, TCP_SYN), SHOT);
}

#[test]
fn sctp_is_allowed_on_its_port_only() {
    let fx = Fixture::policed("sctp");
    for (dport, verdict) in [(9000, PASS), (9001, SHOT)] {
        let init = L4::Sctp { sport: 5000, dport };
        fx.expect(Hook::ToPod, &packet::ip(CLIENT, SERVER, init), verdict);
    }
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_SCTP, 0), 1, "9001 is no label: port 0");
}

#[test]
fn egress_policy_allows_only_its_destinations() {
    let fx = Fixture::policed("egress");
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 33000, 8080, TCP_SYN), PASS);
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 33000, 8081, TCP_SYN), SHOT);
    fx.expect(
        Hook::FromPod,
        &packet::tcp(SERVER, ip("10.1.1.1"), 33000, 8080, TCP_SYN),
        SHOT,
    );
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_TCP, 8080), 1);
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_TCP, 0), 1, "8081 is no label: port 0");
}

#[test]
fn inspect_decodes_every_map() {
    let fx = Fixture::policed("inspect");
    let syn = packet::tcp(CLIENT, SERVER, 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &syn, PASS);
    let denied = packet::tcp(ip("10.0.0.99"), SERVER, 40001, 81, TCP_SYN);
    fx.expect(Hook::ToPod, &denied, SHOT);

    let snap = npc_agent::datapath::inspect::Snapshot::read(&fx.t.dp, 10).expect("read the maps");
    assert_eq!(snap.endpoints.len(), 1);
    let server = &snap.endpoints[0];
    assert_eq!((server.ifindex, server.addr), (1, SERVER));
    assert!(server.ingress_isolated && server.egress_isolated);
    let client_id = snap
        .identities
        .iter()
        .find(|i| i.addr == CLIENT)
        .expect("the client's address has an identity")
        .identity
        .clone();
    assert!(
        snap.allows.iter().any(|a| a.identity == server.identity
            && a.direction == "ingress"
            && a.peer == format!("identity {client_id}")
            && a.protocol == "TCP"
            && a.ports == "80"),
        "{:?}",
        snap.allows
    );
    assert_eq!(snap.conntrack_total, 1);
    assert_eq!(snap.conntrack[0].src, "10.0.0.20:40000");
    assert_eq!(snap.conntrack[0].state, "syn-sent");
    assert_eq!(snap.allowed_connections.ingress, 1);
    assert!(
        snap.drops.iter().any(|d| d.dport == 0 && d.count == 1),
        "{:?}",
        snap.drops
    );

    // The CLI prints the same, as a table and as JSON.
    let out = std::process::Command::new(npc_integration::npc_agent_bin())
        .args(["inspect", "--pin-root"])
        .arg(fx.t.pin_root())
        .output()
        .expect("run inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().eq(["1", "257", "10.0.0.10", "true", "true"]))
            && text
                .lines()
                .any(|l| l.contains("10.0.0.20:40000") && l.contains("10.0.0.10:80") && l.contains("syn-sent")),
        "{text}"
    );
    let out = std::process::Command::new(npc_integration::npc_agent_bin())
        .args(["inspect", "--output", "json", "--pin-root"])
        .arg(fx.t.pin_root())
        .output()
        .expect("run inspect");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["conntrack_total"], 1);
}

/// Services whose backends are the clients (server-out allows them on 8080): `via-8080` reaches
/// them on 8080, `via-9999` on a port server-out does not allow.
const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: via-8080, namespace: shop}
spec:
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  selector: {app: client}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: via-9999, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  selector: {app: client}
  ports: [{port: 80, targetPort: 9999}]
"#;

#[test]
fn egress_to_a_service_vip_is_judged_by_its_backends_and_replies_from_the_vip_pass() {
    let mut fx = Fixture::new("service");
    fx.apply(&format!("{POLICIES}\n---\n{SERVICES}"));
    let vip = ip("10.96.0.20");
    // The backends are allowed on the target port: the Service port is allowed, on both families.
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, vip, 34000, 80, TCP_SYN), PASS);
    fx.expect(
        Hook::FromPod,
        &packet::tcp(ip("fd00::10"), ip("fd00:96::20"), 34000, 80, TCP_SYN),
        PASS,
    );
    // The reply comes back from the VIP (kube-proxy undoes the DNAT): conntrack knows it, though
    // the server's ingress allows nothing from the VIP.
    fx.expect(
        Hook::ToPod,
        &packet::tcp(vip, SERVER, 80, 34000, TCP_SYN | TCP_ACK),
        PASS,
    );
    // Another port of the VIP, and a Service whose backends are reached on a port not allowed.
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, vip, 34001, 81, TCP_SYN), SHOT);
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_TCP, 0), 1, "81 is no label: port 0");
    let via_9999 = packet::tcp(SERVER, ip("10.96.0.21"), 34002, 80, TCP_SYN);
    fx.expect(Hook::FromPod, &via_9999, SHOT);
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_TCP, 80), 1);
    // Unsolicited traffic from the VIP in is still judged by ingress policy.
    fx.expect(Hook::ToPod, &packet::tcp(vip, SERVER, 80, 35000, TCP_SYN), SHOT);
}

/// A packet that claims to be a reply (SYN-ACK, a bare ACK, a RST) with no tracked connection
/// behind it is a new packet, judged by policy like any other: no "established" shortcut for an
/// attacker who forges one (issue 12's "replies" row).
#[test]
fn forged_replies_to_an_isolated_pod_are_judged_as_new() {
    let fx = Fixture::policed("forged");
    let (client_v6, server_v6) = (ip("fd00::20"), ip("fd00::10"));
    for (client, server) in [(CLIENT, SERVER), (client_v6, server_v6)] {
        for flags in [TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK] {
            // From the client's port 80, as if the server had connected out to it: the server's
            // ingress allows the client on port 80 only, and this arrives on port 42000.
            let forged = packet::tcp(client, server, 80, 42000, flags);
            fx.expect(Hook::ToPod, &forged, SHOT);
        }
    }
    assert_eq!(
        fx.drops(DIR_INGRESS, PROTO_TCP, 0),
        2,
        "one connection per family (42000 is no label)"
    );
    assert_eq!(fx.t.dp.denied_packets().unwrap(), 6, "each forged reply is counted");
    // The control: a real reply passes. server-out lets the server open to the client's 8080.
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 42001, 8080, TCP_SYN), PASS);
    let reply = packet::tcp(CLIENT, SERVER, 8080, 42001, TCP_SYN | TCP_ACK);
    fx.expect(Hook::ToPod, &reply, PASS);
}

/// A tracked connection passes packets out of the pod without source validation only from the
/// end that was the pod's own when the entry was made: not the peer's end of the same tuple, and
/// not an address the pod was sent to that is not its own.
#[test]
fn tracked_connections_never_let_a_pod_send_from_another_address() {
    let mut fx = Fixture::new("spoof-tracked");
    fx.apply("");
    // Into the pod from the client, then the same tuple out of the pod: the client's address.
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40000, 8080, TCP_SYN), PASS);
    fx.expect(Hook::FromPod, &packet::tcp(CLIENT, SERVER, 40000, 8080, TCP_ACK), SHOT);
    assert_eq!(fx.t.dp.spoofed_packets().unwrap(), 1);
    // The pod's own replies on the connection pass.
    fx.expect(
        Hook::FromPod,
        &packet::tcp(SERVER, CLIENT, 8080, 40000, TCP_SYN | TCP_ACK),
        PASS,
    );
    fx.expect(Hook::FromPod, &packet::tcp(SERVER, CLIENT, 8080, 40000, TCP_ACK), PASS);
    // A frame into the pod addressed to somebody else (a bridge delivers by MAC) is tracked
    // (the pod is not isolated), but "replies" from that address are forged.
    let other = ip("10.0.0.99");
    fx.expect(
        Hook::ToPod,
        &packet::ip(CLIENT, other, L4::Udp { sport: 5000, dport: 53 }),
        PASS,
    );
    for _ in 0..2 {
        fx.expect(
            Hook::FromPod,
            &packet::ip(other, CLIENT, L4::Udp { sport: 53, dport: 5000 }),
            SHOT,
        );
    }
    assert_eq!(fx.t.dp.spoofed_packets().unwrap(), 3);
}

/// Source validation (issue 12): whatever its policy, a pod sends only from its own addresses,
/// IPv6 link-local ones, and `::` for neighbour discovery; ARP only with its own sender address
/// (or 0.0.0.0, a probe). Forged packets have their own counter, not the policy drop counters.
#[test]
fn a_pod_sends_only_from_its_own_addresses() {
    let mut fx = Fixture::new("spoof");
    let forged = [
        (
            "another pod's address",
            packet::ip(CLIENT, ip("10.0.0.30"), L4::Udp { sport: 1, dport: 53 }),
        ),
        (
            "the node's",
            packet::ip(ip("10.0.0.1"), CLIENT, L4::Udp { sport: 1, dport: 53 }),
        ),
        (
            "an outside address",
            packet::ip(ip("192.0.2.7"), CLIENT, L4::Udp { sport: 1, dport: 53 }),
        ),
        (
            "another pod's IPv6",
            packet::tcp(ip("fd00::20"), ip("fd00::30"), 1, 80, TCP_SYN),
        ),
        (
            "unspecified, not ND",
            packet::ip(ip("::"), ip("fd00::20"), L4::Udp { sport: 1, dport: 53 }),
        ),
        ("ARP as another pod", packet::arp_from([10, 0, 0, 20])),
    ];
    let honest = [
        ("its IPv4", packet::tcp(SERVER, CLIENT, 1, 8080, TCP_SYN)),
        (
            "its IPv6",
            packet::tcp(ip("fd00::10"), ip("fd00::20"), 1, 8080, TCP_SYN),
        ),
        (
            "link-local ND",
            packet::ip(ip("fe80::1"), ip("fe80::2"), L4::Icmp { icmp_type: 136, id: 0 }),
        ),
        (
            "DAD from ::",
            packet::ip(ip("::"), ip("ff02::1:ff00:10"), L4::Icmp { icmp_type: 135, id: 0 }),
        ),
        ("ARP as itself", packet::arp_from([10, 0, 0, 10])),
        ("ARP probe", packet::arp_from([0, 0, 0, 0])),
    ];
    // Not isolated, then isolated both ways (server-out allows the client on 8080): the same.
    for (round, policies) in ["", POLICIES].into_iter().enumerate() {
        fx.apply(policies);
        for (what, frame) in &forged {
            assert_eq!(fx.run(Hook::FromPod, frame), SHOT, "{what}, round {round}");
        }
        for (what, frame) in &honest {
            assert_eq!(fx.run(Hook::FromPod, frame), PASS, "{what}, round {round}");
        }
        let expected = (forged.len() * (round + 1)) as u64;
        assert_eq!(
            fx.t.dp.spoofed_packets().unwrap(),
            expected,
            "each forged packet counted"
        );
    }
    assert!(
        fx.t.dp.drops().unwrap().is_empty(),
        "no policy drop counted for a forgery"
    );
    // Packets *to* the pod are not its to forge: the sender's own hook validates them.
    fx.expect(Hook::ToPod, &packet::tcp(CLIENT, SERVER, 40000, 80, TCP_SYN), PASS);
}

/// ICMP errors pass only about a connection tracked at the pod's interface (conntrack's
/// RELATED), in either direction; any other is judged as a new packet (issue 12).
#[test]
fn icmp_errors_pass_only_for_tracked_connections() {
    let fx = Fixture::policed("icmp-errors");
    let router = ip("10.0.0.1");
    for (server, client, router, frag_needed) in [
        (SERVER, CLIENT, router, (3u8, 4u8)),
        (ip("fd00::10"), ip("fd00::20"), ip("fd00::1"), (2, 0)),
    ] {
        // The server opens to the client's 8080 (server-out allows it): tracked.
        let out = packet::tcp(server, client, 42001, 8080, TCP_SYN);
        fx.expect(Hook::FromPod, &out, PASS);
        // Path MTU discovery: "fragmentation needed" / "packet too big" quoting that packet.
        let pmtu = packet::icmp_error(router, server, frag_needed.0, frag_needed.1, &out[14..]);
        fx.expect(Hook::ToPod, &pmtu, PASS);
        // The same error quoting a connection the server never had.
        let never = packet::tcp(server, client, 42002, 9999, TCP_SYN);
        let forged = packet::icmp_error(client, server, frag_needed.0, frag_needed.1, &never[14..]);
        fx.expect(Hook::ToPod, &forged, SHOT);
        // A port-unreachable the server sends about a datagram it was allowed to receive (UDP 53
        // from the client), and one about a datagram nobody sent it.
        let query = packet::ip(client, server, L4::Udp { sport: 5353, dport: 53 });
        fx.expect(Hook::ToPod, &query, PASS);
        let unreachable = if server.is_ipv4() { (3, 3) } else { (1, 4) };
        let reply = packet::icmp_error(server, client, unreachable.0, unreachable.1, &query[14..]);
        fx.expect(Hook::FromPod, &reply, PASS);
        let stray = packet::ip(client, server, L4::Udp { sport: 5353, dport: 54 });
        let forged = packet::icmp_error(server, client, unreachable.0, unreachable.1, &stray[14..]);
        fx.expect(Hook::FromPod, &forged, SHOT);
    }
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_ICMP, 0), 1, "the forged v4 error, counted");
    assert_eq!(
        fx.drops(DIR_INGRESS, PROTO_ICMPV6, 0),
        1,
        "the forged v6 error, counted"
    );
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_ICMP, 0), 1);
    assert_eq!(fx.drops(DIR_EGRESS, PROTO_ICMPV6, 0), 1);
}

/// A later fragment passes only after its datagram's first fragment was allowed here, and only
/// if it does not overlap the transport header; a first fragment too short for its transport
/// header is dropped (issue 12). Both families.
#[test]
fn fragments_follow_their_first_fragment() {
    let mut fx = Fixture::policed("fragments");
    let v4 = |dport: u16, id: u16, offset: u16, more: bool| {
        packet::ipv4_fragment(
            &packet::ip(CLIENT, SERVER, L4::Udp { sport: 5353, dport }),
            id,
            offset,
            more,
        )
    };
    let v6 = |dport: u16, id: u16, offset: u16, more: bool| {
        let frame = packet::ip(ip("fd00::20"), ip("fd00::10"), L4::Udp { sport: 5353, dport });
        packet::ipv6_fragment(&frame, u32::from(id) << 16 | 1, offset, more)
    };
    /// A UDP fragment to `dport` of datagram `id`, at `offset`, more to come or not.
    type Fragment<'a> = &'a dyn Fn(u16, u16, u16, bool) -> Vec<u8>;
    let families: [(&str, Fragment); 2] = [("IPv4", &v4), ("IPv6", &v6)];
    for (family, fragment) in families {
        // An allowed datagram (UDP 53): all its fragments pass.
        fx.expect(Hook::ToPod, &fragment(53, 7, 0, true), PASS);
        assert_eq!(fx.run(Hook::ToPod, &fragment(53, 7, 1480, true)), PASS, "{family}");
        assert_eq!(fx.run(Hook::ToPod, &fragment(53, 7, 2960, false)), PASS, "{family}");
        // A denied one (UDP 54): its first fragment and the rest are dropped.
        assert_eq!(fx.run(Hook::ToPod, &fragment(54, 8, 0, true)), SHOT, "{family}");
        assert_eq!(fx.run(Hook::ToPod, &fragment(54, 8, 1480, false)), SHOT, "{family}");
        // A later fragment whose first fragment never came.
        assert_eq!(fx.run(Hook::ToPod, &fragment(53, 9, 1480, false)), SHOT, "{family}");
    }
    // Later fragments carry no flow: one each. The denied first fragments are a connection
    // each, under port 0 too (54 is no label).
    assert_eq!(
        fx.drops(DIR_INGRESS, PROTO_UDP, 0),
        4 + 2,
        "two later fragments and a first one per family"
    );

    // TCP: an allowed first fragment (port 80), then a later one at offset 8, inside the 20-byte
    // TCP header it could rewrite (flags, and with them the connection state): dropped. At 24: fine.
    let syn = packet::tcp(CLIENT, SERVER, 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &packet::ipv4_fragment(&syn, 11, 0, true), PASS);
    fx.expect(Hook::ToPod, &packet::ipv4_fragment(&syn, 11, 8, true), SHOT);
    fx.expect(Hook::ToPod, &packet::ipv4_fragment(&syn, 11, 24, false), PASS);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 0), 1);
    // A tiny first fragment: its IP length covers only 8 bytes of TCP (the ports, not the flags),
    // though the frame is padded to look whole.
    let tiny = packet::with_ipv4_total_length(&packet::ipv4_fragment(&syn, 12, 0, true), 28);
    fx.expect(Hook::ToPod, &tiny, SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 0), 2);
    // The same in IPv6: an overlap at offset 8, then a first fragment whose payload length holds
    // the fragment header and 8 bytes of TCP.
    let syn6 = packet::tcp(ip("fd00::20"), ip("fd00::10"), 40000, 80, TCP_SYN);
    fx.expect(Hook::ToPod, &packet::ipv6_fragment(&syn6, 11, 0, true), PASS);
    fx.expect(Hook::ToPod, &packet::ipv6_fragment(&syn6, 11, 8, true), SHOT);
    fx.expect(Hook::ToPod, &packet::ipv6_fragment(&syn6, 11, 24, false), PASS);
    let tiny6 = packet::with_ipv6_payload_length(&packet::ipv6_fragment(&syn6, 12, 0, true), 8 + 8);
    fx.expect(Hook::ToPod, &tiny6, SHOT);
    assert_eq!(fx.drops(DIR_INGRESS, PROTO_TCP, 0), 4);

    // A pod that is not isolated has nothing to protect: fragments pass as they come.
    fx.apply("");
    fx.expect(Hook::ToPod, &v4(54, 13, 1480, false), PASS);
    fx.expect(Hook::ToPod, &v6(54, 13, 1480, false), PASS);
}

/// A pod that routes may send from the prefixes its `npc.dev/source-prefixes` annotation lists,
/// and only from those (issue 12).
#[test]
fn the_source_prefixes_annotation_lets_a_routing_pod_send_from_its_prefixes() {
    let mut fx = Fixture::new("source-prefixes");
    let plain = "metadata: {name: server, namespace: shop, labels: {app: server}}";
    assert!(CLUSTER.contains(plain), "the fixture's server line changed");
    let routing = CLUSTER.replace(
        plain,
        "metadata: {name: server, namespace: shop, labels: {app: server}, annotations: {npc.dev/source-prefixes: '192.168.50.0/24, fd00:50::/64'}}",
    );
    let from = |src: &str| {
        packet::ip(
            ip(src),
            if src.contains(':') { ip("fd00::20") } else { CLIENT },
            L4::Udp { sport: 1, dport: 53 },
        )
    };
    fx.apply_cluster(&routing, "");
    for src in ["192.168.50.7", "fd00:50::7", "10.0.0.10"] {
        assert_eq!(
            fx.run(Hook::FromPod, &from(src)),
            PASS,
            "{src} is in the annotation (or the pod's own)"
        );
    }
    for src in ["192.168.51.7", "fd00:51::7", "10.0.0.20"] {
        assert_eq!(fx.run(Hook::FromPod, &from(src)), SHOT, "{src} is not");
    }
    assert_eq!(fx.t.dp.spoofed_packets().unwrap(), 3);
    // The prefixes changed (the pod still has some): a flow from a prefix it lost is forged from
    // its next packet on, tracked or not. Tracked packets out of a pod skip source validation
    // only under the epoch they were judged in, so the change must move the epoch.
    fx.apply_cluster(&routing.replace("192.168.50.0/24", "192.168.60.0/24"), "");
    fx.expect(Hook::FromPod, &from("192.168.60.7"), PASS);
    fx.expect(Hook::FromPod, &from("192.168.50.7"), SHOT);
    assert_eq!(fx.t.dp.spoofed_packets().unwrap(), 4);
    // The annotation removed: the prefixes are forged again.
    fx.apply("");
    fx.expect(Hook::FromPod, &from("192.168.60.7"), SHOT);
    assert_eq!(fx.t.dp.spoofed_packets().unwrap(), 5);
}
