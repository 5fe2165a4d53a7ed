//! Makes sure a BPF filesystem is mounted where the pins go, as Cilium's agent does: a node
//! where nobody mounted /sys/fs/bpf must still work.

use std::{
    fs::{self, File, TryLockError},
    io,
    path::Path,
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::DatapathError;

/// Creates `pin_dir` on a bpffs, mounting one at its parent when that is not bpffs.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let err = |reason: String| DatapathError::Bpffs {
        path: pin_dir.to_path_buf(),
        reason,
    };
    let parent = pin_dir
        .parent()
        .ok_or_else(|| err("the pin folder needs a parent on bpffs".into()))?;
    fs::create_dir_all(parent).map_err(|e| err(format!("creating {}: {e}", parent.display())))?;
    if !is_bpffs(parent) {
        mount(
            Some("bpffs"),
            parent,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err(format!("mounting bpffs on {}: {e}", parent.display())))?;
        tracing::info!(path = %parent.display(), "mounted bpffs");
    }
    fs::create_dir_all(pin_dir).map_err(|e| err(format!("creating it: {e}")))?;
    Ok(())
}

pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Takes a shared lock on the pin folder `dir` for as long as the returned file is open.
/// Every agent holds one, so `bpfproxy cleanup` ([`lock_exclusive`]) can tell that an agent
/// is running on the folder; agents do not exclude each other.
pub fn lock_shared(dir: &Path) -> Result<File, DatapathError> {
    let err = |reason: String| DatapathError::Bpffs {
        path: dir.to_path_buf(),
        reason,
    };
    let file = File::open(dir).map_err(|e| err(format!("opening it to lock it: {e}")))?;
    file.lock_shared()
        .map_err(|e| err(format!("locking it: {e}")))?;
    Ok(file)
}

/// Takes the exclusive lock on `dir` without waiting: `WouldBlock` while an agent holds
/// its shared one.
pub fn lock_exclusive(dir: &Path) -> io::Result<File> {
    let file = File::open(dir)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
        Err(TryLockError::Error(e)) => Err(e),
    }
}
