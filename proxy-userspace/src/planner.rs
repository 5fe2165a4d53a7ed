//! What changes: diffs the desired state against what the maps hold and emits the fewest
//! map writes, ordered so that no packet sees a half-written service.
//!
//! Pure: [`MapState`] is a mirror of the maps (read from the kernel at start, then kept in
//! step by [`MapState::apply`] as each op succeeds), so plans are unit-testable.

use std::collections::BTreeMap;

use proxy_common::service::{Backend4, BackendSlotKey, Svc4Key, Svc4Value, SvcMeta};

use crate::model::ServicePortName;

/// One service as programmed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub value: Svc4Value,
    /// Backends in slot order of the live table (`value.table`).
    pub backends: Vec<Backend4>,
    pub meta: SvcMeta,
}

/// Mirror of the service-side maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<Svc4Key, ProgrammedService>,
    /// Words of `reply_filter4` (length `reply_filter::WORDS`, or empty before the first read).
    pub reply_filter: Vec<u64>,
}

/// Sizes of the maps, so the planner can refuse what would not fit before writing anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backend_slots: u32,
}

/// One write to a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend { key: BackendSlotKey, value: Backend4 },
    DeleteBackend { key: BackendSlotKey },
    PutMeta { svc_id: u32, meta: SvcMeta },
    DeleteMeta { svc_id: u32 },
    PutService { key: Svc4Key, value: Svc4Value },
    DeleteService { key: Svc4Key },
    SetReplyFilterWord { index: u32, word: u64 },
    /// Drop UDP conntrack entries of `frontend` whose backend is one of `backends`
    /// (kube-proxy clears UDP conntrack when an endpoint goes, so clients move at once).
    PurgeUdpConntrack { frontend: Svc4Key, backends: Vec<Backend4> },
}

/// The ops for one service port, applied together; if one fails the step is rolled back
/// and the error names `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub name: ServicePortName,
    pub ops: Vec<MapOp>,
}

/// A plan is applied prologue, steps, epilogue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Reply-filter words that gain bits (`old | new`), written before any service is
    /// published, so the first reply of a new backend is never missed.
    pub prologue: Vec<MapOp>,
    /// Service steps in order: additions and changes first, removals after.
    pub steps: Vec<Step>,
    /// Reply-filter words set to exactly the new bits, after all steps.
    pub epilogue: Vec<MapOp>,
}
