//! Backend selection for a new connection: ClientIP affinity first (when the service has
//! it), then the service's scheduler. Established connections never come here.
//!
//! Generic over the [`Family`]: the backend tables, counters and affinity entries are
//! the family's (`*4`, `*6`); `sched_rr4` and `maglev4` are shared (keyed by svc_id, table).
//!
//! Every scheduler ends in one `backend_slots4`/`6` lookup of the chosen slot; before it,
//! random/sh/dh do no lookup, rr one per-CPU array read and write, maglev one `maglev4`
//! lookup, and lc/sed/nq two lookups per backend compared (at most `SCHED_SCAN_MAX`).

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop},
};
use proxy_common::{
    hash,
    maps::SCHED_SCAN_MAX,
    service::{
        BackendConns, BackendSlotKey, MAGLEV_SIZE, MaglevKey, SCHED_DH, SCHED_LC, SCHED_MAGLEV,
        SCHED_NQ, SCHED_RR, SCHED_SED, SCHED_SH, SvcValue,
    },
};

use crate::{
    family::{BackendEntry, Family},
    maps::{MAGLEV, SCHED_RR_POS},
    parse::Packet,
};

/// What a new connection needs to know of its service (copied out of `services4`/`6`).
#[derive(Clone, Copy)]
pub struct Service {
    pub svc_id: u32,
    pub table: u32,
    /// Never 0 here: a service without backends rejects before scheduling.
    pub count: u32,
    pub scheduler: u8,
    pub affinity_timeout_s: u32,
}

impl Service {
    /// Copies a `services4` value out, with its `SVC_F_*` flags.
    ///
    /// # Safety
    /// `svc` is a lookup result. A concurrent update of a preallocated hash may recycle the
    /// element; reading the fields at once, right after the lookup, keeps that window to a
    /// few instructions (the usual BPF trade-off).
    #[inline(always)]
    pub unsafe fn read(svc: *const SvcValue) -> (Service, u8) {
        unsafe {
            (
                Service {
                    svc_id: (*svc).svc_id,
                    table: (*svc).table,
                    count: (*svc).backend_count,
                    scheduler: (*svc).scheduler,
                    affinity_timeout_s: (*svc).affinity_timeout_s,
                },
                (*svc).flags,
            )
        }
    }
}

/// The backend a new connection goes to.
#[derive(Clone, Copy)]
pub struct Chosen<A> {
    pub addr: A,
    pub port: u16,
    /// `BACKEND_*` flags (the external view SNATs only backends without `BACKEND_LOCAL`).
    pub flags: u8,
    pub slot: u32,
}

/// The chosen slot is not in `backend_slots4` (a half-written table).
pub struct Missing;

#[inline(always)]
fn random() -> u32 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
fn backend_at<F: Family>(table: u32, slot: u32) -> Option<(Chosen<F::Addr>, u8)> {
    let b = F::backend_slots().get_ptr(BackendSlotKey { table, slot })?;
    let (addr, port, flags, weight) = F::Backend::read(b);
    Some((
        Chosen {
            addr,
            port,
            flags,
            slot,
        },
        weight,
    ))
}

/// Picks the backend of a new connection.
#[inline(always)]
pub fn choose<F: Family>(pkt: &Packet<F::Addr>, svc: &Service) -> Result<Chosen<F::Addr>, Missing> {
    if svc.affinity_timeout_s != 0 {
        return with_affinity::<F>(pkt, svc);
    }
    schedule::<F>(pkt, svc)
}

/// The service's scheduler alone.
#[inline(always)]
fn schedule<F: Family>(pkt: &Packet<F::Addr>, svc: &Service) -> Result<Chosen<F::Addr>, Missing> {
    let n = svc.count;
    let slot = match svc.scheduler {
        SCHED_RR => rr_next(svc.svc_id) % n,
        SCHED_SH => hash::addr_hash(F::hash_word(pkt.saddr), 0) % n,
        SCHED_DH => hash::addr_hash(F::hash_word(pkt.daddr), pkt.dport) % n,
        SCHED_MAGLEV => maglev_slot::<F>(pkt, svc),
        SCHED_LC | SCHED_SED | SCHED_NQ => return least_loaded::<F>(svc),
        _ => random() % n,
    };
    backend_at::<F>(svc.table, slot)
        .map(|(c, _)| c)
        .ok_or(Missing)
}

/// The service's next round-robin position on this CPU.
#[inline(always)]
fn rr_next(svc_id: u32) -> u32 {
    match SCHED_RR_POS.get_ptr_mut(svc_id) {
        // SAFETY: this CPU's own slot (programs do not migrate while they run).
        Some(p) => unsafe {
            let next = *p;
            *p = next.wrapping_add(1);
            next
        },
        None => random(),
    }
}

