//! The address family the datapath serves a packet in. The service, conntrack,
//! scheduler and XDP code is written once, generic over [`Family`], and monomorphised for
//! [`V4`] and [`V6`] (as `parse` is generic over tc and XDP contexts): each family has
//! its own maps (`*4`, `*6`), key and value types and header rewrites, and both share the
//! maps keyed by svc_id or backend table (`maglev4`, `sched_rr4`, `svc_counters`, `stats`,
//! `reply_filter4`).
//!
//! Monitor events stay IPv4-only this session: [`V6`]'s reporters do nothing.
//!
//! Stack: the verifier allows 512 bytes for a whole call chain. Each family's path is out
//! of line (`tc_family`, `xdp::serve`) so the two do not add up in one frame, and the IPv6
//! path keeps what LLVM would otherwise hold in registers and spill: its packet in a
//! per-CPU scratch entry ([`Family::stash`]), addresses as two words ([`A6`]), a new
//! connection's keys and values in [`CtScratch`], checksums of long spans summed by
//! `bpf_csum_diff`. Measured frames (tc / XDP): IPv4 about 340 / 300 bytes, IPv6 about
//! 380 / 370, plus the entry point's and a bpf_loop callback's.

use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    conntrack::{Ct4Key, Ct4Value, Ct6Key, Ct6Value},
    hash,
    maps::{DEFAULT_AFFINITY, DEFAULT_BACKEND_SLOTS, DEFAULT_CONNTRACK},
    reply_filter,
    service::{
        Affinity6Key, Affinity6Value, AffinityKey, AffinityValue, Backend4, Backend6, BackendConns,
        BackendConns6Key, BackendConnsKey, BackendSlotKey, SourceRange4Key, SourceRange6Key,
        Svc4Key, Svc6Key, SvcValue,
    },
};

use crate::{
    maps::{
        AFFINITY4, AFFINITY6, BACKEND_CONNS4, BACKEND_CONNS6, BACKEND_SLOTS4, BACKEND_SLOTS6,
        CONNTRACK4, CONNTRACK6, COUNTED4, COUNTED6, NODE_CFG4, NODE_CFG6, SERVICES4, SERVICES6,
        SRC_RANGES4, SRC_RANGES6,
    },
    monitor,
    nat::{self, RewriteError, Tuple},
    parse::{self, A6, Packet, PacketCtx, Skip},
    reject::{self, RejectError},
    xdp,
};

const CT_SIZE: usize = DEFAULT_CONNTRACK as usize;
const SLOTS: usize = DEFAULT_BACKEND_SLOTS as usize;
const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

/// Where `conntrack::create` builds a new connection's keys and values (see there).
#[repr(C)]
pub struct CtScratch<K, V, C> {
    pub fkey: K,
    pub rkey: K,
    pub reply: V,
    pub forward: V,
    pub conns: C,
}

/// Not pinned: scratch space only.
#[btf_map(name = "ct4_scratch")]
static CT4_SCRATCH: PerCpuArray<CtScratch<Ct4Key, Ct4Value, BackendConnsKey>, 1> =
    PerCpuArray::new();
#[btf_map(name = "ct6_scratch")]
static CT6_SCRATCH: PerCpuArray<CtScratch<Ct6Key, Ct6Value, BackendConns6Key>, 1> =
    PerCpuArray::new();

/// Where the IPv6 path keeps its packet (see [`Family::stash`]). Not pinned.
#[btf_map(name = "pkt6_scratch")]
static PKT6_SCRATCH: PerCpuArray<Packet<A6>, 1> = PerCpuArray::new();

/// What the external view needs of `node_cfg4`/`node_cfg6`.
#[derive(Clone, Copy)]
pub struct Node<A> {
    pub snat_addr: A,
    pub port_min: u16,
    pub port_max: u16,
    pub flags: u32,
}

/// An address of the datapath and its wire form in the map types.
pub trait Wire<W> {
    fn wire(self) -> W;
    fn from_wire(w: W) -> Self;
}

