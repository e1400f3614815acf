//! Gateway delivery: `cross/package.sh` builds the .deb and the tarball from the agent binary;
//! the .deb is installed on this machine with dpkg, and the installed agent checks the
//! default config as the service's own user. Needs root and dpkg; skips with a reason
//! otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use spillway_tests::workspace_binary;

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Removes the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "spillway-agent"])
            .output();
    }
}

/// The unit's `KEY=` values.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_package_installs_where_the_unit_expects_and_the_agent_checks_its_config()
-> anyhow::Result<()> {
    if !is_root() {
        eprintln!("skipped: installing a package needs root");
        return Ok(());
    }
    if !which("dpkg") || !which("dpkg-deb") {
        eprintln!("skipped: dpkg is not installed");
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    // The test binary carries debug info; a gateway build is stripped.
    let binary = work.path().join("edge-agent");
    std::fs::copy(workspace_binary("edge-agent")?, &binary)?;
    if which("strip") {
        run(Command::new("strip").arg(&binary))?;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = run(Command::new("sh")
        .arg(repo.join("cross/package.sh"))
        .arg(&binary)
        .arg("amd64")
        .arg(work.path().join("out")))?;
    let made: Vec<PathBuf> = String::from_utf8(out.stdout)?
        .lines()
        .map(PathBuf::from)
        .collect();
    let deb = made
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let tarball = made
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .expect("a tarball");

    // dpkg checks the dependency against this machine's glibc as it installs.
    let depends = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"))?;
    let depends = String::from_utf8(depends.stdout)?;
    assert!(
        depends.starts_with("libc6 (>= 2."),
        "the package names the glibc its binary needs: {depends}"
    );
    let _installed = Installed;
    run(Command::new("dpkg").arg("-i").arg(deb))?;

    let unit = std::fs::read_to_string("/lib/systemd/system/spillway-agent.service")?;
    for exec in unit_values(&unit, "ExecStart") {
        let program = exec.split_whitespace().next().unwrap_or_default();
        assert!(Path::new(program).is_file(), "{program} from ExecStart");
        let config = exec
            .split_whitespace()
            .skip_while(|w| *w != "--config")
            .nth(1)
            .expect("the unit names the config");
        assert!(Path::new(config).is_file(), "{config} from ExecStart");
    }
    for dir in unit_values(&unit, "ReadWritePaths") {
        assert!(Path::new(dir).is_dir(), "{dir} from ReadWritePaths");
    }
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == key), "the unit sets {key}");
    }
    let user = unit_values(&unit, "User")[0];
    let passwd = run(Command::new("getent").args(["passwd", user]))?;
    let uid = String::from_utf8(passwd.stdout)?
        .split(':')
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let owner = run(Command::new("stat").args(["-c", "%u", "/var/lib/spillway"]))?;
    assert_eq!(
        String::from_utf8(owner.stdout)?.trim(),
        uid,
        "the state folder belongs to {user}"
    );
    if which("systemd-analyze") {
        let verify = Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/spillway-agent.service"])
            .output()?;
        let said = String::from_utf8_lossy(&verify.stderr);
        assert!(
            !said.contains("spillway-agent.service:"),
            "systemd-analyze: {said}"
        );
    }

    // The installed agent, run as the service's user, accepts the default config.
    let checked = run(Command::new("runuser").args([
        "-u",
        user,
        "--",
        "/usr/bin/edge-agent",
        "--config",
        "/etc/spillway/agent.toml",
        "--check-config",
    ]))?;
    let said = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(
        said.contains("configuration and models are valid"),
        "{said}"
    );
    // The default config's outbox is the service user's to write.
    assert!(
        said.contains("outbox /var/lib/spillway/outbox: 0 result messages waiting"),
        "{said}"
    );
    let version = run(Command::new("/usr/bin/edge-agent").arg("--version"))?;
    let version = String::from_utf8(version.stdout)?;
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")) && version.contains("x86_64"),
        "{version}"
    );

    // Purging removes it all.
    run(Command::new("dpkg").args(["--purge", "spillway-agent"]))?;
    assert!(!Path::new("/usr/bin/edge-agent").exists());
    assert!(!Path::new("/var/lib/spillway").exists());

    // The tarball installs the same files under a root of our choosing.
    let unpack = work.path().join("unpack");
    std::fs::create_dir_all(&unpack)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(tarball)
        .arg("-C")
        .arg(&unpack))?;
    let folder = std::fs::read_dir(&unpack)?
        .next()
        .expect("one folder")?
        .path();
    let root = work.path().join("root");
    run(Command::new("sh")
        .arg(folder.join("install.sh"))
        .env("DESTDIR", &root))?;
    for file in [
        "usr/bin/edge-agent",
        "lib/systemd/system/spillway-agent.service",
        "etc/spillway/agent.toml",
    ] {
        assert!(root.join(file).is_file(), "{file} from install.sh");
    }
    assert!(root.join("var/lib/spillway").is_dir());

    // On a gateway whose loader refuses the build, install.sh says why and installs nothing.
    let refused = folder.join("edge-agent");
    std::fs::write(
        &refused,
        "#!/bin/sh\necho \"version 'GLIBC_ABI_DT_RELR' not found\" >&2\nexit 1\n",
    )?;
    let out = Command::new("sh").arg(folder.join("install.sh")).output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "install.sh went on: {said}");
    assert!(
        said.contains("does not run on this machine") && said.contains("GLIBC_ABI_DT_RELR"),
        "{said}"
    );
    assert!(!Path::new("/usr/bin/edge-agent").exists());
    Ok(())
}
