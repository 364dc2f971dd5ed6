//! Attaching: both programs on a host-side interface, kept so that they outlive the agent.
//!
//! Two paths, chosen by the kernel ([`AttachPath::current`]):
//! - **TCX** (Linux 6.6 and later): one bpf_link per hook, pinned at
//!   `<pin_root>/links/if<ifindex>_<hook>`. A restart updates the pinned link in place
//!   (`BPF_LINK_UPDATE`: atomic). New links go **first** in the interface's TCX chain
//!   (`LinkOrder::first()`).
//! - **clsact** (before 6.6): a netlink `cls_bpf` filter (direct action) per hook on the clsact
//!   qdisc, at priority [`NL_PRIORITY`] and a handle npc derives from its pin root
//!   ([`Datapath::nl_handle`]), so two npc instances with different pin roots never take each
//!   other's filters. Netlink filters hold no bpffs pin, so each one is recorded as an empty
//!   directory `<pin_root>/links/nl-if<ifindex>-<hook>-ns<netns inode>-p<prio>-h<handle>`
//!   (bpffs holds no regular files), and the qdisc, when npc added it, as
//!   `nl-if<ifindex>-clsact-ns<netns inode>`. A restart replaces the program of the filter at
//!   that priority and handle in place (an `RTM_NEWTFILTER` without `NLM_F_CREATE`: the kernel's
//!   `tc filter change`, which swaps the program atomically; cls_bpf keeps the filter's place in
//!   its list), so enforcement never lapses and no second filter appears.
//!
//! Where npc runs relative to a CNI's own tc programs: **before them**, on both paths. Its
//! programs pass with `TC_ACT_UNSPEC` ("next program / next filter"), so whatever comes after
//! still runs, while a CNI program that ends tc processing itself (`TC_ACT_OK`, a redirect) would
//! hide packets from a policy enforcer placed after it. TCX: `LinkOrder::first()` at attach time
//! (a program attached later with "first" goes ahead of npc). clsact: priority 1, the first
//! priority there is; a CNI filter at priority 1 too (Cilium's default) shares the same cls_bpf
//! list, where a filter added later runs earlier, so npc runs first when it attaches after the
//! CNI, which is the usual order on a pod's veth.
use std::{collections::BTreeSet, io, path::Path};

use aya::{
    programs::{
        LinkOrder, ProgramError,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    sys::SyscallError,
    util::KernelVersion,
};
use npc_common::program_names;

use super::{Datapath, DatapathError, Hook, io_err, nl};

/// The clsact priority of npc's filters (lower runs earlier; 1 is the first).
pub const NL_PRIORITY: u16 = 1;

/// How this kernel attaches tc programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPath {
    /// TCX bpf_links (Linux 6.6+).
    Tcx,
    /// Legacy clsact qdisc and netlink cls_bpf filters.
    Clsact,
}

impl AttachPath {
    pub fn current() -> Self {
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            Self::Tcx
        } else {
            Self::Clsact
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: uname into a zeroed struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// What a record directory under `<pin_root>/links/` says about a netlink attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NlRecord {
    ifindex: u32,
    /// `None`: the clsact qdisc, added by npc.
    hook: Option<Hook>,
    netns: u64,
    prio: u16,
    handle: u32,
}

impl NlRecord {
    fn name(&self) -> String {
        match self.hook {
            Some(h) => format!(
                "nl-if{}-{}-ns{}-p{}-h{}",
                self.ifindex,
                h.pin_suffix(),
                self.netns,
                self.prio,
                self.handle
            ),
            None => format!("nl-if{}-clsact-ns{}", self.ifindex, self.netns),
        }
    }

    fn parse(name: &str) -> Option<Self> {
        let mut parts = name.strip_prefix("nl-")?.split('-');
        let ifindex = parts.next()?.strip_prefix("if")?.parse().ok()?;
        let what = parts.next()?;
        let netns = parts.next()?.strip_prefix("ns")?.parse().ok()?;
        if what == "clsact" {
            return Some(Self {
                ifindex,
                hook: None,
                netns,
                prio: 0,
                handle: 0,
            });
        }
        let hook = Hook::BOTH.into_iter().find(|h| h.pin_suffix() == what)?;
        let prio = parts.next()?.strip_prefix('p')?.parse().ok()?;
        let handle = parts.next()?.strip_prefix('h')?.parse().ok()?;
        Some(Self {
            ifindex,
            hook: Some(hook),
            netns,
            prio,
            handle,
        })
    }

