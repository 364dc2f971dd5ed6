//! The attacher on both CNI topologies, built in network namespaces: a point-to-point veth with a
//! calico-style /32 route, and a bridge (flannel/weave/lab style); plus what it must refuse.
use std::time::Duration;

use npc_agent::lab::netns::{self, Netns};
use npc_agent::node::attacher::{AttachError, Attacher};
use npc_integration::{require_root, tag};

#[test]
fn point_to_point_route_names_the_veth() {
    require_root();
    let node = Netns::create(&tag("p2p-node")).expect("node ns");
    let pod = Netns::create(&tag("p2p-pod")).expect("pod ns");
    let host_if = "cali1234567890";
    node.run(|| netns::add_veth(host_if, "eth0", Some(&pod)))
        .expect("enter the node")
        .expect("veth into the pod");
    pod.run(|| {
        netns::add_address("eth0", "10.77.0.5/32".parse().unwrap())?;
        netns::set_link_up("eth0")
    })
    .expect("enter the pod")
    .expect("pod side");
    node.run(|| {
        netns::set_link_up(host_if)?;
        netns::add_host_route("10.77.0.5".parse().unwrap(), host_if)?;
        // A gateway route to a remote node's pods, and nothing at all for another range.
        // (A veth pair stands in for the uplink: this kernel has no dummy interfaces.)
        netns::add_veth("uplink", "uplink-peer", None)?;
        netns::set_link_up("uplink-peer")?;
        netns::add_address("uplink", "192.168.50.1/24".parse().unwrap())?;
        netns::set_link_up("uplink")?;
        netns::add_route_via("10.78.0.0/24".parse().unwrap(), "192.168.50.2".parse().unwrap())
    })
    .expect("enter the node")
    .expect("node side");

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
    node.run(|| netns::add_bridge("cni0", "10.88.0.1/24".parse().unwrap()))
        .expect("enter the node")
        .expect("bridge");
    let mut pods = Vec::new();
    for i in 2..5 {
        let pod = Netns::create(&tag(&format!("br-pod{i}"))).expect("pod ns");
        let host_if = format!("veth{i}abc");
        let addr = format!("10.88.0.{i}/24").parse().unwrap();
        node.run(|| netns::add_veth_to_pod(&host_if, "cni0", &pod, "eth0", &[addr]))
            .expect("enter the node")
            .expect("veth into the pod");
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
