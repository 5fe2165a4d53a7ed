//! The bpfproxy node agent: model (what the cluster wants), planner (what changes) and
//! datapath (how it reaches the kernel).

pub mod agent;
pub mod conntrack_gc;
pub mod datapath;
pub mod health;
pub mod health_check;
pub mod http;
pub mod inspect;
pub mod kube_source;
pub mod maglev;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod node;
pub mod planner;
