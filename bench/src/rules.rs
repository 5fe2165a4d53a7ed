//! The rule sets kube-proxy would write for the synthetic cluster, in its iptables mode
//! (`iptables-restore` input) and its nftables mode (`nft -f` input), with chain names made
//! as kube-proxy makes them (base32 of a SHA-256). Only the NAT part is generated, for
//! ClusterIPs: kube-proxy's filter-table chains (firewall, no-endpoint reject, forward
//! accept) are left out of both, as are NodePorts and the off-cluster masquerade rule (no
//! cluster CIDR is set). The per-endpoint hairpin masquerade rules are kept, as kube-proxy
//! always writes them.

use std::fmt::Write as _;

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::cluster::{PORT_NAME, SynthService};

const PROTO: &str = "tcp";
const MASQ_MARK: &str = "0x4000";

fn base32_sha256(s: &str) -> String {
    BASE32.encode(&Sha256::digest(s.as_bytes()))
}

// ---------------------------------------------------------------------------------------
// iptables

/// kube-proxy's `ServicePortName.String()`: `namespace/name:port`.
fn service_port_name(svc: &SynthService) -> String {
    format!("{}/{}:{PORT_NAME}", svc.namespace, svc.name)
}

fn svc_chain(svc: &SynthService) -> String {
    let h = base32_sha256(&format!("{}{PROTO}", service_port_name(svc)));
    format!("KUBE-SVC-{}", &h[..16])
}

fn sep_chain(svc: &SynthService, ep: (std::net::Ipv4Addr, u16)) -> String {
    let h = base32_sha256(&format!(
        "{}{PROTO}{}:{}",
        service_port_name(svc),
        ep.0,
        ep.1
    ));
    format!("KUBE-SEP-{}", &h[..16])
}

/// The jumps from the built-in chains that kube-proxy adds with `iptables -I` before its
/// first sync (for `iptables-restore --noflush`).
pub fn iptables_base() -> String {
    "*nat\n\
     :KUBE-SERVICES - [0:0]\n\
     :KUBE-POSTROUTING - [0:0]\n\
     -I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
     -I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
     COMMIT\n"
        .to_string()
}

/// Chains every sync writes in full: declarations and rules.
fn iptables_fixed(chains: &mut String, rules: &mut String) {
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
}

fn kube_services_rule(rules: &mut String, svc: &SynthService) {
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {PROTO} -p {PROTO} -d {} --dport {} -j {}",
        service_port_name(svc),
        svc.vip,
        svc.port,
        svc_chain(svc)
    );
}

fn nodeports_rule(rules: &mut String) {
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
}

/// The service chain (random choice of endpoint chains) and its endpoint chains.
fn service_chains(chains: &mut String, rules: &mut String, svc: &SynthService) {
    let name = service_port_name(svc);
    let svc_chain = svc_chain(svc);
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    let n = svc.endpoints.len();
    for (i, &ep) in svc.endpoints.iter().enumerate() {
        let sep = sep_chain(svc, ep);
        let _ = write!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} -> {}:{}\"",
            ep.0, ep.1
        );
        if i + 1 < n {
            let _ = write!(
                rules,
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            );
        }
        let _ = writeln!(rules, " -j {sep}");
    }
    for &ep in &svc.endpoints {
        endpoint_chain(chains, rules, svc, ep);
    }
}

fn endpoint_chain(
    chains: &mut String,
    rules: &mut String,
    svc: &SynthService,
    ep: (std::net::Ipv4Addr, u16),
) {
    let name = service_port_name(svc);
    let sep = sep_chain(svc, ep);
    let _ = writeln!(chains, ":{sep} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ\n\
         -A {sep} -m comment --comment {name} -m {PROTO} -p {PROTO} -j DNAT --to-destination {}:{}",
        ep.0, ep.0, ep.1
    );
}

/// kube-proxy's full sync of the nat table (`iptables-restore --noflush`): every chain,
/// services in the given order (so the last one is the last rule of KUBE-SERVICES).
pub fn iptables_full(services: &[SynthService]) -> String {
    let mut chains = String::from("*nat\n");
    let mut rules = String::new();
    iptables_fixed(&mut chains, &mut rules);
    for svc in services {
        kube_services_rule(&mut rules, svc);
        service_chains(&mut chains, &mut rules, svc);
    }
    nodeports_rule(&mut rules);
    chains + &rules + "COMMIT\n"
}

