//! Edge benchmark: the agent end to end against a raw tract loop and a Python agent.
//!
//! For each zoo model, in one run on one machine:
//! 1. a raw tract loop: `--workers` threads running the optimised model over the reference
//!    windows, nothing else;
//! 2. `edge-agent` end to end: mosquitto on loopback → agent → mosquitto, windows published
//!    as fast as QoS 1 allows by one client, never more than half the agent's queue ahead of
//!    the results another client collects;
//! 3. the same workload through `bench/python_agent.py` (paho-mqtt + onnxruntime);
//! 4. single-thread latency of tract and of onnxruntime (`bench/ort_latency.py`).
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-edge`.
//! Needs mosquitto; the Python columns need `pip install -r bench/requirements.txt`.
//!
//! `--pin` gives the inference threads (the raw loop's, and the agent's `infer-N`) the first
//! `--workers` cores to themselves and puts everything else (mosquitto, the load generator,
//! the collector and the agent's other threads) on the remaining cores, so that the ratio
//! shows whether the agent keeps its inference threads as busy as the raw loop does when
//! its I/O has CPU of its own. The Python agent is left out of such a run.
//!
//! `--batch K` publishes up to K back-to-back windows of one sensor per payload (as many as
//! fit the agent's 1,024 samples) and runs the agent with `mqtt.result_batch = 64` and
//! `result_linger_ms = 5`, so that the broker carries a message per K windows each way
//! instead of one per window. The Python agent, which reads one window per message, is left
//! out. `--windows-ae 0` or `--windows-cnn 0` leaves a model out.
//!
//! `--outbox` gives the agent an on-disk outbox (`mqtt.outbox_path` in a temporary folder).
//! With the broker up the outbox stays empty; the run measures what checking it costs.
//!
//! `--unix` connects the agent to mosquitto's Unix socket instead of its loopback TCP port
//! (`mqtt.unix_socket`); the load generator and the collector stay on TCP.
//!
//! Beside the agent, each model's workload also runs through an MQTT echo: this binary again
//! (`bench-edge echo PORT GATEWAY RESULTS`), an rumqttc client set up as the agent's (QoS 1
//! both ways, `TCP_NODELAY`, a request channel of 1,024, a two-thread runtime) that answers
//! each data message with a result encoded once at start, decoding nothing and running
//! nothing. With the raw loop it bounds what any agent on this client, broker and machine
//! could serve: inference at the raw loop's cost plus the echo's transport, which add up where
//! they share the cores and do not where `--pin` separates them. `agent ÷ ceiling` is the
//! share of that bound the agent reaches.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use models::{LoadedModel, zoo};
use protocol::edge::{InferenceResult, Route, encode_result_batch};
use protocol::payload::{encode_plain_cbor, encode_plain_json};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use spillway_tests::load::median;
use spillway_tests::{Agent, Broker, Listener, Publisher, mosquitto_path, reference};

/// Windows a call in the batched raw loop: the agent's default `max_batch`, the most windows
/// it runs in one call.
const RAW_BATCH: usize = 32;

/// Most samples the agent takes in one payload.
const MAX_SAMPLES: usize = 1024;

/// The agent runs with a queue of this many windows.
const QUEUE_CAPACITY: usize = 65_536;

/// Most windows published and not yet answered: half the agent's queue.
const IN_FLIGHT: usize = QUEUE_CAPACITY / 2;

/// How long the publisher waits for the agent to catch up before it gives up.
const STALL: Duration = Duration::from_secs(30);

struct Row {
    model: &'static str,
    raw: Run,
    /// The raw loop running [`RAW_BATCH`] windows a call.
    raw_batched: Run,
    agent: Run,
    /// The MQTT echo: the same workload answered without decoding or inference.
    echo: Run,
    python: Option<Run>,
}

/// One measured configuration: throughput, CPU seconds per window, peak RSS.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    cpu_us: f64,
    rss_mb: f64,
    /// End to end: mosquitto's CPU per window (µs).
    broker_cpu_us: f64,
    /// End to end: the load generator's and the collector's (this process) CPU per window.
    driver_cpu_us: f64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("echo") {
        let [port, gateway, results] = args.get(2..5).context("echo PORT GATEWAY RESULTS")? else {
            bail!("echo PORT GATEWAY RESULTS");
        };
        return echo(port.parse()?, gateway, results.parse()?);
    }
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let workers = arg("--workers", 2);
    // `--cbor`: publish the plain form as CBOR instead of JSON (the Python agent reads JSON
    // only, so its columns are skipped).
    let cbor = args.iter().any(|a| a == "--cbor");
    let batch = arg("--batch", 1).max(1);
    let outbox = args.iter().any(|a| a == "--outbox");
    let unix = args.iter().any(|a| a == "--unix");
    let pinning = if args.iter().any(|a| a == "--pin") {
        let pinning = Pinning::new(workers)?;
        // Threads and child processes inherit the main thread's cores.
        taskset(&pinning.rest, std::process::id())?;
        Some(pinning)
    } else {
        None
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mosquitto = mosquitto_path().context("mosquitto is needed (apt-get install mosquitto)")?;
    let python = python_ready(&repo) && !cbor && pinning.is_none() && batch == 1;
    if !python {
        eprintln!("python3 with paho-mqtt and onnxruntime not found: Python columns skipped");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let mut rows = Vec::new();
    for (model, windows) in [
        (zoo::VIBRATION_AE, arg("--windows-ae", 20_000)),
        (zoo::BEARING_CNN, arg("--windows-cnn", 30_000)),
    ] {
        if windows == 0 {
            continue;
        }
        eprintln!("{}: raw tract loop", model.name);
        let raw = raw_tract(model, workers, windows, 1, pinning.as_ref())?;
        eprintln!("{}: raw tract loop, {RAW_BATCH} windows a call", model.name);
        let raw_batched = raw_tract(model, workers, windows, RAW_BATCH, pinning.as_ref())?;
        eprintln!("{}: edge-agent end to end", model.name);
        let agent = runtime.block_on(end_to_end(
            &mosquitto,
            Target::Agent {
                model,
                workers,
                outbox,
                unix,
            },
            windows,
            Wire { cbor, batch },
            pinning.as_ref(),
        ))?;
        eprintln!("{}: MQTT echo end to end", model.name);
        let echo = runtime.block_on(end_to_end(
            &mosquitto,
            Target::Echo { model },
            windows,
            Wire { cbor, batch },
            pinning.as_ref(),
        ))?;
        let python_row = if python {
            eprintln!("{}: python agent end to end", model.name);
            Some(runtime.block_on(end_to_end(
                &mosquitto,
                Target::Python {
                    model,
                    workers,
                    repo: &repo,
                },
                windows,
                Wire {
                    cbor: false,
                    batch: 1,
                },
                None,
            ))?)
        } else {
            None
        };
        rows.push(Row {
            model: model.name,
            raw,
            raw_batched,
            agent,
            echo,
            python: python_row,
        });
    }

    let format = if cbor { "plain CBOR" } else { "plain JSON" };
    let placement = match &pinning {
        Some(p) => format!(
            ", inference threads on cores {} alone, everything else on cores {}",
            p.inference, p.rest
        ),
        None => String::new(),
    };
    let batching = if batch > 1 {
        format!(", up to {batch} windows per payload, results batched (`result_batch = 64`)")
    } else {
        String::new()
    };
    println!(
        "\n### Throughput with {workers} worker threads{placement}, {format} payloads{batching} (median of 3 runs each)\n"
    );
    println!(
        "| model | raw tract loop, windows/s | edge-agent end to end, windows/s | agent ÷ raw | CPU per window: raw / agent (µs) | raw ÷ agent CPU | raw loop, {RAW_BATCH} windows a call | agent ÷ that | Python agent, windows/s | agent ÷ Python | agent RSS | Python RSS |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let (py, ratio, py_rss) = match r.python {
            Some(p) => (
                format!("{:.0}", p.rate),
                format!("{:.2}", r.agent.rate / p.rate),
                format!("{:.1} MB", p.rss_mb),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} | {:.2} | {:.0} | {:.2} | {py} | {ratio} | {:.1} MB | {py_rss} |",
            r.model,
            r.raw.rate,
            r.agent.rate,
            r.agent.rate / r.raw.rate,
            r.raw.cpu_us,
            r.agent.cpu_us,
            r.raw.cpu_us / r.agent.cpu_us,
            r.raw_batched.rate,
            r.agent.rate / r.raw_batched.rate,
            r.agent.rss_mb
        );
    }

    // The most any agent could serve: inference at the raw loop's cost and the echo's
    // transport, on separate cores when pinned, else sharing them (their costs per window add).
    let ceiling = |r: &Row| match pinning {
        Some(_) => r.raw.rate.min(r.echo.rate),
        None => 1.0 / (1.0 / r.raw.rate + 1.0 / r.echo.rate),
    };
    let ceiling_rule = if pinning.is_some() {
        "the lower of the two (separate cores)"
    } else {
        "1 / (1/raw + 1/echo) (shared cores)"
    };
    println!(
        "\n### The agent against an MQTT echo (the same workload, answered without decoding or inference)\n"
    );
    println!(
        "| model | raw tract loop, windows/s | MQTT echo, windows/s | ceiling: {ceiling_rule} | ceiling ÷ raw | edge-agent, windows/s | agent ÷ echo | agent ÷ ceiling | CPU per window: echo / agent (µs) | the echo's mosquitto / load generator and collector (µs) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let ceiling = ceiling(r);
        println!(
            "| {} | {:.0} | {:.0} | {ceiling:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} |",
            r.model,
            r.raw.rate,
            r.echo.rate,
            ceiling / r.raw.rate,
            r.agent.rate,
            r.agent.rate / r.echo.rate,
            r.agent.rate / ceiling,
            r.echo.cpu_us,
            r.agent.cpu_us,
            r.echo.broker_cpu_us,
            r.echo.driver_cpu_us
        );
    }

    println!("\n### Latency, one thread, one window (µs)\n");
    let ort = if python {
        ort_latency(&repo)?
    } else {
        Vec::new()
    };
    println!(
        "| model | tract median | tract p99 | onnxruntime median | onnxruntime p99 | tract ÷ ORT (median) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for model in zoo::ALL {
        let (median, p99) = tract_latency(model, 5_000)?;
        match ort.iter().find(|(name, _, _)| name == model.name) {
            Some((_, om, op)) => {
                println!(
                    "| {} | {median:.1} | {p99:.1} | {om:.1} | {op:.1} | {:.2} |",
                    model.name,
                    median / om
                )
            }
            None => println!("| {} | {median:.1} | {p99:.1} | – | – | – |", model.name),
        }
    }
    Ok(())
}

fn runner(model: zoo::ZooModel) -> anyhow::Result<models::Runner> {
    Ok(LoadedModel::from_bytes(model.onnx)?
        .optimize_batched(Some(model.input_shape), &[RAW_BATCH])?)
}

/// Which cores `--pin` gives the inference threads, and which everything else (`taskset`
/// lists).
struct Pinning {
    inference: String,
    rest: String,
}

impl Pinning {
    /// The first `workers` cores for inference, the others for the rest; there must be some.
    fn new(workers: usize) -> anyhow::Result<Pinning> {
        let cores = std::thread::available_parallelism()?.get();
        anyhow::ensure!(
            workers >= 1 && workers < cores,
            "--pin needs fewer worker threads ({workers}) than cores ({cores})"
        );
        Ok(Pinning {
            inference: format!("0-{}", workers - 1),
            rest: format!("{workers}-{}", cores - 1),
        })
    }

    /// Moves the agent's `infer-N` threads to the inference cores; returns how many.
    fn pin_agent(&self, pid: u32) -> anyhow::Result<usize> {
        let mut moved = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let task = task?;
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with("infer-") {
                let tid = task.file_name().to_string_lossy().parse()?;
                taskset(&self.inference, tid)?;
                moved += 1;
            }
        }
        Ok(moved)
    }
}

/// `taskset -p -c CORES TID`: one thread (a process's main thread, by its pid) to `cores`.
fn taskset(cores: &str, tid: u32) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-p", "-c", cores, &tid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset (util-linux) is needed for --pin")?;
    anyhow::ensure!(status.success(), "taskset -p -c {cores} {tid} failed");
    Ok(())
}

/// The calling thread's id.
fn current_tid() -> anyhow::Result<u32> {
    let link = std::fs::read_link("/proc/thread-self")?;
    Ok(link
        .file_name()
        .context("/proc/thread-self names no thread")?
        .to_string_lossy()
        .parse()?)
}

/// Windows per second of `workers` threads doing nothing but inference, `batch` windows a
/// call (median of 3).
fn raw_tract(
    model: zoo::ZooModel,
    workers: usize,
    windows: usize,
    batch: usize,
    pinning: Option<&Pinning>,
) -> anyhow::Result<Run> {
    let runner = runner(model)?;
    let reference = std::sync::Arc::new(reference(model.name)?);
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let cpu_start = cpu_secs(std::process::id());
        let threads: Vec<_> = (0..workers)
            .map(|w| {
                let runner = runner.clone();
                let reference = reference.clone();
                let cores = pinning.map(|p| p.inference.clone());
                std::thread::spawn(move || -> anyhow::Result<()> {
                    if let Some(cores) = cores {
                        taskset(&cores, current_tid()?)?;
                    }
                    let all = &reference.windows;
                    let mut calls = (w * batch..windows).step_by(workers * batch);
                    if batch == 1 {
                        for i in calls {
                            let window = &all[i % all.len()];
                            std::hint::black_box(runner.run(window).map(|o| o.len()).unwrap_or(0));
                        }
                    } else {
                        let mut inputs = Vec::with_capacity(batch);
                        for i in calls.by_ref() {
                            inputs.clear();
                            inputs.extend(
                                (i..(i + batch).min(windows))
                                    .map(|j| all[j % all.len()].as_slice()),
                            );
                            std::hint::black_box(runner.run_batch(&inputs)?.len());
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        rates.push(windows as f64 / start.elapsed().as_secs_f64());
        cpu.push((cpu_secs(std::process::id()) - cpu_start) * 1e6 / windows as f64);
    }
    Ok(Run {
        rate: median(&mut rates),
        cpu_us: median(&mut cpu),
        rss_mb: 0.0,
        broker_cpu_us: 0.0,
        driver_cpu_us: 0.0,
    })
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

enum Target<'a> {
    Agent {
        model: zoo::ZooModel,
        workers: usize,
        /// Whether the agent has an on-disk outbox.
        outbox: bool,
        /// Whether the agent reaches the broker over its Unix socket.
        unix: bool,
    },
    Python {
        model: zoo::ZooModel,
        workers: usize,
        repo: &'a Path,
    },
    /// This binary's `echo` mode, with the model's windows.
    Echo { model: zoo::ZooModel },
}

impl Target<'_> {
    /// The model whose windows the run publishes.
    fn model(&self) -> zoo::ZooModel {
        match self {
            Target::Agent { model, .. } | Target::Python { model, .. } | Target::Echo { model } => {
                *model
            }
        }
    }
}

/// How windows travel to the agent and results back.
#[derive(Debug, Clone, Copy)]
struct Wire {
    /// Payloads in plain CBOR instead of plain JSON.
    cbor: bool,
    /// Windows per payload at most, and batched results when above 1.
    batch: usize,
}

/// Windows per second through broker → agent → broker, the agent's CPU time per window and
/// its peak RSS (MB); the median of 3 runs.
async fn end_to_end(
    mosquitto: &Path,
    target: Target<'_>,
    windows: usize,
    wire: Wire,
    pinning: Option<&Pinning>,
) -> anyhow::Result<Run> {
    let mut rates = Vec::new();
    let mut rss = Vec::new();
    let mut cpu = Vec::new();
    let mut broker_cpu = Vec::new();
    let mut driver_cpu = Vec::new();
    for run in 0..3 {
        let broker = Broker::start(mosquitto)?;
        let gateway = format!("bench{run}");
        let model = target.model();
        let reference = reference(model.name)?;
        // Back-to-back windows of the reference set, `per_payload` to a message.
        let window_len = reference.windows[0].len();
        let per_payload = wire.batch.min(MAX_SAMPLES / window_len).max(1);
        let mut process = match &target {
            Target::Agent {
                model,
                workers,
                outbox,
                unix,
            } => {
                let results = if wire.batch > 1 {
                    "result_batch = 64\nresult_linger_ms = 5\n"
                } else {
                    ""
                };
                let config = format!(
                    "[agent]\nsite = \"bench\"\ngateway = \"{gateway}\"\nworkers = {workers}\nqueue_capacity = {QUEUE_CAPACITY}\n\
                     [mqtt]\nport = {}\n{results}[[models]]\nname = \"m\"\nzoo = \"{}\"\n[sensors]\ndefault_model = \"m\"\n",
                    broker.port(),
                    model.name
                );
                let state = tempfile::tempdir()?;
                let outbox_path = state.path().join("outbox");
                let mut env = vec![("RUST_LOG", "warn")];
                if *outbox {
                    env.push((
                        "SPILLWAY__MQTT__OUTBOX_PATH",
                        outbox_path.to_str().context("temporary path is UTF-8")?,
                    ));
                }
                let socket = broker.unix_socket();
                if *unix {
                    env.push((
                        "SPILLWAY__MQTT__UNIX_SOCKET",
                        socket.to_str().context("temporary path is UTF-8")?,
                    ));
                }
                Process::Agent(Agent::start(&config, &env)?, state)
            }
            Target::Python {
                model,
                workers,
                repo,
            } => {
                let shape: Vec<String> = model.input_shape.iter().map(|d| d.to_string()).collect();
                let child = Command::new("python3")
                    .arg(repo.join("bench/python_agent.py"))
                    .args(["--port", &broker.port().to_string()])
                    .args([
                        "--model",
                        &repo
                            .join(format!("models/zoo/{}.onnx", model.name))
                            .to_string_lossy(),
                    ])
                    .args([
                        "--shape",
                        &shape.join(","),
                        "--workers",
                        &workers.to_string(),
                    ])
                    .args(["--site", "bench", "--gateway", &gateway])
                    .stdout(Stdio::null())
                    .spawn()?;
                Process::Python(child)
            }
            Target::Echo { .. } => Process::Echo(
                Command::new(std::env::current_exe()?)
                    .args([
                        "echo",
                        &broker.port().to_string(),
                        &gateway,
                        &per_payload.to_string(),
                    ])
                    .spawn()?,
            ),
        };
        let listener = Listener::start(broker.port(), "bench", &gateway).await?;
        if !listener
            .wait_until(Duration::from_secs(30), |c| c.raw_status.is_some())
            .await
        {
            bail!("the agent under test did not come online");
        }
        if let (Some(pinning), Target::Agent { .. }) = (pinning, &target) {
            let pid = process.pid().context("the agent under test exited")?;
            anyhow::ensure!(
                pinning.pin_agent(pid)? > 0,
                "the agent under test has no infer-N threads to pin"
            );
        }
        let publisher = Publisher::connect(broker.port()).await?;
        let messages = windows.div_ceil(per_payload);
        let payloads: Vec<Vec<u8>> = (0..reference.windows.len())
            .map(|i| {
                let samples: Vec<f32> = (0..per_payload)
                    .flat_map(|k| {
                        reference.windows[(i + k) % reference.windows.len()]
                            .iter()
                            .copied()
                    })
                    .collect();
                if wire.cbor {
                    encode_plain_cbor(&samples, i as f64)
                } else {
                    encode_plain_json(&samples, i as f64)
                }
            })
            .collect();
        let windows = messages * per_payload;
        let pid = process.pid().context("the agent under test exited")?;
        let broker_pid = broker.pid().context("the benchmark's broker exited")?;
        let cpu_start = cpu_secs(pid);
        let broker_start = cpu_secs(broker_pid);
        let driver_start = cpu_secs(std::process::id());
        let start = Instant::now();
        for i in 0..messages {
            // Closed loop: never more windows on their way than half the agent's queue, so
            // a publisher faster than the agent measures its throughput instead of its
            // shedding.
            let published = i * per_payload;
            if published >= IN_FLIGHT
                && published.saturating_sub(listener.result_count()) > IN_FLIGHT
            {
                let answered = published - IN_FLIGHT / 2;
                if !listener
                    .wait_until(STALL, |c| c.results.len() >= answered)
                    .await
                {
                    bail!("the agent answered no window for {STALL:?} ({answered} expected)");
                }
            }
            let topic = format!("spillway/bench/{gateway}/s{:02}/data", i % 20);
            publisher
                .publish(&topic, payloads[i % payloads.len()].clone())
                .await?;
        }
        let done = listener
            .wait_until(Duration::from_secs(300), |c| c.results.len() >= windows)
            .await;
        let elapsed = start.elapsed().as_secs_f64();
        if !done {
            bail!(
                "only {} of {windows} results arrived",
                listener.result_count()
            );
        }
        rates.push(windows as f64 / elapsed);
        let per_window = |secs: f64| secs * 1e6 / windows as f64;
        cpu.push(per_window(cpu_secs(pid) - cpu_start));
        broker_cpu.push(per_window(cpu_secs(broker_pid) - broker_start));
        driver_cpu.push(per_window(cpu_secs(std::process::id()) - driver_start));
        rss.push(process.peak_rss_mb());
        process.stop();
    }
    Ok(Run {
        rate: median(&mut rates),
        cpu_us: median(&mut cpu),
        rss_mb: median(&mut rss),
        broker_cpu_us: median(&mut broker_cpu),
        driver_cpu_us: median(&mut driver_cpu),
    })
}

enum Process {
    /// The agent, and the folder of its outbox (removed once it has stopped).
    Agent(Agent, tempfile::TempDir),
    Python(Child),
    Echo(Child),
}

impl Process {
    fn pid(&mut self) -> Option<u32> {
        match self {
            Process::Agent(a, _) => a.pid(),
            Process::Python(c) | Process::Echo(c) => Some(c.id()),
        }
    }

    /// Peak resident set (VmHWM) in MB.
    fn peak_rss_mb(&mut self) -> f64 {
        let Some(pid) = self.pid() else { return 0.0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    fn stop(self) {
        match self {
            Process::Agent(mut a, _state) => {
                let _ = a.terminate(Duration::from_secs(10));
            }
            Process::Python(mut c) | Process::Echo(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// `bench-edge echo PORT GATEWAY RESULTS`: answers every message on the gateway's data
/// topics with one message of `RESULTS` results on its inference topic, encoded once, over a
/// client set up as the agent's; runs until killed.
fn echo(port: u16, gateway: &str, results: usize) -> anyhow::Result<()> {
    let prefix = format!("spillway/bench/{gateway}");
    let one = serde_json::to_vec(&InferenceResult {
        id: 1,
        sensor: "s00".into(),
        model: "m".into(),
        version: 1,
        route: Route::Local,
        ts: 0.0,
        latency_us: 100,
        score: 0.001,
        anomaly: false,
        outputs: [("score".to_string(), vec![0.001])].into(),
    })?;
    let payload = if results > 1 {
        encode_result_batch(std::iter::repeat_n(one.as_slice(), results))
    } else {
        one
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut options = MqttOptions::new(format!("echo-{gateway}"), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        // The agent hands results from its workers to a task that publishes them; so does
        // the echo, from its event loop. The benchmark keeps at most half a queue of windows
        // unanswered, so this channel never fills.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(QUEUE_CAPACITY);
        let publisher = client.clone();
        tokio::spawn(async move {
            while let Some(topic) = rx.recv().await {
                if publisher
                    .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .subscribe(format!("{prefix}/+/data"), QoS::AtLeastOnce)
                        .await?;
                    client
                        .publish(format!("{prefix}/status"), QoS::AtLeastOnce, true, "online")
                        .await?;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let Some(sensor) = p.topic.strip_suffix("/data") else {
                        continue;
                    };
                    tx.send(format!("{sensor}/inference")).await?;
                }
                _ => {}
            }
        }
    })
}

fn tract_latency(model: zoo::ZooModel, runs: usize) -> anyhow::Result<(f64, f64)> {
    let runner = runner(model)?;
    let reference = reference(model.name)?;
    for w in reference.windows.iter().take(50) {
        runner.run(w)?;
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|i| {
            let start = Instant::now();
            let out = runner.run(&reference.windows[i % reference.windows.len()]);
            std::hint::black_box(out.map(|o| o.len()).unwrap_or(0));
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() * 99 / 100]))
}

fn ort_latency(repo: &Path) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let out = Command::new("python3")
        .arg(repo.join("bench/ort_latency.py"))
        .arg(repo.join("models/zoo"))
        .arg("5000")
        .output()?;
    if !out.status.success() {
        bail!(
            "ort_latency.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)?;
            Ok((
                v["model"].as_str().unwrap_or_default().to_owned(),
                v["median_us"].as_f64().unwrap_or(f64::NAN),
                v["p99_us"].as_f64().unwrap_or(f64::NAN),
            ))
        })
        .collect()
}

fn python_ready(repo: &Path) -> bool {
    let script: PathBuf = repo.join("bench/python_agent.py");
    script.exists()
        && Command::new("python3")
            .args(["-c", "import paho.mqtt, onnxruntime, numpy"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}
