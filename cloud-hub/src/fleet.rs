//! The fleet as the hub sees it now: which agents are connected, their last heartbeat, and
//! the demand they forecast for the replicas.
//!
//! A plain state machine: sessions report `hello`, `heartbeat` and `closed` with the time
//! (Unix ms) passed in, and [`Fleet::sweep`] turns silence into "offline" — an agent is online
//! while its session is open and its last heartbeat is younger than `offline_after_ms`.
//! Records that changed are handed to the [`crate::registry`] in batches ([`Fleet::take_dirty`]).
//! A heartbeat alone moves an agent's stored "last seen" at most every [`SEEN_PERSIST_MS`]:
//! the live value is in memory, and a fleet of thousands should not rewrite every row every
//! second. Going offline, a new session and changed models are stored at the next batch.

use std::collections::{BTreeMap, HashMap};

use protocol::frame::{Heartbeat, Hello};
use serde::Serialize;

use crate::registry::AgentRecord;

/// How stale the stored "last seen" of an online agent may get.
pub const SEEN_PERSIST_MS: i64 = 30_000;

/// One agent.
#[derive(Debug, Clone)]
struct AgentState {
    record: AgentRecord,
    /// The open session's id, if one is open.
    session: Option<u64>,
    online: bool,
    heartbeat: Option<Heartbeat>,
    heartbeats: u64,
    dirty: bool,
    /// `record.last_seen` as last handed to the registry.
    saved_seen: i64,
}

/// An agent as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentView {
    /// Name.
    pub name: String,
    /// Site.
    pub site: String,
    /// Online now.
    pub online: bool,
    /// Agent software version.
    pub agent_version: String,
    /// Models and versions, `name@version`.
    pub models: String,
    /// Last contact (Unix ms).
    pub last_seen: i64,
    /// First contact (Unix ms).
    pub first_seen: i64,
    /// When it enrolled (Unix ms), if it did through the hub.
    pub enrolled_at: Option<i64>,
    /// Heartbeats received since the hub started.
    pub heartbeats: u64,
    /// The last heartbeat's figures.
    pub load: Option<LoadView>,
}

/// The figures of an agent's last heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadView {
    /// Windows per second arriving.
    pub arrival_rate: f32,
    /// Windows per second the gateway can serve.
    pub capacity: f32,
    /// Forecast arrival rate at the warm-up horizon.
    pub forecast: f32,
    /// Windows per second it expects to send to replicas.
    pub offload_demand: f32,
    /// Share of windows sent to replicas.
    pub offload_share: f32,
    /// Windows waiting.
    pub queue_depth: u32,
    /// Requests at replicas.
    pub in_flight: u32,
    /// CPU busy share.
    pub cpu: f32,
    /// Agent resident memory, bytes.
    pub memory_bytes: u64,
    /// Counters since the agent started.
    pub counters: BTreeMap<String, u64>,
}

/// What changed in a sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transitions {
    /// Agents that went offline.
    pub offline: Vec<String>,
}

/// The live fleet.
#[derive(Debug)]
pub struct Fleet {
    agents: HashMap<String, AgentState>,
    offline_after_ms: i64,
}

impl Fleet {
    /// A fleet that starts from the registry's records (all offline).
    pub fn new(records: Vec<AgentRecord>, offline_after_ms: i64) -> Fleet {
        let agents = records
            .into_iter()
            .map(|record| {
                (
                    record.name.clone(),
                    AgentState {
                        saved_seen: record.last_seen,
                        record,
                        session: None,
                        online: false,
                        heartbeat: None,
                        heartbeats: 0,
                        dirty: false,
                    },
                )
            })
            .collect();
        Fleet {
            agents,
            offline_after_ms,
        }
    }

