//! The `edge-agent` command line: version, and configuration checks that exit.
//!
//! (Building these tests also builds the binary that the workspace's end-to-end tests run.)

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
}

#[test]
fn version_names_the_revision_target_and_model_formats() {
    let out = agent().arg("--version").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert!(text.contains("linux"), "the target triple: {text}");
    let inside = text.split('(').nth(1).unwrap_or_default();
    let parts: Vec<&str> = inside
        .trim_end()
        .trim_end_matches(')')
        .split(", ")
        .collect();
    assert_eq!(parts.len(), 3, "revision, target and formats: {text}");
    let formats = if cfg!(feature = "onnx") {
        "reads ONNX and NNEF"
    } else {
        "reads NNEF"
    };
    assert_eq!(parts[2], formats, "{text}");
}

/// Runs `edge-agent --check-config` on a config written from `toml`.
fn check_config(toml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).expect("write");
    agent()
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .expect("runs")
}

#[test]
fn check_config_loads_the_models_and_exits() {
    let out = check_config(
        "[agent]\nsite = \"s\"\ngateway = \"g\"\n[[models]]\nname = \"vib\"\nzoo = \"vibration-ae\"\n\
         [sensors]\ndefault_model = \"vib\"\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("valid"), "{text}");
    // It says what it would connect to and read.
    assert!(
        text.contains("broker 127.0.0.1:1883 as spillway-s-g, reading spillway/s/g/+/data"),
        "{text}"
    );
    assert!(
        text.contains("model vib v1: window 128, stride 128"),
        "{text}"
    );
}

#[test]
fn check_config_refuses_a_bad_config_and_says_why() {
    let out = check_config(
        "[agent]\nsite = \"s\"\ngateway = \"g\"\nqueue_capacity = 0\n[[models]]\nname = \"vib\"\n\
         path = \"missing.onnx\"\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue_capacity"), "{err}");

    let out = check_config(
        "[agent]\nsite = \"s\"\ngateway = \"g\"\n[[models]]\nname = \"vib\"\npath = \"missing.onnx\"\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.onnx"),
        "the unreadable model is named: {err}"
    );
}
