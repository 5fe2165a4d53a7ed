//! Attaches the ingress program to interfaces whose names match the operator's patterns,
//! and keeps that true as interfaces come and go (pod veths are created and deleted all the
//! time): every link event from netlink triggers a re-scan of the interfaces.

use std::collections::BTreeMap;

use aya::{
    programs::{SchedClassifier, TcAttachType, tc, tc::SchedClassifierLinkId},
    util::KernelVersion,
};
use globset::{Glob, GlobSet, GlobSetBuilder};

use super::DatapathError;

/// Interface name patterns (`eth0`, `veth*`, `lxc?*`).
#[derive(Clone, Debug)]
pub struct InterfacePatterns {
    set: GlobSet,
    pub source: Vec<String>,
}

impl InterfacePatterns {
    pub fn parse(patterns: &[String]) -> Result<Self, DatapathError> {
        let mut builder = GlobSetBuilder::new();
        for p in patterns {
            let glob = Glob::new(p).map_err(|e| DatapathError::Interface {
                interface: p.clone(),
                reason: format!("not a valid name pattern: {e}"),
            })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|e| DatapathError::Interface {
            interface: patterns.join(","),
            reason: e.to_string(),
        })?;
        Ok(InterfacePatterns {
            set,
            source: patterns.to_vec(),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// True when a pattern has no wildcard, i.e. names one interface that must exist.
    pub fn literal_names(&self) -> impl Iterator<Item = &str> {
        self.source
            .iter()
            .filter(|p| !p.contains(['*', '?', '[', '{']))
            .map(String::as_str)
    }
}

/// The interfaces of this network namespace: (index, name).
pub fn list_interfaces() -> Vec<(u32, String)> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Where the program is attached: interface name -> (ifindex, link).
#[derive(Default)]
pub struct Attachments {
    links: BTreeMap<String, (u32, SchedClassifierLinkId)>,
}

impl Attachments {
    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    /// Attaches to every matching interface not yet attached and forgets interfaces that
    /// are gone (their tcx links went with them). Returns errors by interface; an interface
    /// that fails does not stop the others.
    pub fn sync(
        &mut self,
        prog: &mut SchedClassifier,
        patterns: &InterfacePatterns,
    ) -> Vec<DatapathError> {
        let present = list_interfaces();
        let mut errors = Vec::new();
        let gone: Vec<String> = self
            .links
            .iter()
            .filter(|(name, (index, _))| !present.iter().any(|(i, n)| i == index && n == *name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some((_, link)) = self.links.remove(&name) {
                // The device is gone, so is the attachment; dropping the link closes its fd.
                let _ = prog.take_link(link);
                tracing::info!(interface = %name, "interface gone, detached");
            }
        }
        for (index, name) in present {
            if self.links.contains_key(&name) || !patterns.matches(&name) {
                continue;
            }
            match attach_ingress(prog, &name) {
                Ok(link) => {
                    tracing::info!(interface = %name, "attached tc ingress");
                    self.links.insert(name, (index, link));
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self, prog: &mut SchedClassifier) {
        for (name, (_, link)) in std::mem::take(&mut self.links) {
            if let Err(e) = prog.detach(link) {
                tracing::warn!(interface = %name, error = %e, "detach failed");
            }
        }
    }
}

fn attach_ingress(
    prog: &mut SchedClassifier,
    name: &str,
) -> Result<SchedClassifierLinkId, DatapathError> {
    // tcx (6.6+) needs no qdisc; older kernels attach through a clsact qdisc.
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx && let Err(e) = tc::qdisc_add_clsact(name) {
        tracing::debug!(interface = %name, error = %e, "clsact qdisc not added (may exist)");
    }
    prog.attach(name, TcAttachType::Ingress)
        .map_err(|e| DatapathError::Interface {
            interface: name.to_string(),
            reason: format!("attaching tc ingress: {e}"),
        })
}
