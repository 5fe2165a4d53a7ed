//! Socket-level load balancing (cgroup connect/sendmsg/recvmsg/getpeername programs, 4 and 6, for
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

/// Key of `sock_rev6` (LRU): as [`SockRev4Key`], for IPv6 sockets reaching an IPv6
/// frontend (an IPv4-mapped destination of a dual-stack socket is served from the IPv4
/// maps and recorded in `sock_rev4`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRev6Key {
    pub cookie: u64,
    /// The backend the destination was rewritten to (wire bytes).
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of `sock_rev6`: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRev6Value {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<SockRev6Key>() == 32);
const _: () = assert!(core::mem::size_of::<SockRev6Value>() == 20);

#[cfg(feature = "user")]
mod pod6 {
    // SAFETY: repr(C), Copy, no implicit padding (asserted above).
    unsafe impl aya::Pod for super::SockRev6Key {}
    unsafe impl aya::Pod for super::SockRev6Value {}
}
