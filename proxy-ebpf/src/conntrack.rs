//! Connection tracking: one forward and one reply entry per NAT-ed connection, in
//! `conntrack4` or `conntrack6` (generic over the [`Family`]).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_loop},
};
use proxy_common::conntrack::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, CT_FLAG_SNAT,
    LAST_SEEN_REFRESH_NS,
};

use crate::{
    family::{CtEntry, CtScratch, Family},
    nat::Tuple,
    parse::Packet,
    sched,
};

/// Ports tried for a new SNAT-ed connection before giving up (ERR_SNAT_PORTS). Starting
/// at a random port of the range, with a range mostly free each try is a hit; the bound
/// keeps the program's worst case small when the range is nearly full.
pub const SNAT_PORT_TRIES: u32 = 16;

/// What a forward entry says to do with a client's packet: the backend, and with
/// `snat` the new source (`addr2:port2`) too.
#[derive(Clone, Copy)]
pub struct Translation<A> {
    pub addr: A,
    pub port: u16,
    pub snat: bool,
    pub addr2: A,
    pub port2: u16,
}

impl<A: Copy> Translation<A> {
    /// Read out of a conntrack entry (forward: backend and SNAT source; reply: frontend
    /// and client).
    #[inline(always)]
    pub fn of<V: CtEntry<A>>(entry: *mut V) -> Translation<A> {
        let (addr, port) = V::nat(entry);
        let (addr2, port2) = V::nat2(entry);
        // SAFETY: a lookup result, read at once.
        let flags = unsafe { *V::flags(entry) };
        Translation {
            addr,
            port,
            snat: flags & CT_FLAG_SNAT != 0,
            addr2,
            port2,
        }
    }

