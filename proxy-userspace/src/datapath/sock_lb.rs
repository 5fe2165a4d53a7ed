//! Socket-level load balancing for processes on the node: the cgroup sock_addr programs
//! (`proxy-ebpf/src/sock.rs`) attached to one cgroup2 folder (`--socket-lb-cgroup`), which
//! covers every process in it and in the cgroups below it.
//!
//! With a pin folder, each link is pinned at `<pin folder>/links/cgroup/<hook>`, so the
//! hooks stay in place while the agent restarts; the next agent gives each pinned link its
//! own program in one `BPF_LINK_UPDATE` (no call goes unbalanced meanwhile), or, if the
//! pinned link is on another cgroup than the one it is now given, detaches it and attaches
//! anew. An agent started without `--socket-lb-cgroup` removes such pins (the feature was
//! turned off).

use std::{
    fs::{self, File},
    io,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, links::FdLink};
use aya_obj::generated::bpf_attach_type;
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

use super::{Datapath, DatapathError, link_sys};

/// Folder under `links/` of the cgroup link pins.
pub const LINKS_SUBDIR: &str = "cgroup";

/// One hook: program name, pin name, kernel attach type.
pub struct Hook {
    pub program: &'static str,
    pub pin: &'static str,
    attach_type: bpf_attach_type,
}

/// The programs and where they attach: IPv4, then IPv6 (whose connect6 also serves an
/// IPv4-mapped destination from the IPv4 maps).
pub const HOOKS: [Hook; 8] = [
    Hook {
        program: "sock_connect4",
        pin: "connect4",
        attach_type: bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
    },
    Hook {
        program: "sock_sendmsg4",
        pin: "sendmsg4",
        attach_type: bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG,
    },
    Hook {
        program: "sock_recvmsg4",
        pin: "recvmsg4",
        attach_type: bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG,
    },
    Hook {
        program: "sock_getpeername4",
        pin: "getpeername4",
        attach_type: bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
    },
    Hook {
        program: "sock_connect6",
        pin: "connect6",
        attach_type: bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
    },
    Hook {
        program: "sock_sendmsg6",
        pin: "sendmsg6",
        attach_type: bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG,
    },
    Hook {
        program: "sock_recvmsg6",
        pin: "recvmsg6",
        attach_type: bpf_attach_type::BPF_CGROUP_UDP6_RECVMSG,
    },
    Hook {
        program: "sock_getpeername6",
        pin: "getpeername6",
        attach_type: bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
    },
];

/// The hooks attached by this agent.
pub struct SocketLb {
    cgroup: PathBuf,
    links: Vec<Held>,
}

struct Held {
    hook: &'static str,
    /// Where the link is pinned; `None`: it lives as long as `link`.
    pin: Option<PathBuf>,
    /// Held only when not pinned (dropping it detaches).
    link: Option<FdLink>,
}

/// Opens `path` as a cgroup2 folder: the open folder and the cgroup's id (its inode number,
/// which is what the kernel reports as a cgroup link's cgroup id).
pub fn open_cgroup2(path: &Path) -> Result<(File, u64), DatapathError> {
    let err = |reason: String| DatapathError::Cgroup {
        path: path.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|e| err(format!("{e}")))?;
    if !meta.is_dir() {
        return Err(err("not a folder; give a cgroup2 folder (e.g. the host's /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)".into()));
    }
    match statfs(path) {
        Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => {}
        Ok(_) => {
            return Err(err(
                "not on a cgroup2 filesystem (a cgroup v1 hierarchy or another filesystem); give a cgroup2 folder (e.g. the host's /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)".into(),
            ));
        }
        Err(e) => return Err(err(format!("statfs: {e}"))),
    }
    let file = File::open(path).map_err(|e| err(format!("opening it: {e}")))?;
    Ok((file, meta.ino()))
}

