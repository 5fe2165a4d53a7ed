//! Attaches `xdp_nodeport` (the external view) to the node interfaces, in native (driver)
//! mode, and keeps that true as interfaces come and go, like the tc attachments
//! ([`super::attach`]). Each XDP link is pinned at `<pin folder>/links/xdp/<interface>`, so
//! the program stays attached across an agent restart; the next agent swaps its program
//! into each pinned link (`BPF_LINK_UPDATE`, one atomic step). aya 0.14 gives no fd of an
//! XDP link, so the links are held here by their own fd (`BPF_LINK_GET_FD_BY_ID`).

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::programs::{Xdp, XdpMode, links::FdLink};

use super::{
    DatapathError,
    attach::{InterfacePatterns, list_interfaces, pin_name, unpin_name},
    link_sys,
};

/// Folder under `<pin folder>/links` where the XDP links are pinned (the tc links are the
/// files of `links/` itself).
pub const LINKS_SUBDIR: &str = "xdp";

/// Where `xdp_nodeport` is attached: interface name -> link.
#[derive(Default)]
pub struct XdpAttachments {
    /// `<pin folder>/links/xdp`; `None`: links live as long as the agent.
    pin_dir: Option<PathBuf>,
    adopted: bool,
    links: BTreeMap<String, XdpAttached>,
}

struct XdpAttached {
    index: u32,
    /// Holds the link while the agent runs (a pinned link stays after it is closed).
    fd: OwnedFd,
    pin: Option<PathBuf>,
}

