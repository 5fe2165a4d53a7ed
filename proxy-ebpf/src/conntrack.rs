//! Connection tracking: one forward and one reply entry per NAT-ed connection.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use proxy_common::{
    conntrack::{
        CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, Ct4Key, Ct4Value,
        LAST_SEEN_REFRESH_NS,
    },
    service::BackendConnsKey,
};

use crate::{maps::CONNTRACK4, parse::Packet, sched};

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

/// The reply key of a connection from the packet's client to `backend`.
#[inline(always)]
fn reply_key(pkt: &Packet, backend_addr: [u8; 4], backend_port: u16) -> Ct4Key {
    Ct4Key {
        saddr: backend_addr,
        daddr: pkt.saddr,
        sport: backend_port,
        dport: pkt.sport,
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
/// the tuple picks a backend anew even when the backend ended the connection.
#[inline(always)]
pub fn note_closing_forward(pkt: &Packet, vip: [u8; 4], vip_port: u16) {
    if !pkt.is_closing() {
        return;
    }
    let fwd = Ct4Key {
        saddr: pkt.daddr,
        daddr: vip,
        sport: pkt.dport,
        dport: vip_port,
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

/// Drops the reply entry of a forward entry that is being replaced.
#[inline(always)]
pub fn forget_reply(pkt: &Packet, backend_addr: [u8; 4], backend_port: u16) {
    let _ = CONNTRACK4.remove(reply_key(pkt, backend_addr, backend_port));
}

/// The map is full beyond what LRU eviction could free.
pub struct ConntrackFull;

/// How [`create`] went.
pub enum Created {
    /// Both entries are in; the connection goes to the chosen backend.
    New,
    /// Another CPU created the same tuple first (a retransmitted SYN racing the first):
    /// the connection goes to that one's backend.
    Raced([u8; 4], u16),
}

/// Records a new connection from the packet's client to a backend, both directions. With
/// `count` (a TCP connection of a counting scheduler, not already closing), the backend's
/// `opened` counter gets one, the connection a token in `counted4`, and the forward entry
/// the `counted` hint.
///
/// The forward entry is inserted only if the tuple has none (`BPF_NOEXIST`; the caller
/// removed a closed one), so two CPUs racing on one tuple create it, and count it, once.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    svc_id: u32,
    backend_addr: [u8; 4],
    backend_port: u16,
    count: bool,
) -> Result<Created, ConntrackFull> {
    let last_seen_ns = now();
    let closing = pkt.is_closing();
    let flags = if closing { CT_FLAG_CLOSING } else { 0 };
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
    let reply = Ct4Value {
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
    let rkey = reply_key(pkt, backend_addr, backend_port);
    CONNTRACK4
        .insert(rkey, reply, BPF_ANY as u64)
        .map_err(|_| ConntrackFull)?;
    let forward = Ct4Value {
        nat_addr: backend_addr,
        nat_port: backend_port,
        dir: CT_DIR_FORWARD,
        counted: counters.is_some() as u32,
        ..reply
    };
    let fkey = tuple_key(pkt);
    if CONNTRACK4
        .insert(fkey, forward, BPF_NOEXIST as u64)
        .is_err()
    {
        let winner = CONNTRACK4.get_ptr(fkey).map(|e| {
            // SAFETY: a lookup result.
            unsafe { ((*e).nat_addr, (*e).nat_port, (*e).dir) }
        });
        return match winner {
            Some((addr, port, CT_DIR_FORWARD)) => {
                if (addr, port) != (backend_addr, backend_port) {
                    let _ = CONNTRACK4.remove(rkey);
                }
                Ok(Created::Raced(addr, port))
            }
            _ => {
                let _ = CONNTRACK4.remove(rkey);
                Err(ConntrackFull)
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
    Ok(Created::New)
}
