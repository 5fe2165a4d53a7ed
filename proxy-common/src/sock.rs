//! Socket-level load balancing (cgroup connect4/sendmsg4/recvmsg4/getpeername4 programs for
//! processes on the node): the reverse map that lets a socket keep seeing the frontend it
//! asked for while its packets go to a backend.

/// Key of `sock_rev4` (LRU): one backend a socket was sent to by the socket hooks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRev4Key {
    /// The socket's cookie (`bpf_get_socket_cookie`): unique while the socket lives.
    pub cookie: u64,
    /// The backend the destination was rewritten to.
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of `sock_rev4`: the frontend the socket asked for, written back in place of the
/// backend by getpeername() and recvmsg() (UDP: the source of a reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRev4Value {
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<SockRev4Key>() == 16);
const _: () = assert!(core::mem::size_of::<SockRev4Value>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no implicit padding (asserted above).
    unsafe impl aya::Pod for super::SockRev4Key {}
    unsafe impl aya::Pod for super::SockRev4Value {}
}
