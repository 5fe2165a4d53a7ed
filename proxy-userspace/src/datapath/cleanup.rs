//! `bpfproxy cleanup`: takes off every link bpfproxy pinned and removes its pin folder, so
//! nothing of it is left in the kernel (its programs and maps are freed once nothing holds
//! them). Running it again finds nothing and says so.

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

use super::{DatapathError, attach::unpin_name, link_sys, loader};

/// What [`cleanup`] did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Links taken off their interface: (interface, link id, program id). The interface is
    /// empty for links whose interface was already gone.
    pub detached: Vec<(String, u32, u32)>,
    /// Other pins removed (maps, the layout record, unusable link pins).
    pub removed: Vec<PathBuf>,
    /// False when there was no folder to begin with.
    pub existed: bool,
}

/// Removes everything bpfproxy pinned under `dir`, detaching its links first. Refuses a
/// folder that does not look like bpfproxy's (no `layout`, map or `links` pin), so a
/// mistyped `--bpffs /sys/fs/bpf` cannot wipe other programs' pins.
pub fn cleanup(dir: &Path) -> Result<CleanupReport, DatapathError> {
    let mut report = CleanupReport::default();
    let err = |reason: String| DatapathError::Bpffs {
        path: dir.to_path_buf(),
        reason,
    };
    let entries: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(err(format!("reading it: {e}"))),
    };
    report.existed = true;
    let ours = |name: &str| {
        name == maps::LAYOUT || name == maps::LINKS_DIR || loader::map_names().any(|m| m == name)
    };
    if !entries.is_empty()
        && !entries
            .iter()
            .any(|p| p.file_name().is_some_and(|n| ours(&n.to_string_lossy())))
    {
        return Err(err(
            "this does not look like a bpfproxy pin folder (no layout, map or links pin); \
             not touching it"
                .into(),
        ));
    }
    // Links first: once they are off, nothing runs the programs that use the maps.
    let links = dir.join(maps::LINKS_DIR);
    if let Ok(rd) = fs::read_dir(&links) {
        let mut pins: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        pins.sort();
        for pin in pins {
            match detach_pinned(&pin) {
                Ok(Some((ifindex_name, link, prog))) => {
                    report.detached.push((ifindex_name, link, prog))
                }
                Ok(None) => report.removed.push(pin.clone()),
                Err(e) => return Err(err(format!("detaching {}: {e}", pin.display()))),
            }
            fs::remove_file(&pin)
                .or_else(not_found_ok)
                .map_err(|e| err(format!("removing {}: {e}", pin.display())))?;
        }
    }
    remove_tree(dir, &mut report).map_err(|e| err(format!("removing its pins: {e}")))?;
    Ok(report)
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

/// Removes every pin below `dir`, then `dir` (deepest first).
fn remove_tree(dir: &Path, report: &mut CleanupReport) -> io::Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            remove_tree(&path, report)?;
        } else {
            fs::remove_file(&path).or_else(not_found_ok)?;
            report.removed.push(path);
        }
    }
    fs::remove_dir(dir).or_else(not_found_ok)
}

fn not_found_ok(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}
