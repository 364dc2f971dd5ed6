//! The few rtnetlink requests the clsact path needs that aya 0.14 does not offer: listing an
//! interface's tc filters (with their cls_bpf program names), deleting one filter by priority
//! and handle, and deleting the clsact qdisc. Everything runs in the calling thread's network
//! namespace; see [`in_netns`] for running it in another one.
use std::{io, os::fd::AsRawFd as _, path::Path};

const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
pub(super) const TC_H_CLSACT: u32 = 0xffff_fff1;
/// The clsact qdisc's ingress and egress "classes" (parents of the filters).
pub(super) const PARENT_INGRESS: u32 = 0xffff_fff2;
pub(super) const PARENT_EGRESS: u32 = 0xffff_fff3;
const ETH_P_ALL: u16 = 0x0003;

/// One tc filter as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Filter {
    pub prio: u16,
    pub handle: u32,
    pub kind: String,
    /// cls_bpf: the program's name (as attached) and id.
    pub bpf_name: Option<String>,
    pub bpf_id: Option<u32>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut m = vec![0u8; TCMSG];
    m[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    m[8..12].copy_from_slice(&handle.to_ne_bytes());
    m[12..16].copy_from_slice(&parent.to_ne_bytes());
    m[16..20].copy_from_slice(&info.to_ne_bytes());
    m
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align4(buf.len()), 0);
}

fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, data))
    })
}

fn cstr(data: &[u8]) -> String {
    String::from_utf8_lossy(data.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

/// Sends one request and returns the payloads of the replies of type `want` (a dump's
/// messages); an error reply becomes the error.
fn request(kind: u16, flags: u16, payload: &[u8], want: u16) -> io::Result<Vec<Vec<u8>>> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut msg = Vec::with_capacity(NLMSG_HDR + payload.len());
    msg.extend_from_slice(&((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(payload);
    // SAFETY: a valid buffer; sockaddr_nl zeroed means "the kernel".
    let sent = unsafe {
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: a valid buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < NLMSG_HDR || len > rest.len() {
                return Err(io::Error::other("truncated netlink reply"));
            }
            let body = &rest[NLMSG_HDR..len];
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(body.get(0..4).unwrap_or(&[0; 4]).try_into().expect("4 bytes"));
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    if !dump {
                        return Ok(out); // the ACK
                    }
                }
                t if t == want => out.push(body.to_vec()),
                _ => {}
            }
            rest = &rest[align4(len).min(rest.len())..];
        }
    }
}

/// The filters on one clsact parent of an interface (an interface without clsact has none).
pub(super) fn filters(ifindex: u32, parent: u32) -> io::Result<Vec<Filter>> {
    let replies = match request(
        RTM_GETTFILTER,
        NLM_F_DUMP,
        &tcmsg(ifindex, 0, parent, 0),
        RTM_NEWTFILTER,
    ) {
        Ok(r) => r,
        // No such interface, or no qdisc to hold filters.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EINVAL | libc::ENOENT)) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for body in replies {
        if body.len() < TCMSG {
            continue;
        }
        let handle = u32::from_ne_bytes(body[8..12].try_into().expect("4 bytes"));
        let info = u32::from_ne_bytes(body[16..20].try_into().expect("4 bytes"));
        if handle == 0 {
            continue; // the classifier instance itself, not a filter
        }
        let mut f = Filter {
            prio: (info >> 16) as u16,
            handle,
            kind: String::new(),
            bpf_name: None,
            bpf_id: None,
        };
        for (kind, data) in attrs(&body[TCMSG..]) {
            match kind {
                TCA_KIND => f.kind = cstr(data),
                TCA_OPTIONS => {
                    for (k, d) in attrs(data) {
                        match k {
                            TCA_BPF_NAME => f.bpf_name = Some(cstr(d)),
                            TCA_BPF_ID if d.len() >= 4 => {
                                f.bpf_id = Some(u32::from_ne_bytes(d[0..4].try_into().expect("4 bytes")))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(f);
    }
    Ok(out)
}

/// Deletes the cls_bpf filter at (`prio`, `handle`) on `parent`; a filter already gone is fine.
pub(super) fn delete_filter(ifindex: u32, parent: u32, prio: u16, handle: u32) -> io::Result<()> {
    let info = (u32::from(prio) << 16) | u32::from(ETH_P_ALL.to_be());
    let mut payload = tcmsg(ifindex, handle, parent, info);
    push_attr(&mut payload, TCA_KIND, b"bpf\0");
    match request(RTM_DELTFILTER, NLM_F_ACK, &payload, 0) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => Ok(()),
        r => r.map(|_| ()),
    }
}

/// Deletes the clsact qdisc of an interface (and with it any filter left on it).
pub(super) fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let mut payload = tcmsg(ifindex, 0xffff_0000, TC_H_CLSACT, 0);
    push_attr(&mut payload, TCA_KIND, b"clsact\0");
    match request(RTM_DELQDISC, NLM_F_ACK, &payload, 0) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => Ok(()),
        r => r.map(|_| ()),
    }
}

/// The inode of the calling thread's network namespace (what a record names it by).
pub(super) fn current_netns() -> io::Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(
        "/proc/thread-self/ns/net",
    )?))
}

/// A path that opens the network namespace with inode `ino`, if it still exists: the caller's,
/// init's, a named one (/run/netns), or any process's.
pub(super) fn find_netns(ino: u64) -> Option<std::path::PathBuf> {
    let ino_of = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    let mut candidates: Vec<std::path::PathBuf> = vec!["/proc/thread-self/ns/net".into(), "/proc/1/ns/net".into()];
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            candidates.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        candidates.extend(
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
                .map(|e| e.path().join("ns/net")),
        );
    }
    candidates.into_iter().find(|p| ino_of(p) == Some(ino))
}

/// Runs `f` on a thread that has entered the network namespace at `path`; in the calling
/// thread when that is its own namespace already (setns needs CAP_SYS_ADMIN, which the
/// DaemonSet does not grant).
pub(super) fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ino = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    if ino(path)? == current_netns()? {
        return Ok(f());
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(path)?;
            // SAFETY: setns on this (scoped, fresh) thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}
