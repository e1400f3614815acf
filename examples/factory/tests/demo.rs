//! The README's first command, run as a user runs it: the demo binary, its embedded broker,
//! hub, agents, replicas and machines, for a short run with a burst early in it.

use std::process::Command;

/// The numbers after each `prefix` in `text`, in order, up to the first that does not parse.
fn numbers_after<'a>(text: &'a str, prefix: &str) -> Vec<u64> {
    text.match_indices(prefix)
        .filter_map(|(at, _)| {
            let rest: &'a str = &text[at + prefix.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

#[test]
fn the_demo_answers_every_window_and_spills_a_burst_to_replicas() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_factory"))
        .args([
            "--duration",
            "25",
            "--burst-every-secs",
            "5",
            "--burst-secs",
            "10",
        ])
        .args(["--http", "127.0.0.1:0"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let summary = stdout
        .lines()
        .find(|l| l.starts_with("stopped after"))
        .ok_or_else(|| anyhow::anyhow!("no summary:\n{stdout}\n{stderr}"))?;
    let sent = numbers_after(summary, "s: ");
    let received = numbers_after(summary, "sent, ");
    assert!(
        sent.first().is_some_and(|n| *n > 1_000) && sent == received,
        "{summary}"
    );

    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("line")).collect();
    assert_eq!(lines.len(), 3, "a summary per line:\n{stdout}");
    for line in &lines {
        assert!(line.contains("drained cleanly: true"), "{line}");
        assert_eq!(numbers_after(line, "; "), [0], "nothing shed: {line}");
    }
    let remote: u64 = lines.iter().flat_map(|l| numbers_after(l, "local, ")).sum();
    assert!(remote > 0, "no burst reached a replica:\n{stdout}");

    let faults = stdout
        .lines()
        .find(|l| l.starts_with("faults:"))
        .ok_or_else(|| anyhow::anyhow!("no fault summary:\n{stdout}"))?;
    assert!(
        numbers_after(faults, "flagged (")
            .first()
            .is_some_and(|p| *p >= 90)
            && faults.ends_with(" 0 false alarms on healthy windows"),
        "{faults}"
    );
    Ok(())
}