impl SocketLb {
    /// Loads the socket programs and attaches them to `cgroup`, taking over the links an
    /// earlier agent pinned under `<pin_dir>/links/cgroup` when they are on that cgroup.
    pub fn attach(datapath: &mut Datapath, cgroup: &Path) -> Result<Self, DatapathError> {
        let (file, cgroup_id) = open_cgroup2(cgroup)?;
        let dir = datapath
            .pin_dir
            .as_ref()
            .map(|d| d.join(proxy_common::maps::LINKS_DIR).join(LINKS_SUBDIR));
        if let Some(dir) = &dir {
            fs::create_dir_all(dir).map_err(|e| DatapathError::Bpffs {
                path: dir.clone(),
                reason: format!("creating the cgroup link folder: {e}"),
            })?;
        }
        let mut this = SocketLb {
            cgroup: cgroup.to_path_buf(),
            links: Vec::new(),
        };
        for hook in &HOOKS {
            let prog_err = |reason: String| DatapathError::Cgroup {
                path: cgroup.to_path_buf(),
                reason: format!("{} ({}): {reason}", hook.program, hook.pin),
            };
            let prog = datapath.sock_program_mut(hook.program)?;
            prog.load().map_err(|source| DatapathError::Program {
                name: hook.program.to_string(),
                source,
            })?;
            let pin = dir.as_ref().map(|d| d.join(hook.pin));
            if let Some(pin) = &pin
                && fs::symlink_metadata(pin).is_ok()
            {
                let prog_fd = prog.fd().map_err(|e| prog_err(e.to_string()))?;
                match take_over(pin, prog_fd.as_fd(), cgroup_id, hook) {
                    Ok(true) => {
                        tracing::info!(hook = hook.pin, cgroup = %cgroup.display(), "took over the pinned cgroup link: program replaced in place");
                        this.links.push(Held {
                            hook: hook.pin,
                            pin: Some(pin.clone()),
                            link: None,
                        });
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => return Err(prog_err(format!("taking over {}: {e}", pin.display()))),
                }
            }
            let attach =
                |prog: &mut aya::programs::CgroupSockAddr| -> Result<FdLink, DatapathError> {
                    let id = prog
                        .attach(file.as_fd(), CgroupAttachMode::Single)
                        .map_err(|e| prog_err(format!("attaching: {e}")))?;
                    let link = prog
                        .take_link(id)
                        .map_err(|e| prog_err(format!("taking the link: {e}")))?;
                    FdLink::try_from(link).map_err(|e| prog_err(format!("not a bpf link: {e}")))
                };
            let link = attach(prog)?;
            let Some(pin) = pin else {
                this.links.push(Held {
                    hook: hook.pin,
                    pin: None,
                    link: Some(link),
                });
                continue;
            };
            match link.pin(&pin) {
                // The pin holds the link; this agent's fd closes here.
                Ok(_pinned) => this.links.push(Held {
                    hook: hook.pin,
                    pin: Some(pin),
                    link: None,
                }),
                Err(e) => {
                    // aya dropped (so detached) the link: attach again, unpinned. Serving
                    // now matters more than surviving a restart.
                    tracing::warn!(hook = hook.pin, pin = %pin.display(), error = %e, "could not pin the cgroup link: the hook is served, but goes with this agent");
                    let link = attach(prog)?;
                    this.links.push(Held {
                        hook: hook.pin,
                        pin: None,
                        link: Some(link),
                    });
                }
            }
        }
        tracing::info!(cgroup = %cgroup.display(), pinned = this.links.iter().all(|l| l.pin.is_some()), "socket-level load balancing attached (connect, sendmsg, recvmsg, getpeername; IPv4 and IPv6)");
        Ok(this)
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Takes every hook off the cgroup and removes the pins.
    pub fn detach_all(self) {
        for held in self.links {
            if let Some(pin) = &held.pin {
                match detach_pinned(pin) {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(hook = held.hook, pin = %pin.display(), error = %e, "detaching the cgroup link")
                    }
                }
                let _ = fs::remove_file(pin);
            }
            drop(held.link);
        }
    }

    /// Leaves the pinned hooks attached for the next agent; returns how many stay.
    pub fn leave_attached(self) -> usize {
        self.links.iter().filter(|l| l.pin.is_some()).count()
    }
}

/// Gives the link pinned at `pin` the program `prog` if it is this hook's link on this
/// cgroup (true); otherwise detaches it and removes the pin (false), so a fresh link can
/// take its place.
fn take_over(
    pin: &Path,
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup_id: u64,
    hook: &Hook,
) -> io::Result<bool> {
    let fd = match link_sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "removing an unusable cgroup link pin");
            fs::remove_file(pin)?;
            return Ok(false);
        }
    };
    let info = match link_sys::cgroup_link_info(fd.as_fd()) {
        Ok(info) => info,
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "removing a pin that is no cgroup link");
            fs::remove_file(pin)?;
            return Ok(false);
        }
    };
    if info.cgroup_id == cgroup_id && info.attach_type == hook.attach_type as u32 {
        link_sys::link_update(fd.as_fd(), prog)?;
        return Ok(true);
    }
    tracing::info!(
        hook = hook.pin,
        link = info.link_id,
        cgroup_id = info.cgroup_id,
        "the pinned cgroup link is on another cgroup: detached"
    );
    if info.cgroup_id != 0 {
        link_sys::link_detach(fd.as_fd())?;
    }
    fs::remove_file(pin)?;
    Ok(false)
}

/// Detaches the cgroup link pinned at `pin` (the pin stays): its link and program ids.
pub fn detach_pinned(pin: &Path) -> io::Result<(u32, u32)> {
    let fd = link_sys::obj_get(pin)?;
    let info = link_sys::cgroup_link_info(fd.as_fd())?;
    if info.cgroup_id != 0 {
        link_sys::link_detach(fd.as_fd())?;
    }
    Ok((info.link_id, info.prog_id))
}

/// Removes the cgroup links pinned under `<pin_dir>/links/cgroup` (an agent started without
/// `--socket-lb-cgroup`: the feature is off). Returns how many were detached.
pub fn remove_pinned(pin_dir: &Path) -> usize {
    let dir = pin_dir
        .join(proxy_common::maps::LINKS_DIR)
        .join(LINKS_SUBDIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            match detach_pinned(&path) {
                Ok(_) => n += 1,
                Err(e) => {
                    tracing::warn!(pin = %path.display(), error = %e, "detaching a pinned cgroup link")
                }
            }
            let _ = fs::remove_file(&path);
        }
    }
    let _ = fs::remove_dir(&dir);
    if n > 0 {
        tracing::info!(
            links = n,
            "socket-level load balancing is off (no --socket-lb-cgroup): removed the cgroup links an earlier agent pinned"
        );
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_that_is_not_cgroup2_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_cgroup2(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&dir.path().display().to_string()) && e.contains("cgroup2"),
            "{e}"
        );
        let missing = dir.path().join("nope");
        let e = open_cgroup2(&missing).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        let e = open_cgroup2(&file).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
    }

    #[test]
    fn a_cgroup2_folder_is_accepted_with_its_inode_as_id() {
        // Read-only use of the machine's cgroup2 mount (nothing is attached here).
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| statfs(*p).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC))
            .expect("a cgroup2 mount on this machine");
        let (_file, id) = open_cgroup2(root).unwrap();
        assert_eq!(id, fs::metadata(root).unwrap().ino());
    }
}