    fn list(links_dir: &Path) -> Vec<Self> {
        let Ok(dir) = std::fs::read_dir(links_dir) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| Self::parse(e.file_name().to_str()?))
            .collect()
    }
}

fn parent_of(hook: Hook) -> u32 {
    match hook {
        Hook::FromPod => nl::PARENT_INGRESS,
        Hook::ToPod => nl::PARENT_EGRESS,
    }
}

fn is_errno(e: &ProgramError, errno: i32) -> bool {
    match e {
        ProgramError::TcError(TcError::NetlinkError(n)) => n.raw_os_error() == Some(errno),
        ProgramError::NetlinkError(n) => n.raw_os_error() == Some(errno),
        _ => false,
    }
}

impl Datapath {
    /// Attaches both programs to a host-side interface (in the calling thread's network
    /// namespace), so that they outlive this process; an attachment an earlier agent left is
    /// updated in place (atomic program replacement across restarts). See the module docs.
    pub fn attach(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        let ifindex = ifindex_of(ifname).ok_or_else(|| DatapathError::NoInterface(ifname.into()))?;
        match AttachPath::current() {
            AttachPath::Tcx => self.attach_tcx(ifname, ifindex)?,
            AttachPath::Clsact => self.attach_clsact(ifname, ifindex)?,
        }
        Ok(ifindex)
    }

    fn attach_tcx(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        for hook in Hook::BOTH {
            let pin = self.link_pin(ifindex, hook);
            let prog = self.program(hook)?;
            let replaced = match PinnedLink::from_pin(&pin) {
                // The interface may be gone and its index reused: a defunct link cannot be
                // updated, so fall back to a fresh attachment.
                Ok(old) => FdLink::from(old)
                    .try_into()
                    .ok()
                    .and_then(|link| prog.attach_to_link(link).ok()),
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(e) => return Err(e.into()),
            };
            let id = match replaced {
                Some(id) => id,
                None => {
                    let _ = std::fs::remove_file(&pin);
                    prog.attach_with_options(
                        ifname,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )?
                }
            };
            let link = prog.take_link(id)?;
            let fd_link: FdLink = link.try_into()?;
            // Re-pinning over an existing pin: remove the old path first.
            let _ = std::fs::remove_file(&pin);
            fd_link.pin(&pin)?;
        }
        Ok(())
    }

    /// The cls_bpf handle of this datapath's filters: "NP" in the upper half, and 16 bits of a
    /// hash of the pin root in the lower, so another npc (another pin root) has another handle.
    pub fn nl_handle(&self) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.pin_root.as_os_str().as_encoded_bytes() {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        0x4e50_0000 | ((h ^ (h >> 16)) & 0xffff)
    }

