//! Issue 12, tried as an attacker in a pod would: x/b sends forged frames with an AF_PACKET socket
//! from its own namespace (what CAP_NET_RAW, which containers get by default, allows), and a
//! capture on x/a's interface counts what arrives. a admits c on everything and b on TCP 80 only.
//!
//! Every attack must arrive 0 times, with the counter that explains why moving by exactly its
//! count; every control must arrive (so a zero is never a broken fabric): raw frames from c's
//! own address, path-MTU errors about a real connection, a fragmented datagram of an allowed
//! flow, and IPv6 neighbour discovery.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6, UdpSocket},
    process::Command,
    time::Duration,
};

use npc_agent::lab::{Lab, LabOptions, netns};
use npc_common::{DIR_EGRESS, DIR_INGRESS, DropKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use npc_integration::{
    packet::{self, TCP_ACK, TCP_SYN},
    raw::{self, PacketSocket},
    require_root, tag, wait_for,
};
use npc_policy::{files, model::ObjectRef};

const CLUSTER: &str = include_str!("fixtures/lab-attacks.yaml");
/// Copies of each frame sent.
const N: usize = 5;
/// A router's address: no pod, not the node, so nothing a's policy admits.
const ROUTER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 255, 254));

struct Row {
    what: &'static str,
    frame: Vec<u8>,
    /// Which of the frames that reach a are this row's (by IPv4 identification, and more).
    id: u16,
    /// Frames of this row's id that do not count as its arrival (the allowed first fragment
    /// ahead of an overlapping one).
    only_offset: Option<u16>,
    /// An ARP row: its frames are the ARP frames with this sender protocol address, from this MAC.
    arp_sender: Option<([u8; 4], [u8; 6])>,
}

fn ip_of(lab: &Lab, pod: &ObjectRef) -> IpAddr {
    lab.pod(pod).expect("a lab pod").ips[0]
}

fn arrivals(frames: &[Vec<u8>], row: &Row) -> usize {
    if let Some((sender, mac)) = row.arp_sender {
        return frames
            .iter()
            .filter(|f| f.len() >= 32 && f[6..12] == mac && f[12..14] == [0x08, 0x06] && f[28..32] == sender)
            .count();
    }
    frames
        .iter()
        .filter(|f| raw::ipv4_id(f) == Some(row.id))
        .filter(|f| match row.only_offset {
            None => true,
            // The fragment offset field of the IPv4 header (untagged frames only here).
            Some(offset) => u16::from_be_bytes([f[20], f[21]]) & 0x1fff == offset / 8,
        })
        .count()
}

fn drop_counts(lab: &Lab) -> BTreeMap<DropKey, u64> {
    lab.datapath().drops().expect("read the drop counters")
}

fn grew(
    before: &BTreeMap<DropKey, u64>,
    after: &BTreeMap<DropKey, u64>,
    direction: u8,
    protocol: u8,
    dport: u16,
) -> u64 {
    let key = DropKey {
        direction,
        protocol,
        dport,
    };
    after.get(&key).copied().unwrap_or(0) - before.get(&key).copied().unwrap_or(0)
}

