//! Machine and process load, sampled with `sysinfo` for the retained status message.

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// One reading of the machine and of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Whole-machine CPU use since the previous reading, percent.
    pub cpu_percent: f32,
    /// This process's resident memory, bytes.
    pub rss_bytes: u64,
    /// Machine memory in use, bytes.
    pub mem_used_bytes: u64,
    /// Machine memory, bytes.
    pub mem_total_bytes: u64,
}

/// Samples load; CPU use is measured between consecutive calls to [`Sampler::sample`].
#[derive(Debug)]
pub struct Sampler {
    system: Option<System>,
    pid: Option<Pid>,
}

impl Sampler {
    /// A sampler; on a platform sysinfo does not support, every reading is zero.
    pub fn new() -> Self {
        let system = System::new()
            .map_err(|e| tracing::warn!("load sampling unavailable: {e}"))
            .ok();
        let pid = sysinfo::get_current_pid().ok();
        let mut sampler = Sampler { system, pid };
        sampler.sample();
        sampler
    }

    /// Takes a reading.
    pub fn sample(&mut self) -> Load {
        let Some(system) = self.system.as_mut() else {
            return Load::default();
        };
        system.refresh_cpu_usage();
        system.refresh_memory();
        let mut rss_bytes = 0;
        if let Some(pid) = self.pid {
            system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_memory(),
            );
            rss_bytes = system.process(pid).map_or(0, |p| p.memory());
        }
        Load {
            cpu_percent: system.global_cpu_usage(),
            rss_bytes,
            mem_used_bytes: system.used_memory(),
            mem_total_bytes: system.total_memory(),
        }
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}
