//! A simulated machine: gearbox vibration with bearing faults that come and go.
//!
//! The signal follows the zoo's training script (`models/zoo/train.py`): shaft harmonics, a
//! gear-mesh tone and noise; a bearing fault adds impulses at the defect frequency, each
//! ringing a structural resonance near 3 kHz. Deterministic for its seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Samples per second.
pub(crate) const SAMPLE_RATE: f64 = 12_800.0;
const WINDOW: usize = 128;

/// What a machine is.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) name: String,
    pub(crate) rate: u32,
    pub(crate) fault_every_secs: f64,
    pub(crate) seed: u64,
}

/// One window and whether a fault was present.
pub(crate) struct Window {
    pub(crate) samples: Vec<f32>,
    pub(crate) faulty: bool,
}

pub(crate) struct Machine {
    rng: StdRng,
    t: f64,
    shaft_hz: f64,
    phases: [f64; 3],
    /// Probability per window that a fault starts.
    fault_chance: f64,
    /// Windows left in the current fault; 0 when healthy.
    fault_left: u32,
    fault_hz: f64,
    resonance_hz: f64,
    fault_windows: u32,
    next_impulse: f64,
}

impl Machine {
    pub(crate) fn new(spec: &Spec) -> Machine {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let shaft_hz = rng.random_range(20.0..40.0);
        let phases = [
            rng.random_range(0.0..std::f64::consts::TAU),
            rng.random_range(0.0..std::f64::consts::TAU),
            rng.random_range(0.0..std::f64::consts::TAU),
        ];
        Machine {
            rng,
            t: 0.0,
            shaft_hz,
            phases,
            fault_chance: 1.0 / (spec.fault_every_secs * f64::from(spec.rate)).max(1.0),
            fault_left: 0,
            fault_hz: 0.0,
            resonance_hz: 3000.0,
            fault_windows: 3 * spec.rate,
            next_impulse: 0.0,
        }
    }

    fn normal(&mut self) -> f64 {
        // Box–Muller.
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub(crate) fn next_window(&mut self) -> Window {
        if self.fault_left == 0 && self.rng.random_bool(self.fault_chance) {
            self.fault_left = self.fault_windows;
            let ratio = if self.rng.random_bool(0.5) {
                3.58
            } else {
                5.42
            };
            self.fault_hz = ratio * self.shaft_hz;
            self.resonance_hz = self.rng.random_range(2600.0..3400.0);
            self.next_impulse = self.t;
        }
        let faulty = self.fault_left > 0;
        let tau = std::f64::consts::TAU;
        let mut samples = Vec::with_capacity(WINDOW);
        for _ in 0..WINDOW {
            let t = self.t;
            let mut x = 0.8 * (tau * self.shaft_hz * t + self.phases[0]).sin()
                + 0.3 * (tau * 2.0 * self.shaft_hz * t + self.phases[1]).sin()
                + 0.35 * (tau * 27.0 * self.shaft_hz * t + self.phases[2]).sin()
                + 0.08 * self.normal();
            if faulty {
                if t >= self.next_impulse + 1.0 / self.fault_hz {
                    self.next_impulse = t;
                }
                let since = t - self.next_impulse;
                x += 3.0 * (-since * 900.0).exp() * (tau * self.resonance_hz * since).sin();
            }
            samples.push(x as f32);
            self.t += 1.0 / SAMPLE_RATE;
        }
        self.fault_left = self.fault_left.saturating_sub(1);
        Window { samples, faulty }
    }
}