impl XdpAttachments {
    /// Attachments whose links are pinned under `dir` (created if missing).
    pub fn pinned(dir: PathBuf) -> Self {
        XdpAttachments {
            pin_dir: Some(dir),
            ..XdpAttachments::default()
        }
    }

    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    /// Attaches to every matching interface not yet attached, forgets interfaces that are
    /// gone; the first call first takes over the links pinned by an earlier agent. Errors
    /// by interface (e.g. a driver without native XDP); one failing does not stop the rest.
    pub fn sync(&mut self, prog: &mut Xdp, patterns: &InterfacePatterns) -> Vec<DatapathError> {
        let present = match list_interfaces() {
            Ok(present) => present,
            Err(e) => {
                return vec![DatapathError::Interface {
                    interface: patterns.source.join(","),
                    reason: format!("listing the interfaces (XDP links left as they are): {e}"),
                }];
            }
        };
        let mut errors = Vec::new();
        if !self.adopted {
            self.adopted = true;
            self.adopt(prog, patterns, &present, &mut errors);
        }
        let gone: Vec<String> = self
            .links
            .iter()
            .filter(|(name, a)| !present.iter().any(|(i, n)| *i == a.index && n == *name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(attached) = self.links.remove(&name) {
                release(&name, attached, false);
                tracing::info!(interface = %name, "interface gone, its XDP link with it");
            }
        }
        for (index, name) in present {
            if self.links.contains_key(&name) || !patterns.matches(&name) {
                continue;
            }
            match self.attach(prog, &name) {
                Ok((fd, pin)) => {
                    tracing::info!(interface = %name, pinned = pin.is_some(), "attached xdp_nodeport (native)");
                    self.links.insert(name, XdpAttached { index, fd, pin });
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    fn attach(
        &self,
        prog: &mut Xdp,
        name: &str,
    ) -> Result<(OwnedFd, Option<PathBuf>), DatapathError> {
        let err = |reason: String| DatapathError::Interface {
            interface: name.to_string(),
            reason,
        };
        // Native only: generic (skb) XDP runs after the stack has built an skb, which is
        // the cost this program exists to avoid; better to say so than to serve slowly.
        let id = prog.attach(name, XdpMode::Driver).map_err(|e| {
            err(format!(
                "attaching xdp_nodeport in native (driver) mode: {e} (does its driver support XDP?)"
            ))
        })?;
        let link = prog
            .take_link(id)
            .map_err(|e| err(format!("taking the XDP link: {e}")))?;
        // A netlink attachment (kernels without XDP links) has no fd: it is undone when
        // the program is dropped, which cannot be pinned; refuse it rather than lose it
        // silently at the next restart.
        let fd_link = FdLink::try_from(link).map_err(|e| {
            err(format!(
                "the kernel attached XDP without a link (kernel older than 5.9?): {e}"
            ))
        })?;
        let link_id = fd_link
            .info()
            .map_err(|e| err(format!("reading the XDP link: {e}")))?
            .id();
        let fd = link_sys::link_fd_by_id(link_id)
            .map_err(|e| err(format!("opening XDP link {link_id}: {e}")))?;
        drop(fd_link);
        let Some(dir) = &self.pin_dir else {
            return Ok((fd, None));
        };
        let path = dir.join(pin_name(name));
        if stale_pin(&path) {
            let _ = fs::remove_file(&path);
        }
        if let Err(e) = fs::create_dir_all(dir).and_then(|()| link_sys::obj_pin(fd.as_fd(), &path))
        {
            tracing::warn!(
                interface = %name,
                pin = %path.display(),
                error = %e,
                "could not pin the XDP link: the interface is served, but its program will go with this agent"
            );
            return Ok((fd, None));
        }
        Ok((fd, Some(path)))
    }

    /// Takes over the XDP links pinned by an earlier agent: on an interface that is present
    /// and still matches, the program is replaced in place; the others are unpinned (the
    /// last holder gone, the link detaches).
    fn adopt(
        &mut self,
        prog: &mut Xdp,
        patterns: &InterfacePatterns,
        present: &[(u32, String)],
        errors: &mut Vec<DatapathError>,
    ) {
        let Some(dir) = self.pin_dir.clone() else {
            return;
        };
        let mut entries: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                errors.push(DatapathError::Bpffs {
                    path: dir,
                    reason: format!("reading the XDP link folder: {e}"),
                });
                return;
            }
        };
        entries.sort();
        let prog_fd = match prog.fd() {
            Ok(fd) => fd,
            Err(e) => {
                errors.push(DatapathError::Interface {
                    interface: patterns.source.join(","),
                    reason: format!("xdp_nodeport has no fd to swap into pinned links: {e}"),
                });
                return;
            }
        };
        for path in entries {
            let pinned_name = path
                .file_name()
                .map(|n| unpin_name(&n.to_string_lossy()))
                .unwrap_or_default();
            let info = link_sys::obj_get(&path)
                .and_then(|fd| link_sys::xdp_link_info(fd.as_fd()).map(|info| (fd, info)));
            let (fd, info) = match info {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(pin = %path.display(), error = %e, "removing an unusable XDP link pin");
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            let here = present
                .iter()
                .find(|(i, n)| *i == info.ifindex && *n == pinned_name);
            let Some((index, name)) = here.filter(|(_, n)| patterns.matches(n)) else {
                // Interface gone, renamed or no longer a node interface: the pin was the
                // last holder but this fd, so the link goes when it is closed.
                let _ = fs::remove_file(&path);
                tracing::info!(interface = %pinned_name, link = info.link_id, "removed the pinned XDP link of an interface no longer served");
                continue;
            };
            if let Err(e) = link_sys::link_update(fd.as_fd(), prog_fd.as_fd()) {
                // The old program keeps serving in its pinned link.
                errors.push(DatapathError::Interface {
                    interface: name.clone(),
                    reason: format!("replacing the program in its pinned XDP link: {e}"),
                });
                continue;
            }
            tracing::info!(
                interface = %name,
                link = info.link_id,
                old_program = info.prog_id,
                "took over the pinned XDP link: program replaced in place"
            );
            self.links.insert(
                name.clone(),
                XdpAttached {
                    index: *index,
                    fd,
                    pin: Some(path),
                },
            );
        }
    }

    /// Detaches from every interface and removes the pins.
    pub fn detach_all(&mut self) {
        for (name, attached) in std::mem::take(&mut self.links) {
            release(&name, attached, true);
        }
    }

    /// Leaves the pinned links attached for the next agent; returns how many stay.
    pub fn leave_attached(self) -> usize {
        self.links.values().filter(|a| a.pin.is_some()).count()
    }
}

fn release(name: &str, attached: XdpAttached, detach: bool) {
    if let Some(pin) = &attached.pin
        && let Err(e) = fs::remove_file(pin)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(interface = %name, pin = %pin.display(), error = %e, "removing XDP link pin");
    }
    if detach && let Err(e) = link_sys::link_detach(attached.fd.as_fd()) {
        tracing::warn!(interface = %name, error = %e, "XDP detach failed");
    }
}

/// Whether `path` pins an XDP link whose interface is gone (or no XDP link at all).
fn stale_pin(path: &Path) -> bool {
    if fs::symlink_metadata(path).is_err() {
        return false;
    }
    link_sys::obj_get(path)
        .and_then(|fd| link_sys::xdp_link_info(fd.as_fd()))
        .map_or(true, |info| info.ifindex == 0)
}

/// Detaches the XDP link pinned at `pin`: (link id, program id, ifindex).
pub fn detach_pinned(pin: &Path) -> io::Result<link_sys::XdpLinkInfo> {
    let fd = link_sys::obj_get(pin)?;
    let info = link_sys::xdp_link_info(fd.as_fd())?;
    link_sys::link_detach(fd.as_fd())?;
    Ok(info)
}
