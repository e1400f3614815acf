//! The simulator replays exactly: same seed and inputs, same outcome, for every policy.

use proptest::prelude::*;
use spillway_models::forecast::Holt;
use spillway_models::policy::{Hpa, Kpa, Policy, Predictive, QLearning, Threshold};
use spillway_models::sim::{SimConfig, simulate, workloads};

fn policy(kind: usize, seed: u64) -> Box<dyn Policy> {
    match kind {
        0 => Box::new(Threshold::new(0.8, 0.4, 30.0, 0)),
        1 => Box::new(Hpa::new(0.7, 1, 200)),
        2 => Box::new(Kpa::new(200)),
        3 => Box::new(Predictive::new(
            Box::new(Kpa::new(200)),
            Box::new(Holt::new(0.1, 0.01)),
            30,
            0.7,
            200,
        )),
        _ => Box::new(QLearning::new(200, seed)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn simulator_is_deterministic_for_a_seed(seed in any::<u64>(), base in 1.0f64..300.0, kind in 0usize..5) {
        let rates = workloads::diurnal(600, base, base * 0.8, 200);
        let config = SimConfig::default();
        let a = simulate(&rates, policy(kind, seed).as_mut(), &config, seed);
        let b = simulate(&rates, policy(kind, seed).as_mut(), &config, seed);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn every_request_is_accounted_for(seed in any::<u64>(), rate in 0.0f64..400.0, kind in 0usize..5) {
        let rates = workloads::flash_spike(400, rate, rate * 4.0, 30);
        let out = simulate(&rates, policy(kind, seed).as_mut(), &SimConfig::default(), seed);
        prop_assert!(out.over_slo_share >= 0.0 && out.over_slo_share <= 1.0);
        prop_assert!(out.p50 <= out.p99);
        prop_assert_eq!(out.trace.len(), rates.len());
        let arrived: f64 = out.trace.iter().map(|r| r.demand).sum();
        prop_assert!((arrived - out.requests).abs() < 1e-6);
    }
}

#[test]
fn another_seed_draws_other_arrivals() {
    let rates = workloads::constant(300, 50.0);
    let config = SimConfig::default();
    let a = simulate(&rates, &mut Kpa::new(200), &config, 1);
    let b = simulate(&rates, &mut Kpa::new(200), &config, 2);
    assert_ne!(a.requests, b.requests);
}
