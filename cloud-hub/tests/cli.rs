//! The `cloud-hub` binary's certificate, replica and simulator commands, run as a user runs them.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn hub(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .args(args)
        .output()
        .expect("cloud-hub runs")
}

#[test]
fn ca_init_and_issue_write_certificates_with_private_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().to_str().expect("utf-8");
    assert!(hub(&["ca", "init", "--dir", ca]).status.success());
    let again = hub(&["ca", "init", "--dir", ca]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let agent = hub(&["ca", "issue", "--dir", ca, "--agent", "gw-7"]);
    assert!(
        agent.status.success(),
        "{}",
        String::from_utf8_lossy(&agent.stderr)
    );
    let server = hub(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "--server",
        "replica",
        "--host",
        "localhost",
        "--host",
        "127.0.0.1",
    ]);
    assert!(
        server.status.success(),
        "{}",
        String::from_utf8_lossy(&server.stderr)
    );
    for key in ["ca.key", "gw-7.key", "replica.key"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .expect("key written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    assert!(
        !hub(&["ca", "issue", "--dir", ca]).status.success(),
        "no role given"
    );
}

#[test]
fn a_replica_with_a_bad_model_or_certificate_says_so_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().to_str().expect("utf-8");
    assert!(hub(&["ca", "init", "--dir", ca]).status.success());
    let no_model = hub(&[
        "replica",
        "--listen",
        "127.0.0.1:0",
        "--zoo",
        "no-such-model",
    ]);
    assert!(!no_model.status.success());
    assert!(String::from_utf8_lossy(&no_model.stderr).contains("no-such-model"));

    let not_onnx = dir.path().join("model.onnx");
    std::fs::write(&not_onnx, b"not a model").expect("write");
    let bad_model = hub(&[
        "replica",
        "--listen",
        "127.0.0.1:0",
        "--model",
        not_onnx.to_str().expect("utf-8"),
    ]);
    assert!(!bad_model.status.success());

    let missing_cert = hub(&[
        "replica",
        "--listen",
        "127.0.0.1:0",
        "--zoo",
        "vibration-ae",
        "--ca",
        &format!("{ca}/ca.pem"),
        "--cert",
        &format!("{ca}/nobody.pem"),
        "--key",
        &format!("{ca}/nobody.key"),
    ]);
    assert!(!missing_cert.status.success());
    assert!(String::from_utf8_lossy(&missing_cert.stderr).contains("nobody.pem"));
}

/// Writes `hours` rows of a `ts,value` series: for each day, `levels(day)` gives the value of
/// the night and of the shift from 06:00 to 22:00.
fn write_hourly(path: &std::path::Path, hours: usize, levels: impl Fn(usize) -> (usize, usize)) {
    let mut text = String::from("ts,value\n");
    for h in 0..hours {
        let (night, shift) = levels(h / 24);
        let v = if (6..22).contains(&(h % 24)) {
            shift
        } else {
            night
        };
        text.push_str(&format!("{h},{v}\n"));
    }
    std::fs::write(path, text).expect("csv written");
}

#[test]
fn simulate_replays_a_users_csv_beside_the_synthetic_workloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("press-line.csv");
    // Three days of an hourly series: quiet nights, a busy shift.
    write_hourly(&csv, 72, |_| (30, 250));
    let out_dir = dir.path().join("plots");
    let absent = dir.path().join("absent");
    let args = [
        "simulate",
        "--policies",
        "KPA,predictive",
        "--seeds",
        "1",
        "--data",
        absent.to_str().expect("utf-8"),
        "--csv",
        csv.to_str().expect("utf-8"),
        "--out",
        out_dir.to_str().expect("utf-8"),
    ];
    let out = hub(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The series is compared like the others, and gets its plot.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| press-line | "))
        .collect();
    assert_eq!(rows.len(), 3, "two policy rows and a goal row:\n{stdout}");
    assert!(out_dir.join("press-line.svg").exists());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shared series skipped"),
        "a missing data folder is said, not fatal"
    );

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "ts,value\n0,12\n1,twelve\n").expect("csv written");
    let out = hub(&["simulate", "--csv", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
}

#[test]
fn forecast_eval_scores_and_plots_a_users_csv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("kiln.csv");
    // Ten days of an hourly series with a daily shape that grows a little each day.
    write_hourly(&csv, 240, |day| (40 + 5 * day, 200 + 5 * day));
    let out_dir = dir.path().join("plots");
    let absent = dir.path().join("absent");
    let out = hub(&[
        "forecast-eval",
        "--data",
        absent.to_str().expect("utf-8"),
        "--csv",
        csv.to_str().expect("utf-8"),
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = stdout
        .lines()
        .filter(|l| l.starts_with("| kiln | "))
        .count();
    assert_eq!(rows, 8, "seven forecasters and the best:\n{stdout}");
    assert!(stdout.contains("| kiln | **best: "), "{stdout}");
    // Every forecaster of the table is drawn.
    let svg = std::fs::read_to_string(out_dir.join("kiln.svg")).expect("plot written");
    for line in stdout.lines().filter(|l| l.starts_with("| kiln | ")) {
        let forecaster = line.split(" | ").nth(1).expect("a forecaster column");
        if !forecaster.starts_with("**") {
            assert!(svg.contains(forecaster), "{forecaster} is not drawn");
        }
    }
}
