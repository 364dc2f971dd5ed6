//! Network namespaces for the lab and the tests, entered per thread, and the little fabric built
//! in them (bridges, veths, addresses, routes). Made the way iproute2 makes them (`ip netns add`,
//! `ip link`, `ip addr`, `ip route`), with system calls (nix) and netlink (rtnetlink) rather than
//! by running `ip`, so the namespaces are ones `ip netns` lists and enters too.
//!
//! A thread that `setns`es into a namespace takes its sockets and interface lookups there; other
//! threads are unaffected, so one process can stand in for a node and all its pods at once.
//! (`ip netns exec` would remount /sys and hide bpffs pins; `setns` on the net namespace alone
//! keeps the host's bpffs.) The fabric helpers work in the calling thread's namespace: run them
//! through [`run_in`] or [`Netns::run`] to work in another.
use std::{
    cell::RefCell,
    fs::File,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::PathBuf,
    sync::Mutex,
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags},
        link::{InfoData, InfoVeth},
        neighbour::NeighbourState,
        route::{RouteProtocol, RouteScope},
    },
};

/// Where named namespaces live (iproute2's `NETNS_RUN_DIR`).
const RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{what}: {source}")]
    System { what: String, source: std::io::Error },
    #[error("{what} (in {netns}): {source}")]
    Netlink {
        what: String,
        netns: String,
        source: rtnetlink::Error,
    },
    #[error("{what}: {reason}")]
    InvalidRoute { what: String, reason: String },
    #[error("entering network namespace {name}: {source}")]
    Enter { name: String, source: std::io::Error },
    #[error("a thread in network namespace {0} panicked")]
    Panicked(String),
    #[error("interface {0} is missing")]
    Missing(String),
    #[error("{what} (in {netns}): {message}")]
    Command {
        what: String,
        netns: String,
        message: String,
    },
}

thread_local! {
    /// The namespace this thread last entered, to say where a netlink request failed.
    static CURRENT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The calling thread's network namespace, for error messages: its name if it entered one of
/// ours, else the kernel's `net:[inode]`.
fn here() -> String {
    CURRENT.with_borrow(Clone::clone).map_or_else(
        || match std::fs::read_link("/proc/thread-self/ns/net") {
            Ok(link) => format!("network namespace {}", link.display()),
            Err(_) => "the calling thread's network namespace".into(),
        },
        |name| format!("network namespace {name}"),
    )
}

fn system(what: impl Into<String>) -> impl FnOnce(Errno) -> NetnsError {
    let what = what.into();
    move |errno| NetnsError::System {
        what,
        source: errno.into(),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::System { what, source }
}

fn netlink_error(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Netlink {
        what,
        netns: here(),
        source,
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn path_of(name: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(name)
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace (replacing a stale one of the same name) with loopback up, as
    /// `ip netns add NAME` and `ip -n NAME link set lo up` do.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        let path = path_of(name);
        if path.exists() {
            delete(name)?;
        }
        prepare_run_dir()?;
        // The mount point: an empty file that the namespace is bind-mounted onto.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(&path)
            .map_err(io(format!("creating {}", path.display())))?;
        // From here on, dropping `ns` removes what was made.
        let ns = Self { name: name.to_string() };
        std::thread::scope(|s| {
            s.spawn(|| {
                // A thread of its own: the new namespace is this thread's alone, and the bind
                // mount keeps it after the thread ends.
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(system(format!("creating network namespace {name} (unshare)")))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(system(format!(
                    "bind-mounting network namespace {name} onto {}",
                    path.display()
                )))?;
                CURRENT.set(Some(name.to_string()));
                set_link_up("lo")
            })
            .join()
            .map_err(|_| NetnsError::Panicked(name.to_string()))?
        })?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        run_in(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = delete(&self.name);
    }
}

/// Makes /run/netns a shared mount point, as iproute2 does, so that namespace mounts made under
/// it propagate to other mount namespaces (and `ip netns` sees ours): if it is not a mount point
/// yet, it becomes a bind mount of itself first.
fn prepare_run_dir() -> Result<(), NetnsError> {
    // Two threads of this process making it a mount point at once would stack two bind mounts.
    static PREPARING: Mutex<()> = Mutex::new(());
    let _guard = PREPARING.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(RUN_DIR).map_err(io(format!("creating {RUN_DIR}")))?;
    let share = || {
        mount(
            Some(""),
            RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match share() {
        Ok(()) => Ok(()),
        // Not a mount point.
        Err(Errno::EINVAL) => {
            mount(
                Some(RUN_DIR),
                RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(system(format!("bind-mounting {RUN_DIR} onto itself")))?;
            share().map_err(system(format!("making {RUN_DIR} a shared mount")))
        }
        Err(e) => Err(system(format!("making {RUN_DIR} a shared mount"))(e)),
    }
}

/// Runs `f` on a new thread inside the named namespace and waits for it.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked(name.to_string()))?
    })
}

/// Moves the calling thread into the named network namespace.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let enter_error = |source| NetnsError::Enter {
        name: name.into(),
        source,
    };
    let file = File::open(path_of(name)).map_err(enter_error)?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| enter_error(e.into()))?;
    CURRENT.set(Some(name.to_string()));
    Ok(())
}

/// Network namespaces whose names start with `prefix` (for cleaning up after a crash).
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir(RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes the named namespace, as `ip netns del` does: the mount is detached (the namespace
/// itself goes with the last thread or socket in it) and the file removed.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    let path = path_of(name);
    // Not mounted (a half-made namespace) is fine: the file goes all the same.
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    std::fs::remove_file(&path).map_err(io(format!("deleting network namespace {name} ({})", path.display())))
}

/// Runs `f` with a netlink connection opened in the calling thread's network namespace, on a
/// current-thread runtime of its own (as the attacher does).
fn netlink<T>(f: impl AsyncFnOnce(Handle) -> Result<T, NetnsError>) -> Result<T, NetnsError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(io("starting a runtime for netlink"))?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(io(format!("opening a netlink socket in {}", here())))?;
        tokio::spawn(connection);
        f(handle).await
    })
}

