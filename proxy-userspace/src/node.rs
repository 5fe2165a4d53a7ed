//! This node's addresses, as the external view needs them: the addresses NodePorts are
//! served on (`--nodeport-addresses`, kube-proxy's flag), the SNAT addresses and port range
//! of `node_cfg4` and `node_cfg6`. Read from the interfaces with getifaddrs(3); the agent
//! reads them again on every rtnetlink link, IPv4 or IPv6 address event, so an address
//! added later is picked up.
//!
//! IPv6: only addresses of global scope count (ULAs such as fd00::/8 included); link-local
//! (fe80::/10) and loopback ones are never node addresses here: a NodePort or SNAT on a
//! link-local address would need the interface to go with it, and kube-proxy's nftables
//! rules skip them too.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use crate::{
    datapath::attach::InterfacePatterns,
    model::{Family, IpRange, build::parse_ip},
};

/// Default `--snat-ports`: above the kernel's default ephemeral range (32768-60999), so
/// no process on the node holds one of them.
pub const DEFAULT_SNAT_PORTS: RangeInclusive<u16> = 61_000..=65_535;

/// A CIDR of `--nodeport-addresses`, IPv4 (`10.0.0.0/8`) or IPv6 (`fd00::/64`); a bare
/// address is a /32 or /128.
pub fn parse_cidr(s: &str) -> Result<IpRange, String> {
    let text = s.trim();
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr = parse_ip(addr).ok_or_else(|| format!("{s:?} is not an IPv4 or IPv6 CIDR"))?;
    let bits = Family::of(&addr).bits();
    let len: u8 = match len {
        None => bits,
        Some(l) => l
            .parse()
            .ok()
            .filter(|l| *l <= bits)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0-{bits}"))?,
    };
    IpRange::new(addr, len).ok_or_else(|| format!("{s:?} is not an IPv4 or IPv6 CIDR"))
}