#[inline(always)]
fn maglev_slot<F: Family>(pkt: &Packet<F::Addr>, svc: &Service) -> u32 {
    let h = hash::tuple_hash(
        F::hash_word(pkt.saddr),
        F::hash_word(pkt.daddr),
        pkt.sport,
        pkt.dport,
        pkt.proto,
    );
    let key = MaglevKey {
        table: svc.table,
        index: h % MAGLEV_SIZE,
    };
    match MAGLEV.get_ptr(key) {
        // SAFETY: a lookup result.
        Some(slot) => unsafe { *slot },
        // No table (written before the service value, so only in a broken state): hash.
        None => h % svc.count,
    }
}

/// Connections open to a backend of a service.
#[inline(always)]
fn active<F: Family>(svc_id: u32, addr: F::Addr, port: u16) -> u64 {
    match F::backend_conns().get_ptr(F::conns_key(svc_id, addr, port)) {
        // SAFETY: a lookup result; the counters only grow, a torn pair reads as a
        // transient count.
        Some(c) => unsafe { (*c).opened.saturating_sub((*c).closed) },
        None => 0,
    }
}

/// State of a scan over the live table, passed to the `bpf_loop` callbacks (a loop of up
/// to `SCHED_SCAN_MAX` map lookups is too long for the verifier to walk unrolled;
/// `bpf_loop` has it check one iteration).
#[repr(C)]
struct Scan<A> {
    svc_id: u32,
    table: u32,
    count: u32,
    start: u32,
    scheduler: u32,
    /// 1 once `best` holds a backend.
    found: u32,
    best_slot: u32,
    best_port: u32,
    best_addr: A,
    best_flags: u32,
    /// The best cost as a fraction: best_num / best_weight.
    best_num: u64,
    best_weight: u64,
}

/// One backend of a least-loaded scan; returns 1 to stop the loop.
#[inline(never)]
extern "C" fn scan_least_loaded<F: Family>(i: u64, ctx: *mut c_void) -> i64 {
    let s = ctx as *mut Scan<F::Addr>;
    // SAFETY: `ctx` is the `Scan` on the caller's stack that bpf_loop passes back.
    let s = unsafe { &mut *s };
    let i = i as u32;
    if i >= s.count {
        return 1;
    }
    let mut slot = s.start + i;
    if slot >= s.count {
        slot -= s.count;
    }
    let Some((c, weight)) = backend_at::<F>(s.table, slot) else {
        return 0;
    };
    let weight = if weight == 0 { 1 } else { weight as u64 };
    let conns = active::<F>(s.svc_id, c.addr, c.port);
    let idle_wins = s.scheduler == SCHED_NQ as u32 && conns == 0;
    let num = conns + (s.scheduler != SCHED_LC as u32) as u64;
    if idle_wins || s.found == 0 || num * s.best_weight < s.best_num * weight {
        s.found = 1;
        s.best_slot = slot;
        s.best_addr = c.addr;
        s.best_port = c.port as u32;
        s.best_flags = c.flags as u32;
        s.best_num = num;
        s.best_weight = weight;
    }
    idle_wins as i64
}

/// lc, sed and nq: compares the backends' active connections per weight. Scanning starts
/// at a rotating slot, so equally loaded backends take turns.
#[inline(always)]
fn least_loaded<F: Family>(svc: &Service) -> Result<Chosen<F::Addr>, Missing> {
    let n = svc.count;
    let mut scan = Scan {
        svc_id: svc.svc_id,
        table: svc.table,
        count: n,
        start: rr_next(svc.svc_id) % n,
        scheduler: svc.scheduler as u32,
        found: 0,
        best_slot: 0,
        best_port: 0,
        best_addr: F::ZERO,
        best_flags: 0,
        best_num: 0,
        best_weight: 1,
    };
    let loops = if n < SCHED_SCAN_MAX {
        n
    } else {
        SCHED_SCAN_MAX
    };
    // SAFETY: the callback is a static function; the context is this stack variable.
    unsafe {
        bpf_loop(
            loops,
            scan_least_loaded::<F> as *mut c_void,
            &raw mut scan as *mut c_void,
            0,
        )
    };
    if scan.found == 0 {
        return Err(Missing);
    }
    Ok(Chosen {
        addr: scan.best_addr,
        port: scan.best_port as u16,
        flags: scan.best_flags as u8,
        slot: scan.best_slot,
    })
}

/// One slot of a search for `best_addr:best_port`; returns 1 (stop) when found.
#[inline(never)]
extern "C" fn scan_find<F: Family>(i: u64, ctx: *mut c_void) -> i64 {
    let s = ctx as *mut Scan<F::Addr>;
    // SAFETY: as in `scan_least_loaded`.
    let s = unsafe { &mut *s };
    let i = i as u32;
    if i >= s.count {
        return 1;
    }
    match backend_at::<F>(s.table, i) {
        Some((c, _)) if F::same(&c.addr, &s.best_addr) && c.port as u32 == s.best_port => {
            s.found = 1;
            s.best_slot = i;
            s.best_flags = c.flags as u32;
            1
        }
        _ => 0,
    }
}

