//! bpffs: the agent pins under it and mounts it when the host has not.
use std::path::Path;

use super::{DatapathError, io_err};

/// Checks that bpffs is mounted at (or above) `dir`, mounting it at /sys/fs/bpf when it is not.
pub fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let on_bpffs = |p: &Path| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: statfs into a zeroed struct with a valid C string.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && i128::from(st.f_type) == i128::from(libc::BPF_FS_MAGIC)
    };
    let root = Path::new("/sys/fs/bpf");
    if !on_bpffs(root) {
        tracing::warn!("bpffs is not mounted at /sys/fs/bpf; mounting it");
        std::fs::create_dir_all(root).map_err(io_err("creating /sys/fs/bpf"))?;
        let ok = nix_mount_bpf(root);
        if !ok || !on_bpffs(root) {
            return Err(DatapathError::Environment(
                "cannot mount bpffs at /sys/fs/bpf (are we root with CAP_SYS_ADMIN?)".into(),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    if !on_bpffs(dir) {
        return Err(DatapathError::Environment(format!(
            "{} is not on a bpf filesystem",
            dir.display()
        )));
    }
    Ok(())
}

fn nix_mount_bpf(target: &Path) -> bool {
    let (Ok(src), Ok(tgt), Ok(fs)) = (
        std::ffi::CString::new("bpf"),
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()),
        std::ffi::CString::new("bpf"),
    ) else {
        return false;
    };
    // SAFETY: valid C strings; no data argument.
    unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) == 0 }
}
