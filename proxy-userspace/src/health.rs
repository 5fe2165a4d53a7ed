//! `/healthz` and `/livez`, with kube-proxy's meaning: healthy once the maps were
//! programmed from a complete source, and as long as no change (or periodic resync) has
//! waited longer than the timeout for a reconcile to take it.
//!
//! A change is "queued" by whoever notices it (a watcher, or a timer every resync period,
//! so a loop stuck in a reconcile goes unhealthy even when nothing changes) and "done" by
//! the reconcile that started after it. Before the first successful sync: unhealthy.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

#[derive(Clone)]
pub struct Health {
    state: Arc<Mutex<State>>,
    timeout: Duration,
    node_name: Option<String>,
}

struct State {
    /// End of the last successful sync.
    last_synced: Option<(SystemTime, Instant)>,
    /// The oldest change not yet taken by a reconcile.
    pending_since: Option<Instant>,
    /// The newest change queued.
    last_queued: Option<Instant>,
}

/// What an endpoint answers.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    pub healthy: bool,
    /// The JSON body: `lastUpdated` (RFC 3339, null before the first sync),
    /// `currentTime`, and `nodeName` when known.
    pub body: String,
}

impl Health {
    /// Unhealthy when a change has waited longer than `timeout` (kube-proxy uses twice its
    /// sync period). The first sync is pending from now.
    pub fn new(timeout: Duration, node_name: Option<String>) -> Self {
        Health {
            state: Arc::new(Mutex::new(State {
                last_synced: None,
                pending_since: Some(Instant::now()),
                last_queued: Some(Instant::now()),
            })),
            timeout,
            node_name,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change is waiting for a reconcile (kept if one is waiting already: the oldest
    /// counts).
    pub fn queued(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        state.pending_since.get_or_insert(now);
        state.last_queued = Some(now);
    }

    /// A reconcile that started at `started` programmed the maps from a complete source:
    /// every change queued before it is done.
    pub fn synced(&self, started: Instant) {
        let mut state = self.lock();
        state.last_synced = Some((SystemTime::now(), Instant::now()));
        if state.last_queued.is_none_or(|q| q <= started) {
            state.pending_since = None;
        } else if state.pending_since.is_some_and(|p| p < started) {
            // Some change came during the reconcile: it waits since `started` at most.
            state.pending_since = Some(started);
        }
    }

    /// When the last successful sync ended, if any.
    pub fn last_synced(&self) -> Option<SystemTime> {
        self.lock().last_synced.map(|(t, _)| t)
    }

    /// What `/healthz` and `/livez` answer now.
    pub fn status(&self) -> Status {
        let (last, pending) = {
            let state = self.lock();
            (state.last_synced, state.pending_since)
        };
        let stalled = pending.is_some_and(|p| p.elapsed() > self.timeout);
        let healthy = last.is_some() && !stalled;
        let mut body = serde_json::json!({
            "lastUpdated": last.map(|(t, _)| rfc3339(t)),
            "currentTime": rfc3339(SystemTime::now()),
        });
        if let Some(node) = &self.node_name {
            body["nodeName"] = node.clone().into();
        }
        Status {
            healthy,
            body: body.to_string(),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(status: &Status) -> serde_json::Value {
        serde_json::from_str(&status.body).unwrap()
    }

    #[test]
    fn unhealthy_before_the_first_sync_then_healthy() {
        let health = Health::new(Duration::from_secs(60), Some("node-a".into()));
        let before = health.status();
        assert!(!before.healthy);
        assert_eq!(body(&before)["lastUpdated"], serde_json::Value::Null);
        assert_eq!(body(&before)["nodeName"], "node-a");

        health.synced(Instant::now());
        let after = health.status();
        assert!(after.healthy);
        let last = body(&after)["lastUpdated"].as_str().unwrap().to_string();
        assert!(last.parse::<jiff::Timestamp>().is_ok(), "{last}");
        assert!(body(&after)["currentTime"].as_str().is_some());
    }

    #[test]
    fn a_change_waiting_longer_than_the_timeout_is_a_stall() {
        let health = Health::new(Duration::from_millis(20), None);
        health.synced(Instant::now());
        health.queued();
        assert!(health.status().healthy, "within the timeout");
        std::thread::sleep(Duration::from_millis(40));
        let stalled = health.status();
        assert!(!stalled.healthy);
        assert!(body(&stalled).get("nodeName").is_none());
        // A reconcile that started after the change takes it.
        health.synced(Instant::now());
        assert!(health.status().healthy);
    }

    #[test]
    fn a_change_queued_during_a_reconcile_stays_pending() {
        let health = Health::new(Duration::from_millis(20), None);
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        health.queued();
        health.synced(started);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!health.status().healthy);
    }
}
