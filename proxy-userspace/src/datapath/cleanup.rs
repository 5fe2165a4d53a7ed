//! `bpfproxy cleanup`: takes off every link bpfproxy pinned and removes its pins, so nothing
//! of it is left in the kernel (its programs and maps are freed once nothing holds them).
//! Running it again finds nothing and says so.
//!
//! It removes only what bpfproxy pins (`layout`, the maps of the loader's list, the link
//! pins in `links/`, the socket hooks' in `links/cgroup/` and the XDP links' in `links/xdp/`), never follows a symlink, refuses a folder that is not on bpffs or holds
//! none of bpfproxy's pins, and reports anything else it finds instead of deleting it.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    MultiProgLink,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};
use proxy_common::maps;

use super::{
    DatapathError, attach::unpin_name, bpffs, layout, link_sys, loader, sock_lb, xdp_attach,
};

/// What [`cleanup`] did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Links taken off their interface: (interface, link id, program id). The interface is
    /// empty for links whose interface was already gone.
    pub detached: Vec<(String, u32, u32)>,
    /// Other pins removed (maps, the layout record, unusable link pins).
    pub removed: Vec<PathBuf>,
    /// Entries that are not bpfproxy's, left in place (the folder then stays too).
    pub left: Vec<PathBuf>,
    /// False when there was no folder to begin with.
    pub existed: bool,
}

/// Removes what bpfproxy pinned under `dir`, detaching its links first. Refuses a folder
/// that is not on bpffs, one an agent is running on, and one that holds no bpfproxy pin
/// (so a mistyped `--bpffs /sys/fs/bpf` cannot touch other programs' pins).
pub fn cleanup(dir: &Path) -> Result<CleanupReport, DatapathError> {
    let mut report = CleanupReport::default();
    let err = |reason: String| DatapathError::Bpffs {
        path: dir.to_path_buf(),
        reason,
    };
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(err(format!("reading it: {e}"))),
        Ok(m) if !m.file_type().is_dir() => {
            return Err(err(
                "not a folder (symlinks are not followed); not touching it".into(),
            ));
        }
        Ok(_) => {}
    }
    report.existed = true;
    if !bpffs::is_bpffs(dir) {
        return Err(err(
            "not on a BPF filesystem, so it holds no pins of bpfproxy; not touching it".into(),
        ));
    }
    // Held (shared) by every agent using the folder: detaching under a running agent would
    // leave it serving nothing until it restarts.
    let _lock = match bpffs::lock_exclusive(dir) {
        Ok(lock) => lock,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(err(
                "an agent is running on it; stop it first (it would keep running with its \
                 programs taken off)"
                    .into(),
            ));
        }
        Err(e) => return Err(err(format!("locking it: {e}"))),
    };
    let entries = list(dir).map_err(|e| err(format!("reading it: {e}")))?;
    if !entries.is_empty() && !looks_ours(dir) {
        return Err(err(
            "this does not look like a bpfproxy pin folder (no layout record, nor a map of \
             bpfproxy's shape); not touching it"
                .into(),
        ));
    }
    for (path, kind) in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == maps::LINKS_DIR && kind.is_dir() {
            // Links first: once they are off, nothing runs the programs that use the maps.
            cleanup_links(&path, &mut report).map_err(err)?;
        } else if kind.is_file() && (name == maps::LAYOUT || loader::map_names().any(|m| m == name))
        {
            fs::remove_file(&path)
                .or_else(not_found_ok)
                .map_err(|e| err(format!("removing {}: {e}", path.display())))?;
            report.removed.push(path);
        } else {
            report.left.push(path);
        }
    }
    if report.left.is_empty() {
        fs::remove_dir(dir)
            .or_else(not_found_ok)
            .map_err(|e| err(format!("removing the folder: {e}")))?;
    }
    Ok(report)
}

/// Whether `dir` holds a bpfproxy pin: a readable layout record, or (a folder of an agent
/// older than layout versions) a map of one of bpfproxy's names and shapes.
fn looks_ours(dir: &Path) -> bool {
    if matches!(layout::read_version(dir), Ok(Some(_))) {
        return true;
    }
    loader::map_names()
        .any(|name| fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.file_type().is_file()))
        && loader::check_pins(dir).is_ok()
}