    fn attach_clsact(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        let netns = nl::current_netns().map_err(io_err("reading the network namespace"))?;
        let links_dir = self.links_dir();
        let record = |r: NlRecord| match std::fs::create_dir(links_dir.join(r.name())) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(DatapathError::Io {
                what: format!("recording {}", r.name()),
                source: e,
            }),
            _ => Ok(()),
        };
        match tc::qdisc_add_clsact(ifname) {
            // We added it: ours to remove when nothing uses it any more.
            Ok(()) => record(NlRecord {
                ifindex,
                hook: None,
                netns,
                prio: 0,
                handle: 0,
            })?,
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(ProgramError::from(e).into()),
        }
        let handle = self.nl_handle();
        for hook in Hook::BOTH {
            let prog = self.program(hook)?;
            // Our filter from an earlier start: swap its program in place.
            let existing =
                SchedClassifierLink::attached(ifname, hook.attach_type(), NL_PRIORITY, TcHandle::from(handle), None)
                    .map_err(io_err(format!("interface {ifname}")))?;
            let id = match prog.attach_to_link(existing) {
                Ok(id) => id,
                Err(e) if is_errno(&e, libc::ENOENT) => prog.attach_with_options(
                    ifname,
                    hook.attach_type(),
                    TcAttachOptions::Netlink(NlOptions {
                        priority: NL_PRIORITY,
                        handle: TcHandle::from(handle),
                        classid: None,
                    }),
                )?,
                Err(e) => return Err(e.into()),
            };
            // The filter stays after we exit: forgetting the link keeps Drop from removing it.
            std::mem::forget(prog.take_link(id)?);
            record(NlRecord {
                ifindex,
                hook: Some(hook),
                netns,
                prio: NL_PRIORITY,
                handle,
            })?;
        }
        Ok(())
    }

    /// Removes our attachments from an interface (TCX: unpinning the last reference detaches;
    /// clsact: our filters, and the qdisc if npc added it and nothing else uses it).
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for hook in Hook::BOTH {
            let pin = self.link_pin(ifindex, hook);
            match PinnedLink::from_pin(&pin) {
                Ok(link) => {
                    let fd_link = link.unpin().map_err(io_err("unpinning a link"))?;
                    let _ = aya::programs::links::Link::detach(fd_link);
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let netns = nl::current_netns().map_err(io_err("reading the network namespace"))?;
        remove_nl(&self.links_dir(), |r| r.ifindex == ifindex && r.netns == netns)
    }

    /// Interfaces that have our attachments (pinned links or recorded filters).
    pub fn attached_ifindexes(&self) -> BTreeSet<u32> {
        let mut out: BTreeSet<u32> = NlRecord::list(&self.links_dir())
            .into_iter()
            .filter(|r| r.hook.is_some())
            .map(|r| r.ifindex)
            .collect();
        if let Ok(dir) = std::fs::read_dir(self.links_dir()) {
            out.extend(dir.filter_map(|e| e.ok()).filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("if")?.split('_').next()?.parse::<u32>().ok()
            }));
        }
        out
    }
}

/// Removes the recorded netlink attachments that `which` selects, each in its own network
/// namespace (found by inode; one that is gone took its interfaces and filters with it):
/// filters first, only where the filter at the recorded priority and handle still runs one of
/// npc's programs; then the qdiscs npc added, only when no filter at all is left on them.
fn remove_nl(links_dir: &Path, which: impl Fn(&NlRecord) -> bool) -> Result<(), DatapathError> {
    let mut records: Vec<NlRecord> = NlRecord::list(links_dir).into_iter().filter(|r| which(r)).collect();
    // Filters before qdiscs.
    records.sort_by_key(|r| r.hook.is_none());
    for r in records {
        if let Some(path) = nl::find_netns(r.netns) {
            nl::in_netns(&path, || -> io::Result<()> {
                match r.hook {
                    Some(hook) => {
                        let parent = parent_of(hook);
                        let ours = nl::filters(r.ifindex, parent)?.into_iter().any(|f| {
                            f.prio == r.prio
                                && f.handle == r.handle
                                && f.kind == "bpf"
                                && f.bpf_name
                                    .as_deref()
                                    .is_some_and(|n| [program_names::FROM_POD, program_names::TO_POD].contains(&n))
                        });
                        if ours {
                            nl::delete_filter(r.ifindex, parent, r.prio, r.handle)?;
                        }
                    }
                    None => {
                        let unused = nl::filters(r.ifindex, nl::PARENT_INGRESS)?.is_empty()
                            && nl::filters(r.ifindex, nl::PARENT_EGRESS)?.is_empty();
                        if unused {
                            nl::delete_clsact(r.ifindex)?;
                        }
                    }
                }
                Ok(())
            })
            .and_then(|r| r)
            .map_err(io_err(format!("removing {}", r.name())))?;
        }
        let _ = std::fs::remove_dir(links_dir.join(r.name()));
    }
    Ok(())
}

/// `if_nametoindex` in the calling thread's network namespace.
pub fn ifindex_of(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Removes everything npc put on the node under `pin_root`: the netlink filters and clsact
/// qdiscs it recorded (in whichever network namespace they are), then every pin (links first:
/// that detaches the TCX programs; then the maps).
pub fn uninstall(pin_root: &Path) -> Result<(), DatapathError> {
    if !pin_root.exists() {
        return Ok(());
    }
    remove_nl(&pin_root.join("links"), |_| true)?;
    std::fs::remove_dir_all(pin_root).map_err(io_err(format!("removing {}", pin_root.display())))
}