impl Wire<[u8; 4]> for [u8; 4] {
    #[inline(always)]
    fn wire(self) -> [u8; 4] {
        self
    }
    #[inline(always)]
    fn from_wire(w: [u8; 4]) -> Self {
        w
    }
}

impl Wire<[u8; 16]> for A6 {
    #[inline(always)]
    fn wire(self) -> [u8; 16] {
        self.bytes()
    }
    #[inline(always)]
    fn from_wire(w: [u8; 16]) -> Self {
        A6::new(w)
    }
}

/// A conntrack value (`Ct4Value`, `Ct6Value`): built whole, then read and written
/// through the pointer a lookup gave, field by field.
pub trait CtEntry<A>: Copy {
    #[allow(clippy::too_many_arguments)]
    fn new(
        nat: (A, u16),
        nat2: (A, u16),
        dir: u8,
        flags: u8,
        svc_id: u32,
        counted: u32,
        last_seen_ns: u64,
    ) -> Self;
    fn nat(p: *const Self) -> (A, u16);
    fn nat2(p: *const Self) -> (A, u16);
    fn dir(p: *const Self) -> u8;
    fn svc_id(p: *const Self) -> u32;
    fn flags(p: *mut Self) -> *mut u8;
    fn counted(p: *mut Self) -> *mut u32;
    fn last_seen(p: *mut Self) -> *mut u64;
}

macro_rules! ct_entry {
    ($value:ty, $addr:ty) => {
        impl CtEntry<$addr> for $value {
            #[inline(always)]
            fn new(
                nat: ($addr, u16),
                nat2: ($addr, u16),
                dir: u8,
                flags: u8,
                svc_id: u32,
                counted: u32,
                last_seen_ns: u64,
            ) -> Self {
                Self {
                    nat_addr: Wire::wire(nat.0),
                    nat_port: nat.1,
                    nat2_addr: Wire::wire(nat2.0),
                    nat2_port: nat2.1,
                    dir,
                    flags,
                    svc_id,
                    counted,
                    last_seen_ns,
                    _pad: 0,
                }
            }
            // SAFETY (all accessors): `p` is a lookup result of this program run or a
            // value on the stack; fields are read or addressed, never moved.
            #[inline(always)]
            fn nat(p: *const Self) -> ($addr, u16) {
                unsafe { (Wire::from_wire((*p).nat_addr), (*p).nat_port) }
            }
            #[inline(always)]
            fn nat2(p: *const Self) -> ($addr, u16) {
                unsafe { (Wire::from_wire((*p).nat2_addr), (*p).nat2_port) }
            }
            #[inline(always)]
            fn dir(p: *const Self) -> u8 {
                unsafe { (*p).dir }
            }
            #[inline(always)]
            fn svc_id(p: *const Self) -> u32 {
                unsafe { (*p).svc_id }
            }
            #[inline(always)]
            fn flags(p: *mut Self) -> *mut u8 {
                unsafe { &raw mut (*p).flags }
            }
            #[inline(always)]
            fn counted(p: *mut Self) -> *mut u32 {
                unsafe { &raw mut (*p).counted }
            }
            #[inline(always)]
            fn last_seen(p: *mut Self) -> *mut u64 {
                unsafe { &raw mut (*p).last_seen_ns }
            }
        }
    };
}
ct_entry!(Ct4Value, [u8; 4]);
ct_entry!(Ct6Value, A6);

/// A backend slot value (`Backend4`, `Backend6`): (addr, port, flags, weight).
pub trait BackendEntry<A> {
    fn read(p: *const Self) -> (A, u16, u8, u8);
}

macro_rules! backend_entry {
    ($value:ty, $addr:ty) => {
        impl BackendEntry<$addr> for $value {
            #[inline(always)]
            fn read(p: *const Self) -> ($addr, u16, u8, u8) {
                // SAFETY: a lookup result, read at once.
                unsafe {
                    (
                        Wire::from_wire((*p).addr),
                        (*p).port,
                        (*p).flags,
                        (*p).weight,
                    )
                }
            }
        }
    };
}
backend_entry!(Backend4, [u8; 4]);
backend_entry!(Backend6, A6);

