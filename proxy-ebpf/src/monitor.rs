//! Decision events for `bpfproxy monitor`. Each reporter first reads `monitor_cfg` (one
//! array lookup) and returns at once when no monitor runs; reporters sit only on paths that
//! already do more (a new connection, a connection's first reply, a drop), so an
//! established packet never pays for the monitor. The reporters with addresses are out of
//! line: their 40-byte event would otherwise take stack in the frames of the packet paths,
//! which the verifier limits to 512 bytes per call chain.

use aya_ebpf::{
    btf_maps::{Array, RingBuf},
    helpers::bpf_ktime_get_ns,
    macros::btf_map,
};
use proxy_common::{
    maps::MONITOR_RING_BYTES,
    monitor::{EV_DROP, EV_NEW, EV_REPLY, MonitorConfig, MonitorEvent},
};

use crate::parse::Packet4 as Packet;

/// Whether a monitor runs (written by `bpfproxy monitor`; the datapath only reads it).
#[btf_map(name = "monitor_cfg")]
pub static MONITOR_CFG: Array<MonitorConfig, 1> = Array::new();

/// The events, read by `bpfproxy monitor` from the pin. When it is full (a monitor too
/// slow), events are lost, never packets.
#[btf_map(name = "monitor_events")]
pub static MONITOR_EVENTS: RingBuf<MonitorEvent, { MONITOR_RING_BYTES as usize }> = RingBuf::new();

#[inline(always)]
fn enabled() -> bool {
    match MONITOR_CFG.get(0) {
        Some(cfg) => cfg.enabled != 0,
        None => false,
    }
}

#[inline(always)]
fn emit(event: MonitorEvent) {
    let _ = MONITOR_EVENTS.output(&event, 0);
}

#[inline(always)]
fn base(kind: u8, reason: u8, svc_id: u32, proto: u8) -> MonitorEvent {
    MonitorEvent {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        svc_id,
        kind,
        reason,
        proto,
        ..MonitorEvent::default()
    }
}

/// A new connection from the packet's client to `backend` (reason 0, or
/// `REASON_MIDSTREAM` for a lost connection picked up again).
#[inline(never)]
pub fn new_connection(
    pkt: &Packet,
    svc_id: u32,
    scheduler: u8,
    backend: ([u8; 4], u16),
    reason: u8,
) {
    if !enabled() {
        return;
    }
    emit(MonitorEvent {
        scheduler,
        client: pkt.saddr,
        client_port: pkt.sport,
        vip: pkt.daddr,
        vip_port: pkt.dport,
        backend: backend.0,
        backend_port: backend.1,
        ..base(EV_NEW, reason, svc_id, pkt.proto)
    });
}

/// The first reply of a connection: from the backend to `client`, translated to `vip`.
#[inline(never)]
pub fn first_reply(pkt: &Packet, svc_id: u32, client: ([u8; 4], u16), vip: ([u8; 4], u16)) {
    if !enabled() {
        return;
    }
    emit(MonitorEvent {
        client: client.0,
        client_port: client.1,
        vip: vip.0,
        vip_port: vip.1,
        backend: pkt.saddr,
        backend_port: pkt.sport,
        ..base(EV_REPLY, 0, svc_id, pkt.proto)
    });
}

/// A packet from the client to a service that was not forwarded (or not translated).
#[inline(never)]
pub fn dropped(pkt: &Packet, svc_id: u32, reason: u8) {
    if !enabled() {
        return;
    }
    emit(MonitorEvent {
        client: pkt.saddr,
        client_port: pkt.sport,
        vip: pkt.daddr,
        vip_port: pkt.dport,
        ..base(EV_DROP, reason, svc_id, pkt.proto)
    });
}

/// A packet whose headers could not be parsed (no addresses to report).
#[inline(always)]
pub fn malformed(reason: u8) {
    if !enabled() {
        return;
    }
    emit(base(EV_DROP, reason, 0, 0));
}
