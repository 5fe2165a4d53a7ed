//! Conntrack lifecycle: the agent's collector deletes the entries of connections idle for
//! longer than their timeout, both directions at once, and gives back the connection
//! counts (lc, sed, nq) of the connections it removes.
//!
//! The datapath stamps each entry with the time of its last packet (`last_seen_ns`,
//! CLOCK_MONOTONIC_COARSE, refreshed when over a second old). A connection's state comes
//! from the flags of its two entries, as the kernel's conntrack keeps it per connection:
//! a FIN or RST seen -> closing; the backend answered -> established (TCP); else the SYN
//! is still unanswered. The defaults are Cilium's (`bpf-ct-timeout-regular-tcp`, `-tcp-fin`,
//! `-tcp-syn`, `-any`): established 8000 s (longer than Linux's 2-hour TCP keepalive, so
//! an idle connection with keepalives keeps its entry), closing 10 s, SYN 60 s, UDP 60 s.

use std::{collections::HashMap, fmt::Debug, hash::Hash, time::Duration};

use proxy_common::{
    PROTO_TCP,
    conntrack::{
        CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, CT_FLAG_SNAT, Ct4Key,
        Ct4Value, Ct6Key, Ct6Value,
    },
};

use crate::datapath::{Datapath, DatapathError};

/// How long a connection may stay idle in each state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    /// After a FIN or RST in either direction.
    pub tcp_closing: Duration,
    /// A SYN the backend has not answered.
    pub tcp_syn: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: Duration::from_secs(8000),
            tcp_closing: Duration::from_secs(10),
            tcp_syn: Duration::from_secs(60),
            udp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The timeout of a connection of protocol `proto` whose entries carry `flags` (both
    /// directions' flags or-ed).
    pub fn for_connection(&self, proto: u8, flags: u8) -> Duration {
        if proto != PROTO_TCP {
            return self.udp;
        }
        if flags & CT_FLAG_CLOSING != 0 {
            self.tcp_closing
        } else if flags & CT_FLAG_REPLIED != 0 {
            self.tcp_established
        } else {
            self.tcp_syn
        }
    }
}

/// Whether a connection last seen at `last_ns` is idle for longer than `timeout` at
/// `now_ns`. A time ahead of `now_ns` (another CPU stamped it after our clock read) is not.
pub fn is_expired(now_ns: u64, last_ns: u64, timeout: Duration) -> bool {
    now_ns.saturating_sub(last_ns) > timeout.as_nanos() as u64
}

/// A conntrack key of one family (`conntrack4` or `conntrack6`): what the collector needs
/// to judge its entries and delete them, the same way for both.
pub trait CtKey: Copy + Eq + Hash + Debug {
    type Value: Copy;
    fn proto(&self) -> u8;
    /// The reply key of the forward entry `(self, value)` (see [`reply_key_of`]).
    fn reply_key(&self, value: &Self::Value) -> Self;
    /// Whether reply entry `reply` translates back to this forward key's destination.
    fn answers(&self, reply: &Self::Value) -> bool;
    fn dir(value: &Self::Value) -> u8;
    fn flags(value: &Self::Value) -> u8;
    fn last_seen_ns(value: &Self::Value) -> u64;
    /// The family's entries, as the kernel holds them now.
    fn entries(dp: &Datapath) -> Vec<(Self, Self::Value)>;
    fn get(dp: &Datapath, key: &Self) -> Option<Self::Value>;
    fn remove(dp: &mut Datapath, key: &Self);
    /// Deletes the connection-count token of the forward key, if any, and releases its
    /// count when this delete was the one that succeeded; whether it did.
    fn release_token(dp: &mut Datapath, key: &Self) -> Result<bool, DatapathError>;
}

impl CtKey for Ct4Key {
    type Value = Ct4Value;
    fn proto(&self) -> u8 {
        self.proto
    }
    fn reply_key(&self, value: &Ct4Value) -> Self {
        reply_key_of(self, value)
    }
    fn answers(&self, reply: &Ct4Value) -> bool {
        reply.nat_addr == self.daddr && reply.nat_port == self.dport
    }
    fn dir(value: &Ct4Value) -> u8 {
        value.dir
    }
    fn flags(value: &Ct4Value) -> u8 {
        value.flags
    }
    fn last_seen_ns(value: &Ct4Value) -> u64 {
        value.last_seen_ns
    }
    fn entries(dp: &Datapath) -> Vec<(Self, Ct4Value)> {
        dp.maps.conntrack_entries()
    }
    fn get(dp: &Datapath, key: &Self) -> Option<Ct4Value> {
        dp.maps.conntrack.get(key, 0).ok()
    }
    fn remove(dp: &mut Datapath, key: &Self) {
        // An entry the LRU already evicted is fine.
        let _ = dp.maps.conntrack.remove(key);
    }
    fn release_token(dp: &mut Datapath, key: &Self) -> Result<bool, DatapathError> {
        if let Ok(backend) = dp.maps.counted.get(key, 0)
            && dp.maps.counted.remove(key).is_ok()
        {
            dp.release_connections(&backend, 1)?;
            return Ok(true);
        }
        Ok(false)
    }
}