/// Detaches and removes every link pin in `links`, then the folder (unless something not
/// ours is in it).
fn cleanup_links(links: &Path, report: &mut CleanupReport) -> Result<(), String> {
    let entries = list(links).map_err(|e| format!("reading {}: {e}", links.display()))?;
    let mut kept = false;
    for (pin, kind) in entries {
        if kind.is_dir() && pin.file_name().is_some_and(|n| n == sock_lb::LINKS_SUBDIR) {
            if !cleanup_cgroup_links(&pin, report)? {
                kept = true;
            }
            continue;
        }
        if kind.is_dir()
            && pin
                .file_name()
                .is_some_and(|n| n == xdp_attach::LINKS_SUBDIR)
        {
            if !cleanup_xdp_links(&pin, report)? {
                kept = true;
            }
            continue;
        }
        if !kind.is_file() {
            // A folder or symlink: bpfproxy makes neither here.
            report.left.push(pin);
            kept = true;
            continue;
        }
        match detach_pinned(&pin) {
            Ok(Some(detached)) => report.detached.push(detached),
            Ok(None) => report.removed.push(pin.clone()),
            Err(e) => return Err(format!("detaching {}: {e}", pin.display())),
        }
        fs::remove_file(&pin)
            .or_else(not_found_ok)
            .map_err(|e| format!("removing {}: {e}", pin.display()))?;
    }
    if !kept {
        fs::remove_dir(links)
            .or_else(not_found_ok)
            .map_err(|e| format!("removing {}: {e}", links.display()))?;
    }
    Ok(())
}

