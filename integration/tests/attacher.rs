//! The attacher on both CNI topologies, built in network namespaces: a point-to-point veth with a
//! calico-style /32 route, and a bridge (flannel/weave/lab style); plus what it must refuse.
use std::time::Duration;

use npc_agent::{
    attacher::{AttachError, Attacher},
    netns::{self, Netns},
};
use npc_integration::{require_root, tag};

fn ip(args: &[&str]) {
    netns::ip(args).expect("ip");
}

#[test]
fn point_to_point_route_names_the_veth() {
    require_root();
    let node = Netns::create(&tag("p2p-node")).expect("node ns");
    let pod = Netns::create(&tag("p2p-pod")).expect("pod ns");
    let host_if = "cali1234567890";
    ip(&[
        "-n",
        node.name(),
        "link",
        "add",
        host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ]);
    ip(&["-n", pod.name(), "addr", "add", "10.77.0.5/32", "dev", "eth0"]);
    ip(&["-n", pod.name(), "link", "set", "eth0", "up"]);
    ip(&["-n", node.name(), "link", "set", host_if, "up"]);
    ip(&["-n", node.name(), "route", "add", "10.77.0.5/32", "dev", host_if]);
    // A gateway route to a remote node's pods, and nothing at all for another range.
    // (A veth pair stands in for the uplink: this kernel has no dummy interfaces.)
    ip(&[
        "-n",
        node.name(),
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "uplink-peer",
    ]);
    ip(&["-n", node.name(), "link", "set", "uplink-peer", "up"]);
    ip(&["-n", node.name(), "addr", "add", "192.168.50.1/24", "dev", "uplink"]);
    ip(&["-n", node.name(), "link", "set", "uplink", "up"]);
    ip(&["-n", node.name(), "route", "add", "10.78.0.0/24", "via", "192.168.50.2"]);

    let attacher = node.run(Attacher::new).expect("enter").expect("netlink");
    let link = attacher
        .resolve("10.77.0.5".parse().unwrap(), Duration::from_secs(1))
        .expect("resolve");
    assert_eq!(link.name, host_if);
    assert_eq!(link.bridge, None);
    assert!(matches!(
        attacher.resolve("10.78.0.9".parse().unwrap(), Duration::from_millis(100)),
        Err(AttachError::NotLocal { .. })
    ));
    assert!(matches!(
        attacher.resolve("10.99.0.9".parse().unwrap(), Duration::from_millis(100)),
        Err(AttachError::NoRoute { .. })
    ));
    let addrs = attacher.local_addresses().expect("addresses");
    assert!(addrs.contains(&"192.168.50.1".parse().unwrap()), "{addrs:?}");
}

#[test]
fn bridge_port_is_found_through_neighbour_and_fdb() {
    require_root();
    let node = Netns::create(&tag("br-node")).expect("node ns");
    ip(&["-n", node.name(), "link", "add", "cni0", "type", "bridge"]);
    ip(&["-n", node.name(), "addr", "add", "10.88.0.1/24", "dev", "cni0"]);
    ip(&["-n", node.name(), "link", "set", "cni0", "up"]);
    let mut pods = Vec::new();
    for i in 2..5 {
        let pod = Netns::create(&tag(&format!("br-pod{i}"))).expect("pod ns");
        let host_if = format!("veth{i}abc");
        ip(&[
            "-n",
            node.name(),
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ]);
        ip(&["-n", node.name(), "link", "set", &host_if, "master", "cni0", "up"]);
        ip(&[
            "-n",
            pod.name(),
            "addr",
            "add",
            &format!("10.88.0.{i}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", pod.name(), "link", "set", "eth0", "up"]);
        pods.push((pod, host_if));
    }
    let attacher = node.run(Attacher::new).expect("enter").expect("netlink");
    // Nothing has talked to these pods: the attacher's nudge makes the bridge learn them.
    for (i, (_, host_if)) in (2..5).zip(&pods) {
        let link = attacher
            .resolve(format!("10.88.0.{i}").parse().unwrap(), Duration::from_secs(3))
            .expect("resolve");
        assert_eq!(&link.name, host_if);
        assert_eq!(link.bridge.as_deref(), Some("cni0"));
    }
    // An address on the bridge's subnet that no pod has: never learned, a clear error.
    assert!(matches!(
        attacher.resolve("10.88.0.200".parse().unwrap(), Duration::from_millis(300)),
        Err(AttachError::NotLearned { .. })
    ));
}