#[test]
fn forged_frames_from_a_pod_never_arrive_and_the_controls_do() {
    require_root();
    let loaded = files::parse_str("attacks.yaml".as_ref(), CLUSTER);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let lab = Lab::up(LabOptions::new(&tag("atk")), &loaded).expect("lab up");
    let [a, b, c] = ["a", "b", "c"].map(|n| ObjectRef::new("x", n));
    let ns = |p: &ObjectRef| lab.pod_netns(p).expect("a lab pod").to_string();
    let (a_ip, b_ip, c_ip) = (ip_of(&lab, &a), ip_of(&lab, &b), ip_of(&lab, &c));
    let (a_mac, b_mac) = (raw::mac_of(&ns(&a), "eth0"), raw::mac_of(&ns(&b), "eth0"));
    let c_mac = raw::mac_of(&ns(&c), "eth0");
    let node = lab.node_addr();

    // The controls first, with real sockets: c's datagram of 3000 bytes reaches a in three
    // fragments, a's listener echoes (up to 512 bytes of) it, and c gets the echo.
    let capture = PacketSocket::open(&ns(&a), "eth0");
    let c_port = netns::run_in(&ns(&c), move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        sock.send_to(&[7u8; 3000], SocketAddr::new(a_ip, 5000)).expect("send");
        let mut buf = [0u8; 4096];
        let (n, _) = sock.recv_from(&mut buf).expect("the echo of a fragmented datagram");
        assert!(n > 0 && buf[..n].iter().all(|&x| x == 7), "the echo is the datagram");
        sock.local_addr().expect("address").port()
    })
    .expect("run in c");
    let fragments = capture
        .received(Duration::from_millis(200), Duration::from_secs(2))
        .into_iter()
        .filter(|f| {
            raw::ipv4_id(f).is_some() && f[26..30] == octets(c_ip) && u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0
        })
        .count();
    assert!(
        fragments >= 3,
        "c's 3000-byte datagram reached a in fragments ({fragments})"
    );

    // Path MTU discovery: a router's "fragmentation needed" (MTU 1400) about a's echo to c (a
    // tracked connection) is let through though a admits nothing from the router, and a's
    // kernel takes the new path MTU.
    let echo = packet::udp4_with_payload(a_ip, c_ip, 5000, c_port, &[7u8; 8]);
    let mut frag_needed = packet::icmp_error(ROUTER, a_ip, 3, 4, &echo[14..]);
    frag_needed[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&1400u16.to_be_bytes());
    let node_side = PacketSocket::open(lab.node_netns(), "br0");
    let br_mac = raw::mac_of(lab.node_netns(), "br0");

    let ports = |sport: u16, dport: u16, flags: u8| packet::tcp(b_ip, a_ip, sport, dport, flags);
    let udp = |src: IpAddr| packet::udp4_with_payload(src, a_ip, 4000, 5000, b"npc-attack");
    let syn80 = ports(40000, 80, TCP_SYN);
    // 20 bytes of TCP header and 4 of data in the first fragment; a later one at offset 8.
    let mut syn80_data = syn80.clone();
    syn80_data.extend_from_slice(&[0; 4]);
    let syn80_data = packet::with_ipv4_total_length(&syn80_data, 44);
    let never = packet::udp4_with_payload(a_ip, "10.244.250.9".parse().unwrap(), 5000, 7777, &[0; 8]);
    let attacks = [
        ("UDP from b's own address (a admits b on TCP 80 only)", udp(b_ip)),
        ("UDP with the node's address", udp(node)),
        ("UDP with c's address", udp(c_ip)),
        ("UDP with an outside address", udp("192.0.2.9".parse().unwrap())),
        (
            "IPv4 in one 802.1Q VID 0 tag, b's address",
            packet::vlan_tagged(&[0x8100], &udp(b_ip)),
        ),
        (
            "IPv4 in one 802.1Q VID 0 tag, c's address",
            packet::vlan_tagged(&[0x8100], &udp(c_ip)),
        ),
        (
            "IPv4 in 802.1ad + 802.1Q (VID 0), c's address",
            packet::vlan_tagged(&[0x88a8, 0x8100], &udp(c_ip)),
        ),
        ("ARP with c's address as sender", packet::arp_from(octets(c_ip))),
        (
            "ICMP port-unreachable quoting a flow a never had",
            packet::icmp_error(b_ip, a_ip, 3, 3, &never[14..]),
        ),
        (
            "a later fragment whose first never came",
            packet::ipv4_fragment(&udp(b_ip), 0, 8, false),
        ),
        (
            "a tiny first fragment (8 bytes of TCP to port 80)",
            packet::with_ipv4_total_length(&packet::ipv4_fragment(&ports(40001, 80, TCP_SYN), 0, 0, true), 28),
        ),
        (
            "a later fragment overlapping the TCP header of an allowed first fragment",
            packet::ipv4_fragment(&ports(40002, 80, TCP_ACK), 0, 8, false),
        ),
    ];
    let rows: Vec<Row> = attacks
        .into_iter()
        .enumerate()
        .map(|(i, (what, frame))| Row {
            what,
            frame,
            id: 0x4e00 + i as u16,
            only_offset: what.contains("overlapping").then_some(8),
            arp_sender: what.starts_with("ARP").then(|| (octets(c_ip), b_mac)),
        })
        .collect();
    let control_c = Row {
        what: "control: raw UDP from c's own address",
        frame: udp(c_ip),
        id: 0x4f00,
        only_offset: None,
        arp_sender: None,
    };
    let control_arp = Row {
        what: "control: ARP from c with its own sender address",
        frame: packet::arp_from(octets(c_ip)),
        id: 0,
        only_offset: None,
        arp_sender: Some((octets(c_ip), c_mac)),
    };
    let control_pmtu = Row {
        what: "control: fragmentation-needed about a tracked connection, from a router",
        frame: frag_needed,
        id: 0x4f01,
        only_offset: None,
        arp_sender: None,
    };

    let spoofed_before = lab.datapath().spoofed_packets().expect("spoofed counter");
    let denied_before = lab.datapath().denied_packets().expect("denied counter");
    let drops_before = drop_counts(&lab);
    let capture = PacketSocket::open(&ns(&a), "eth0");
    let from_b = PacketSocket::open(&ns(&b), "eth0");
    let from_c = PacketSocket::open(&ns(&c), "eth0");
    for _ in 0..N {
        for row in &rows {
            if row.only_offset.is_some() {
                // The allowed first fragment of the same datagram goes first.
                from_b.send(&raw::finish(
                    &packet::ipv4_fragment(&syn80_data, 0, 0, true),
                    b_mac,
                    a_mac,
                    row.id,
                ));
            }
            from_b.send(&raw::finish(&row.frame, b_mac, a_mac, row.id));
        }
        from_c.send(&raw::finish(&control_c.frame, c_mac, a_mac, control_c.id));
        from_c.send(&raw::finish(&control_arp.frame, c_mac, a_mac, 0));
        node_side.send(&raw::finish(&control_pmtu.frame, br_mac, a_mac, control_pmtu.id));
    }
    let frames = capture.received(Duration::from_millis(300), Duration::from_secs(5));

    let mut report = Vec::new();
    for row in &rows {
        let got = arrivals(&frames, row);
        report.push(format!("{got} of {N}  {}", row.what));
        assert_eq!(got, 0, "{}: arrived", row.what);
    }
    for row in [&control_c, &control_arp, &control_pmtu] {
        let got = arrivals(&frames, row);
        report.push(format!("{got} of {N}  {}", row.what));
        assert_eq!(got, N, "{}", row.what);
    }
    eprintln!("{}", report.join("\n"));

    // Each block is one the datapath counted, for the reason it had.
    let drops = drop_counts(&lab);
    let spoofed = lab.datapath().spoofed_packets().expect("spoofed counter") - spoofed_before;
    let denied = lab.datapath().denied_packets().expect("denied counter") - denied_before;
    let n = N as u64;
    assert_eq!(
        spoofed,
        5 * n,
        "node, c, outside, c behind one tag, c as ARP sender: forged sources"
    );
    // Every frame refused by policy is a denied packet; the drop counters count connections: the
    // N copies of one frame a policy refuses are one connection (frames without a flow, not IP
    // or fragments, count one each).
    assert!(denied >= 7 * n, "{denied} denied packets, {} sent", 7 * n);
    // Tagged frames never leave b. The kernel moves a single 802.1Q tag out of the frame before
    // tc: that one is counted under the IP packet inside it; the inner tag of a stacked pair stays
    // in the frame, and the frame is counted as not IP at all.
    assert_eq!(
        grew(&drops_before, &drops, DIR_EGRESS, PROTO_UDP, 5000),
        n,
        "one tag, b's own address (a tagged frame is not a flow of ours: each counted)"
    );
    assert_eq!(grew(&drops_before, &drops, DIR_EGRESS, 0, 0), n, "802.1ad + 802.1Q");
    assert_eq!(
        grew(&drops_before, &drops, DIR_INGRESS, PROTO_UDP, 5000),
        1,
        "b's own UDP, by policy: one connection"
    );
    assert_eq!(
        grew(&drops_before, &drops, DIR_INGRESS, PROTO_ICMP, 0),
        1,
        "the unrelated ICMP error, by policy: one flow"
    );
    assert_eq!(
        grew(&drops_before, &drops, DIR_INGRESS, PROTO_UDP, 0),
        n,
        "the orphan later fragment"
    );
    assert_eq!(
        grew(&drops_before, &drops, DIR_INGRESS, PROTO_TCP, 0),
        2 * n,
        "tiny and overlapping fragments"
    );

    // a's kernel took the router's MTU for its path to c.
    let a_ns = ns(&a);
    let route = Command::new("ip")
        .args(["netns", "exec", &a_ns, "ip", "-4", "route", "get", &c_ip.to_string()])
        .output()
        .expect("ip route get");
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains("mtu 1400"),
        "path MTU to c after the router's error: {route}"
    );

    // IPv6 neighbour discovery works for the isolated pod: a resolves b's link-local address
    // (a's solicitation out, b's advertisement in through a's ingress policy).
    // Both ends' link-local addresses must be through duplicate address detection first: a
    // tentative address sends nothing.
    let b_ll = link_local(&ns(&b));
    link_local(&a_ns);
    let scope = raw::ifindex_of(&a_ns, "eth0");
    let target = SocketAddr::V6(SocketAddrV6::new(b_ll.parse().expect("an IPv6 address"), 9, 0, scope));
    let mut neighbour = String::new();
    let resolved = wait_for(Duration::from_secs(10), || {
        // A datagram to b each round: the kernel solicits b's link-layer address for it.
        netns::run_in(&a_ns, move || {
            let sock = UdpSocket::bind("[::]:0").expect("bind");
            let _ = sock.send_to(b"nd", target);
        })
        .expect("run in a");
        let out = Command::new("ip")
            .args([
                "netns", "exec", &a_ns, "ip", "-6", "neigh", "show", "dev", "eth0", &b_ll,
            ])
            .output()
            .expect("ip neigh");
        neighbour = String::from_utf8_lossy(&out.stdout).to_string();
        neighbour.contains("lladdr")
    });
    assert!(
        resolved,
        "a never resolved b's link-local address {b_ll} (neighbour entry: {neighbour:?}; drops: {:?}): neighbour discovery is blocked",
        drop_counts(&lab)
    );
    drop(lab);
}

fn octets(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => panic!("the lab's pods are IPv4"),
    }
}

/// eth0's link-local IPv6 address in `netns`, once duplicate address detection is done.
fn link_local(netns: &str) -> String {
    let mut found = String::new();
    let ready = wait_for(Duration::from_secs(10), || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", netns, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
            ])
            .output()
            .expect("ip addr");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("tentative") {
            return false;
        }
        match text.split_whitespace().skip_while(|w| *w != "inet6").nth(1) {
            Some(addr) => {
                found = addr.split('/').next().unwrap_or_default().to_string();
                true
            }
            None => false,
        }
    });
    assert!(ready, "no link-local IPv6 address on eth0 in {netns}");
    found
}