/// kube-proxy's partial sync after one endpoint of `before` moved (`after`): the chains it
/// always writes (KUBE-SERVICES with every service), the changed service's chain, the new
/// endpoint chain, and the old endpoint chain flushed and deleted. `services` is the whole
/// set after the change.
pub fn iptables_endpoint_change(
    services: &[SynthService],
    before: &SynthService,
    after: &SynthService,
) -> String {
    let mut chains = String::from("*nat\n");
    let mut rules = String::new();
    iptables_fixed(&mut chains, &mut rules);
    for svc in services {
        kube_services_rule(&mut rules, svc);
    }
    nodeports_rule(&mut rules);
    // The service chain is rewritten; of the endpoint chains only the new one is written.
    let svc_chain = svc_chain(after);
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    let name = service_port_name(after);
    let n = after.endpoints.len();
    for (i, &ep) in after.endpoints.iter().enumerate() {
        let _ = write!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} -> {}:{}\"",
            ep.0, ep.1
        );
        if i + 1 < n {
            let _ = write!(
                rules,
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            );
        }
        let _ = writeln!(rules, " -j {}", sep_chain(after, ep));
    }
    for &ep in after
        .endpoints
        .iter()
        .filter(|e| !before.endpoints.contains(e))
    {
        endpoint_chain(&mut chains, &mut rules, after, ep);
    }
    for &ep in before
        .endpoints
        .iter()
        .filter(|e| !after.endpoints.contains(e))
    {
        let sep = sep_chain(before, ep);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let _ = writeln!(rules, "-X {sep}");
    }
    chains + &rules + "COMMIT\n"
}

// ---------------------------------------------------------------------------------------
// nftables

const TABLE: &str = "ip kube-proxy";

/// kube-proxy's `hashAndTruncate`: 8 base32 characters of the hash, a dash, the name.
fn hash_and_name(base: &str) -> String {
    format!("{}-{base}", &base32_sha256(base)[..8])
}

fn nft_service_chain(svc: &SynthService) -> String {
    format!(
        "service-{}",
        hash_and_name(&format!(
            "{}/{}/{PROTO}/{PORT_NAME}",
            svc.namespace, svc.name
        ))
    )
}

fn nft_endpoint_chain(svc: &SynthService, ep: (std::net::Ipv4Addr, u16)) -> String {
    format!(
        "endpoint-{}",
        hash_and_name(&format!(
            "{}/{}/{PROTO}/{PORT_NAME}__{}/{}",
            svc.namespace, svc.name, ep.0, ep.1
        ))
    )
}

fn nft_endpoint(out: &mut String, svc: &SynthService, ep: (std::net::Ipv4Addr, u16)) {
    let chain = nft_endpoint_chain(svc, ep);
    let _ = writeln!(
        out,
        "add chain {TABLE} {chain}\n\
         add rule {TABLE} {chain} ip saddr {} jump mark-for-masquerade\n\
         add rule {TABLE} {chain} meta l4proto {PROTO} dnat to {}:{}",
        ep.0, ep.0, ep.1
    );
}

fn nft_numgen_rule(out: &mut String, svc: &SynthService) {
    let chain = nft_service_chain(svc);
    let targets: Vec<String> = svc
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, &ep)| format!("{i} : goto {}", nft_endpoint_chain(svc, ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {TABLE} {chain} numgen random mod {} vmap {{ {} }}",
        svc.endpoints.len(),
        targets.join(" , ")
    );
}

