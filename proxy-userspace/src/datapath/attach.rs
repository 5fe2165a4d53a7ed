//! Attaches the ingress program to interfaces whose names match the operator's patterns,
//! and keeps that true as interfaces come and go (pod veths are created and deleted all the
//! time): every link event from netlink triggers a re-scan of the interfaces. Links are
//! pinned so the programs stay attached across an agent restart (see [`Attachments`]).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        MultiProgLink, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc,
        tc::{SchedClassifierLink, SchedClassifierLinkId},
    },
    util::KernelVersion,
};
use globset::{Glob, GlobSet, GlobSetBuilder};

use super::{DatapathError, link_sys};

/// Interface name patterns (`eth0`, `veth*`, `lxc?*`).
#[derive(Clone, Debug)]
pub struct InterfacePatterns {
    set: GlobSet,
    pub source: Vec<String>,
}

impl InterfacePatterns {
    pub fn parse(patterns: &[String]) -> Result<Self, DatapathError> {
        let mut builder = GlobSetBuilder::new();
        for p in patterns {
            let glob = Glob::new(p).map_err(|e| DatapathError::Interface {
                interface: p.clone(),
                reason: format!("not a valid name pattern: {e}"),
            })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| DatapathError::Interface {
            interface: patterns.join(","),
            reason: e.to_string(),
        })?;
        Ok(InterfacePatterns {
            set,
            source: patterns.to_vec(),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// True when a pattern has no wildcard, i.e. names one interface that must exist.
    pub fn literal_names(&self) -> impl Iterator<Item = &str> {
        self.source
            .iter()
            .filter(|p| !p.contains(['*', '?', '[', '{']))
            .map(String::as_str)
    }
}

/// The interfaces of this network namespace: (index, name).
pub fn list_interfaces() -> io::Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex().map_err(io::Error::from)?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}

/// Where the program is attached: interface name -> attachment.
///
/// With a pin folder, every tcx link is pinned at `<pin folder>/links/<interface>`: the
/// programs stay attached when the agent exits, and the next agent takes each pinned link
/// over by replacing the program inside it (`BPF_LINK_UPDATE`, one atomic swap), so no
/// packet ever passes an interface without a program. Clsact filters (kernels before 6.6)
/// cannot be pinned; they go with the agent.
#[derive(Default)]
pub struct Attachments {
    /// `<pin folder>/links`; `None`: links live as long as the agent.
    pin_dir: Option<PathBuf>,
    /// Whether the links pinned by an earlier agent were taken over (done on the first sync).
    adopted: bool,
    links: BTreeMap<String, Attached>,
}

struct Attached {
    index: u32,
    /// Owned here, not by the program: dropping it closes its fd (a pinned tcx link stays
    /// attached; an unpinned one, or a clsact filter, is detached).
    link: SchedClassifierLink,
    pin: Option<PathBuf>,
}

impl Attachments {
    /// Attachments whose links are pinned under `dir` (created if missing) and outlive the
    /// agent.
    pub fn pinned(dir: PathBuf) -> Self {
        Attachments {
            pin_dir: Some(dir),
            ..Attachments::default()
        }
    }

    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    /// Attaches to every matching interface not yet attached and forgets interfaces that
    /// are gone (their tcx links went with them). The first call first takes over the links
    /// pinned by an earlier agent. Returns errors by interface; an interface that fails
    /// does not stop the others.
    pub fn sync(
        &mut self,
        prog: &mut SchedClassifier,
        patterns: &InterfacePatterns,
    ) -> Vec<DatapathError> {
        let present = match list_interfaces() {
            Ok(present) => present,
            // Without the list every link would look gone: change nothing until next time.
            Err(e) => {
                return vec![DatapathError::Interface {
                    interface: patterns.source.join(","),
                    reason: format!("listing the interfaces (links left as they are): {e}"),
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
                tracing::info!(interface = %name, "interface gone, detached");
            }
        }
        for (index, name) in present {
            if self.links.contains_key(&name) || !patterns.matches(&name) {
                continue;
            }
            match attach_ingress(prog, &name).and_then(|id| self.own(prog, id, &name)) {
                Ok((link, pin)) => {
                    tracing::info!(interface = %name, pinned = pin.is_some(), "attached tc ingress");
                    if let Err(e) = accept_local(&name) {
                        tracing::warn!(interface = %name, error = %e, "setting accept_local");
                    }
                    self.links.insert(name, Attached { index, link, pin });
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Takes a new link out of the program and pins it.
    fn own(
        &self,
        prog: &mut SchedClassifier,
        id: SchedClassifierLinkId,
        name: &str,
    ) -> Result<(SchedClassifierLink, Option<PathBuf>), DatapathError> {
        let err = |reason: String| DatapathError::Interface {
            interface: name.to_string(),
            reason,
        };
        let link = prog
            .take_link(id)
            .map_err(|e| err(format!("taking the link: {e}")))?;
        let (Some(dir), Ok(fd)) = (&self.pin_dir, MultiProgLink::fd(&link)) else {
            // Not pinning, or a clsact filter (no fd to pin).
            return Ok((link, None));
        };
        let path = dir.join(pin_name(name));
        // A pin of the same name left over by a link whose interface is gone (the interface
        // was recreated): replace it. A live link's pin stays (then this one is not pinned).
        if stale_link_pin(&path) {
            let _ = fs::remove_file(&path);
        }
        if let Err(e) = link_sys::obj_pin(fd, &path) {
            // Serving now matters more than surviving a restart: keep the link, unpinned.
            tracing::warn!(
                interface = %name,
                pin = %path.display(),
                error = %e,
                "could not pin the tc link: the interface is served, but its program will go with this agent (a restart leaves it unserved until the next agent attaches)"
            );
            return Ok((link, None));
        }
        Ok((link, Some(path)))
    }

    /// Takes over the links pinned by an earlier agent: each one on an interface that is
    /// present and still matches gets this agent's program, swapped in place; the others
    /// (interface gone, or no longer wanted) are unpinned, which detaches them.
    fn adopt(
        &mut self,
        prog: &mut SchedClassifier,
        patterns: &InterfacePatterns,
        present: &[(u32, String)],
        errors: &mut Vec<DatapathError>,
    ) {
        let Some(dir) = self.pin_dir.clone() else {
            return;
        };
        if let Err(e) = fs::create_dir_all(&dir) {
            errors.push(DatapathError::Bpffs {
                path: dir,
                reason: format!("creating the link folder: {e}"),
            });
            return;
        }
        let mut entries: Vec<PathBuf> = match fs::read_dir(&dir) {
            // Folders hold other links (`links/cgroup`: the socket hooks), not tc links.
            Ok(rd) => rd
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .map(|e| e.path())
                .collect(),
            Err(e) => {
                errors.push(DatapathError::Bpffs {
                    path: dir,
                    reason: format!("reading the link folder: {e}"),
                });
                return;
            }
        };
        entries.sort();
        for path in entries {
            let pinned_name = path
                .file_name()
                .map(|n| unpin_name(&n.to_string_lossy()))
                .unwrap_or_default();
            let link = match open_pinned_tcx(&path) {
                Ok(l) => l,
                Err(reason) => {
                    // Not a tcx link of ours: nothing can use it; unpin it.
                    tracing::warn!(pin = %path.display(), %reason, "removing an unusable link pin");
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            let info = match MultiProgLink::fd(&link)
                .map_err(io::Error::other)
                .and_then(link_sys::tcx_link_info)
            {
                Ok(info) => info,
                Err(e) => {
                    // Cannot tell where it is: leave it as it is.
                    errors.push(DatapathError::Interface {
                        interface: pinned_name,
                        reason: format!(
                            "reading the tc link pinned at {} (left as it is): {e}",
                            path.display()
                        ),
                    });
                    continue;
                }
            };
            if info.ifindex == 0 {
                // Its interface is gone: the pin was the last holder, so removing it frees
                // the link.
                let _ = fs::remove_file(&path);
                tracing::info!(interface = %pinned_name, link = info.link_id, "removed the pinned link of an interface that is gone");
                continue;
            }
            // The kernel must list this link on the interface of that index here: a link of
            // another namespace's interface (the same index can exist there) is not ours to
            // change.
            let here = present
                .iter()
                .find(|(i, _)| *i == info.ifindex)
                .filter(|_| {
                    link_sys::tcx_ingress_link_ids(info.ifindex)
                        .is_ok_and(|ids| ids.contains(&info.link_id))
                });
            let Some((index, name)) = here else {
                tracing::warn!(
                    pin = %path.display(),
                    link = info.link_id,
                    ifindex = info.ifindex,
                    "a pinned tc link is not on an interface of this network namespace: left as it is"
                );
                continue;
            };
            if !patterns.matches(name) || self.links.contains_key(name) {
                // No longer wanted (or renamed out of the patterns): removing the last
                // holder detaches it.
                let _ = fs::remove_file(&path);
                drop(link);
                tracing::info!(interface = %name, link = info.link_id, "removed the pinned link of an interface no longer served");
                continue;
            }
            let old_prog = info.prog_id;
            let replaced = prog.attach_to_link(link).and_then(|id| prog.take_link(id));
            let link = match replaced {
                Ok(link) => link,
                Err(e) => {
                    // The link (and its old program) stays pinned and attached.
                    errors.push(DatapathError::Interface {
                        interface: name.clone(),
                        reason: format!("replacing the program in its pinned link: {e}"),
                    });
                    continue;
                }
            };
            let mut pin = path.clone();
            let wanted = dir.join(pin_name(name));
            if wanted != path
                && let Ok(fd) = MultiProgLink::fd(&link)
                && link_sys::obj_pin(fd, &wanted).is_ok()
            {
                // Renamed interface: pinned under its new name.
                let _ = fs::remove_file(&path);
                pin = wanted;
            }
            tracing::info!(
                interface = %name,
                link = info.link_id,
                old_program = old_prog,
                "took over the pinned tc link: program replaced in place"
            );
            self.links.insert(
                name.clone(),
                Attached {
                    index: *index,
                    link,
                    pin: Some(pin),
                },
            );
        }
    }

    /// Detaches from every interface and removes the link pins.
    pub fn detach_all(&mut self) {
        for (name, attached) in std::mem::take(&mut self.links) {
            release(&name, attached, true);
        }
    }

    /// Leaves every pinned link attached (the agent exits; the next one takes them over).
    /// Returns how many stay; unpinned links are detached as they drop.
    pub fn leave_attached(self) -> usize {
        self.links.values().filter(|a| a.pin.is_some()).count()
    }
}

/// Unpins a link and, with `detach`, takes it off its interface even if something else
/// still holds it; dropping the link closes this agent's fd.
fn release(name: &str, attached: Attached, detach: bool) {
    if let Some(pin) = &attached.pin
        && let Err(e) = fs::remove_file(pin)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(interface = %name, pin = %pin.display(), error = %e, "removing link pin");
    }
    if detach
        && let Ok(fd) = MultiProgLink::fd(&attached.link)
        && let Err(e) = link_sys::link_detach(fd)
    {
        tracing::warn!(interface = %name, error = %e, "detach failed");
    }
    drop(attached.link);
}

/// Whether `path` pins a tcx link whose interface is gone (or pins no tcx link at all).
fn stale_link_pin(path: &Path) -> bool {
    if fs::symlink_metadata(path).is_err() {
        return false;
    }
    match open_pinned_tcx(path) {
        Ok(link) => MultiProgLink::fd(&link)
            .map_err(io::Error::other)
            .and_then(link_sys::tcx_link_info)
            .is_ok_and(|info| info.ifindex == 0),
        Err(_) => true,
    }
}

/// Opens a pinned tcx link; the reason if it is not one.
fn open_pinned_tcx(path: &Path) -> Result<SchedClassifierLink, String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())
}

/// The pin name of an interface: bpffs refuses `.` in names (reserved), which interface
/// names may hold (`eth0.100`), so `.` and the escape `%` are percent-encoded.
pub fn pin_name(interface: &str) -> String {
    interface.replace('%', "%25").replace('.', "%2e")
}

/// The interface name of a pin name (see [`pin_name`]).
pub fn unpin_name(pin: &str) -> String {
    pin.replace("%2e", ".").replace("%25", "%")
}

fn attach_ingress(
    prog: &mut SchedClassifier,
    name: &str,
) -> Result<SchedClassifierLinkId, DatapathError> {
    // tcx (6.6+) needs no qdisc; older kernels attach through a clsact qdisc.
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx && let Err(e) = tc::qdisc_add_clsact(name) {
        tracing::debug!(interface = %name, error = %e, "clsact qdisc not added (may exist)");
    }
    prog.attach(name, TcAttachType::Ingress)
        .map_err(|e| DatapathError::Interface {
            interface: name.to_string(),
            reason: format!("attaching tc ingress: {e}"),
        })
}

/// Turns on `accept_local` for interface `name` of this namespace. Packets the datapath
/// translates to come from one of the node's own addresses reach the kernel's routing with
/// that local source, which it drops as martian otherwise: a NodePort reply reverse-
/// translated on a pod's interface, and an SNAT-ed packet that XDP hands to the stack on a
/// node interface when it cannot forward it itself (e.g. no neighbour entry yet).
fn accept_local(name: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/accept_local"), "1")
}

#[cfg(test)]
mod tests {
    use super::{pin_name, unpin_name};

    #[test]
    fn pin_names_have_no_dot_and_map_back_to_the_interface() {
        for name in ["eth0", "eth0.100", "veth%1", "a.b.c", "%2e", "lxc_1-x"] {
            let pin = pin_name(name);
            assert!(!pin.contains('.'), "{name} -> {pin}");
            assert_eq!(unpin_name(&pin), name, "{name} -> {pin}");
        }
        assert_eq!(pin_name("eth0.100"), "eth0%2e100");
    }
}