/// One address family of the datapath: its types, maps and header rewrites.
pub trait Family: 'static {
    type Addr: Copy;
    type CtKey: Copy;
    type Ct: CtEntry<Self::Addr>;
    type Backend: BackendEntry<Self::Addr>;
    type ConnsKey: Copy;
    type AffKey: Copy;
    type AffValue: Copy;
    /// The unspecified address (`0.0.0.0`, `::`): "no SNAT address".
    const ZERO: Self::Addr;

    /// Address equality. Written out for IPv6 as four word compares: LLVM's BPF backend
    /// crashes on the 16-byte array comparison (memcmp) it would otherwise emit.
    fn same(a: &Self::Addr, b: &Self::Addr) -> bool;
    fn same_key(a: &Self::CtKey, b: &Self::CtKey) -> bool;
    /// Where the path keeps the parsed packet: IPv4 on the stack (`pkt` itself), IPv6 in
    /// a per-CPU scratch entry. Fields read through a pointer to map memory are loaded
    /// again after each helper call instead of being held in registers and spilled, which
    /// keeps the IPv6 path's stack frame within the verifier's limit.
    fn stash(pkt: &Packet<Self::Addr>) -> Option<*const Packet<Self::Addr>>;
    /// Parses the IP and L4 headers of a frame of this family.
    fn parse<C: PacketCtx>(ctx: &C) -> Result<Packet<Self::Addr>, Skip>;
    fn service(addr: Self::Addr, port: u16, proto: u8, scope: u8) -> Option<*const SvcValue>;
    fn ct_key(
        saddr: Self::Addr,
        daddr: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> Self::CtKey;
    /// The destination port of a conntrack key (an SNAT port search tries several).
    fn ct_key_dport(key: &mut Self::CtKey) -> &mut u16;
    fn conntrack() -> &'static LruHashMap<Self::CtKey, Self::Ct, CT_SIZE>;
    /// This CPU's scratch entry for new connections.
    fn ct_scratch() -> Option<*mut CtScratch<Self::CtKey, Self::Ct, Self::ConnsKey>>;
    fn backend_slots() -> &'static HashMap<BackendSlotKey, Self::Backend, SLOTS>;
    fn conns_key(svc_id: u32, addr: Self::Addr, port: u16) -> Self::ConnsKey;
    fn backend_conns() -> &'static HashMap<Self::ConnsKey, BackendConns, SLOTS, NO_PREALLOC>;
    fn counted() -> &'static HashMap<Self::CtKey, Self::ConnsKey, { CT_SIZE / 2 }, NO_PREALLOC>;
    fn aff_key(svc_id: u32, client: Self::Addr) -> Self::AffKey;
    fn aff_value(addr: Self::Addr, port: u16, slot: u32, last_ns: u64) -> Self::AffValue;
    /// (addr, port, slot, last_ns) of an affinity entry.
    fn aff_read(p: *const Self::AffValue) -> (Self::Addr, u16, u32, u64);
    fn aff_set(p: *mut Self::AffValue, slot: u32, last_ns: u64);
    fn affinity() -> &'static LruHashMap<Self::AffKey, Self::AffValue, { DEFAULT_AFFINITY as usize }>;
    fn node() -> Option<Node<Self::Addr>>;
    /// The client is inside one of the frontend's loadBalancerSourceRanges.
    fn source_allowed(svc_id: u32, client: Self::Addr) -> bool;
    /// The backend's bit in `reply_filter4`.
    fn reply_bit(addr: Self::Addr, port: u16, proto: u8) -> u32;
    /// An address as the 4 bytes the shared hashes (`proxy_common::hash`) take.
    fn hash_word(addr: Self::Addr) -> [u8; 4];

    fn rewrite_dst(
        ctx: &TcContext,
        pkt: &Packet<Self::Addr>,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), RewriteError>;
    fn rewrite_src(
        ctx: &TcContext,
        pkt: &Packet<Self::Addr>,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), RewriteError>;
    fn rewrite_both(
        ctx: &TcContext,
        pkt: &Packet<Self::Addr>,
        new: &Tuple<Self::Addr>,
    ) -> Result<(), RewriteError>;
    fn rewrite_xdp(
        ctx: &XdpContext,
        pkt: &Packet<Self::Addr>,
        new: &Tuple<Self::Addr>,
    ) -> Result<(), RewriteError>;
    /// Turns the packet into a port unreachable back to its sender (tc).
    fn reject(ctx: &TcContext, pkt: &Packet<Self::Addr>) -> Result<i32, RejectError>;
    /// As [`Family::reject`], at XDP.
    fn reject_xdp(ctx: &XdpContext, pkt: &Packet<Self::Addr>) -> Result<u32, RejectError>;
    /// Forwards a translated frame with the FIB at XDP, or passes it (see `xdp::forward`).
    fn forward(ctx: &XdpContext) -> u32;

    fn mon_dropped(pkt: &Packet<Self::Addr>, svc_id: u32, reason: u8);
    fn mon_new(
        pkt: &Packet<Self::Addr>,
        svc_id: u32,
        scheduler: u8,
        backend: (Self::Addr, u16),
        reason: u8,
    );
    fn mon_first_reply(
        pkt: &Packet<Self::Addr>,
        svc_id: u32,
        client: (Self::Addr, u16),
        vip: (Self::Addr, u16),
    );
}