/// The index of interface `name`.
async fn index_of(handle: &Handle, name: &str) -> Result<u32, NetnsError> {
    let missing = || NetnsError::Missing(format!("{name} (in {})", here()));
    match handle.link().get().match_name(name).execute().try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(missing()),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Err(missing()),
        Err(e) => Err(netlink_error(format!("looking up interface {name}"))(e)),
    }
}

async fn link_up(handle: &Handle, name: &str) -> Result<(), NetnsError> {
    let index = index_of(handle, name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink_error(format!("setting {name} up")))
}

/// `ip addr add ADDR dev DEV [nodad]`.
async fn address_add(handle: &Handle, dev: &str, addr: IpNet, nodad: bool) -> Result<(), NetnsError> {
    let index = index_of(handle, dev).await?;
    let mut request = handle.address().add(index, addr.addr(), addr.prefix_len());
    if nodad {
        let message = request.message_mut();
        message.header.flags |= AddressHeaderFlags::Nodad;
        message.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    request
        .execute()
        .await
        .map_err(netlink_error(format!("adding address {addr} to {dev}")))
}

/// `ip link add NAME type veth peer name PEER [netns NS]`, both ends down.
async fn veth_add(handle: &Handle, name: &str, peer: &str, peer_netns: Option<&Netns>) -> Result<(), NetnsError> {
    let file = peer_netns
        .map(|ns| {
            File::open(path_of(ns.name())).map_err(|source| NetnsError::Enter {
                name: ns.name().into(),
                source,
            })
        })
        .transpose()?;
    let mut peer_message = LinkUnspec::new_with_name(peer);
    if let Some(file) = &file {
        peer_message = peer_message.setns_by_fd(file.as_raw_fd());
    }
    let message = LinkVeth::new(name, peer)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message.build())))
        .build();
    let peer_at = peer_netns.map_or_else(String::new, |ns| format!(" in network namespace {}", ns.name()));
    handle
        .link()
        .add(message)
        .execute()
        .await
        .map_err(netlink_error(format!("adding veth {name} with peer {peer}{peer_at}")))
}

/// `ip route add|replace DEST (dev DEV | via GATEWAY)`, with iproute2's defaults: protocol boot,
/// and scope link for an IPv4 route straight to a device.
async fn route_add(
    handle: &Handle,
    dest: IpNet,
    dev: Option<&str>,
    gateway: Option<IpAddr>,
    replace: bool,
) -> Result<(), NetnsError> {
    let what = format!(
        "{} route to {dest}{}{}",
        if replace { "replacing the" } else { "adding a" },
        dev.map_or_else(String::new, |d| format!(" dev {d}")),
        gateway.map_or_else(String::new, |g| format!(" via {g}")),
    );
    let invalid = |e: &dyn std::fmt::Display| NetnsError::InvalidRoute {
        what: what.clone(),
        reason: e.to_string(),
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest.addr(), dest.prefix_len())
        .map_err(|e| invalid(&e))?
        .protocol(RouteProtocol::Boot);
    if let Some(dev) = dev {
        builder = builder.output_interface(index_of(handle, dev).await?);
    }
    if let Some(gateway) = gateway {
        builder = builder.gateway(gateway).map_err(|e| invalid(&e))?;
    } else if dest.addr().is_ipv4() {
        builder = builder.scope(RouteScope::Link);
    }
    let mut request = handle.route().add(builder.build());
    if replace {
        request = request.replace();
    }
    request.execute().await.map_err(netlink_error(what))
}

/// A bridge with `addr` on it, up (in the calling thread's namespace).
pub fn add_bridge(name: &str, addr: IpNet) -> Result<(), NetnsError> {
    netlink(async |h| {
        h.link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(netlink_error(format!("adding bridge {name}")))?;
        address_add(&h, name, addr, false).await?;
        link_up(&h, name).await
    })
}

