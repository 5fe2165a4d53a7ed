//! This node's addresses, as the external view needs them: the addresses NodePorts are
//! served on (`--nodeport-addresses`, kube-proxy's flag), the SNAT address and port range
//! of `node_cfg4`. Read from the interfaces with getifaddrs(3); the agent reads them again
//! on every rtnetlink link or IPv4 address event, so an address added later is picked up.

use std::{io, net::Ipv4Addr, ops::RangeInclusive};

use crate::{
    datapath::attach::InterfacePatterns,
    model::{IpRange, build::parse_ipv4},
};

/// Default `--snat-ports`: above the kernel's default ephemeral range (32768-60999), so
/// no process on the node holds one of them.
pub const DEFAULT_SNAT_PORTS: RangeInclusive<u16> = 61_000..=65_535;

/// An IPv4 CIDR of `--nodeport-addresses` (`10.0.0.0/8`; a bare address is a /32).
pub fn parse_cidr(s: &str) -> Result<IpRange, String> {
    let text = s.trim();
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, l),
        None => (text, "32"),
    };
    let addr = parse_ipv4(addr).ok_or_else(|| format!("{s:?} is not an IPv4 CIDR"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{s:?}: the prefix length must be 0-32"))?;
    IpRange::new(addr, len).ok_or_else(|| format!("{s:?} is not an IPv4 CIDR"))
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

/// The IPv4 addresses of the interfaces of this network namespace: (interface, address),
/// in the kernel's order.
pub fn interface_addresses() -> io::Result<Vec<(String, Ipv4Addr)>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            let ip = a.address?.as_sockaddr_in()?.ip();
            Some((a.interface_name, ip))
        })
        .collect())
}

/// The addresses NodePorts are served on: with `cidrs` (`--nodeport-addresses`), every
/// address of this node inside one of them, as kube-proxy does; without, the addresses of
/// the node interfaces (none without node interfaces). Sorted, each once.
pub fn nodeport_addresses(
    addrs: &[(String, Ipv4Addr)],
    node_interfaces: Option<&InterfacePatterns>,
    cidrs: &[IpRange],
) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = addrs
        .iter()
        .filter(|(name, ip)| {
            if cidrs.is_empty() {
                !ip.is_loopback() && node_interfaces.is_some_and(|p| p.matches(name))
            } else {
                cidrs.iter().any(|c| c.contains(*ip))
            }
        })
        .map(|(_, ip)| *ip)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The SNAT address: `explicit` (`--snat-address`), which must be an address of this node,
/// or the first address of a node interface; `None` when there is none yet.
pub fn snat_address(
    explicit: Option<Ipv4Addr>,
    addrs: &[(String, Ipv4Addr)],
    node_interfaces: Option<&InterfacePatterns>,
) -> Result<Option<Ipv4Addr>, String> {
    if let Some(ip) = explicit {
        if addrs.iter().any(|(_, a)| *a == ip) {
            return Ok(Some(ip));
        }
        let known: Vec<String> = addrs.iter().map(|(n, a)| format!("{a} ({n})")).collect();
        return Err(format!(
            "--snat-address {ip}: node address not found (this node has {})",
            if known.is_empty() {
                "no IPv4 address".to_string()
            } else {
                known.join(", ")
            }
        ));
    }
    Ok(addrs
        .iter()
        .find(|(name, ip)| !ip.is_loopback() && node_interfaces.is_some_and(|p| p.matches(name)))
        .map(|(_, ip)| *ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<(String, Ipv4Addr)> {
        [
            ("lo", "127.0.0.1"),
            ("eth0", "192.168.1.10"),
            ("eth0", "192.168.1.11"),
            ("eth1", "10.0.0.5"),
            ("cni0", "10.244.0.1"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
        .collect()
    }

    #[test]
    fn nodeport_addresses_default_to_the_node_interfaces_and_follow_cidrs() {
        let eth = InterfacePatterns::parse(&["eth*".to_string()]).unwrap();
        let ips = |v: Vec<Ipv4Addr>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            ips(nodeport_addresses(&addrs(), Some(&eth), &[])),
            ["10.0.0.5", "192.168.1.10", "192.168.1.11"]
        );
        assert!(nodeport_addresses(&addrs(), None, &[]).is_empty());
        let cidrs = [
            parse_cidr("192.168.1.0/24").unwrap(),
            parse_cidr("10.244.0.1").unwrap(),
        ];
        assert_eq!(
            ips(nodeport_addresses(&addrs(), Some(&eth), &cidrs)),
            ["10.244.0.1", "192.168.1.10", "192.168.1.11"]
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
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "fd00::/8", ""] {
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
    fn the_snat_address_is_a_node_address() {
        let eth = InterfacePatterns::parse(&["eth1".to_string(), "eth0".to_string()]).unwrap();
        // The first address of a node interface in the kernel's order.
        assert_eq!(
            snat_address(None, &addrs(), Some(&eth)).unwrap(),
            Some("192.168.1.10".parse().unwrap())
        );
        assert_eq!(snat_address(None, &addrs(), None).unwrap(), None);
        assert_eq!(
            snat_address(Some("10.0.0.5".parse().unwrap()), &addrs(), Some(&eth)).unwrap(),
            Some("10.0.0.5".parse().unwrap())
        );
        let e = snat_address(Some("10.9.9.9".parse().unwrap()), &addrs(), Some(&eth)).unwrap_err();
        assert!(
            e.starts_with("--snat-address 10.9.9.9: node address not found")
                && e.contains("192.168.1.10 (eth0)"),
            "{e}"
        );
    }
}
