//! What an attacker in a pod can do with CAP_NET_RAW (which containers get by default): send any
//! Ethernet frame it likes through an AF_PACKET socket. And the other side: a capture of every
//! frame that reaches a pod's interface, for counting what an attack got through.
//!
//! Frames are the ones `packet` builds, finished here for a real kernel: real MAC addresses and
//! a valid IPv4 header checksum (and ICMP checksum), since a receiving kernel drops what fails
//! them, and a test that counts arrivals must not be fooled by that.
use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use npc_agent::lab::netns;

/// An AF_PACKET socket bound to one interface of one network namespace (a socket keeps the
/// namespace it was made in, whichever thread uses it later).
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens it on `ifname` in `netns`.
    pub fn open(netns: &str, ifname: &str) -> Self {
        let ifname = ifname.to_string();
        netns::run_in(netns, move || -> std::io::Result<OwnedFd> {
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain syscalls on values we own; the fd is wrapped at once.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(protocol),
                );
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let name = CString::new(ifname).expect("no NUL in an interface name");
                let ifindex = libc::if_nametoindex(name.as_ptr());
                if ifindex == 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = protocol;
                addr.sll_ifindex = ifindex as i32;
                let bound = libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if bound < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(fd)
            }
        })
        .expect("enter the namespace")
        .map(|fd| Self { fd })
        .unwrap_or_else(|e| panic!("AF_PACKET socket in {netns}: {e} (the test needs root)"))
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: a valid buffer of that length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "AF_PACKET send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Every frame that came *in* on the interface since the socket was opened, waiting until
    /// `quiet` passes with nothing new (bounded by `limit`).
    pub fn received(&self, quiet: Duration, limit: Duration) -> Vec<Vec<u8>> {
        let (start, mut last) = (Instant::now(), Instant::now());
        let mut frames = Vec::new();
        while last.elapsed() < quiet && start.elapsed() < limit {
            let mut buf = vec![0u8; 65_536];
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: valid buffers and lengths.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::from_mut(&mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "AF_PACKET recv: {e}");
                let mut pfd = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                continue;
            }
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                buf.truncate(n as usize);
                frames.push(buf);
                last = Instant::now();
            }
        }
        frames
    }
}

/// `ip -n NETNS -j link show dev IFNAME`: sysfs would show the namespace it was mounted in,
/// whichever thread reads it.
fn link(netns: &str, ifname: &str) -> serde_json::Value {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", "dev", ifname])
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip link show {ifname} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
    links[0].clone()
}

/// The interface index of `ifname` in `netns` (an IPv6 link-local scope id).
pub fn ifindex_of(netns: &str, ifname: &str) -> u32 {
    let index = link(netns, ifname)["ifindex"].as_u64().expect("an ifindex");
    u32::try_from(index).expect("a 32-bit ifindex")
}

/// The MAC address of `ifname` in `netns`.
pub fn mac_of(netns: &str, ifname: &str) -> [u8; 6] {
    let link = link(netns, ifname);
    let text = link["address"].as_str().expect("a MAC address");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// `frame` with these MAC addresses and, for IPv4 (behind any VLAN tags), a valid header
/// checksum, the identification `id`, and for an unfragmented ICMP message a valid ICMP checksum.
pub fn finish(frame: &[u8], src: [u8; 6], dst: [u8; 6], id: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    let mut l3 = 12;
    while matches!(u16::from_be_bytes([f[l3], f[l3 + 1]]), 0x8100 | 0x88a8) {
        l3 += 4;
    }
    if u16::from_be_bytes([f[l3], f[l3 + 1]]) != 0x0800 {
        return f;
    }
    let ip = l3 + 2;
    let ihl = usize::from(f[ip] & 0x0f) * 4;
    f[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&f[ip..ip + ihl]);
    f[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    let fragmented = u16::from_be_bytes([f[ip + 6], f[ip + 7]]) & 0x3fff != 0;
    if f[ip + 9] == 1 && !fragmented {
        let total = usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
        let icmp = ip + ihl;
        f[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[icmp..ip + total]);
        f[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
    }
    f
}

/// The IPv4 identification of a frame (behind any VLAN tags), if it is IPv4.
pub fn ipv4_id(frame: &[u8]) -> Option<u16> {
    let mut l3 = 12;
    while frame.len() > l3 + 2 && matches!(u16::from_be_bytes([frame[l3], frame[l3 + 1]]), 0x8100 | 0x88a8) {
        l3 += 4;
    }
    let ip = l3 + 2;
    (frame.len() >= ip + 20 && u16::from_be_bytes([frame[l3], frame[l3 + 1]]) == 0x0800)
        .then(|| u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]))
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
