//! Records the target triple for `edge-agent --version`.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=SPILLWAY_TARGET={target}");
}