    /// A session `session` opened for the agent that sent `hello`.
    pub fn hello(&mut self, hello: &Hello, session: u64, now: i64) {
        let models = hello
            .models
            .iter()
            .map(|m| format!("{}@{}", m.name, m.version))
            .collect::<Vec<_>>()
            .join(",");
        let state = self.entry(&hello.agent, now);
        state.record.site.clone_from(&hello.site);
        state.record.agent_version.clone_from(&hello.agent_version);
        state.record.models = models;
        state.record.last_seen = now;
        state.session = Some(session);
        state.online = true;
        state.dirty = true;
    }

    fn entry(&mut self, name: &str, now: i64) -> &mut AgentState {
        self.agents
            .entry(name.to_owned())
            .or_insert_with(|| AgentState {
                record: AgentRecord {
                    name: name.to_owned(),
                    site: String::new(),
                    agent_version: String::new(),
                    models: String::new(),
                    enrolled_at: None,
                    first_seen: now,
                    last_seen: now,
                },
                session: None,
                online: false,
                heartbeat: None,
                heartbeats: 0,
                dirty: true,
                saved_seen: now,
            })
    }

    /// `agent` enrolled at `now`.
    pub fn enrolled(&mut self, agent: &str, now: i64) {
        let state = self.entry(agent, now);
        state.record.enrolled_at = Some(now);
    }

    /// A heartbeat arrived on `agent`'s session `session`. `None` if that session is not the
    /// agent's current one (a stale connection); otherwise whether the agent now reports other
    /// model versions than before.
    pub fn heartbeat(
        &mut self,
        agent: &str,
        session: u64,
        heartbeat: Heartbeat,
        now: i64,
    ) -> Option<bool> {
        let state = self.agents.get_mut(agent)?;
        if state.session != Some(session) {
            return None;
        }
        let models_changed =
            !heartbeat.models.is_empty() && !same_models(&state.record.models, &heartbeat);
        if models_changed {
            state.record.models = heartbeat
                .models
                .iter()
                .map(|m| format!("{}@{}", m.name, m.version))
                .collect::<Vec<_>>()
                .join(",");
            state.dirty = true;
        }
        state.heartbeat = Some(heartbeat);
        state.heartbeats += 1;
        state.record.last_seen = now;
        if !state.online || now - state.saved_seen >= SEEN_PERSIST_MS {
            state.dirty = true;
        }
        state.online = true;
        Some(models_changed)
    }

    /// `agent`'s session `session` closed.
    pub fn closed(&mut self, agent: &str, session: u64) {
        if let Some(state) = self.agents.get_mut(agent)
            && state.session == Some(session)
        {
            state.session = None;
            state.online = false;
            state.heartbeat = None;
            state.dirty = true;
        }
    }

    /// Marks agents silent for longer than `offline_after_ms` offline.
    pub fn sweep(&mut self, now: i64) -> Transitions {
        let mut t = Transitions::default();
        for (name, state) in &mut self.agents {
            if state.online && now - state.record.last_seen > self.offline_after_ms {
                state.online = false;
                state.heartbeat = None;
                state.dirty = true;
                t.offline.push(name.clone());
            }
        }
        t.offline.sort();
        t
    }

