//! Connection tracking: one forward and one reply entry per NAT-ed connection.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_loop},
};
use proxy_common::{
    conntrack::{
        CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, CT_FLAG_SNAT, Ct4Key,
        Ct4Value, LAST_SEEN_REFRESH_NS,
    },
    service::BackendConnsKey,
};

use crate::{maps::CONNTRACK4, nat::Tuple, parse::Packet, sched};

/// Ports tried for a new SNAT-ed connection before giving up (ERR_SNAT_PORTS). Starting
/// at a random port of the range, with a range mostly free each try is a hit; the bound
/// keeps the program's worst case small when the range is nearly full.
pub const SNAT_PORT_TRIES: u32 = 16;

/// What a forward entry says to do with a client's packet: the backend, and with
/// `snat` the new source (`addr2:port2`) too.
#[derive(Clone, Copy)]
pub struct Translation {
    pub addr: [u8; 4],
    pub port: u16,
    pub snat: bool,
    pub addr2: [u8; 4],
    pub port2: u16,
}

impl Translation {
    /// Read out of a conntrack entry (forward: backend and SNAT source; reply: frontend
    /// and client).
    #[inline(always)]
    pub fn of(entry: *const Ct4Value) -> Translation {
        // SAFETY: a lookup result, read at once.
        unsafe {
            Translation {
                addr: (*entry).nat_addr,
                port: (*entry).nat_port,
                snat: (*entry).flags & CT_FLAG_SNAT != 0,
                addr2: (*entry).nat2_addr,
                port2: (*entry).nat2_port,
            }
        }
    }

    /// A client's packet after a forward translation.
    #[inline(always)]
    pub fn forward(&self, pkt: &Packet) -> Tuple {
        let (saddr, sport) = if self.snat {
            (self.addr2, self.port2)
        } else {
            (pkt.saddr, pkt.sport)
        };
        Tuple {
            saddr,
            sport,
            daddr: self.addr,
            dport: self.port,
        }
    }

    /// A backend's packet after a reply translation.
    #[inline(always)]
    pub fn reply(&self, pkt: &Packet) -> Tuple {
        let (daddr, dport) = if self.snat {
            (self.addr2, self.port2)
        } else {
            (pkt.daddr, pkt.dport)
        };
        Tuple {
            saddr: self.addr,
            sport: self.port,
            daddr,
            dport,
        }
    }

    /// The client of a reply entry on `pkt` (a backend's packet): the packet's
    /// destination, or `nat2` when source-NAT-ed.
    #[inline(always)]
    pub fn client_of_reply(&self, pkt: &Packet) -> ([u8; 4], u16) {
        if self.snat {
            (self.addr2, self.port2)
        } else {
            (pkt.daddr, pkt.dport)
        }
    }
}

/// How a new connection's source is translated.
#[derive(Clone, Copy)]
pub enum Snat {
    /// Kept (DNAT only).
    None,
    /// Becomes this address and port (hairpin: the frontend and the client's own port,
    /// whose reply key is unique to the client's socket).
    Fixed([u8; 4], u16),
    /// Becomes `addr` and a port of `min..=max` that no other connection to the same
    /// backend uses (NodePort SNAT).
    Alloc { addr: [u8; 4], min: u16, max: u16 },
}

