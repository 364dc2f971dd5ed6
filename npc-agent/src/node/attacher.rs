//! Finds a local pod's host-side interface from its IP address, with netlink, the way a node
//! sees it. The lab uses exactly this code too.
//!
//! 1. Route lookup for the pod IP (`ip route get`). A route through a gateway means the pod is
//!    not on this node: not ours. A direct route to an interface that is not a bridge is the
//!    answer (point-to-point CNIs, calico-style `/32 dev caliXXX`).
//! 2. A bridge (weave, flannel's cni0, the lab's br0): the neighbour entry for the IP gives the
//!    pod's MAC, and the bridge's forwarding database gives the port that MAC was learned on.
//!    When either is missing (nothing talked to the pod yet), one UDP datagram to the discard port
//!    makes the kernel resolve the address and the pod's answer teaches the bridge; then retry.
//!    A neighbour entry whose MAC no bridge port knows is stale (the address moved to a new pod
//!    or veth): it is deleted once so that the kernel resolves the new owner.
//!
//! Nothing here changes an interface: attaching is the datapath's job, and it only ever attaches
//! to what this returns.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
        route::RouteAttribute,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{ip}: no route on this node")]
    NoRoute { ip: IpAddr },
    #[error("{ip}: routed through a gateway, so not a pod on this node")]
    NotLocal { ip: IpAddr },
    #[error("{ip}: behind bridge {bridge}, but no bridge port has learned it (within {waited:?})")]
    NotLearned {
        ip: IpAddr,
        bridge: String,
        waited: Duration,
    },
}

/// A pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLink {
    pub ifindex: u32,
    pub name: String,
    /// The bridge it is a port of, if any.
    pub bridge: Option<String>,
}

/// A netlink connection, bound to the network namespace of the thread that created it.
pub struct Attacher {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
    /// Sockets for the nudge that makes the kernel resolve a pod's MAC (made with the netlink
    /// socket, so in the same network namespace).
    nudge_v4: UdpSocket,
    nudge_v6: Option<UdpSocket>,
}