impl CtKey for Ct6Key {
    type Value = Ct6Value;
    fn proto(&self) -> u8 {
        self.proto
    }
    fn reply_key(&self, value: &Ct6Value) -> Self {
        reply_key_of6(self, value)
    }
    fn answers(&self, reply: &Ct6Value) -> bool {
        reply.nat_addr == self.daddr && reply.nat_port == self.dport
    }
    fn dir(value: &Ct6Value) -> u8 {
        value.dir
    }
    fn flags(value: &Ct6Value) -> u8 {
        value.flags
    }
    fn last_seen_ns(value: &Ct6Value) -> u64 {
        value.last_seen_ns
    }
    fn entries(dp: &Datapath) -> Vec<(Self, Ct6Value)> {
        dp.maps.conntrack_entries6()
    }
    fn get(dp: &Datapath, key: &Self) -> Option<Ct6Value> {
        dp.maps.conntrack6.get(key, 0).ok()
    }
    fn remove(dp: &mut Datapath, key: &Self) {
        let _ = dp.maps.conntrack6.remove(key);
    }
    fn release_token(dp: &mut Datapath, key: &Self) -> Result<bool, DatapathError> {
        if let Ok(backend) = dp.maps.counted6.get(key, 0)
            && dp.maps.counted6.remove(key).is_ok()
        {
            dp.release_connections6(&backend, 1)?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// [`reply_key_of`] for an IPv6 connection.
pub fn reply_key_of6(key: &Ct6Key, value: &Ct6Value) -> Ct6Key {
    let (daddr, dport) = if value.flags & CT_FLAG_SNAT != 0 {
        (value.nat2_addr, value.nat2_port)
    } else {
        (key.saddr, key.sport)
    };
    Ct6Key {
        saddr: value.nat_addr,
        daddr,
        sport: value.nat_port,
        dport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// The reply key of the forward entry `(key, value)`: backend -> client, or backend ->
/// the SNAT address and port (`nat2`) of a source-NAT-ed connection.
pub fn reply_key_of(key: &Ct4Key, value: &Ct4Value) -> Ct4Key {
    let (daddr, dport) = if value.flags & CT_FLAG_SNAT != 0 {
        (value.nat2_addr, value.nat2_port)
    } else {
        (key.saddr, key.sport)
    };
    Ct4Key {
        saddr: value.nat_addr,
        daddr,
        sport: value.nat_port,
        dport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// One expired connection: the keys to delete (a direction whose entry is gone already,
/// e.g. evicted, is `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired<K = Ct4Key> {
    pub forward: Option<K>,
    pub reply: Option<K>,
    /// When the connection was last seen, to check again just before deleting.
    pub last_seen_ns: u64,
}

/// Which connections of `entries` (a snapshot of `conntrack4` or `conntrack6`) have
/// expired at `now_ns`. A forward entry and its reply twin are judged together (latest
/// time, either's flags); an entry whose twin is gone is judged alone.
pub fn expired<K: CtKey>(
    entries: &[(K, K::Value)],
    now_ns: u64,
    timeouts: &Timeouts,
) -> Vec<Expired<K>> {
    let by_key: HashMap<K, K::Value> = entries.iter().copied().collect();
    let mut twins = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (key, fwd) in entries.iter().filter(|(_, v)| K::dir(v) == CT_DIR_FORWARD) {
        let rkey = key.reply_key(fwd);
        let reply = by_key
            .get(&rkey)
            .filter(|r| K::dir(r) == CT_DIR_REPLY && key.answers(r));
        let (flags, last) = match reply {
            Some(r) => {
                twins.insert(rkey);
                (
                    K::flags(fwd) | K::flags(r),
                    K::last_seen_ns(fwd).max(K::last_seen_ns(r)),
                )
            }
            None => (K::flags(fwd), K::last_seen_ns(fwd)),
        };
        if is_expired(now_ns, last, timeouts.for_connection(key.proto(), flags)) {
            out.push(Expired {
                forward: Some(*key),
                reply: reply.map(|_| rkey),
                last_seen_ns: last,
            });
        }
    }
    for (key, rep) in entries.iter().filter(|(_, v)| K::dir(v) == CT_DIR_REPLY) {
        if twins.contains(key) {
            continue;
        }
        let timeout = timeouts.for_connection(key.proto(), K::flags(rep));
        if is_expired(now_ns, K::last_seen_ns(rep), timeout) {
            out.push(Expired {
                forward: None,
                reply: Some(*key),
                last_seen_ns: K::last_seen_ns(rep),
            });
        }
    }
    out
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock the datapath stamps `last_seen_ns` with.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; CLOCK_MONOTONIC_COARSE exists on every Linux the
    // datapath loads on (bpf_ktime_get_coarse_ns needs 5.11).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one pass of [`collect`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries walked (in use before the pass).
    pub entries: usize,
    /// Connections whose entries were deleted.
    pub expired: usize,
    /// Of those, counted connections (lc, sed, nq) whose count was given back.
    pub released: u64,
}

/// One pass of the collector: walks `conntrack4` and `conntrack6`, deletes the entries
/// of expired connections and releases their connection counts.
///
/// Each connection is looked at again right before its delete: one that saw a packet
/// since the walk (its time moved) is left alone. The reply entry goes first, so a client
/// packet racing the delete either still finds its forward entry or creates both anew.
pub fn collect(dp: &mut Datapath, timeouts: &Timeouts) -> Result<GcReport, DatapathError> {
    let now = monotonic_coarse_ns();
    let mut report = GcReport::default();
    collect_family::<Ct4Key>(dp, now, timeouts, &mut report)?;
    collect_family::<Ct6Key>(dp, now, timeouts, &mut report)?;
    Ok(report)
}

fn collect_family<K: CtKey>(
    dp: &mut Datapath,
    now: u64,
    timeouts: &Timeouts,
    report: &mut GcReport,
) -> Result<(), DatapathError> {
    let entries = K::entries(dp);
    report.entries += entries.len();
    for e in expired(&entries, now, timeouts) {
        let still = |key: &Option<K>| {
            key.and_then(|k| K::get(dp, &k))
                .is_some_and(|v| K::last_seen_ns(&v) > e.last_seen_ns)
        };
        if still(&e.forward) || still(&e.reply) {
            continue;
        }
        if let Some(r) = e.reply {
            K::remove(dp, &r);
        }
        if let Some(f) = e.forward {
            K::remove(dp, &f);
            // The token of a counted connection: whoever deletes it releases the count.
            if K::release_token(dp, &f)? {
                report.released += 1;
            }
        }
        report.expired += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proxy_common::PROTO_UDP;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> Ct4Key {
        Ct4Key {
            saddr: src,
            daddr: dst,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }

    /// A connection client:40000 -> VIP:80 -> backend:8080, both entries.
    fn conn(proto: u8, sport: u16, fwd: (u8, u64), rep: (u8, u64)) -> [(Ct4Key, Ct4Value); 2] {
        let (client, vip, backend) = ([10, 0, 0, 1], [10, 96, 0, 1], [10, 1, 0, 1]);
        let value = |nat_addr, nat_port, dir, (flags, last_seen_ns)| Ct4Value {
            nat_addr,
            nat_port,
            dir,
            flags,
            svc_id: 1,
            counted: 0,
            last_seen_ns,
            nat2_addr: [0; 4],
            nat2_port: 0,
            _pad: 0,
        };
        [
            (
                key(client, sport, vip, 80, proto),
                value(backend, 8080, CT_DIR_FORWARD, fwd),
            ),
            (
                key(backend, 8080, client, sport, proto),
                value(vip, 80, CT_DIR_REPLY, rep),
            ),
        ]
    }

    #[test]
    fn timeout_follows_the_connection_state() {
        let t = Timeouts::default();
        assert_eq!(t.for_connection(PROTO_TCP, 0), t.tcp_syn);
        assert_eq!(
            t.for_connection(PROTO_TCP, CT_FLAG_REPLIED),
            t.tcp_established
        );
        assert_eq!(
            t.for_connection(PROTO_TCP, CT_FLAG_REPLIED | CT_FLAG_CLOSING),
            t.tcp_closing
        );
        assert_eq!(t.for_connection(PROTO_TCP, CT_FLAG_CLOSING), t.tcp_closing);
        assert_eq!(t.for_connection(PROTO_UDP, 0), t.udp);
        assert_eq!(t.for_connection(PROTO_UDP, CT_FLAG_REPLIED), t.udp);
    }

    #[test]
    fn expiry_is_strictly_after_the_timeout() {
        let t = Duration::from_secs(10);
        assert!(!is_expired(100 * S, 90 * S, t), "exactly the timeout");
        assert!(is_expired(100 * S, 90 * S - 1, t));
        assert!(
            !is_expired(100 * S, 101 * S, t),
            "stamped after our clock read"
        );
    }

    #[test]
    fn both_directions_go_together_and_the_latest_time_counts() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(5),
            tcp_syn: Duration::from_secs(20),
            udp: Duration::from_secs(30),
        };
        let now = 1000 * S;
        let mut entries = Vec::new();
        // Established, forward idle but the backend sent 50 s ago: kept.
        entries.extend(conn(PROTO_TCP, 1, (0, 800 * S), (CT_FLAG_REPLIED, 950 * S)));
        // Established, idle 200 s: expired, both keys.
        entries.extend(conn(PROTO_TCP, 2, (0, 800 * S), (CT_FLAG_REPLIED, 800 * S)));
        // Closing (the client's FIN), idle 10 s: expired.
        entries.extend(conn(
            PROTO_TCP,
            3,
            (CT_FLAG_CLOSING, 990 * S),
            (CT_FLAG_REPLIED, 990 * S),
        ));
        // SYN unanswered for 30 s: expired; for 10 s: kept.
        entries.extend(conn(PROTO_TCP, 4, (0, 970 * S), (0, 970 * S)));
        entries.extend(conn(PROTO_TCP, 5, (0, 990 * S), (0, 990 * S)));
        // UDP idle 40 s: expired; 20 s: kept.
        entries.extend(conn(PROTO_UDP, 6, (0, 960 * S), (0, 960 * S)));
        entries.extend(conn(PROTO_UDP, 7, (0, 980 * S), (0, 980 * S)));
        let out = expired(&entries, now, &t);
        let sports: Vec<u16> = out.iter().map(|e| e.forward.unwrap().sport).collect();
        assert_eq!(sports, [2, 3, 4, 6]);
        for e in &out {
            let f = e.forward.unwrap();
            let r = e.reply.expect("the reply twin goes too");
            assert_eq!((r.daddr, r.dport), (f.saddr, f.sport));
        }
    }

    #[test]
    fn a_source_nated_connection_goes_with_its_reply_keyed_on_the_snat_port() {
        let t = Timeouts::default();
        let now = 10_000 * S;
        let (client, frontend, backend, node) =
            ([192, 0, 2, 7], [10, 0, 0, 2], [10, 1, 0, 9], [10, 0, 0, 2]);
        let entry = |nat_addr, nat_port, dir, nat2_addr, nat2_port| Ct4Value {
            nat_addr,
            nat_port,
            dir,
            flags: CT_FLAG_SNAT | CT_FLAG_REPLIED,
            svc_id: 1,
            counted: 0,
            last_seen_ns: now - 9000 * S,
            nat2_addr,
            nat2_port,
            _pad: 0,
        };
        let fwd = (
            key(client, 40000, frontend, 30080, PROTO_TCP),
            entry(backend, 8080, CT_DIR_FORWARD, node, 31001),
        );
        let rep = (
            key(backend, 8080, node, 31001, PROTO_TCP),
            entry(frontend, 30080, CT_DIR_REPLY, client, 40000),
        );
        assert_eq!(reply_key_of(&fwd.0, &fwd.1), rep.0);
        let out = expired(&[fwd, rep], now, &t);
        assert_eq!(
            out,
            [Expired {
                forward: Some(fwd.0),
                reply: Some(rep.0),
                last_seen_ns: now - 9000 * S
            }],
            "one connection, both keys"
        );
    }

    #[test]
    fn an_entry_whose_twin_is_gone_is_judged_alone() {
        let t = Timeouts::default();
        let now = 10_000 * S;
        let [f1, _] = conn(PROTO_UDP, 1, (0, now - 61 * S), (0, 0));
        let [_, r2] = conn(PROTO_UDP, 2, (0, 0), (0, now - 61 * S));
        let [f3, _] = conn(PROTO_UDP, 3, (0, now - 10 * S), (0, 0));
        let out = expired(&[f1, r2, f3], now, &t);
        assert_eq!(
            out,
            [
                Expired {
                    forward: Some(f1.0),
                    reply: None,
                    last_seen_ns: now - 61 * S
                },
                Expired {
                    forward: None,
                    reply: Some(r2.0),
                    last_seen_ns: now - 61 * S
                },
            ]
        );
    }

    #[test]
    fn a_reply_entry_of_another_connection_is_no_twin() {
        // The reply key of connection 1 holds the reply entry of a connection to another
        // VIP with the same backend (two services sharing a backend, same client port).
        let t = Timeouts::default();
        let now = 10_000 * S;
        let [f, mut r] = conn(PROTO_UDP, 1, (0, now - 61 * S), (0, now));
        r.1.nat_addr = [10, 96, 0, 2];
        let out = expired(&[f, r], now, &t);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reply, None, "the other connection's entry stays");
    }

    /// `a.b.c.d` as `fd00::a.b.c.d` (wire bytes).
    fn v6(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..2].copy_from_slice(&[0xfd, 0]);
        out[12..].copy_from_slice(&a);
        out
    }

    /// The IPv6 twin of an IPv4 entry (addresses mapped by [`v6`]).
    fn to6((k, v): (Ct4Key, Ct4Value)) -> (Ct6Key, Ct6Value) {
        (
            Ct6Key {
                saddr: v6(k.saddr),
                daddr: v6(k.daddr),
                sport: k.sport,
                dport: k.dport,
                proto: k.proto,
                _pad: [0; 3],
            },
            Ct6Value {
                nat_addr: v6(v.nat_addr),
                nat2_addr: if v.nat2_addr == [0; 4] {
                    [0; 16]
                } else {
                    v6(v.nat2_addr)
                },
                nat_port: v.nat_port,
                nat2_port: v.nat2_port,
                dir: v.dir,
                flags: v.flags,
                _pad: 0,
                svc_id: v.svc_id,
                counted: v.counted,
                last_seen_ns: v.last_seen_ns,
            },
        )
    }

    #[test]
    fn ipv6_connections_expire_exactly_like_ipv4_ones() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(5),
            tcp_syn: Duration::from_secs(20),
            udp: Duration::from_secs(30),
        };
        let now = 1000 * S;
        let mut entries = Vec::new();
        entries.extend(conn(PROTO_TCP, 1, (0, 800 * S), (CT_FLAG_REPLIED, 950 * S)));
        entries.extend(conn(PROTO_TCP, 2, (0, 800 * S), (CT_FLAG_REPLIED, 800 * S)));
        entries.extend(conn(
            PROTO_TCP,
            3,
            (CT_FLAG_CLOSING, 990 * S),
            (CT_FLAG_REPLIED, 990 * S),
        ));
        entries.extend(conn(PROTO_TCP, 4, (0, 970 * S), (0, 970 * S)));
        entries.extend(conn(PROTO_UDP, 6, (0, 960 * S), (0, 960 * S)));
        entries.extend(conn(PROTO_UDP, 7, (0, 980 * S), (0, 980 * S)));
        // A reply whose forward entry is gone, idle 40 s (UDP): judged alone, expired.
        entries.push(conn(PROTO_UDP, 8, (0, 0), (0, 960 * S))[1]);
        let four = expired(&entries, now, &t);
        let entries6: Vec<(Ct6Key, Ct6Value)> = entries.iter().copied().map(to6).collect();
        let six = expired(&entries6, now, &t);
        assert_eq!(six.len(), 5);
        assert_eq!(six.len(), four.len());
        for (a, b) in four.iter().zip(&six) {
            assert_eq!(a.forward.map(|k| k.sport), b.forward.map(|k| k.sport));
            assert_eq!(a.reply.map(|k| v6(k.saddr)), b.reply.map(|k| k.saddr));
            assert_eq!(a.reply.map(|k| k.dport), b.reply.map(|k| k.dport));
            assert_eq!(a.last_seen_ns, b.last_seen_ns);
        }
        // A source-NAT-ed IPv6 connection: its reply is keyed on the SNAT address and port.
        let (fk, mut fv) = to6(conn(PROTO_TCP, 9, (0, 0), (0, 0))[0]);
        fv.flags = CT_FLAG_SNAT;
        fv.nat2_addr = v6([192, 168, 1, 10]);
        fv.nat2_port = 61_000;
        let r = reply_key_of6(&fk, &fv);
        assert_eq!((r.saddr, r.sport), (fv.nat_addr, fv.nat_port));
        assert_eq!((r.daddr, r.dport), (v6([192, 168, 1, 10]), 61_000));
    }
}
