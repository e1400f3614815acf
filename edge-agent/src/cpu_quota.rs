//! The CPU quota a thread runs under (cgroup v1 `cpu.cfs_quota_us`, v2 `cpu.max`).
//!
//! A quota caps throughput, not speed: a thread under a 10 % quota still runs one inference
//! at full speed and is only held back once it has used its share of the period. Measured
//! inference times then overstate the capacity of a containerised agent (a Kubernetes CPU
//! limit is such a quota) by the inverse of the quota. The router therefore caps its worker
//! count by the quota, read here from `/proc/thread-self/cgroup` and the cgroup files of the
//! thread's group and every ancestor. Parsing is separate from reading so tests feed text.

use std::path::{Path, PathBuf};

/// Where a thread's cpu controller lives, from the text of `/proc/<tid>/cgroup`.
pub fn cpu_cgroup(proc_cgroup: &str, root: &Path) -> Option<(PathBuf, Version)> {
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "cpu") {
            let mount = root.join(controllers);
            let mount = if mount.exists() {
                mount
            } else {
                root.join("cpu")
            };
            return Some((join(&mount, path), Version::V1));
        }
    }
    let v2 = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some((join(root, v2), Version::V2))
}

fn join(base: &Path, path: &str) -> PathBuf {
    base.join(path.trim_start_matches('/'))
}

/// Which cgroup hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`).
    V1,
    /// cgroup v2 (`cpu.max`).
    V2,
}

/// Cores allowed by a v2 `cpu.max` text (`max 100000` or `quota period`).
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?.parse::<f64>().ok()?;
    let period = it.next()?.parse::<f64>().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// Cores allowed by v1 quota and period texts (`-1` means no quota).
pub fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota = quota.trim().parse::<f64>().ok()?;
    let period = period.trim().parse::<f64>().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// Cores the calling thread may use, if a quota limits it (the tightest along its path).
pub fn current_thread() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/cgroup").ok()?;
    let root = Path::new("/sys/fs/cgroup");
    let (mut dir, version) = cpu_cgroup(&text, root)?;
    let mut tightest: Option<f64> = None;
    loop {
        let cores = match version {
            Version::V1 => parse_cfs(
                &std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap_or_default(),
                &std::fs::read_to_string(dir.join("cpu.cfs_period_us")).unwrap_or_default(),
            ),
            Version::V2 => {
                parse_cpu_max(&std::fs::read_to_string(dir.join("cpu.max")).unwrap_or_default())
            }
        };
        if let Some(c) = cores {
            tightest = Some(tightest.map_or(c, |t| t.min(c)));
        }
        if !dir.pop() || !dir.starts_with(root) || dir == root {
            break;
        }
    }
    tightest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_paths_are_found() {
        let root = Path::new("/nonexistent/cgroup");
        let v1 = "12:pids:/\n4:cpu,cpuacct:/spillway/gw\n0::/\n";
        assert_eq!(
            cpu_cgroup(v1, root),
            Some((
                PathBuf::from("/nonexistent/cgroup/cpu/spillway/gw"),
                Version::V1
            ))
        );
        let v2 = "0::/system.slice/agent.service\n";
        assert_eq!(
            cpu_cgroup(v2, root),
            Some((
                PathBuf::from("/nonexistent/cgroup/system.slice/agent.service"),
                Version::V2
            ))
        );
        assert_eq!(cpu_cgroup("", root), None);
    }

    #[test]
    fn quotas_parse_and_no_quota_is_none() {
        assert_eq!(parse_cpu_max("50000 100000\n"), Some(0.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cfs("1000\n", "10000\n"), Some(0.1));
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("", ""), None);
    }
}