/// The live backend `addr:port`: at `slot` (one lookup) or, after the table changed, by a
/// scan of the live table.
#[inline(always)]
fn find_backend<F: Family>(
    svc: &Service,
    addr: F::Addr,
    port: u16,
    slot: u32,
) -> Option<Chosen<F::Addr>> {
    if slot < svc.count
        && let Some((c, _)) = backend_at::<F>(svc.table, slot)
        && F::same(&c.addr, &addr)
        && c.port == port
    {
        return Some(c);
    }
    let mut scan = Scan {
        svc_id: svc.svc_id,
        table: svc.table,
        count: svc.count,
        start: 0,
        scheduler: 0,
        found: 0,
        best_slot: 0,
        best_port: port as u32,
        best_addr: addr,
        best_flags: 0,
        best_num: 0,
        best_weight: 0,
    };
    let loops = if svc.count < SCHED_SCAN_MAX {
        svc.count
    } else {
        SCHED_SCAN_MAX
    };
    // SAFETY: as in `least_loaded`.
    unsafe {
        bpf_loop(
            loops,
            scan_find::<F> as *mut c_void,
            &raw mut scan as *mut c_void,
            0,
        )
    };
    (scan.found != 0).then_some(Chosen {
        addr,
        port,
        flags: scan.best_flags as u8,
        slot: scan.best_slot,
    })
}

/// ClientIP affinity: the client's backend while it is live and the client was not idle
/// longer than the timeout; otherwise the scheduler's choice, remembered.
#[inline(always)]
fn with_affinity<F: Family>(
    pkt: &Packet<F::Addr>,
    svc: &Service,
) -> Result<Chosen<F::Addr>, Missing> {
    let key = F::aff_key(svc.svc_id, pkt.saddr);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(a) = F::affinity().get_ptr_mut(&key) {
        let (addr, port, slot, last) = F::aff_read(a);
        let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
        if now.saturating_sub(last) <= timeout_ns
            && let Some(c) = find_backend::<F>(svc, addr, port, slot)
        {
            F::aff_set(a, c.slot, now);
            return Ok(c);
        }
        // Idle too long, or its backend is gone: replaced below.
    }
    let c = schedule::<F>(pkt, svc)?;
    let value = F::aff_value(c.addr, c.port, c.slot, now);
    let _ = F::affinity().insert(&key, &value, BPF_ANY as u64);
    Ok(c)
}

/// The counters of a backend, created (zero) if missing; `None` if the map is full.
#[inline(always)]
pub fn conns_entry<F: Family>(key: &F::ConnsKey) -> Option<*mut BackendConns> {
    let map = F::backend_conns();
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    let _ = map.insert(key, &BackendConns::default(), BPF_NOEXIST as u64);
    map.get_ptr_mut(key)
}

/// Adds to a backend's `opened` counter.
#[inline(always)]
pub fn add_opened(entry: *mut BackendConns) {
    // SAFETY: a map value, only ever added to atomically.
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*entry).opened, 1) };
}

/// Gives the connection on forward tuple `fkey` a token and counts it `opened` (`entry`
/// is its backend's counters). False if the token map is full: then it is not counted.
#[inline(always)]
pub fn count_open<F: Family>(fkey: &F::CtKey, key: &F::ConnsKey, entry: *mut BackendConns) -> bool {
    // A token left by an earlier connection on this tuple whose entry was evicted.
    release_token::<F>(fkey);
    if F::counted().insert(fkey, key, BPF_NOEXIST as u64).is_err() {
        return false;
    }
    add_opened(entry);
    true
}

/// Deletes the token of forward tuple `fkey`, if any; whoever deletes it adds the
/// matching `closed`.
#[inline(always)]
pub fn release_token<F: Family>(fkey: &F::CtKey) {
    let Some(held) = F::counted().get_ptr(fkey) else {
        return;
    };
    // SAFETY: a lookup result, copied at once.
    let key = unsafe { *held };
    if F::counted().remove(fkey).is_ok() {
        add_closed::<F>(&key, 1);
    }
}

/// Adds `n` to the `closed` counter of a backend, if it has counters.
#[inline(always)]
pub fn add_closed<F: Family>(key: &F::ConnsKey, n: u64) -> bool {
    match F::backend_conns().get_ptr_mut(key) {
        Some(entry) => {
            // SAFETY: as in `add_opened`.
            unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*entry).closed, n) };
            true
        }
        None => false,
    }
}