/// `--snat-address`: one address per family (`192.168.1.10`, `fd00::10`, or both), given
/// comma separated or as repeated flags.
pub fn parse_snat_addresses(given: &[IpAddr]) -> Result<SnatAddresses, String> {
    let mut out = SnatAddresses::default();
    for ip in given {
        match ip {
            IpAddr::V4(a) => {
                if let Some(old) = out.v4.replace(*a) {
                    return Err(format!(
                        "--snat-address: two IPv4 addresses ({old}, {a}); give at most one per family"
                    ));
                }
            }
            IpAddr::V6(a) => {
                if let Some(old) = out.v6.replace(*a) {
                    return Err(format!(
                        "--snat-address: two IPv6 addresses ({old}, {a}); give at most one per family"
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// One `--snat-address` value: an IPv4 or IPv6 address (IPv4 leading zeros read as
/// decimal, as Kubernetes reads them).
pub fn parse_address(s: &str) -> Result<IpAddr, String> {
    parse_ip(s.trim()).ok_or_else(|| format!("{s:?} is not an IPv4 or IPv6 address"))
}

/// The SNAT address of each family (`None`: not given, or none found).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatAddresses {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// `--snat-ports MIN-MAX`: at least 1024 (below are the well-known ports of services on the
/// node), MIN <= MAX.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (min, max) = s
        .trim()
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range MIN-MAX"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: {p:?} is not a port (1-65535)"))
    };
    let (min, max) = (port(min)?, port(max)?);
    if min < 1024 {
        return Err(format!(
            "{s:?}: ports below 1024 belong to services on the node; start at 1024 or above"
        ));
    }
    if min > max {
        return Err(format!("{s:?}: {min} is above {max}"));
    }
    Ok(min..=max)
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`) of this namespace.
pub fn ephemeral_ports() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some(parts.next()??..=parts.next()??)
}

/// Whether two port ranges share a port.
pub fn overlaps(a: &RangeInclusive<u16>, b: &RangeInclusive<u16>) -> bool {
    a.start() <= b.end() && b.start() <= a.end()
}

/// Whether an address can be a node address: IPv4 ones all (loopback too, which only a
/// `--nodeport-addresses` range naming it selects), IPv6 ones of global scope only (not
/// link-local fe80::/10, loopback, multicast or unspecified).
pub fn is_node_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local())
        }
    }
}

/// The IPv4 and IPv6 addresses of the interfaces of this network namespace (IPv6 of global
/// scope only, see [`is_node_address`]): (interface, address), in the kernel's order.
pub fn interface_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address?;
            let ip = match (sa.as_sockaddr_in(), sa.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (None, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            is_node_address(&ip).then_some((a.interface_name, ip))
        })
        .collect())
}

/// The addresses NodePorts are served on, per family as kube-proxy splits
/// `--nodeport-addresses` (pkg/proxy/util/nodeport_addresses.go, NewNodePortAddresses): a
/// family with ranges in `cidrs` gets every node address inside one of them; a family
/// without gets its default, here the addresses of the node interfaces (none without
/// node interfaces), loopback excluded. Sorted, each once.
pub fn nodeport_addresses(
    addrs: &[(String, IpAddr)],
    node_interfaces: Option<&InterfacePatterns>,
    cidrs: &[IpRange],
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addrs
        .iter()
        .filter(|(name, ip)| {
            let family = Family::of(ip);
            let mut ranges = cidrs.iter().filter(|c| c.family() == family).peekable();
            if ranges.peek().is_none() {
                !ip.is_loopback() && node_interfaces.is_some_and(|p| p.matches(name))
            } else {
                ranges.any(|c| c.contains(*ip))
            }
        })
        .map(|(_, ip)| *ip)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The SNAT address of each family: the one given (`--snat-address`), which must be an
/// address of this node, or the first address of that family on a node interface; `None`
/// for a family with none yet.
pub fn snat_addresses(
    explicit: SnatAddresses,
    addrs: &[(String, IpAddr)],
    node_interfaces: Option<&InterfacePatterns>,
) -> Result<SnatAddresses, String> {
    let pick = |given: Option<IpAddr>, family: Family| -> Result<Option<IpAddr>, String> {
        if let Some(ip) = given {
            if addrs.iter().any(|(_, a)| *a == ip) {
                return Ok(Some(ip));
            }
            let known: Vec<String> = addrs
                .iter()
                .filter(|(_, a)| Family::of(a) == family)
                .map(|(n, a)| format!("{a} ({n})"))
                .collect();
            return Err(format!(
                "--snat-address {ip}: node address not found (this node has {})",
                if known.is_empty() {
                    format!("no {} address", family.name())
                } else {
                    known.join(", ")
                }
            ));
        }
        Ok(addrs
            .iter()
            .find(|(name, ip)| {
                Family::of(ip) == family
                    && !ip.is_loopback()
                    && node_interfaces.is_some_and(|p| p.matches(name))
            })
            .map(|(_, ip)| *ip))
    };
    let v4 = pick(explicit.v4.map(IpAddr::V4), Family::V4)?;
    let v6 = pick(explicit.v6.map(IpAddr::V6), Family::V6)?;
    Ok(SnatAddresses {
        v4: v4.and_then(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }),
        v6: v6.and_then(|a| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("eth0", "192.168.1.10"),
            ("eth0", "192.168.1.11"),
            ("eth0", "fd00:251::1"),
            ("eth1", "10.0.0.5"),
            ("eth1", "2001:db8::5"),
            ("cni0", "10.244.0.1"),
            ("cni0", "fd00:244::1"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
        .collect()
    }

    fn ips(v: Vec<IpAddr>) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn only_global_ipv6_addresses_are_node_addresses() {
        for (ip, yes) in [
            ("10.0.0.1", true),
            ("127.0.0.1", true),
            ("fd00:251::1", true),
            ("2001:db8::1", true),
            ("fe80::1", false),
            ("febf::1", false),
            ("::1", false),
            ("::", false),
            ("ff02::1", false),
        ] {
            assert_eq!(is_node_address(&ip.parse().unwrap()), yes, "{ip}");
        }
        // The real interfaces of this namespace: never a link-local IPv6 address.
        let here = interface_addresses().unwrap();
        assert!(here.iter().any(|(_, a)| a.is_loopback()), "{here:?}");
        assert!(here.iter().all(|(_, a)| is_node_address(a)), "{here:?}");
    }

    #[test]
    fn nodeport_addresses_default_to_the_node_interfaces_and_follow_cidrs() {
        let eth = InterfacePatterns::parse(&["eth*".to_string()]).unwrap();
        assert_eq!(
            ips(nodeport_addresses(&addrs(), Some(&eth), &[])),
            [
                "10.0.0.5",
                "192.168.1.10",
                "192.168.1.11",
                "2001:db8::5",
                "fd00:251::1"
            ]
        );
        assert!(nodeport_addresses(&addrs(), None, &[]).is_empty());
        // IPv4 ranges narrow the IPv4 addresses only: IPv6 keeps its default, as
        // kube-proxy gives a family without ranges its default.
        let cidrs = [
            parse_cidr("192.168.1.0/24").unwrap(),
            parse_cidr("10.244.0.1").unwrap(),
        ];
        assert_eq!(
            ips(nodeport_addresses(&addrs(), Some(&eth), &cidrs)),
            [
                "10.244.0.1",
                "192.168.1.10",
                "192.168.1.11",
                "2001:db8::5",
                "fd00:251::1"
            ]
        );
        // And IPv6 ranges the IPv6 ones only.
        let cidrs6 = [parse_cidr("fd00::/8").unwrap()];
        assert_eq!(
            ips(nodeport_addresses(&addrs(), Some(&eth), &cidrs6)),
            [
                "10.0.0.5",
                "192.168.1.10",
                "192.168.1.11",
                "fd00:244::1",
                "fd00:251::1"
            ]
        );
        let both = [
            parse_cidr("10.0.0.0/8").unwrap(),
            parse_cidr("2001:db8::/32").unwrap(),
        ];
        assert_eq!(
            ips(nodeport_addresses(&addrs(), None, &both)),
            ["10.0.0.5", "10.244.0.1", "2001:db8::5"]
        );
        // Loopback only when a range names it.
        let lo = [parse_cidr("127.0.0.0/8").unwrap()];
        assert_eq!(ips(nodeport_addresses(&addrs(), None, &lo)), ["127.0.0.1"]);
    }

    #[test]
    fn bad_cidrs_and_port_ranges_are_named() {
        assert_eq!(
            parse_cidr(" 10.1.2.3/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(
            parse_cidr("FD00:0251:0000::0001/64").unwrap().to_string(),
            "fd00:251::/64"
        );
        assert_eq!(parse_cidr("fd00::7").unwrap().to_string(), "fd00::7/128");
        assert_eq!(parse_cidr("010.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        for bad in [
            "10.0.0.0/33",
            "nope",
            "10.0.0.0/x",
            "fd00::/129",
            "fe80::1%eth0/64",
            "",
        ] {
            let e = parse_cidr(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(parse_port_range("61000-65535").unwrap(), DEFAULT_SNAT_PORTS);
        assert_eq!(
            parse_port_range(" 40000 - 40010 ").unwrap(),
            40_000..=40_010
        );
        for (bad, why) in [
            ("65535-61000", "is above"),
            ("100-2000", "below 1024"),
            ("61000", "not a range"),
            ("61000-70000", "not a port"),
        ] {
            let e = parse_port_range(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
        assert!(overlaps(&(32768..=60999), &(60000..=61000)));
        assert!(!overlaps(&(32768..=60999), &DEFAULT_SNAT_PORTS));
    }

    #[test]
    fn snat_addresses_are_one_per_family() {
        let a = |s: &str| parse_address(s).unwrap();
        assert_eq!(
            parse_snat_addresses(&[a("192.168.1.10"), a(" fd00:251::1")]).unwrap(),
            SnatAddresses {
                v4: Some("192.168.1.10".parse().unwrap()),
                v6: Some("fd00:251::1".parse().unwrap()),
            }
        );
        assert_eq!(parse_snat_addresses(&[]).unwrap(), SnatAddresses::default());
        let e = parse_snat_addresses(&[a("fd00::1"), a("fd00::2")]).unwrap_err();
        assert!(e.contains("two IPv6 addresses (fd00::1, fd00::2)"), "{e}");
        let e = parse_snat_addresses(&[a("10.0.0.1"), a("10.0.0.2")]).unwrap_err();
        assert!(e.contains("two IPv4 addresses"), "{e}");
        assert!(parse_address("nope").unwrap_err().contains("\"nope\""));
    }

    #[test]
    fn the_snat_address_is_a_node_address_of_its_family() {
        let eth = InterfacePatterns::parse(&["eth1".to_string(), "eth0".to_string()]).unwrap();
        // The first address of each family on a node interface, in the kernel's order.
        assert_eq!(
            snat_addresses(SnatAddresses::default(), &addrs(), Some(&eth)).unwrap(),
            SnatAddresses {
                v4: Some("192.168.1.10".parse().unwrap()),
                v6: Some("fd00:251::1".parse().unwrap()),
            }
        );
        assert_eq!(
            snat_addresses(SnatAddresses::default(), &addrs(), None).unwrap(),
            SnatAddresses::default()
        );
        let given = SnatAddresses {
            v4: Some("10.0.0.5".parse().unwrap()),
            v6: Some("2001:db8::5".parse().unwrap()),
        };
        assert_eq!(snat_addresses(given, &addrs(), Some(&eth)).unwrap(), given);
        // One family given, the other chosen.
        let only6 = SnatAddresses {
            v6: Some("2001:db8::5".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            snat_addresses(only6, &addrs(), Some(&eth)).unwrap().v4,
            Some("192.168.1.10".parse().unwrap())
        );
        let e = snat_addresses(
            SnatAddresses {
                v4: Some("10.9.9.9".parse().unwrap()),
                ..Default::default()
            },
            &addrs(),
            Some(&eth),
        )
        .unwrap_err();
        assert!(
            e.starts_with("--snat-address 10.9.9.9: node address not found")
                && e.contains("192.168.1.10 (eth0)")
                && !e.contains("fd00"),
            "{e}"
        );
        let e = snat_addresses(
            SnatAddresses {
                v6: Some("fd00::99".parse().unwrap()),
                ..Default::default()
            },
            &addrs(),
            Some(&eth),
        )
        .unwrap_err();
        assert!(e.contains("fd00:251::1 (eth0)"), "{e}");
        let e = snat_addresses(
            SnatAddresses {
                v6: Some("fd00::99".parse().unwrap()),
                ..Default::default()
            },
            &addrs()[..2],
            Some(&eth),
        )
        .unwrap_err();
        assert!(e.contains("this node has no IPv6 address"), "{e}");
    }
}