/// The packet's own 5-tuple: the forward key of a client packet, the reply key of a backend's.
#[inline(always)]
pub fn tuple_key(pkt: &Packet) -> Ct4Key {
    Ct4Key {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

/// The reply key of the connection of the packet's client translated by `t`: backend ->
/// client, or backend -> SNAT source.
#[inline(always)]
fn reply_key(pkt: &Packet, t: &Translation) -> Ct4Key {
    let fwd = t.forward(pkt);
    Ct4Key {
        saddr: fwd.daddr,
        daddr: fwd.saddr,
        sport: fwd.dport,
        dport: fwd.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

/// The clock of `last_seen_ns`: CLOCK_MONOTONIC_COARSE, the tick-granular clock (no
/// clocksource read), plenty for timeouts counted in seconds.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Records that a packet went through `entry` now, writing only when the recorded time is
/// over [`LAST_SEEN_REFRESH_NS`] old: most packets of a busy flow read the field and go on,
/// without dirtying the entry's cache line.
#[inline(always)]
pub fn touch(entry: *mut Ct4Value) {
    let now = now();
    // SAFETY: `entry` comes from a lookup in this program run; a racing writer stores a
    // time just as recent.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > LAST_SEEN_REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
}

/// Marks a reply entry as answered; true the first time (the connection's first reply).
#[inline(always)]
pub fn note_replied(entry: *mut Ct4Value) -> bool {
    // SAFETY: as in `touch`; a racing first reply at worst reports the event twice.
    unsafe {
        if (*entry).flags & CT_FLAG_REPLIED != 0 {
            return false;
        }
        (*entry).flags |= CT_FLAG_REPLIED;
    }
    true
}

/// Marks an entry as closing on a FIN or RST, writing only when the flag changes.
#[inline(always)]
pub fn note_closing(pkt: &Packet, entry: *mut Ct4Value) {
    if pkt.is_closing() {
        // SAFETY: `entry` comes from a lookup in this program run; a racing update of the
        // same entry at worst loses this flag, which the next FIN/RST sets again.
        unsafe {
            if (*entry).flags & CT_FLAG_CLOSING == 0 {
                (*entry).flags |= CT_FLAG_CLOSING;
            }
        }
    }
}

/// On a FIN/RST from a backend, also marks the client's forward entry, so that a new SYN on
/// the tuple picks a backend anew even when the backend ended the connection. `t` is the
/// reply entry's translation.
#[inline(always)]
pub fn note_closing_forward(pkt: &Packet, t: &Translation) {
    if !pkt.is_closing() {
        return;
    }
    let (client, client_port) = t.client_of_reply(pkt);
    let fwd = Ct4Key {
        saddr: client,
        daddr: t.addr,
        sport: client_port,
        dport: t.port,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    if let Some(entry) = CONNTRACK4.get_ptr_mut(fwd) {
        note_closing(pkt, entry);
        release(&fwd, entry);
    }
}

/// Gives back the connection's count in `backend_conns4`, once (see `sched::release_token`).
/// `fkey` and `entry` are the forward tuple and entry.
#[inline(always)]
pub fn release(fkey: &Ct4Key, entry: *mut Ct4Value) {
    // SAFETY: `entry` comes from a lookup in this program run. A racing writer of the
    // hint at worst costs another closing packet one token lookup.
    unsafe {
        if (*entry).counted == 0 {
            return;
        }
        (*entry).counted = 0;
    }
    sched::release_token(fkey);
}

/// Drops the forward entry of a closed connection whose tuple a new SYN reuses (after
/// releasing its count, in case a racing FIN lost its update).
#[inline(always)]
pub fn forget_forward(pkt: &Packet, entry: *mut Ct4Value) {
    let fkey = tuple_key(pkt);
    release(&fkey, entry);
    let _ = CONNTRACK4.remove(fkey);
}

/// Drops the reply entry of a forward entry (translation `t`) that is being replaced.
#[inline(always)]
pub fn forget_reply(pkt: &Packet, t: &Translation) {
    let _ = CONNTRACK4.remove(reply_key(pkt, t));
}

/// Why [`create`] made no connection.
pub enum CreateError {
    /// The map is full beyond what LRU eviction could free.
    Full,
    /// Every SNAT port tried is taken (or no SNAT address is configured).
    NoSnatPort,
}

/// How [`create`] went; both carry the translation the packet gets.
pub enum Created {
    /// Both entries are in; the connection goes to the chosen backend.
    New(Translation),
    /// Another CPU created the same tuple first (a retransmitted SYN racing the first):
    /// the connection goes that one's way.
    Raced(Translation),
}

/// Records a new connection from the packet's client to a backend, both directions, with
/// its source translated as `snat` says. With `count` (a TCP connection of a counting
/// scheduler, not already closing), the backend's `opened` counter gets one, the
/// connection a token in `counted4`, and the forward entry the `counted` hint.
///
/// The forward entry is inserted only if the tuple has none (`BPF_NOEXIST`; the caller
/// removed a closed one), so two CPUs racing on one tuple create it, and count it, once.
/// An SNAT port is taken by inserting the reply entry with `BPF_NOEXIST`: the insert that
/// succeeds owns the port, so two connections never share a reply key.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    svc_id: u32,
    backend_addr: [u8; 4],
    backend_port: u16,
    count: bool,
    snat: Snat,
) -> Result<Created, CreateError> {
    let last_seen_ns = now();
    let closing = pkt.is_closing();
    let flags = if closing { CT_FLAG_CLOSING } else { 0 };
    let mut reply = Ct4Value {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        dir: CT_DIR_REPLY,
        flags,
        svc_id,
        counted: 0,
        last_seen_ns,
        nat2_addr: [0; 4],
        nat2_port: 0,
        _pad: 0,
    };
    let mut t = Translation {
        addr: backend_addr,
        port: backend_port,
        snat: false,
        addr2: [0; 4],
        port2: 0,
    };
    let rkey = match snat {
        Snat::None => {
            let rkey = reply_key(pkt, &t);
            CONNTRACK4
                .insert(rkey, reply, BPF_ANY as u64)
                .map_err(|_| CreateError::Full)?;
            rkey
        }
        Snat::Fixed(addr, port) => {
            reply.flags |= CT_FLAG_SNAT;
            reply.nat2_addr = pkt.saddr;
            reply.nat2_port = pkt.sport;
            t.snat = true;
            t.addr2 = addr;
            t.port2 = port;
            let rkey = reply_key(pkt, &t);
            CONNTRACK4
                .insert(rkey, reply, BPF_ANY as u64)
                .map_err(|_| CreateError::Full)?;
            rkey
        }
        Snat::Alloc { addr, min, max } => {
            reply.flags |= CT_FLAG_SNAT;
            reply.nat2_addr = pkt.saddr;
            reply.nat2_port = pkt.sport;
            t.snat = true;
            t.addr2 = addr;
            alloc_port(pkt, &mut t, &reply, min, max)?
        }
    };
    let forward = Ct4Value {
        nat_addr: backend_addr,
        nat_port: backend_port,
        dir: CT_DIR_FORWARD,
        counted: 0,
        nat2_addr: t.addr2,
        nat2_port: t.port2,
        ..reply
    };
    let counters = if count && !closing {
        sched::conns_entry(BackendConnsKey {
            svc_id,
            addr: backend_addr,
            port: backend_port,
            _pad: 0,
        })
    } else {
        None
    };
    let forward = Ct4Value {
        counted: counters.is_some() as u32,
        ..forward
    };
    let fkey = tuple_key(pkt);
    if CONNTRACK4
        .insert(fkey, forward, BPF_NOEXIST as u64)
        .is_err()
    {
        let winner = CONNTRACK4
            .get_ptr(fkey)
            // SAFETY: a lookup result.
            .map(|e| (Translation::of(e), unsafe { (*e).dir }));
        return match winner {
            Some((w, CT_DIR_FORWARD)) => {
                if reply_key(pkt, &w) != rkey {
                    let _ = CONNTRACK4.remove(rkey);
                }
                Ok(Created::Raced(w))
            }
            _ => {
                let _ = CONNTRACK4.remove(rkey);
                Err(CreateError::Full)
            }
        };
    }
    if let Some(c) = counters {
        let key = BackendConnsKey {
            svc_id,
            addr: backend_addr,
            port: backend_port,
            _pad: 0,
        };
        if !sched::count_open(&fkey, key, c)
            && let Some(e) = CONNTRACK4.get_ptr_mut(fkey)
        {
            // SAFETY: a lookup result.
            unsafe { (*e).counted = 0 };
        }
    }
    Ok(Created::New(t))
}

/// State of an SNAT port search, passed to the `bpf_loop` callback (an unrolled loop of
/// map inserts multiplies the paths the verifier walks by the paths that lead to it;
/// `bpf_loop` has it check one iteration once).
#[repr(C)]
struct PortSearch {
    /// The reply key with the port to try in `dport`.
    key: Ct4Key,
    reply: Ct4Value,
    min: u32,
    range: u32,
    start: u32,
    /// 1 once `key.dport` is taken for this connection.
    found: u32,
}

/// Tries port number `i` of a search; returns 1 (stop) when the insert succeeded.
#[inline(never)]
extern "C" fn try_port(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `PortSearch` on the caller's stack that bpf_loop passes back.
    let s = unsafe { &mut *(ctx as *mut PortSearch) };
    let i = i as u32;
    if i >= s.range {
        return 1;
    }
    let mut off = s.start + i;
    if off >= s.range {
        off -= s.range;
    }
    s.key.dport = (s.min + off) as u16;
    if CONNTRACK4
        .insert(&s.key, &s.reply, BPF_NOEXIST as u64)
        .is_ok()
    {
        s.found = 1;
        return 1;
    }
    0
}

/// Takes a free SNAT port of `min..=max` for the connection: inserts its reply entry
/// (backend -> `t.addr2`:port) with `BPF_NOEXIST` at up to [`SNAT_PORT_TRIES`] ports from
/// a random start; sets `t.port2` and returns the reply key on success.
#[inline(always)]
fn alloc_port(
    pkt: &Packet,
    t: &mut Translation,
    reply: &Ct4Value,
    min: u16,
    max: u16,
) -> Result<Ct4Key, CreateError> {
    if max < min || t.addr2 == [0; 4] {
        return Err(CreateError::NoSnatPort);
    }
    let range = (max - min) as u32 + 1;
    let mut search = PortSearch {
        key: reply_key(pkt, t),
        reply: *reply,
        min: min as u32,
        range,
        // SAFETY: a helper without arguments.
        start: unsafe { bpf_get_prandom_u32() } % range,
        found: 0,
    };
    // SAFETY: the callback is a static function; the context is this stack variable.
    unsafe {
        bpf_loop(
            SNAT_PORT_TRIES,
            try_port as *mut c_void,
            &raw mut search as *mut c_void,
            0,
        )
    };
    if search.found == 0 {
        return Err(CreateError::NoSnatPort);
    }
    t.port2 = search.key.dport;
    Ok(search.key)
}
