//! Types shared by the kernel programs and the userspace agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so each byte of a
//! key is defined (a hash key with garbage in its padding never matches) and `bpftool map
//! dump` shows every field by name. No `bool`, `Option` or enum: the layout is the ABI.
//!
//! Addresses are kept as the bytes on the wire (`[u8; 4]`), so dumps read as `[10,96,0,10]`;
//! ports are in host byte order, so dumps read as `80`. IPv4 types and maps carry a `4`
//! suffix, their IPv6 twins a `6` with `[u8; 16]` addresses (one map per family, as Cilium
//! keeps them); types and maps keyed by svc_id or backend table have no suffix and serve
//! both.
#![no_std]

pub mod conntrack;
pub mod hash;
pub mod maps;
pub mod monitor;
pub mod reply_filter;
pub mod service;
pub mod sock;
pub mod stats;

/// IANA protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