/// A veth pair: `host` in the calling thread's namespace, a port of `bridge`, up; `pod_ifname`
/// in `pod` with `addrs` (no duplicate address detection), up.
pub fn add_veth_to_pod(
    host: &str,
    bridge: &str,
    pod: &Netns,
    pod_ifname: &str,
    addrs: &[IpNet],
) -> Result<(), NetnsError> {
    netlink(async |h| {
        veth_add(&h, host, pod_ifname, Some(pod)).await?;
        let (index, bridge_index) = (index_of(&h, host).await?, index_of(&h, bridge).await?);
        h.link()
            .set(LinkUnspec::new_with_index(index).controller(bridge_index).up().build())
            .execute()
            .await
            .map_err(netlink_error(format!(
                "adding {host} to bridge {bridge} and setting it up"
            )))?;
        // kubelet's hairpin-veth: a pod reaching its own Service is DNATed back to itself, and
        // br_netfilter then bridges the frame out of the port it came in on. (RTM_NEWLINK, as
        // `ip link set ... type bridge_slave` sends: RTM_SETLINK ignores port attributes.)
        h.link()
            .change(LinkBridgePort::new(index).hairpin(true).build())
            .execute()
            .await
            .map_err(netlink_error(format!("setting hairpin mode on {host}")))
    })?;
    pod.run(|| {
        netlink(async |h| {
            for addr in addrs {
                address_add(&h, pod_ifname, *addr, true).await?;
            }
            link_up(&h, pod_ifname).await
        })
    })?
}

/// A veth pair, both ends down: `name` in the calling thread's namespace, `peer` in `peer_netns`
/// (or here too).
pub fn add_veth(name: &str, peer: &str, peer_netns: Option<&Netns>) -> Result<(), NetnsError> {
    netlink(async |h| veth_add(&h, name, peer, peer_netns).await)
}

/// Sets interface `name` up (in the calling thread's namespace).
pub fn set_link_up(name: &str) -> Result<(), NetnsError> {
    netlink(async |h| link_up(&h, name).await)
}

/// Adds `addr` to interface `dev` (in the calling thread's namespace).
pub fn add_address(dev: &str, addr: IpNet) -> Result<(), NetnsError> {
    netlink(async |h| address_add(&h, dev, addr, false).await)
}

/// A host route to `addr` through `dev`, replacing any (in the calling thread's namespace).
pub fn add_host_route(addr: IpAddr, dev: &str) -> Result<(), NetnsError> {
    netlink(async |h| route_add(&h, IpNet::from(addr), Some(dev), None, true).await)
}

/// A route to `dest` through `gateway` (in the calling thread's namespace).
pub fn add_route_via(dest: IpNet, gateway: IpAddr) -> Result<(), NetnsError> {
    netlink(async |h| route_add(&h, dest, None, Some(gateway), false).await)
}

/// Writes `/proc/sys/<key>` for the calling thread's network namespace (the net sysctls are per
/// namespace, and /proc/sys/net answers for the namespace of the thread that opens it).
pub fn set_sysctl(key: &str, value: &str) -> Result<(), NetnsError> {
    std::fs::write(format!("/proc/sys/{key}"), value).map_err(io(format!("setting {key}={value} in {}", here())))
}

/// Replaces the tables in `rules` (iptables-restore input) in the calling thread's namespace, as
/// kube-proxy does: the child inherits the namespace of the thread that forks it.
pub fn iptables_restore(rules: &str) -> Result<(), NetnsError> {
    use std::io::Write as _;
    let what = "iptables-restore (kube-proxy's rules)".to_string();
    let mut child = std::process::Command::new("iptables-restore")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io(format!(
            "{what}: is iptables installed? (`cargo xtask setup` installs it)"
        )))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())
        .map_err(io(what.clone()))?;
    let out = child.wait_with_output().map_err(io(what.clone()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetnsError::Command {
        what,
        netns: here(),
        message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
    })
}

/// Forgets every learned IPv4 and IPv6 neighbour, as `ip neigh flush all` does (permanent and
/// no-ARP entries stay), in the calling thread's namespace.
pub fn flush_neighbours() -> Result<(), NetnsError> {
    netlink(async |h| {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let entries: Vec<_> = h
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(netlink_error("listing neighbours"))?;
            for entry in entries {
                if matches!(
                    entry.header.state,
                    NeighbourState::Permanent | NeighbourState::Noarp | NeighbourState::None
                ) {
                    continue;
                }
                match h.neighbours().del(entry).execute().await {
                    // Gone already (expired, or its interface with it).
                    Err(e) if errno_of(&e) == Some(libc::ENOENT) => {}
                    other => other.map_err(netlink_error("deleting a neighbour entry"))?,
                }
            }
        }
        Ok(())
    })
}
