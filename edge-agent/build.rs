//! Records the target triple, the git revision and the model formats the build reads, for
//! `edge-agent --version`.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=SPILLWAY_TARGET={target}");
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SPILLWAY_REVISION={revision}");
    let formats = if std::env::var_os("CARGO_FEATURE_ONNX").is_some() {
        "ONNX and NNEF"
    } else {
        "NNEF"
    };
    println!("cargo:rustc-env=SPILLWAY_FORMATS={formats}");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
}