/// kube-proxy's nftables ruleset for the services, as one `nft -f` transaction.
pub fn nft_full(services: &[SynthService]) -> String {
    let mut out = format!(
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {TABLE} mark-for-masquerade\n\
         add rule {TABLE} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
         add chain {TABLE} masquerading\n\
         add rule {TABLE} masquerading mark and {MASQ_MARK} == 0 return\n\
         add rule {TABLE} masquerading mark set mark xor {MASQ_MARK}\n\
         add rule {TABLE} masquerading masquerade fully-random\n\
         add chain {TABLE} services\n\
         add chain {TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {TABLE} nat-prerouting jump services\n\
         add chain {TABLE} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {TABLE} nat-output jump services\n\
         add chain {TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {TABLE} nat-postrouting jump masquerading\n\
         add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n"
    );
    for svc in services {
        for &ep in &svc.endpoints {
            nft_endpoint(&mut out, svc, ep);
        }
        let chain = nft_service_chain(svc);
        let _ = writeln!(out, "add chain {TABLE} {chain}");
        nft_numgen_rule(&mut out, svc);
        let _ = writeln!(
            out,
            "add element {TABLE} service-ips {{ {} . {PROTO} . {} : goto {chain} }}",
            svc.vip, svc.port
        );
    }
    out
}

/// kube-proxy's nftables transaction after one endpoint of `before` moved (`after`): the
/// new endpoint chain, the service chain flushed and its numgen rule written anew, the old
/// endpoint chain flushed (kube-proxy deletes stale chains in a later sync).
pub fn nft_endpoint_change(before: &SynthService, after: &SynthService) -> String {
    let mut out = String::new();
    for &ep in after
        .endpoints
        .iter()
        .filter(|e| !before.endpoints.contains(e))
    {
        let chain = nft_endpoint_chain(after, ep);
        let _ = writeln!(
            out,
            "add chain {TABLE} {chain}\nflush chain {TABLE} {chain}"
        );
        let _ = writeln!(
            out,
            "add rule {TABLE} {chain} ip saddr {} jump mark-for-masquerade\n\
             add rule {TABLE} {chain} meta l4proto {PROTO} dnat to {}:{}",
            ep.0, ep.0, ep.1
        );
    }
    let chain = nft_service_chain(after);
    let _ = writeln!(
        out,
        "add chain {TABLE} {chain}\nflush chain {TABLE} {chain}"
    );
    nft_numgen_rule(&mut out, after);
    for &ep in before
        .endpoints
        .iter()
        .filter(|e| !after.endpoints.contains(e))
    {
        let _ = writeln!(
            out,
            "flush chain {TABLE} {}",
            nft_endpoint_chain(before, ep)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{filler, with_changed_endpoint};

    #[test]
    fn chain_names_look_like_kube_proxys() {
        let s = filler(1, 2);
        let c = svc_chain(&s);
        assert!(c.starts_with("KUBE-SVC-") && c.len() == 25, "{c}");
        assert!(
            c[9..]
                .chars()
                .all(|ch| ch.is_ascii_uppercase() || ('2'..='7').contains(&ch))
        );
        assert_ne!(sep_chain(&s, s.endpoints[0]), sep_chain(&s, s.endpoints[1]));
        assert!(nft_service_chain(&s).ends_with("-bench/svc-1/tcp/http"));
        assert!(nft_endpoint_chain(&s, s.endpoints[0]).ends_with("__10.128.0.2/8080"));
    }

    #[test]
    fn iptables_full_puts_the_last_service_last() {
        let all = crate::cluster::fillers(3, 2);
        let text = iptables_full(&all);
        let svc_rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(svc_rules.len(), 4);
        assert!(svc_rules[2].contains("-d 10.100.0.2 "));
        assert!(svc_rules[3].contains("KUBE-NODEPORTS"));
        assert!(text.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert_eq!(text.matches("-j DNAT").count(), 6);
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn endpoint_change_writes_the_new_chain_and_drops_the_old() {
        let all = crate::cluster::fillers(3, 2);
        let after = with_changed_endpoint(&all[1], 1);
        let ipt = iptables_endpoint_change(&all, &all[1], &after);
        assert_eq!(ipt.matches("-j DNAT").count(), 1);
        assert!(ipt.contains(&format!("-X {}", sep_chain(&all[1], all[1].endpoints[1]))));
        let nft = nft_endpoint_change(&all[1], &after);
        assert!(nft.contains("dnat to 10.160.0.1:8080"));
        assert!(nft.contains("numgen random mod 2 vmap"));
    }
}