/// IPv4.
pub struct V4;
/// IPv6.
pub struct V6;

impl Family for V4 {
    type Addr = [u8; 4];
    type CtKey = Ct4Key;
    type Ct = Ct4Value;
    type Backend = Backend4;
    type ConnsKey = BackendConnsKey;
    type AffKey = AffinityKey;
    type AffValue = AffinityValue;
    const ZERO: [u8; 4] = [0; 4];

    #[inline(always)]
    fn same(a: &[u8; 4], b: &[u8; 4]) -> bool {
        a == b
    }
    #[inline(always)]
    fn same_key(a: &Ct4Key, b: &Ct4Key) -> bool {
        a == b
    }
    #[inline(always)]
    fn stash(pkt: &Packet<[u8; 4]>) -> Option<*const Packet<[u8; 4]>> {
        Some(pkt)
    }
    #[inline(always)]
    fn parse<C: PacketCtx>(ctx: &C) -> Result<Packet<[u8; 4]>, Skip> {
        parse::parse4(ctx)
    }

    #[inline(always)]
    fn service(addr: [u8; 4], port: u16, proto: u8, scope: u8) -> Option<*const SvcValue> {
        SERVICES4.get_ptr(Svc4Key {
            addr,
            port,
            proto,
            scope,
        })
    }
    #[inline(always)]
    fn ct_key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> Ct4Key {
        Ct4Key {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn ct_key_dport(key: &mut Ct4Key) -> &mut u16 {
        &mut key.dport
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Ct4Key, Ct4Value, CT_SIZE> {
        &CONNTRACK4
    }
    #[inline(always)]
    fn ct_scratch() -> Option<*mut CtScratch<Ct4Key, Ct4Value, BackendConnsKey>> {
        CT4_SCRATCH.get_ptr_mut(0)
    }
    #[inline(always)]
    fn backend_slots() -> &'static HashMap<BackendSlotKey, Backend4, SLOTS> {
        &BACKEND_SLOTS4
    }
    #[inline(always)]
    fn conns_key(svc_id: u32, addr: [u8; 4], port: u16) -> BackendConnsKey {
        BackendConnsKey {
            svc_id,
            addr,
            port,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn backend_conns() -> &'static HashMap<BackendConnsKey, BackendConns, SLOTS, NO_PREALLOC> {
        &BACKEND_CONNS4
    }
    #[inline(always)]
    fn counted() -> &'static HashMap<Ct4Key, BackendConnsKey, { CT_SIZE / 2 }, NO_PREALLOC> {
        &COUNTED4
    }
    #[inline(always)]
    fn aff_key(svc_id: u32, client: [u8; 4]) -> AffinityKey {
        AffinityKey { svc_id, client }
    }
    #[inline(always)]
    fn aff_value(addr: [u8; 4], port: u16, slot: u32, last_ns: u64) -> AffinityValue {
        AffinityValue {
            addr,
            port,
            _pad: 0,
            slot,
            _pad2: 0,
            last_ns,
        }
    }
    #[inline(always)]
    fn aff_read(p: *const AffinityValue) -> ([u8; 4], u16, u32, u64) {
        // SAFETY: a lookup result, read at once.
        unsafe { ((*p).addr, (*p).port, (*p).slot, (*p).last_ns) }
    }
    #[inline(always)]
    fn aff_set(p: *mut AffinityValue, slot: u32, last_ns: u64) {
        // SAFETY: a lookup result of this program run.
        unsafe {
            (*p).last_ns = last_ns;
            if (*p).slot != slot {
                (*p).slot = slot;
            }
        }
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey, AffinityValue, { DEFAULT_AFFINITY as usize }>
    {
        &AFFINITY4
    }
    #[inline(always)]
    fn node() -> Option<Node<[u8; 4]>> {
        NODE_CFG4.get(0).map(|c| Node {
            snat_addr: c.snat_addr,
            port_min: c.snat_port_min,
            port_max: c.snat_port_max,
            flags: c.flags,
        })
    }
    #[inline(always)]
    fn source_allowed(svc_id: u32, client: [u8; 4]) -> bool {
        // The trie matches svc_id's 32 bits whole, then the longest range prefix.
        let key = Key::new(
            64,
            SourceRange4Key {
                svc_id_be: svc_id.to_be_bytes(),
                addr: client,
            },
        );
        SRC_RANGES4.get(&key).is_some()
    }
    #[inline(always)]
    fn reply_bit(addr: [u8; 4], port: u16, proto: u8) -> u32 {
        reply_filter::bit(addr, port, proto)
    }
    #[inline(always)]
    fn hash_word(addr: [u8; 4]) -> [u8; 4] {
        addr
    }
    #[inline(always)]
    fn rewrite_dst(
        ctx: &TcContext,
        pkt: &Packet<[u8; 4]>,
        addr: [u8; 4],
        port: u16,
    ) -> Result<(), RewriteError> {
        nat::rewrite_dst(ctx, pkt, addr, port)
    }
    #[inline(always)]
    fn rewrite_src(
        ctx: &TcContext,
        pkt: &Packet<[u8; 4]>,
        addr: [u8; 4],
        port: u16,
    ) -> Result<(), RewriteError> {
        nat::rewrite_src(ctx, pkt, addr, port)
    }
    #[inline(always)]
    fn rewrite_both(
        ctx: &TcContext,
        pkt: &Packet<[u8; 4]>,
        new: &Tuple<[u8; 4]>,
    ) -> Result<(), RewriteError> {
        nat::rewrite_both(ctx, pkt, new)
    }
    #[inline(always)]
    fn rewrite_xdp(
        ctx: &XdpContext,
        pkt: &Packet<[u8; 4]>,
        new: &Tuple<[u8; 4]>,
    ) -> Result<(), RewriteError> {
        nat::rewrite_xdp(ctx, pkt, new)
    }
    #[inline(always)]
    fn reject(ctx: &TcContext, pkt: &Packet<[u8; 4]>) -> Result<i32, RejectError> {
        reject::reject(ctx, pkt)
    }
    #[inline(always)]
    fn reject_xdp(ctx: &XdpContext, pkt: &Packet<[u8; 4]>) -> Result<u32, RejectError> {
        reject::reject_xdp(ctx, pkt)
    }
    #[inline(always)]
    fn forward(ctx: &XdpContext) -> u32 {
        xdp::forward4(ctx)
    }
    #[inline(always)]
    fn mon_dropped(pkt: &Packet<[u8; 4]>, svc_id: u32, reason: u8) {
        monitor::dropped(pkt, svc_id, reason)
    }
    #[inline(always)]
    fn mon_new(
        pkt: &Packet<[u8; 4]>,
        svc_id: u32,
        scheduler: u8,
        backend: ([u8; 4], u16),
        reason: u8,
    ) {
        monitor::new_connection(pkt, svc_id, scheduler, backend, reason)
    }
    #[inline(always)]
    fn mon_first_reply(
        pkt: &Packet<[u8; 4]>,
        svc_id: u32,
        client: ([u8; 4], u16),
        vip: ([u8; 4], u16),
    ) {
        monitor::first_reply(pkt, svc_id, client, vip)
    }
}

impl Family for V6 {
    type Addr = A6;
    type CtKey = Ct6Key;
    type Ct = Ct6Value;
    type Backend = Backend6;
    type ConnsKey = BackendConns6Key;
    type AffKey = Affinity6Key;
    type AffValue = Affinity6Value;
    const ZERO: A6 = A6([0; 2]);

    #[inline(always)]
    fn same(a: &A6, b: &A6) -> bool {
        eq16(a, b)
    }
    #[inline(always)]
    fn same_key(a: &Ct6Key, b: &Ct6Key) -> bool {
        eq16(&A6::new(a.saddr), &A6::new(b.saddr))
            && eq16(&A6::new(a.daddr), &A6::new(b.daddr))
            && a.sport == b.sport
            && a.dport == b.dport
            && a.proto == b.proto
    }
    #[inline(always)]
    fn stash(pkt: &Packet<A6>) -> Option<*const Packet<A6>> {
        let p = PKT6_SCRATCH.get_ptr_mut(0)?;
        // SAFETY: this CPU's own slot, used by one program run at a time.
        unsafe { *p = *pkt };
        Some(p)
    }
    #[inline(always)]
    fn parse<C: PacketCtx>(ctx: &C) -> Result<Packet<A6>, Skip> {
        parse::parse6(ctx)
    }

    #[inline(always)]
    fn service(addr: A6, port: u16, proto: u8, scope: u8) -> Option<*const SvcValue> {
        SERVICES6.get_ptr(Svc6Key {
            addr: addr.bytes(),
            port,
            proto,
            scope,
        })
    }
    #[inline(always)]
    fn ct_key(saddr: A6, daddr: A6, sport: u16, dport: u16, proto: u8) -> Ct6Key {
        Ct6Key {
            saddr: saddr.bytes(),
            daddr: daddr.bytes(),
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn ct_key_dport(key: &mut Ct6Key) -> &mut u16 {
        &mut key.dport
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Ct6Key, Ct6Value, CT_SIZE> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn ct_scratch() -> Option<*mut CtScratch<Ct6Key, Ct6Value, BackendConns6Key>> {
        CT6_SCRATCH.get_ptr_mut(0)
    }
    #[inline(always)]
    fn backend_slots() -> &'static HashMap<BackendSlotKey, Backend6, SLOTS> {
        &BACKEND_SLOTS6
    }
    #[inline(always)]
    fn conns_key(svc_id: u32, addr: A6, port: u16) -> BackendConns6Key {
        BackendConns6Key {
            svc_id,
            addr: addr.bytes(),
            port,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn backend_conns() -> &'static HashMap<BackendConns6Key, BackendConns, SLOTS, NO_PREALLOC> {
        &BACKEND_CONNS6
    }
    #[inline(always)]
    fn counted() -> &'static HashMap<Ct6Key, BackendConns6Key, { CT_SIZE / 2 }, NO_PREALLOC> {
        &COUNTED6
    }
    #[inline(always)]
    fn aff_key(svc_id: u32, client: A6) -> Affinity6Key {
        Affinity6Key {
            svc_id,
            client: client.bytes(),
        }
    }
    #[inline(always)]
    fn aff_value(addr: A6, port: u16, slot: u32, last_ns: u64) -> Affinity6Value {
        Affinity6Value {
            addr: addr.bytes(),
            port,
            _pad: 0,
            slot,
            last_ns,
        }
    }
    #[inline(always)]
    fn aff_read(p: *const Affinity6Value) -> (A6, u16, u32, u64) {
        // SAFETY: a lookup result, read at once.
        unsafe { (A6::new((*p).addr), (*p).port, (*p).slot, (*p).last_ns) }
    }
    #[inline(always)]
    fn aff_set(p: *mut Affinity6Value, slot: u32, last_ns: u64) {
        // SAFETY: a lookup result of this program run.
        unsafe {
            (*p).last_ns = last_ns;
            if (*p).slot != slot {
                (*p).slot = slot;
            }
        }
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<Affinity6Key, Affinity6Value, { DEFAULT_AFFINITY as usize }>
    {
        &AFFINITY6
    }
    #[inline(always)]
    fn node() -> Option<Node<A6>> {
        NODE_CFG6.get(0).map(|c| Node {
            snat_addr: A6::new(c.snat_addr),
            port_min: c.snat_port_min,
            port_max: c.snat_port_max,
            flags: c.flags,
        })
    }
    #[inline(always)]
    fn source_allowed(svc_id: u32, client: A6) -> bool {
        let key = Key::new(
            32 + 128,
            SourceRange6Key {
                svc_id_be: svc_id.to_be_bytes(),
                addr: client.bytes(),
            },
        );
        SRC_RANGES6.get(&key).is_some()
    }
    #[inline(always)]
    fn reply_bit(addr: A6, port: u16, proto: u8) -> u32 {
        reply_filter::bit6(addr.bytes(), port, proto)
    }
    /// The four words of the address mixed into one (every bit reaches the result), so
    /// that sh/dh/maglev spread IPv6 clients as well as IPv4 ones.
    #[inline(always)]
    fn hash_word(a: A6) -> [u8; 4] {
        let a = a.bytes();
        let w = |i: usize| u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        hash::mix(hash::mix(hash::mix(w(0), w(4)), w(8)), w(12)).to_le_bytes()
    }
    #[inline(always)]
    fn rewrite_dst(
        ctx: &TcContext,
        pkt: &Packet<A6>,
        addr: A6,
        port: u16,
    ) -> Result<(), RewriteError> {
        let new = Tuple {
            saddr: pkt.saddr,
            sport: pkt.sport,
            daddr: addr,
            dport: port,
        };
        nat::rewrite6(ctx, pkt, &new)
    }
    #[inline(always)]
    fn rewrite_src(
        ctx: &TcContext,
        pkt: &Packet<A6>,
        addr: A6,
        port: u16,
    ) -> Result<(), RewriteError> {
        let new = Tuple {
            saddr: addr,
            sport: port,
            daddr: pkt.daddr,
            dport: pkt.dport,
        };
        nat::rewrite6(ctx, pkt, &new)
    }
    #[inline(always)]
    fn rewrite_both(
        ctx: &TcContext,
        pkt: &Packet<A6>,
        new: &Tuple<A6>,
    ) -> Result<(), RewriteError> {
        nat::rewrite6(ctx, pkt, new)
    }
    #[inline(always)]
    fn rewrite_xdp(
        ctx: &XdpContext,
        pkt: &Packet<A6>,
        new: &Tuple<A6>,
    ) -> Result<(), RewriteError> {
        nat::rewrite_xdp6(ctx, pkt, new)
    }
    #[inline(always)]
    fn reject(ctx: &TcContext, pkt: &Packet<A6>) -> Result<i32, RejectError> {
        reject::reject6(ctx, pkt)
    }
    #[inline(always)]
    fn reject_xdp(ctx: &XdpContext, pkt: &Packet<A6>) -> Result<u32, RejectError> {
        reject::reject_xdp6(ctx, pkt)
    }
    #[inline(always)]
    fn forward(ctx: &XdpContext) -> u32 {
        xdp::forward6(ctx)
    }
    // Monitor events are IPv4-only this session (their ABI has 4-byte addresses).
    #[inline(always)]
    fn mon_dropped(_: &Packet<A6>, _: u32, _: u8) {}
    #[inline(always)]
    fn mon_new(_: &Packet<A6>, _: u32, _: u8, _: (A6, u16), _: u8) {}
    #[inline(always)]
    fn mon_first_reply(_: &Packet<A6>, _: u32, _: (A6, u16), _: (A6, u16)) {}
}

/// Two IPv6 addresses are equal (see [`Family::same`]).
#[inline(always)]
pub fn eq16(a: &A6, b: &A6) -> bool {
    (a.0[0] ^ b.0[0]) | (a.0[1] ^ b.0[1]) == 0
}
