//! The bpf(2) link calls aya 0.14 does not expose: reading which interface a tcx link
//! is on (`BPF_OBJ_GET_INFO_BY_FD`: aya's `LinkInfo` gives only the link and program ids),
//! and forcing a link off its interface (`BPF_LINK_DETACH`, kernel 5.9+), which `bpfproxy
//! cleanup` needs because a pinned link stays attached as long as anything holds it.
//! Pinning goes through here too (`BPF_OBJ_PIN` on a borrowed fd), because aya's
//! `FdLink::pin` consumes the link and drops it, detaching it, when pinning fails. Replacing
//! the program in a tcx link is aya's `SchedClassifier::attach_to_link` (`BPF_LINK_UPDATE`).
//! For the cgroup links of socket-level load balancing (`sock_lb`), aya has no take-over:
//! their pins are opened (`BPF_OBJ_GET`), read (which cgroup, which hook) and given the new
//! program (`BPF_LINK_UPDATE`) here.

use std::{
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

/// What the kernel says of a tcx link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcxLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the interface is gone (the link then holds its program but runs nowhere).
    pub ifindex: u32,
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: `attr` is a zero-initialised bpf_attr with the fields of `cmd` set, and lives
    // across the call; the kernel reads at most size_of::<bpf_attr>() bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What the kernel says of the link behind `fd` (`BPF_OBJ_GET_INFO_BY_FD`); an error naming
/// `kind` if it is not a link of type `want`.
fn link_info(fd: BorrowedFd<'_>, want: bpf_link_type, kind: &str) -> io::Result<bpf_link_info> {
    // SAFETY: both are plain C structs for which all-zero bytes are valid.
    let mut info: bpf_link_info = unsafe { zeroed() };
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = &mut info as *mut bpf_link_info as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != want as u32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link {} is not {kind} link (type {})", info.id, info.type_),
        ));
    }
    Ok(info)
}

/// The tcx link behind `fd`; an error if it is another kind of link.
pub fn tcx_link_info(fd: BorrowedFd<'_>) -> io::Result<TcxLinkInfo> {
    let info = link_info(fd, bpf_link_type::BPF_LINK_TYPE_TCX, "a tcx")?;
    Ok(TcxLinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        // SAFETY: the kernel filled the tcx member, the type says so.
        ifindex: unsafe { info.__bindgen_anon_1.tcx.ifindex },
    })
}

/// Detaches the link from its hook now, whoever else holds it (a pin, another process).
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a plain C struct for which all-zero bytes are valid.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.link_detach.link_fd = fd.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr)
}

/// Pins the object behind `fd` at `path` (on bpffs; the parent folder must exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a plain C struct for which all-zero bytes are valid.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    // `c_path` outlives the call.
    attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr)
}

/// The ids of the tcx links on the ingress of interface `ifindex` of this network namespace
/// (`BPF_PROG_QUERY`; aya's `query_tcx` gives the programs only).
pub fn tcx_ingress_link_ids(ifindex: u32) -> io::Result<Vec<u32>> {
    let mut cap = 16usize;
    loop {
        let mut progs = vec![0u32; cap];
        let mut links = vec![0u32; cap];
        // SAFETY: a plain C struct for which all-zero bytes are valid.
        let mut attr: bpf_attr = unsafe { zeroed() };
        attr.query.__bindgen_anon_1.target_ifindex = ifindex;
        attr.query.attach_type = bpf_attach_type::BPF_TCX_INGRESS as u32;
        attr.query.__bindgen_anon_2.count = cap as u32;
        // Both buffers hold `cap` ids and outlive the call.
        attr.query.prog_ids = progs.as_mut_ptr() as u64;
        attr.query.link_ids = links.as_mut_ptr() as u64;
        match sys_bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) {
            Ok(()) => {
                // SAFETY: the kernel wrote the count it filled in.
                let n = unsafe { attr.query.__bindgen_anon_2.count } as usize;
                links.truncate(n.min(cap));
                return Ok(links);
            }
            // More programs than room: the kernel said how many.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && cap < 4096 => cap *= 4,
            Err(e) => return Err(e),
        }
    }
}

/// What the kernel says of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// The cgroup's id (on cgroup2, the inode number of its folder); 0 once the cgroup is
    /// gone.
    pub cgroup_id: u64,
    /// A `bpf_attach_type` value.
    pub attach_type: u32,
}

/// The cgroup link behind `fd`; an error if it is another kind of link.
pub fn cgroup_link_info(fd: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    let info = link_info(fd, bpf_link_type::BPF_LINK_TYPE_CGROUP, "a cgroup")?;
    // SAFETY: the kernel filled the cgroup member, the type says so.
    let cgroup = unsafe { info.__bindgen_anon_1.cgroup };
    Ok(CgroupLinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        cgroup_id: cgroup.cgroup_id,
        attach_type: cgroup.attach_type,
    })
}

/// Replaces the program of the link behind `link` with `prog` in one step
/// (`BPF_LINK_UPDATE`): the hook never runs without a program. aya 0.14 offers this for
/// tcx links only.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a plain C struct for which all-zero bytes are valid.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr)
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a plain C struct for which all-zero bytes are valid; `c_path` outlives the
    // call, as in `obj_pin`.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
    // SAFETY: as in `sys_bpf`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET as libc::c_int,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}

/// What the kernel says of an XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the interface is gone.
    pub ifindex: u32,
}

/// The XDP link behind `fd`; an error if it is another kind of link.
pub fn xdp_link_info(fd: BorrowedFd<'_>) -> io::Result<XdpLinkInfo> {
    let info = link_info(fd, bpf_link_type::BPF_LINK_TYPE_XDP, "an XDP")?;
    Ok(XdpLinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        // SAFETY: the kernel filled the xdp member, the type says so.
        ifindex: unsafe { info.__bindgen_anon_1.xdp.ifindex },
    })
}

/// A new fd of the link with id `id` (`BPF_LINK_GET_FD_BY_ID`): aya 0.14 keeps the fd of
/// an XDP link to itself.
pub fn link_fd_by_id(id: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: a plain C struct for which all-zero bytes are valid.
    let mut attr: bpf_attr = unsafe { zeroed() };
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
    // SAFETY: as in `sys_bpf`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_LINK_GET_FD_BY_ID as libc::c_int,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}
