//! How the desired state reaches the kernel: loading and pinning the eBPF object
//! ([`loader`]), attaching it to interfaces ([`attach`]), and writing and reading the maps
//! ([`kernel_maps`]).

pub mod attach;
pub mod bpffs;
pub mod cleanup;
pub mod count;
pub mod kernel_maps;
pub mod layout;
mod link_sys;
pub mod loader;
pub mod sock_lb;
pub mod xdp_attach;

pub use kernel_maps::{ApplyReport, KernelMaps};
pub use loader::{Datapath, LoadOptions, MapSizes};

use std::path::PathBuf;

/// Errors of the kernel-facing layer; each names the map, interface or path involved.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this bpfproxy binary was built without its eBPF object; run `cargo xtask build` (or `cargo xtask build-ebpf` before building)"
    )]
    NoEmbeddedObject,
    #[error("reading eBPF object {path}: {source}")]
    ReadObject {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: String,
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(String),
    #[error("map {name}: {source}")]
    Map {
        name: String,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no map {0}")]
    MissingMap(String),
    #[error(
        "pinned map {path} does not fit this version (key {key_size}/value {value_size} bytes, type {map_type}; expected {want_key}/{want_value}, type {want_type}); stop the agent and run `bpfproxy cleanup --bpffs {dir}` to start afresh (its services are programmed again from the source; tracked connections are lost)"
    )]
    IncompatiblePin {
        path: PathBuf,
        dir: PathBuf,
        key_size: u32,
        value_size: u32,
        map_type: String,
        want_key: u32,
        want_value: u32,
        want_type: String,
    },
    #[error(
        "the pins under {dir} have map layout version {found}, and this bpfproxy understands version {want}: it will neither use nor change them. Either run the bpfproxy that made them, or stop every agent using {dir} and run `bpfproxy cleanup --bpffs {dir}`, then start this one (its services are programmed again from the source; connections tracked in the old maps are lost)"
    )]
    LayoutMismatch { dir: PathBuf, found: u32, want: u32 },
    #[error(
        "the pins under {dir} carry no map layout version (made by a bpfproxy older than layout versions, or by something else): this bpfproxy will neither use nor change them. Stop every agent using {dir} and run `bpfproxy cleanup --bpffs {dir}`, then start this one"
    )]
    Unversioned { dir: PathBuf },
    #[error("no pinned maps under {0}: is the agent running with this --bpffs?")]
    NotPinned(PathBuf),
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("--socket-lb-cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("interface {interface}: {reason}")]
    Interface { interface: String, reason: String },
}
