//! Maglev lookup tables (Eisenbud et al., NSDI 2016, section 3.4), built here and read by
//! the kernel's `maglev` scheduler: entry `tuple_hash % M` of a service's table is the slot
//! of the backend a new connection goes to.
//!
//! Each backend has a permutation of `0..M` from two hashes of its address and port
//! (`offset + j * skip mod M`, `M` prime so every permutation visits every entry). Backends
//! take turns claiming the next free entry of their permutation until the table is full; a
//! backend of weight `w` takes `w` turns per round. Because a backend's permutation depends
//! only on its own address, removing one of N backends frees only its own entries (about
//! M/N) and leaves almost all the others' where they were.

use std::net::IpAddr;

use proxy_common::{hash::fnv1a64, service::MAGLEV_SIZE};

use crate::planner::Backend;

/// The Maglev table of `backends` (in slot order) over `size` entries (a prime): for each
/// entry, the slot of a backend. Empty if there are no backends.
pub fn build_table(backends: &[Backend], size: u32) -> Vec<u32> {
    let m = size as u64;
    if backends.is_empty() || m == 0 {
        return Vec::new();
    }
    // (offset, skip, next j) of each backend.
    let mut perm: Vec<(u64, u64, u64)> = backends
        .iter()
        .map(|b| {
            // The address's wire bytes then the port (6 bytes for IPv4, 18 for IPv6).
            let mut name = match b.addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            name.extend_from_slice(&b.port.to_be_bytes());
            let offset = fnv1a64(&name, 0x6d61_676c_6576_3031) % m;
            let skip = fnv1a64(&name, 0x7365_636f_6e64_6831) % (m - 1) + 1;
            (offset, skip, 0)
        })
        .collect();
    let weights: Vec<u32> = backends.iter().map(|b| b.weight.max(1) as u32).collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (slot, p) in perm.iter_mut().enumerate() {
            for _ in 0..weights[slot] {
                // Next entry of this backend's permutation that is still free.
                let entry = loop {
                    let e = (p.0 + p.2 * p.1) % m;
                    p.2 += 1;
                    if table[e as usize] == u32::MAX {
                        break e;
                    }
                };
                table[entry as usize] = slot as u32;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    table
}

/// [`build_table`] with the size the kernel reads ([`MAGLEV_SIZE`]).
pub fn table_for(backends: &[Backend]) -> Vec<u32> {
    build_table(backends, MAGLEV_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: std::net::Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1).into(),
                port: 8080,
                flags: 0,
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &s in table {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn every_entry_is_a_backend_and_the_spread_is_even() {
        for n in [1u32, 3, 10, 100] {
            let t = table_for(&backends(n));
            assert_eq!(t.len(), MAGLEV_SIZE as usize);
            let c = shares(&t, n as usize);
            let even = MAGLEV_SIZE as f64 / n as f64;
            for (i, &k) in c.iter().enumerate() {
                assert!(
                    (k as f64 - even).abs() <= even * 0.02 + 1.0,
                    "{n} backends: backend {i} has {k} entries, even is {even:.0}"
                );
            }
        }
    }

    #[test]
    fn removing_one_backend_moves_little_else() {
        let all = backends(10);
        let before = table_for(&all);
        let mut rest = all.clone();
        rest.remove(4);
        let after = table_for(&rest);
        // Map the new slots back to the old backends.
        let old_slot = |s: u32| if s >= 4 { s + 1 } else { s };
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 4 && old_slot(**a) != **b)
            .count();
        let total_others = before.iter().filter(|b| **b != 4).count();
        assert!(
            (moved as f64) < total_others as f64 * 0.02,
            "{moved} of {total_others} entries of other backends moved"
        );
    }

    #[test]
    fn weights_take_proportional_shares() {
        let mut b = backends(3);
        b[0].weight = 2;
        let c = shares(&table_for(&b), 3);
        let quarter = MAGLEV_SIZE as f64 / 4.0;
        assert!(
            (c[0] as f64 - 2.0 * quarter).abs() < quarter * 0.05,
            "{c:?}"
        );
        assert!((c[1] as f64 - quarter).abs() < quarter * 0.05, "{c:?}");
    }
}
