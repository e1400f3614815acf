//! Rollouts: a model version reaches a canary share of the fleet, bakes, then reaches all —
//! or goes back everywhere it went the moment a health gate fails.
//!
//! A pure state machine in the style of the policies: [`Rollout::step`] takes the agents'
//! reports (site, online, the model's [`ModelHealth`]) and the time, and returns the orders
//! the hub should be sending now (update this agent, roll that one back). Orders are a
//! desired state, repeated every step until the reports show them done; the session layer
//! decides how often to send them again.
//!
//! * **Canary.** A share of the agents running the model, picked round-robin across sites so
//!   no site is left out and none takes them all, gets the new version. The bake time starts
//!   when every canary reports the new version.
//! * **Gates** (on every agent that runs the new version): a refused or failed install, an
//!   error rate above the limit, a p99 inference time above a multiple of the agent's own
//!   p99 before the update, and — once enough windows ran on both versions — output drift
//!   (mean absolute score difference) or anomaly decisions that differ too often.
//! * **Full.** After the bake with the gates holding, every agent gets it; then the rollout
//!   is done, and keeps bringing agents that were offline (or join later) up to the version.
//! * **Rolled back / aborted.** Every agent that runs the new version is told to go back to
//!   the version it ran before.

use std::collections::BTreeMap;

use protocol::frame::ModelHealth;
use serde::{Deserialize, Serialize};

/// Limits and timing of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Share of the agents in the canary stage (at least one agent).
    pub canary_share: f64,
    /// How long the canary runs the new version before the rest get it, ms.
    pub bake_ms: i64,
    /// Highest share of windows failing on the new version.
    pub max_error_rate: f64,
    /// Highest p99 inference time of the new version, as a multiple of the old one's…
    pub max_p99_ratio: f64,
    /// …and at least this much above it, µs: a millisecond of scheduling noise on a busy
    /// gateway is not a slower model.
    #[serde(default = "default_p99_slack_us")]
    pub p99_slack_us: u64,
    /// Highest mean absolute difference of the two versions' scores.
    pub max_drift: f32,
    /// Highest share of compared windows where the versions disagree on "anomaly".
    pub max_flip_share: f64,
    /// Windows compared before the drift gates judge.
    pub min_shadow_runs: u64,
    /// Windows answered before the error and latency gates judge.
    pub min_inferences: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            canary_share: 0.1,
            bake_ms: 300_000,
            max_error_rate: 0.01,
            max_p99_ratio: 2.0,
            p99_slack_us: default_p99_slack_us(),
            max_drift: 0.5,
            max_flip_share: 0.05,
            min_shadow_runs: 20,
            min_inferences: 50,
        }
    }
}

fn default_p99_slack_us() -> u64 {
    5_000
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The canary agents are getting or running it.
    Canary,
    /// Every agent is getting it.
    Full,
    /// Every agent runs it; late agents are still brought up to it.
    Done,
    /// A gate failed: going back everywhere.
    RolledBack,
    /// An operator stopped it: going back everywhere.
    Aborted,
}

/// One agent as a step sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentReport<'a> {
    /// Name.
    pub name: &'a str,
    /// Site.
    pub site: &'a str,
    /// Session open.
    pub online: bool,
    /// Its record for the rollout's model; `None` when it does not run the model.
    pub health: Option<&'a ModelHealth>,
}

/// What the hub should tell an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Install the rollout's version.
    Update {
        /// Agent.
        agent: String,
    },
    /// Go back to `to`.
    Rollback {
        /// Agent.
        agent: String,
        /// The version it ran before.
        to: u32,
    },
}

/// What an agent was before the rollout touched it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Before {
    /// Its version of the model.
    pub version: u32,
    /// Its p99 inference time then, µs.
    pub p99_us: u64,
    /// Its failed updates then.
    pub update_failures: u64,
}