    /// A client's packet after a forward translation.
    #[inline(always)]
    pub fn forward(&self, pkt: &Packet<A>) -> Tuple<A> {
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
    pub fn reply(&self, pkt: &Packet<A>) -> Tuple<A> {
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
    pub fn client_of_reply(&self, pkt: &Packet<A>) -> (A, u16) {
        if self.snat {
            (self.addr2, self.port2)
        } else {
            (pkt.daddr, pkt.dport)
        }
    }
}

/// How a new connection's source is translated.
#[derive(Clone, Copy)]
pub enum Snat<A> {
    /// Kept (DNAT only).
    None,
    /// Becomes this address and port (hairpin: the frontend and the client's own port,
    /// whose reply key is unique to the client's socket).
    Fixed(A, u16),
    /// Becomes `addr` and a port of `min..=max` that no other connection to the same
    /// backend uses (NodePort SNAT).
    Alloc { addr: A, min: u16, max: u16 },
}

/// The packet's own 5-tuple: the forward key of a client packet, the reply key of a backend's.
#[inline(always)]
pub fn tuple_key<F: Family>(pkt: &Packet<F::Addr>) -> F::CtKey {
    F::ct_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
}

/// The reply key of the connection of the packet's client translated by `t`: backend ->
/// client, or backend -> SNAT source.
#[inline(always)]
fn reply_key<F: Family>(pkt: &Packet<F::Addr>, t: &Translation<F::Addr>) -> F::CtKey {
    let fwd = t.forward(pkt);
    F::ct_key(fwd.daddr, fwd.saddr, fwd.dport, fwd.sport, pkt.proto)
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
pub fn touch<F: Family>(entry: *mut F::Ct) {
    let now = now();
    let last = F::Ct::last_seen(entry);
    // SAFETY: `entry` comes from a lookup in this program run; a racing writer stores a
    // time just as recent.
    unsafe {
        if now.wrapping_sub(*last) > LAST_SEEN_REFRESH_NS {
            *last = now;
        }
    }
}

/// Marks a reply entry as answered; true the first time (the connection's first reply).
#[inline(always)]
pub fn note_replied<F: Family>(entry: *mut F::Ct) -> bool {
    let flags = F::Ct::flags(entry);
    // SAFETY: as in `touch`; a racing first reply at worst reports the event twice.
    unsafe {
        if *flags & CT_FLAG_REPLIED != 0 {
            return false;
        }
        *flags |= CT_FLAG_REPLIED;
    }
    true
}

/// Marks an entry as closing on a FIN or RST, writing only when the flag changes.
#[inline(always)]
pub fn note_closing<F: Family>(pkt: &Packet<F::Addr>, entry: *mut F::Ct) {
    if pkt.is_closing() {
        let flags = F::Ct::flags(entry);
        // SAFETY: `entry` comes from a lookup in this program run; a racing update of the
        // same entry at worst loses this flag, which the next FIN/RST sets again.
        unsafe {
            if *flags & CT_FLAG_CLOSING == 0 {
                *flags |= CT_FLAG_CLOSING;
            }
        }
    }
}

/// On a FIN/RST from a backend, also marks the client's forward entry, so that a new SYN on
/// the tuple picks a backend anew even when the backend ended the connection. `t` is the
/// reply entry's translation.
#[inline(always)]
pub fn note_closing_forward<F: Family>(pkt: &Packet<F::Addr>, t: &Translation<F::Addr>) {
    if !pkt.is_closing() {
        return;
    }
    let (client, client_port) = t.client_of_reply(pkt);
    let fwd = F::ct_key(client, t.addr, client_port, t.port, pkt.proto);
    if let Some(entry) = F::conntrack().get_ptr_mut(&fwd) {
        note_closing::<F>(pkt, entry);
        release::<F>(&fwd, entry);
    }
}

/// Gives back the connection's count in `backend_conns4`, once (see `sched::release_token`).
/// `fkey` and `entry` are the forward tuple and entry.
#[inline(always)]
pub fn release<F: Family>(fkey: &F::CtKey, entry: *mut F::Ct) {
    let counted = F::Ct::counted(entry);
    // SAFETY: `entry` comes from a lookup in this program run. A racing writer of the
    // hint at worst costs another closing packet one token lookup.
    unsafe {
        if *counted == 0 {
            return;
        }
        *counted = 0;
    }
    sched::release_token::<F>(fkey);
}

/// Drops the forward entry of a closed connection whose tuple a new SYN reuses (after
/// releasing its count, in case a racing FIN lost its update).
#[inline(always)]
pub fn forget_forward<F: Family>(pkt: &Packet<F::Addr>, entry: *mut F::Ct) {
    let fkey = tuple_key::<F>(pkt);
    release::<F>(&fkey, entry);
    let _ = F::conntrack().remove(&fkey);
}

/// Drops the reply entry of a forward entry (translation `t`) that is being replaced.
#[inline(always)]
pub fn forget_reply<F: Family>(pkt: &Packet<F::Addr>, t: &Translation<F::Addr>) {
    let _ = F::conntrack().remove(&reply_key::<F>(pkt, t));
}

/// Why [`create`] made no connection.
pub enum CreateError {
    /// The map is full beyond what LRU eviction could free.
    Full,
    /// Every SNAT port tried is taken (or no SNAT address is configured).
    NoSnatPort,
}

/// How [`create`] went; both carry the translation the packet gets.
pub enum Created<A> {
    /// Both entries are in; the connection goes to the chosen backend.
    New(Translation<A>),
    /// Another CPU created the same tuple first (a retransmitted SYN racing the first):
    /// the connection goes that one's way.
    Raced(Translation<A>),
}

/// A connection [`create`] is asked to record: to backend `addr:port` of service `svc_id`,
/// counted in `backend_conns` if `count`, its source translated as `snat` says.
pub struct NewConn<A> {
    pub svc_id: u32,
    pub addr: A,
    pub port: u16,
    pub count: bool,
    pub snat: Snat<A>,
}

/// Records a new connection from the packet's client to a backend, both directions, with
/// its source translated as `snat` says. Out of line: only new connections come here, and
/// its keys and values (large for IPv6) get their own stack frame. With `count` (a TCP connection of a counting
/// scheduler, not already closing), the backend's `opened` counter gets one, the
/// connection a token in `counted4`, and the forward entry the `counted` hint.
///
/// The forward entry is inserted only if the tuple has none (`BPF_NOEXIST`; the caller
/// removed a closed one), so two CPUs racing on one tuple create it, and count it, once.
/// An SNAT port is taken by inserting the reply entry with `BPF_NOEXIST`: the insert that
/// succeeds owns the port, so two connections never share a reply key.
#[inline(always)]
pub fn create<F: Family>(
    pkt: &Packet<F::Addr>,
    new: &NewConn<F::Addr>,
) -> Result<Created<F::Addr>, CreateError> {
    let (svc_id, backend_addr, backend_port) = (new.svc_id, new.addr, new.port);
    let last_seen_ns = now();
    let closing = pkt.is_closing();
    let mut flags = if closing { CT_FLAG_CLOSING } else { 0 };
    let (snat, addr2, port2) = match new.snat {
        Snat::None => (false, F::ZERO, 0),
        Snat::Fixed(addr, port) => (true, addr, port),
        Snat::Alloc { addr, .. } => (true, addr, 0),
    };
    let mut t = Translation {
        addr: backend_addr,
        port: backend_port,
        snat,
        addr2,
        port2,
    };
    // The reply entry remembers the client as `nat2` when its source is translated.
    let client = if snat {
        flags |= CT_FLAG_SNAT;
        (pkt.saddr, pkt.sport)
    } else {
        (F::ZERO, 0)
    };
    // Keys and values are built in this CPU's scratch entry, not on the stack: the
    // verifier's 512 bytes must hold a whole call chain, and IPv6 ones are large.
    let Some(sc) = F::ct_scratch() else {
        return Err(CreateError::Full);
    };
    // SAFETY: this CPU's own slot, used by one program run at a time.
    let sc = unsafe { &mut *sc };
    sc.reply = F::Ct::new(
        (pkt.daddr, pkt.dport),
        client,
        CT_DIR_REPLY,
        flags,
        svc_id,
        0,
        last_seen_ns,
    );
    let ct = F::conntrack();
    match new.snat {
        Snat::Alloc { min, max, .. } => alloc_port::<F>(pkt, &mut t, sc, min, max)?,
        _ => {
            sc.rkey = reply_key::<F>(pkt, &t);
            ct.insert(&sc.rkey, &sc.reply, BPF_ANY as u64)
                .map_err(|_| CreateError::Full)?;
        }
    }
    sc.conns = F::conns_key(svc_id, backend_addr, backend_port);
    let counters = if new.count && !closing {
        sched::conns_entry::<F>(&sc.conns)
    } else {
        None
    };
    sc.forward = F::Ct::new(
        (backend_addr, backend_port),
        (t.addr2, t.port2),
        CT_DIR_FORWARD,
        flags,
        svc_id,
        counters.is_some() as u32,
        last_seen_ns,
    );
    sc.fkey = tuple_key::<F>(pkt);
    if ct
        .insert(&sc.fkey, &sc.forward, BPF_NOEXIST as u64)
        .is_err()
    {
        let winner = ct
            .get_ptr_mut(&sc.fkey)
            .map(|e| (Translation::of(e), F::Ct::dir(e)));
        return match winner {
            Some((w, CT_DIR_FORWARD)) => {
                // The winner's reply key, in the forward key's place (no longer needed).
                sc.fkey = reply_key::<F>(pkt, &w);
                if !F::same_key(&sc.fkey, &sc.rkey) {
                    let _ = ct.remove(&sc.rkey);
                }
                Ok(Created::Raced(w))
            }
            _ => {
                let _ = ct.remove(&sc.rkey);
                Err(CreateError::Full)
            }
        };
    }
    if let Some(c) = counters
        && !sched::count_open::<F>(&sc.fkey, &sc.conns, c)
        && let Some(e) = ct.get_ptr_mut(&sc.fkey)
    {
        // SAFETY: a lookup result.
        unsafe { *F::Ct::counted(e) = 0 };
    }
    Ok(Created::New(t))
}

/// State of an SNAT port search, passed to the `bpf_loop` callback (an unrolled loop of
/// map inserts multiplies the paths the verifier walks by the paths that lead to it;
/// `bpf_loop` has it check one iteration once). The reply key and value are in this
/// CPU's conntrack scratch entry (`rkey`, `reply`).
#[repr(C)]
struct PortSearch {
    min: u32,
    range: u32,
    start: u32,
    /// 1 once the scratch `rkey.dport` is taken for this connection.
    found: u32,
}

/// Tries port number `i` of a search; returns 1 (stop) when the insert succeeded. One
/// plain function per family (monomorphised), as bpf_loop wants.
#[inline(never)]
extern "C" fn try_port<F: Family>(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `PortSearch` on the caller's stack that bpf_loop passes back.
    let s = unsafe { &mut *(ctx as *mut PortSearch) };
    let i = i as u32;
    if i >= s.range {
        return 1;
    }
    let Some(sc) = F::ct_scratch() else {
        return 1;
    };
    // SAFETY: this CPU's scratch entry, filled by the caller in this program run.
    let sc = unsafe { &mut *sc };
    let mut off = s.start + i;
    if off >= s.range {
        off -= s.range;
    }
    *F::ct_key_dport(&mut sc.rkey) = (s.min + off) as u16;
    if F::conntrack()
        .insert(&sc.rkey, &sc.reply, BPF_NOEXIST as u64)
        .is_ok()
    {
        s.found = 1;
        return 1;
    }
    0
}

/// Takes a free SNAT port of `min..=max` for the connection: inserts its reply entry
/// (`sc.reply`, key backend -> `t.addr2`:port in `sc.rkey`) with `BPF_NOEXIST` at up to
/// [`SNAT_PORT_TRIES`] ports from a random start; sets `t.port2` on success.
#[inline(always)]
fn alloc_port<F: Family>(
    pkt: &Packet<F::Addr>,
    t: &mut Translation<F::Addr>,
    sc: &mut CtScratch<F::CtKey, F::Ct, F::ConnsKey>,
    min: u16,
    max: u16,
) -> Result<(), CreateError> {
    if max < min || F::same(&t.addr2, &F::ZERO) {
        return Err(CreateError::NoSnatPort);
    }
    let range = (max - min) as u32 + 1;
    sc.rkey = reply_key::<F>(pkt, t);
    let mut search = PortSearch {
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
            try_port::<F> as *mut c_void,
            &raw mut search as *mut c_void,
            0,
        )
    };
    if search.found == 0 {
        return Err(CreateError::NoSnatPort);
    }
    t.port2 = *F::ct_key_dport(&mut sc.rkey);
    Ok(())
}