/// Detaches and removes the socket hooks' cgroup links pinned in `dir` (`links/cgroup`),
/// then the folder; false if something not ours stays in it.
fn cleanup_cgroup_links(dir: &Path, report: &mut CleanupReport) -> Result<bool, String> {
    let entries = list(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut kept = false;
    for (pin, kind) in entries {
        if !kind.is_file() {
            report.left.push(pin);
            kept = true;
            continue;
        }
        match sock_lb::detach_pinned(&pin) {
            Ok((link, prog)) => {
                let hook = pin
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                report.detached.push((format!("cgroup {hook}"), link, prog));
            }
            // Not a cgroup link (or gone): the pin is all there is to remove.
            Err(_) => report.removed.push(pin.clone()),
        }
        fs::remove_file(&pin)
            .or_else(not_found_ok)
            .map_err(|e| format!("removing {}: {e}", pin.display()))?;
    }
    if !kept {
        fs::remove_dir(dir)
            .or_else(not_found_ok)
            .map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    Ok(!kept)
}

/// Detaches and removes the XDP links pinned in `dir` (`links/xdp`), then the folder;
/// false if something not ours stays in it.
fn cleanup_xdp_links(dir: &Path, report: &mut CleanupReport) -> Result<bool, String> {
    let entries = list(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut kept = false;
    for (pin, kind) in entries {
        if !kind.is_file() {
            report.left.push(pin);
            kept = true;
            continue;
        }
        match xdp_attach::detach_pinned(&pin) {
            Ok(info) => {
                let interface = pin
                    .file_name()
                    .map(|n| unpin_name(&n.to_string_lossy()))
                    .unwrap_or_default();
                report
                    .detached
                    .push((format!("{interface} (xdp)"), info.link_id, info.prog_id));
            }
            // Not an XDP link (or gone): the pin is all there is to remove.
            Err(_) => report.removed.push(pin.clone()),
        }
        fs::remove_file(&pin)
            .or_else(not_found_ok)
            .map_err(|e| format!("removing {}: {e}", pin.display()))?;
    }
    if !kept {
        fs::remove_dir(dir)
            .or_else(not_found_ok)
            .map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    Ok(!kept)
}

/// The entries of `dir` with their own type (symlinks not followed), sorted.
fn list(dir: &Path) -> io::Result<Vec<(PathBuf, fs::FileType)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        entries.push((entry.path(), entry.file_type()?));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Detaches the link pinned at `pin` (if it is a tcx link): (interface, link id, program
/// id), the interface named by the pin, or empty if the interface is already gone.
fn detach_pinned(pin: &Path) -> io::Result<Option<(String, u32, u32)>> {
    let Ok(pinned) = PinnedLink::from_pin(pin) else {
        return Ok(None);
    };
    let Ok(link) = SchedClassifierLink::try_from(FdLink::from(pinned)) else {
        return Ok(None);
    };
    let fd = MultiProgLink::fd(&link).map_err(io::Error::other)?;
    let info = link_sys::tcx_link_info(fd)?;
    if info.ifindex != 0 {
        link_sys::link_detach(fd)?;
    }
    let name = if info.ifindex == 0 {
        String::new()
    } else {
        pin.file_name()
            .map(|n| unpin_name(&n.to_string_lossy()))
            .unwrap_or_default()
    };
    Ok(Some((name, info.link_id, info.prog_id)))
}

fn not_found_ok(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use aya::maps::MapData;
    use aya_obj::generated::bpf_map_type;

    use super::*;

    /// A folder of this test, removed on drop (needs root, like CI).
    struct Folder(PathBuf);

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Pins a small array map (not one of bpfproxy's) at `path`.
    fn pin_foreign_map(path: &Path) {
        let obj =
            aya_obj::Map::new_from_params(bpf_map_type::BPF_MAP_TYPE_ARRAY as u32, 4, 4, 1, 0);
        let map = MapData::create(obj, "foreign", None).expect("creating a map (run as root)");
        map.pin(path).expect("pinning it");
    }

    #[test]
    fn removes_only_its_own_pins_reports_the_rest_and_refuses_under_an_agent() {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/bpfproxy-unit-cleanup-{}",
            std::process::id()
        ));
        let folder = Folder(dir.clone());
        bpffs::ensure_pin_dir(&folder.0).expect("a pin folder on bpffs (run as root)");
        layout::stamp(&dir).unwrap();
        fs::create_dir(dir.join(maps::LINKS_DIR)).unwrap();
        // Not a link: an unusable link pin, removed.
        pin_foreign_map(&dir.join(maps::LINKS_DIR).join("eth0"));
        // Not a cgroup link where the socket hooks' links go: removed too.
        let cgroup_links = dir.join(maps::LINKS_DIR).join(sock_lb::LINKS_SUBDIR);
        fs::create_dir(&cgroup_links).unwrap();
        pin_foreign_map(&cgroup_links.join("connect4"));
        // Not bpfproxy's: a pin, a folder with a pin, a symlink to it, a folder named like
        // one of the maps.
        pin_foreign_map(&dir.join("foreign"));
        fs::create_dir(dir.join("other")).unwrap();
        pin_foreign_map(&dir.join("other").join("inner"));
        symlink(dir.join("other"), dir.join("sym")).unwrap();
        fs::create_dir(dir.join(maps::CONNTRACK4)).unwrap();

        // An agent holds the folder: refused, nothing touched.
        let agent = bpffs::lock_shared(&dir).unwrap();
        let err = cleanup(&dir).unwrap_err().to_string();
        assert!(err.contains("an agent is running"), "{err}");
        assert!(dir.join(maps::LAYOUT).exists());
        drop(agent);

        let report = cleanup(&dir).unwrap();
        assert!(report.existed);
        assert!(report.detached.is_empty(), "{report:?}");
        let removed: Vec<PathBuf> = report.removed.clone();
        assert_eq!(
            removed,
            [
                dir.join(maps::LAYOUT),
                cgroup_links.join("connect4"),
                dir.join(maps::LINKS_DIR).join("eth0")
            ],
            "{report:?}"
        );
        assert_eq!(
            report.left,
            [
                dir.join(maps::CONNTRACK4),
                dir.join("foreign"),
                dir.join("other"),
                dir.join("sym")
            ],
            "{report:?}"
        );
        for kept in ["foreign", "other/inner", "sym/inner", maps::CONNTRACK4] {
            assert!(dir.join(kept).exists(), "{kept} was removed");
        }
        assert!(!dir.join(maps::LAYOUT).exists());
        assert!(!dir.join(maps::LINKS_DIR).exists());

        // What is left holds no pin of bpfproxy: refused now, still untouched.
        let err = cleanup(&dir).unwrap_err().to_string();
        assert!(
            err.contains("does not look like a bpfproxy pin folder"),
            "{err}"
        );
        assert!(dir.join("foreign").exists());
    }

    #[test]
    fn a_folder_not_on_bpffs_is_refused_untouched() {
        let dir =
            std::env::temp_dir().join(format!("bpfproxy-unit-not-bpffs-{}", std::process::id()));
        let folder = Folder(dir.clone());
        fs::create_dir_all(folder.0.join(maps::LINKS_DIR)).unwrap();
        fs::write(dir.join(maps::LINKS_DIR).join("eth0"), "x").unwrap();
        fs::write(dir.join(maps::LAYOUT), "x").unwrap();
        let err = cleanup(&dir).unwrap_err().to_string();
        assert!(err.contains("not on a BPF filesystem"), "{err}");
        assert!(dir.join(maps::LINKS_DIR).join("eth0").exists());
        assert!(dir.join(maps::LAYOUT).exists());
    }
}