impl Attacher {
    /// Opens the netlink socket in the calling thread's network namespace; later calls may come
    /// from any thread.
    pub fn new() -> Result<Self, AttachError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            Ok::<_, std::io::Error>(handle)
        })?;
        Ok(Self {
            runtime,
            handle,
            nudge_v4: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
            // No IPv6 in this namespace (disabled): IPv6 pods then cannot be resolved either.
            nudge_v6: UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok(),
        })
    }

    /// The host-side interface of the pod with address `ip`, waiting up to `wait` for a bridge
    /// to learn it.
    pub fn resolve(&self, ip: IpAddr, wait: Duration) -> Result<PodLink, AttachError> {
        self.runtime.block_on(self.resolve_async(ip, wait))
    }

    /// [`Self::resolve`] for many addresses at once: each may wait up to `wait` for its bridge
    /// to learn it, and one after the other a turn would wait that long per unlearned pod.
    pub fn resolve_all(&self, ips: &[IpAddr], wait: Duration) -> Vec<Result<PodLink, AttachError>> {
        self.runtime.block_on(futures::future::join_all(
            ips.iter().map(|ip| self.resolve_async(*ip, wait)),
        ))
    }

    async fn resolve_async(&self, ip: IpAddr, wait: Duration) -> Result<PodLink, AttachError> {
        let oif = self.route_oif(ip).await?;
        let link = self.link(oif).await?;
        if !is_bridge(&link) {
            return Ok(PodLink {
                ifindex: oif,
                name: link_name(&link),
                bridge: None,
            });
        }
        let bridge = link_name(&link);
        let start = Instant::now();
        let mut nudged = false;
        let mut forgotten = false;
        loop {
            let neighbour = self.neighbour(ip, oif).await?;
            if let Some((_, mac)) = &neighbour
                && let Some(port) = self.fdb_port(mac, oif).await?
            {
                let port_link = self.link(port).await?;
                return Ok(PodLink {
                    ifindex: port,
                    name: link_name(&port_link),
                    bridge: Some(bridge),
                });
            }
            // A MAC the bridge does not know: the address now belongs to a new pod (or a new
            // veth) and the node still remembers the old one. Forget it, once, so the next
            // nudge resolves the new owner.
            if let Some((entry, _)) = neighbour
                && nudged
                && !forgotten
                && start.elapsed() >= Duration::from_millis(200)
            {
                let _ = self.handle.neighbours().del(entry).execute().await;
                forgotten = true;
                nudged = false;
            }
            if start.elapsed() >= wait {
                return Err(AttachError::NotLearned {
                    ip,
                    bridge,
                    waited: wait,
                });
            }
            if !nudged {
                self.nudge(ip);
                nudged = true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every address of this network namespace: the node's own addresses, from which traffic to
    /// its pods is always allowed (kubelet probes come from the address facing the pod).
    pub fn local_addresses(&self) -> Result<Vec<IpAddr>, AttachError> {
        self.runtime.block_on(async {
            let addrs: Vec<rtnetlink::packet_route::address::AddressMessage> =
                self.handle.address().get().execute().try_collect().await?;
            let mut out: Vec<IpAddr> = addrs
                .into_iter()
                .flat_map(|a| a.attributes)
                .filter_map(|a| match a {
                    rtnetlink::packet_route::address::AddressAttribute::Address(ip) => Some(ip),
                    _ => None,
                })
                .filter(|ip| !ip.is_loopback())
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        })
    }

    async fn route_oif(&self, ip: IpAddr) -> Result<u32, AttachError> {
        let message = match ip {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(v4, 32)
                .build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(v6, 128)
                .build(),
        };
        let mut routes = self.handle.route().get(message).execute();
        let route = match routes.try_next().await {
            Ok(Some(r)) => r,
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Err(AttachError::NoRoute { ip }),
            Err(e) => return Err(e.into()),
        };
        if route.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))) {
            return Err(AttachError::NotLocal { ip });
        }
        route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
            .ok_or(AttachError::NoRoute { ip })
    }

    async fn link(&self, index: u32) -> Result<LinkMessage, AttachError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        links
            .try_next()
            .await?
            .ok_or(AttachError::Netlink(rtnetlink::Error::RequestFailed))
    }

    /// The neighbour entry for `ip` on the bridge, with the MAC it holds.
    async fn neighbour(&self, ip: IpAddr, bridge: u32) -> Result<Option<(NeighbourMessage, Vec<u8>)>, AttachError> {
        let family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let entries: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await?;
        Ok(entries.into_iter().find_map(|n| {
            let dst_matches = n.attributes.iter().any(|a| match (a, ip) {
                (NeighbourAttribute::Destination(NeighbourAddress::Inet(d)), IpAddr::V4(v4)) => *d == v4,
                (NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)), IpAddr::V6(v6)) => *d == v6,
                _ => false,
            });
            if !dst_matches || n.header.ifindex != bridge {
                return None;
            }
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 && mac.as_slice() != [0; 6] => {
                    Some(mac.clone())
                }
                _ => None,
            })?;
            Some((n, mac))
        }))
    }

    async fn fdb_port(&self, mac: &[u8], bridge: u32) -> Result<Option<u32>, AttachError> {
        let entries: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await?;
        Ok(entries.into_iter().find_map(|n| {
            let on_bridge = n
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Controller(c) if *c == bridge));
            let same_mac = n
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(m) if m.as_slice() == mac));
            (on_bridge && same_mac && n.header.ifindex != bridge).then_some(n.header.ifindex)
        }))
    }

    /// One datagram to the discard port: the kernel resolves the pod's MAC to send it, and the
    /// pod's ARP/ND answer is what the bridge learns the port from. Traffic from the node to its
    /// pods is always allowed, so policy never gets in the way.
    fn nudge(&self, ip: IpAddr) {
        let target = SocketAddr::new(ip, 9);
        let socket = match ip {
            IpAddr::V4(_) => Some(&self.nudge_v4),
            IpAddr::V6(_) => self.nudge_v6.as_ref(),
        };
        if let Some(s) = socket {
            let _ = s.send_to(&[], target);
        }
    }
}

fn is_bridge(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("if{}", link.header.index))
}