/// One rollout of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Id, rising.
    pub id: u64,
    /// Model name.
    pub model: String,
    /// The version being rolled out.
    pub version: u32,
    /// Limits and timing.
    pub settings: Settings,
    /// Where it is.
    pub stage: Stage,
    /// Paused by an operator: no new updates go out (rollbacks still do).
    pub paused: bool,
    /// When it started, Unix ms.
    pub started_at: i64,
    /// When every canary ran the new version, Unix ms.
    pub baked_from: Option<i64>,
    /// The canary agents.
    pub canary: Vec<String>,
    /// Each agent touched or to be touched, as it was before.
    pub before: BTreeMap<String, Before>,
    /// Why it stopped, when it did.
    pub reason: Option<String>,
    /// What happened, oldest first (at most [`MAX_EVENTS`]).
    pub events: Vec<(i64, String)>,
}

/// Events kept per rollout.
pub const MAX_EVENTS: usize = 64;

impl Rollout {
    /// Starts rolling `version` of `model` out to the agents that run it.
    pub fn start(
        id: u64,
        model: &str,
        version: u32,
        settings: Settings,
        agents: &[AgentReport<'_>],
        now: i64,
    ) -> Result<Rollout, String> {
        let running: Vec<&AgentReport<'_>> = agents
            .iter()
            .filter(|a| a.health.is_some_and(|h| h.name == model))
            .collect();
        if running.is_empty() {
            return Err(format!("no known agent runs {model}"));
        }
        if !(0.0..=1.0).contains(&settings.canary_share) {
            return Err(format!(
                "the canary share must be within 0–100 %, not {}",
                settings.canary_share * 100.0
            ));
        }
        let mut before = BTreeMap::new();
        for a in &running {
            let h = a.health.expect("filtered");
            before.insert(
                a.name.to_owned(),
                Before {
                    version: h.version,
                    p99_us: h.p99_us,
                    update_failures: h.update_failures,
                },
            );
        }
        let canary = pick_canary(&running, settings.canary_share);
        let mut rollout = Rollout {
            id,
            model: model.to_owned(),
            version,
            settings,
            stage: Stage::Canary,
            paused: false,
            started_at: now,
            baked_from: None,
            canary,
            before,
            reason: None,
            events: Vec::new(),
        };
        rollout.event(
            now,
            format!(
                "started: v{version} to {} of {} agents first ({})",
                rollout.canary.len(),
                running.len(),
                rollout.canary.join(", ")
            ),
        );
        Ok(rollout)
    }

    /// Whether it still sends updates (canary, full or done).
    pub fn is_forward(&self) -> bool {
        matches!(self.stage, Stage::Canary | Stage::Full | Stage::Done)
    }

    fn event(&mut self, now: i64, what: String) {
        if self.events.len() == MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push((now, what));
    }

    /// Stops new updates.
    pub fn pause(&mut self, now: i64) {
        if !self.paused {
            self.paused = true;
            self.event(now, "paused".into());
        }
    }

    /// Lets updates go on.
    pub fn resume(&mut self, now: i64) {
        if self.paused {
            self.paused = false;
            self.event(now, "resumed".into());
        }
    }

    /// Stops the rollout and sends every updated agent back.
    pub fn abort(&mut self, now: i64) {
        if self.is_forward() {
            self.stage = Stage::Aborted;
            self.reason = Some("aborted by an operator".into());
            self.event(now, "aborted: rolling back".into());
        }
    }

    /// Advances the rollout with the agents' reports at `now`; returns the orders to send.
    pub fn step(&mut self, agents: &[AgentReport<'_>], now: i64) -> Vec<Order> {
        let running: Vec<(&AgentReport<'_>, &ModelHealth)> = agents
            .iter()
            .filter_map(|a| a.health.filter(|h| h.name == self.model).map(|h| (a, h)))
            .collect();
        // Agents that joined since the start are remembered as they were.
        for (a, h) in &running {
            if h.version < self.version && !self.before.contains_key(a.name) {
                self.before.insert(
                    a.name.to_string(),
                    Before {
                        version: h.version,
                        p99_us: h.p99_us,
                        update_failures: h.update_failures,
                    },
                );
            }
        }
        if self.is_forward()
            && let Some(why) = self.failed_gate(&running)
        {
            self.stage = Stage::RolledBack;
            self.event(now, format!("gate failed: {why}; rolling back"));
            self.reason = Some(why);
        }
        match self.stage {
            Stage::RolledBack | Stage::Aborted => running
                .iter()
                .filter(|(a, h)| a.online && h.version == self.version)
                .filter_map(|(a, _)| {
                    let to = self.before.get(a.name)?.version;
                    Some(Order::Rollback {
                        agent: a.name.to_string(),
                        to,
                    })
                })
                .collect(),
            Stage::Canary => {
                let on = |name: &str| {
                    running
                        .iter()
                        .any(|(a, h)| a.name == name && h.version >= self.version)
                };
                if self.baked_from.is_none() && self.canary.iter().all(|c| on(c)) {
                    self.baked_from = Some(now);
                    self.event(now, "every canary runs it: baking".into());
                }
                if let Some(from) = self.baked_from
                    && now - from >= self.settings.bake_ms
                    && !self.paused
                {
                    self.stage = Stage::Full;
                    self.event(now, "bake passed: updating every agent".into());
                    return self.updates(&running, |_| true);
                }
                let canary = self.canary.clone();
                self.updates(&running, |name| canary.iter().any(|c| c == name))
            }
            Stage::Full | Stage::Done => {
                if self.stage == Stage::Full
                    && running
                        .iter()
                        .filter(|(a, _)| a.online)
                        .all(|(_, h)| h.version >= self.version)
                {
                    self.stage = Stage::Done;
                    self.event(now, "every online agent runs it".into());
                }
                self.updates(&running, |_| true)
            }
        }
    }

    fn updates(
        &self,
        running: &[(&AgentReport<'_>, &ModelHealth)],
        chosen: impl Fn(&str) -> bool,
    ) -> Vec<Order> {
        if self.paused {
            return Vec::new();
        }
        running
            .iter()
            .filter(|(a, h)| a.online && h.version < self.version && chosen(a.name))
            .map(|(a, _)| Order::Update {
                agent: a.name.to_string(),
            })
            .collect()
    }

    /// The first gate that fails, described.
    fn failed_gate(&self, running: &[(&AgentReport<'_>, &ModelHealth)]) -> Option<String> {
        let s = &self.settings;
        for (a, h) in running {
            let Some(before) = self.before.get(a.name) else {
                continue;
            };
            if h.update_failures > before.update_failures && h.version < self.version {
                return Some(format!(
                    "{} could not install v{}: {}",
                    a.name, self.version, h.last_failure
                ));
            }
            if h.version != self.version {
                continue;
            }
            let answered = h.inferences + h.errors;
            if answered >= s.min_inferences {
                let rate = h.errors as f64 / answered as f64;
                if rate > s.max_error_rate {
                    return Some(format!(
                        "{}: {:.1} % of windows fail on v{} (limit {:.1} %)",
                        a.name,
                        rate * 100.0,
                        self.version,
                        s.max_error_rate * 100.0
                    ));
                }
                let limit = (before.p99_us as f64 * s.max_p99_ratio)
                    .max((before.p99_us + s.p99_slack_us) as f64);
                if before.p99_us > 0 && h.p99_us as f64 > limit {
                    return Some(format!(
                        "{}: p99 {} µs on v{}, was {} µs (limit ×{})",
                        a.name, h.p99_us, self.version, before.p99_us, s.max_p99_ratio
                    ));
                }
            }
            if h.shadow_runs >= s.min_shadow_runs {
                if h.drift_mean_abs > s.max_drift {
                    return Some(format!(
                        "{}: scores drift {:.3} from v{} on average (limit {})",
                        a.name, h.drift_mean_abs, h.shadow_version, s.max_drift
                    ));
                }
                let flips = h.decision_flips as f64 / h.shadow_runs as f64;
                if flips > s.max_flip_share {
                    return Some(format!(
                        "{}: the anomaly decision differs from v{} on {:.1} % of windows (limit {:.1} %)",
                        a.name,
                        h.shadow_version,
                        flips * 100.0,
                        s.max_flip_share * 100.0
                    ));
                }
            }
        }
        None
    }
}

/// `ceil(share · n)` agents (at least one), taken round-robin over the sites in name order.
fn pick_canary(running: &[&AgentReport<'_>], share: f64) -> Vec<String> {
    let want = ((share * running.len() as f64).ceil() as usize).clamp(1, running.len());
    let mut by_site: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for a in running {
        by_site.entry(a.site).or_default().push(a.name);
    }
    for names in by_site.values_mut() {
        names.sort_unstable();
    }
    let mut picked = Vec::with_capacity(want);
    let mut round = 0;
    while picked.len() < want {
        for names in by_site.values() {
            if let Some(name) = names.get(round)
                && picked.len() < want
            {
                picked.push((*name).to_owned());
            }
        }
        round += 1;
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(version: u32) -> ModelHealth {
        ModelHealth {
            name: "bearing-cnn".into(),
            version,
            p99_us: 1_000,
            ..ModelHealth::default()
        }
    }

    struct Fleet {
        agents: Vec<(String, String, ModelHealth)>,
    }

    impl Fleet {
        fn new(sites: &[(&str, usize)]) -> Fleet {
            let mut agents = Vec::new();
            for (site, n) in sites {
                for i in 0..*n {
                    agents.push((format!("{site}-gw{i}"), site.to_string(), health(1)));
                }
            }
            Fleet { agents }
        }

        fn reports(&self) -> Vec<AgentReport<'_>> {
            self.agents
                .iter()
                .map(|(n, s, h)| AgentReport {
                    name: n,
                    site: s,
                    online: true,
                    health: Some(h),
                })
                .collect()
        }

        /// Agents do what they are told.
        fn obey(&mut self, orders: &[Order], version: u32) {
            for o in orders {
                let (agent, to) = match o {
                    Order::Update { agent } => (agent, version),
                    Order::Rollback { agent, to } => (agent, *to),
                };
                let h = &mut self
                    .agents
                    .iter_mut()
                    .find(|a| &a.0 == agent)
                    .expect("known")
                    .2;
                *h = health(to);
            }
        }

        fn on(&self, version: u32) -> usize {
            self.agents
                .iter()
                .filter(|a| a.2.version == version)
                .count()
        }
    }

    fn settings() -> Settings {
        Settings {
            canary_share: 0.25,
            bake_ms: 60_000,
            ..Settings::default()
        }
    }

    #[test]
    fn the_canary_is_spread_over_sites() {
        let fleet = Fleet::new(&[("a", 6), ("b", 1), ("c", 1)]);
        let r =
            Rollout::start(1, "bearing-cnn", 2, settings(), &fleet.reports(), 0).expect("start");
        assert_eq!(
            r.canary,
            vec!["a-gw0", "b-gw0"],
            "ceil(0.25 · 8) = 2, one per site first"
        );
    }

    #[test]
    fn canary_then_bake_then_everyone() {
        let mut fleet = Fleet::new(&[("a", 4), ("b", 4)]);
        let mut r =
            Rollout::start(1, "bearing-cnn", 2, settings(), &fleet.reports(), 0).expect("start");
        let orders = r.step(&fleet.reports(), 1_000);
        assert_eq!(orders.len(), 2, "the canary only: {orders:?}");
        fleet.obey(&orders, 2);
        assert!(r.step(&fleet.reports(), 2_000).is_empty());
        assert_eq!(r.baked_from, Some(2_000));
        assert!(r.step(&fleet.reports(), 61_000).is_empty(), "still baking");
        let orders = r.step(&fleet.reports(), 62_000);
        assert_eq!(r.stage, Stage::Full);
        assert_eq!(orders.len(), 6);
        fleet.obey(&orders, 2);
        assert!(r.step(&fleet.reports(), 63_000).is_empty());
        assert_eq!(r.stage, Stage::Done);
        assert_eq!(fleet.on(2), 8);
    }

    #[test]
    fn drift_on_the_canary_rolls_back_and_the_rest_never_see_it() {
        let mut fleet = Fleet::new(&[("a", 2), ("b", 2)]);
        let mut r =
            Rollout::start(1, "bearing-cnn", 3, settings(), &fleet.reports(), 0).expect("start");
        let orders = r.step(&fleet.reports(), 1_000);
        fleet.obey(&orders, 3);
        let canary = &mut fleet
            .agents
            .iter_mut()
            .find(|a| a.2.version == 3)
            .expect("one")
            .2;
        canary.shadow_version = 1;
        canary.shadow_runs = 40;
        canary.drift_mean_abs = 3.0;
        canary.decision_flips = 30;
        let orders = r.step(&fleet.reports(), 2_000);
        assert_eq!(r.stage, Stage::RolledBack);
        assert!(
            r.reason.as_deref().unwrap_or("").contains("drift"),
            "{:?}",
            r.reason
        );
        assert_eq!(orders.len(), 1);
        assert!(matches!(&orders[0], Order::Rollback { to: 1, .. }));
        fleet.obey(&orders, 3);
        assert_eq!(fleet.on(1), 4);
        assert!(
            r.step(&fleet.reports(), 400_000).is_empty(),
            "nothing more, ever"
        );
    }

    #[test]
    fn a_refused_install_fails_the_gate() {
        let mut fleet = Fleet::new(&[("a", 4)]);
        let mut r =
            Rollout::start(1, "bearing-cnn", 2, settings(), &fleet.reports(), 0).expect("start");
        r.step(&fleet.reports(), 1_000);
        let h = &mut fleet.agents[0].2;
        h.update_failures = 1;
        h.last_failure = "bad signature".into();
        r.step(&fleet.reports(), 2_000);
        assert_eq!(r.stage, Stage::RolledBack);
        assert!(r.reason.as_deref().unwrap_or("").contains("bad signature"));
    }

    #[test]
    fn errors_and_slowness_fail_the_gates_only_with_enough_windows() {
        let mut fleet = Fleet::new(&[("a", 2)]);
        let mut r =
            Rollout::start(1, "bearing-cnn", 2, settings(), &fleet.reports(), 0).expect("start");
        let orders = r.step(&fleet.reports(), 1_000);
        fleet.obey(&orders, 2);
        let h = &mut fleet
            .agents
            .iter_mut()
            .find(|a| a.2.version == 2)
            .expect("one")
            .2;
        h.inferences = 10;
        h.p99_us = 5_500;
        r.step(&fleet.reports(), 2_000);
        assert_eq!(r.stage, Stage::Canary, "10 windows judge nothing");
        let h = &mut fleet
            .agents
            .iter_mut()
            .find(|a| a.2.version == 2)
            .expect("one")
            .2;
        h.inferences = 100;
        r.step(&fleet.reports(), 3_000);
        assert_eq!(
            r.stage,
            Stage::Canary,
            "5.5 ms against 1 ms is within the 5 ms slack"
        );
        let h = &mut fleet
            .agents
            .iter_mut()
            .find(|a| a.2.version == 2)
            .expect("one")
            .2;
        h.p99_us = 9_000;
        r.step(&fleet.reports(), 4_000);
        assert_eq!(r.stage, Stage::RolledBack);
        assert!(r.reason.as_deref().unwrap_or("").contains("p99"));
    }

    #[test]
    fn pause_holds_updates_and_abort_sends_everyone_back() {
        let mut fleet = Fleet::new(&[("a", 4)]);
        let mut r =
            Rollout::start(1, "bearing-cnn", 2, settings(), &fleet.reports(), 0).expect("start");
        r.pause(500);
        assert!(r.step(&fleet.reports(), 1_000).is_empty());
        r.resume(1_500);
        let orders = r.step(&fleet.reports(), 2_000);
        fleet.obey(&orders, 2);
        r.abort(3_000);
        let orders = r.step(&fleet.reports(), 3_000);
        assert_eq!(orders.len(), 1);
        fleet.obey(&orders, 2);
        assert_eq!(fleet.on(1), 4);
        assert_eq!(r.stage, Stage::Aborted);
    }
}
