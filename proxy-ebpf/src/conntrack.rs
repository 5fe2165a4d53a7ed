//! Connection tracking: one forward and one reply entry per NAT-ed connection.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use proxy_common::conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, Ct4Key, Ct4Value};

use crate::{maps::CONNTRACK4, parse::Packet};

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
    }
}

/// Drops the reply entry of a forward entry that is being replaced.
#[inline(always)]
pub fn forget_reply(pkt: &Packet, backend_addr: [u8; 4], backend_port: u16) {
    let _ = CONNTRACK4.remove(reply_key(pkt, backend_addr, backend_port));
}

/// The map is full beyond what LRU eviction could free.
pub struct ConntrackFull;

/// Records a new connection from the packet's client to a backend, both directions.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    svc_id: u32,
    backend_addr: [u8; 4],
    backend_port: u16,
) -> Result<(), ConntrackFull> {
    // SAFETY: a helper without arguments or side effects.
    let created_ns = unsafe { bpf_ktime_get_ns() };
    let flags = if pkt.is_closing() { CT_FLAG_CLOSING } else { 0 };
    let reply = Ct4Value {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        dir: CT_DIR_REPLY,
        flags,
        svc_id,
        _pad: 0,
        created_ns,
    };
    let rkey = reply_key(pkt, backend_addr, backend_port);
    CONNTRACK4
        .insert(rkey, reply, BPF_ANY as u64)
        .map_err(|_| ConntrackFull)?;
    let forward = Ct4Value {
        nat_addr: backend_addr,
        nat_port: backend_port,
        dir: CT_DIR_FORWARD,
        ..reply
    };
    if CONNTRACK4
        .insert(tuple_key(pkt), forward, BPF_ANY as u64)
        .is_err()
    {
        let _ = CONNTRACK4.remove(rkey);
        return Err(ConntrackFull);
    }
    Ok(())
}