    /// Records changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<AgentRecord> {
        self.agents
            .values_mut()
            .filter_map(|s| {
                std::mem::take(&mut s.dirty).then(|| {
                    s.saved_seen = s.record.last_seen;
                    s.record.clone()
                })
            })
            .collect()
    }

    /// Every record whose stored "last seen" is behind, for a final write at shutdown.
    pub fn take_unsaved(&mut self) -> Vec<AgentRecord> {
        for s in self.agents.values_mut() {
            s.dirty |= s.record.last_seen != s.saved_seen;
        }
        self.take_dirty()
    }

    /// The windows per second online agents running `model` expect to send to replicas. An
    /// agent's demand is split evenly over the served models it runs.
    pub fn offload_demand(&self, model: &str, served: &[String]) -> f64 {
        self.share(model, served, |hb| hb.offload_demand.max(0.0))
    }

    /// The windows per second online agents running `model` receive beyond their capacity
    /// now (what a reactive autoscaler's activator would see), split like
    /// [`Fleet::offload_demand`].
    pub fn overflow(&self, model: &str, served: &[String]) -> f64 {
        self.share(model, served, |hb| (hb.arrival_rate - hb.capacity).max(0.0))
    }

    fn share(&self, model: &str, served: &[String], of: impl Fn(&Heartbeat) -> f32) -> f64 {
        self.agents
            .values()
            .filter(|s| s.online)
            .filter_map(|s| s.heartbeat.as_ref())
            .filter_map(|hb| {
                let runs: Vec<&str> = hb
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .filter(|n| served.iter().any(|s| s == n))
                    .collect();
                runs.contains(&model)
                    .then(|| f64::from(of(hb)) / runs.len() as f64)
            })
            .sum()
    }

    /// Whether `agent` is online.
    pub fn is_online(&self, agent: &str) -> bool {
        self.agents.get(agent).is_some_and(|s| s.online)
    }

    /// Online and known agents.
    pub fn counts(&self) -> (usize, usize) {
        let online = self.agents.values().filter(|s| s.online).count();
        (online, self.agents.len())
    }

    /// Every agent, by name.
    /// Each agent's name, site, whether it is online, and its models' health, for rollouts.
    pub fn health(&self) -> Vec<(String, String, bool, Vec<protocol::frame::ModelHealth>)> {
        self.agents
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.record.site.clone(),
                    s.online,
                    s.heartbeat
                        .as_ref()
                        .map(|h| h.health.clone())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Every agent, by name.
    pub fn views(&self) -> Vec<AgentView> {
        let mut v: Vec<AgentView> = self.agents.values().map(view).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One agent.
    pub fn view(&self, name: &str) -> Option<AgentView> {
        self.agents.get(name).map(view)
    }
}

fn view(s: &AgentState) -> AgentView {
    AgentView {
        name: s.record.name.clone(),
        site: s.record.site.clone(),
        online: s.online,
        agent_version: s.record.agent_version.clone(),
        models: s.record.models.clone(),
        last_seen: s.record.last_seen,
        first_seen: s.record.first_seen,
        enrolled_at: s.record.enrolled_at,
        heartbeats: s.heartbeats,
        load: s.heartbeat.as_ref().map(|h| LoadView {
            arrival_rate: h.arrival_rate,
            capacity: h.capacity,
            forecast: h.forecast,
            offload_demand: h.offload_demand,
            offload_share: h.offload_share,
            queue_depth: h.queue_depth,
            in_flight: h.in_flight,
            cpu: h.cpu,
            memory_bytes: h.memory_bytes,
            counters: h.counters.iter().cloned().collect(),
        }),
    }
}

/// Whether `label` (`name@version,…`) lists exactly the heartbeat's models, in order.
fn same_models(label: &str, heartbeat: &Heartbeat) -> bool {
    let mut parts = label.split(',');
    heartbeat.models.iter().all(|m| {
        parts.next().is_some_and(|p| {
            p.split_once('@')
                .is_some_and(|(n, v)| n == m.name && v.parse() == Ok(m.version))
        })
    }) && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::frame::{ModelVersion, PROTOCOL_VERSION};

    fn hello(name: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            agent: name.into(),
            site: "plant-1".into(),
            capabilities: vec![],
            models: vec![ModelVersion {
                name: "bearing-cnn".into(),
                version: 1,
            }],
        }
    }

    fn beat(demand: f32) -> Heartbeat {
        Heartbeat {
            seq: 0,
            arrival_rate: 10.0,
            capacity: 20.0,
            forecast: 30.0,
            offload_demand: demand,
            queue_depth: 0,
            offload_share: 0.0,
            in_flight: 0,
            cpu: 0.5,
            memory_bytes: 1,
            models: vec![ModelVersion {
                name: "bearing-cnn".into(),
                version: 1,
            }],
            counters: vec![],
            health: vec![],
        }
    }

    #[test]
    fn silence_turns_an_agent_offline_and_a_heartbeat_brings_it_back() {
        let mut fleet = Fleet::new(vec![], 3_000);
        fleet.hello(&hello("gw-1"), 1, 0);
        assert!(fleet.heartbeat("gw-1", 1, beat(0.0), 1_000).is_some());
        assert_eq!(fleet.sweep(3_500), Transitions::default());
        assert_eq!(fleet.sweep(4_001).offline, vec!["gw-1".to_string()]);
        assert!(!fleet.view("gw-1").expect("known").online);
        assert!(fleet.heartbeat("gw-1", 1, beat(0.0), 5_000).is_some());
        assert!(fleet.view("gw-1").expect("known").online);
    }

    #[test]
    fn a_stale_session_cannot_speak_for_a_reconnected_agent() {
        let mut fleet = Fleet::new(vec![], 3_000);
        fleet.hello(&hello("gw-1"), 1, 0);
        fleet.hello(&hello("gw-1"), 2, 100);
        assert_eq!(fleet.heartbeat("gw-1", 1, beat(0.0), 200), None);
        fleet.closed("gw-1", 1);
        assert!(
            fleet.view("gw-1").expect("known").online,
            "session 2 is open"
        );
        fleet.closed("gw-1", 2);
        assert!(!fleet.view("gw-1").expect("known").online);
    }

    #[test]
    fn forecast_demand_is_summed_over_online_agents_running_the_model() {
        let mut fleet = Fleet::new(vec![], 3_000);
        let served = vec!["bearing-cnn".to_string()];
        for (i, d) in [(1, 40.0), (2, 25.0), (3, 0.0)] {
            let name = format!("gw-{i}");
            fleet.hello(&hello(&name), i, 0);
            fleet.heartbeat(&name, i, beat(d), 100);
        }
        assert_eq!(fleet.offload_demand("bearing-cnn", &served), 65.0);
        assert_eq!(fleet.offload_demand("vibration-ae", &served), 0.0);
        fleet.closed("gw-1", 1);
        assert_eq!(fleet.offload_demand("bearing-cnn", &served), 25.0);
        assert_eq!(fleet.take_dirty().len(), 3);
        assert!(fleet.take_dirty().is_empty());
    }

    #[test]
    fn heartbeats_reach_the_registry_only_when_something_worth_storing_changed() {
        let mut fleet = Fleet::new(vec![], 3_000);
        fleet.hello(&hello("gw-1"), 1, 0);
        assert_eq!(fleet.take_dirty().len(), 1, "a new session is stored");
        assert_eq!(fleet.heartbeat("gw-1", 1, beat(0.0), 1_000), Some(false));
        assert!(
            fleet.take_dirty().is_empty(),
            "same models, last seen fresh enough"
        );
        let mut upgraded = beat(0.0);
        upgraded.models[0].version = 2;
        assert_eq!(
            fleet.heartbeat("gw-1", 1, upgraded.clone(), 2_000),
            Some(true),
            "a new model version is news"
        );
        let stored = fleet.take_dirty();
        assert_eq!(stored[0].models, "bearing-cnn@2");
        fleet.heartbeat("gw-1", 1, upgraded.clone(), 2_000 + SEEN_PERSIST_MS);
        assert_eq!(fleet.take_dirty()[0].last_seen, 2_000 + SEEN_PERSIST_MS);
        fleet.heartbeat("gw-1", 1, upgraded, 3_000 + SEEN_PERSIST_MS);
        assert!(fleet.take_dirty().is_empty());
        assert_eq!(
            fleet.take_unsaved()[0].last_seen,
            3_000 + SEEN_PERSIST_MS,
            "shutdown stores the newest"
        );
        fleet.closed("gw-1", 1);
        assert_eq!(fleet.take_dirty().len(), 1, "going offline is stored");
    }
}
