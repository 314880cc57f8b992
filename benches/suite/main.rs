//! keyward's benchmark suite: every scenario measured against an empty
//! ext_authz server in the same run, and the table of results.
//!
//! Run it with `./scripts/bench` (BENCHMARKS.md), which builds everything,
//! installs h2load, wrk and Envoy, pins this driver to core 1 and passes the
//! binaries' paths. The servers under test run pinned to core 0. Targets are
//! measured alternately (A B A B ...), `--reps` times for `--duration` after
//! `--warmup`; figures are the median with [min..max].
//!
//! Loopback only; every load is bounded in time and count.

mod admin;
mod e2e;
mod scenario;
// Shared with tests/api/envoy.rs, which uses parts this file does not.
#[allow(dead_code)]
#[path = "../../tests/support/envoy.rs"]
mod envoy_process;
mod frames;
// Shared with the tests, which use parts this file does not.
#[allow(dead_code)]
#[path = "../../tests/support/db.rs"]
mod db;
#[path = "../../tests/support/grpc.rs"]
mod grpc;
mod h2gen;
mod h2load;
mod latency;
mod seed;
mod servers;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Parser as _;
use keyward::{
    config::Config,
    key::{ApiKey, KeyPrefix},
    startup,
    store::Store,
};

use crate::{
    frames::{Door, bad_checksum, frame},
    latency::{Client, Latency},
    servers::Server,
};

/// What every scenario works with: the servers under test (pinned to core
/// 0), the seeded database and its keys.
pub struct Ctx {
    pub kw: Server,
    pub kw_mt: Server,
    pub empty: Server,
    pub empty_mt: Server,
    pub url: String,
    pub secrets: Vec<String>,
    /// Well-formed keys that were never stored.
    pub unknown: Vec<String>,
    /// Keys with two rate limit windows no load reaches.
    pub limited: Vec<String>,
    pub admin_key: String,
    pub repo: PathBuf,
}

impl Ctx {
    /// The keys the cache-hit scenarios use (the first `HOT` seeded).
    pub fn hot(&self) -> &[String] {
        &self.secrets[..HOT]
    }

    /// The hot keys' request frames through `door`, for h2gen.
    pub fn hot_frames(&self, door: Door) -> Arc<Vec<Bytes>> {
        Arc::new(self.hot().iter().map(|k| frame(door, k)).collect())
    }
}

#[derive(Clone, clap::Parser)]
struct Args {
    /// keyward's release binary.
    #[arg(long)]
    keyward: PathBuf,
    /// The empty baseline server (examples/empty_authz.rs), release build.
    #[arg(long)]
    empty: PathBuf,
    /// The ext_authz server written the way the tonic example writes one
    /// (examples/tonic_example_authz.rs), release build: scenario 1 shows
    /// the empty baseline beside it. Without it that row is left out.
    #[arg(long)]
    tonic_example: Option<PathBuf>,
    #[arg(long)]
    envoy: PathBuf,
    #[arg(long, default_value = "h2load")]
    h2load: PathBuf,
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Measured time per repetition.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured load before each repetition.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Keys seeded into the table (and warmed for the memory figure).
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// Run only these scenarios (1-10, comma-separated); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Only seed a database and write request frames into this directory
    /// (hot, bad checksum, unknown; both doors; and envoy-hot-10000.bin, the
    /// 10,000 hot keys' frames for `--load-frames`), print the database URL and
    /// exit: for profiling a server by hand (BENCHMARKS.md).
    #[arg(long)]
    prepare: Option<PathBuf>,
    /// (Internal) run as the flood generator of scenario 7 against this
    /// address, then exit.
    #[arg(long, hide = true)]
    flood_target: Option<std::net::SocketAddr>,
    #[arg(long, hide = true)]
    flood_frames: Option<PathBuf>,
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    flood_for: Option<Duration>,
    /// Only run h2gen (c8m8, Envoy door) against this address for
    /// `--load-for`, cycling through the frames in `--load-frames` (as
    /// written by `--prepare`), print what it saw and exit: the 10,000-key
    /// load for profiling a server by hand (BENCHMARKS.md).
    #[arg(long, requires_all = ["load_frames", "load_for"])]
    load_target: Option<std::net::SocketAddr>,
    #[arg(long)]
    load_frames: Option<PathBuf>,
    #[arg(long, value_parser = humantime::parse_duration)]
    load_for: Option<Duration>,
    // Passed by cargo bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const HOT: usize = 10_000;
/// Rate limit windows no load reaches: every check is allowed, and only the
/// cost of keeping count shows.
const NEVER_REACHED: &str = r#"[{"name": "burst", "limit": 1000000000, "window_ms": 1000}, {"name": "daily", "limit": 1000000000000, "window_ms": 86400000}]"#;

/// Samples of one target, one per repetition.
#[derive(Debug, Clone, Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
    fn rate(&self) -> String {
        format!(
            "{} [{}..{}]",
            k(self.median()),
            k(self.min()),
            k(self.max())
        )
    }
}

fn k(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k/s", v / 1000.0)
    } else {
        format!("{v:.0}/s")
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn lat(l: &Latency) -> String {
    format!(
        "p50 {} · p99 {} · p99.9 {}",
        us(l.p50),
        us(l.p99),
        us(l.p999)
    )
}

/// The results table, printed as it fills and once more at the end.
#[derive(Default)]
struct Table(Vec<[String; 6]>);

impl Table {
    fn row(
        &mut self,
        figure: &str,
        load: &str,
        keyward: String,
        baseline: String,
        ratio: String,
        target: &str,
    ) {
        let row = [
            figure.to_owned(),
            load.to_owned(),
            keyward,
            baseline,
            ratio,
            target.to_owned(),
        ];
        eprintln!("  {}", row.join(" | "));
        self.0.push(row);
    }

    fn print(&self) {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| figure | load | keyward | baseline (same run) | ratio | target |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for r in &self.0 {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        print!("{out}");
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

struct Suite {
    args: Args,
    table: Table,
    tmp: PathBuf,
    /// The empty server under h2load c8m8 and h2gen c8m8 (Envoy door), kept
    /// from scenario 1: its answer does not depend on the key, so later rows
    /// reuse it rather than measure it again.
    empty_h2load: Option<(Samples, Duration)>,
    empty_h2gen: Option<(Samples, Duration)>,
}

impl Suite {
    fn write_frame(&self, name: &str, frame: &Bytes) -> PathBuf {
        let path = self.tmp.join(format!("{name}.bin"));
        std::fs::write(&path, frame).expect("write frame");
        path
    }

    /// h2load against each target in turn, `reps` times; rate samples and
    /// server CPU per call.
    async fn h2load(
        &self,
        targets: &[&Server],
        door: Door,
        frame: &Path,
        c: usize,
        m: usize,
    ) -> Vec<(Samples, Duration)> {
        self.each_target(targets, async |t: &Server| {
            let run = h2load::run(
                &self.args.h2load,
                t.addr,
                door.path(),
                frame,
                c,
                m,
                self.args.warmup,
                self.args.duration,
            )
            .await;
            assert_eq!(run.failed, 0, "{}: h2load saw failures", t.name);
            run.rps
        })
        .await
    }

    /// h2gen against each target in turn; `check` sees every run's counts.
    async fn h2gen(
        &self,
        targets: &[&Server],
        door: Door,
        frames: &Arc<Vec<Bytes>>,
        c: usize,
        m: usize,
        check: impl Fn(&str, &h2gen::H2genRun),
    ) -> Vec<(Samples, Duration)> {
        self.each_target(targets, async |t: &Server| {
            let run = h2gen::run(
                t.addr,
                door,
                frames.clone(),
                false,
                c,
                m,
                self.args.warmup,
                self.args.duration,
            )
            .await;
            check(&t.name, &run);
            run.rps
        })
        .await
    }

    /// Runs `load` (which returns its rate) against each target in turn,
    /// `reps` times: the rate samples and the server's mean CPU per call.
    async fn each_target(
        &self,
        targets: &[&Server],
        mut load: impl AsyncFnMut(&Server) -> f64,
    ) -> Vec<(Samples, Duration)> {
        let mut out = vec![(Samples::default(), Duration::ZERO); targets.len()];
        for _ in 0..self.args.reps {
            for (i, t) in targets.iter().enumerate() {
                let cpu0 = t.cpu_time();
                let rps = load(t).await;
                let cpu = t.cpu_time() - cpu0;
                out[i].0.0.push(rps);
                out[i].1 +=
                    cpu.div_f64(rps * (self.args.warmup + self.args.duration).as_secs_f64());
            }
        }
        for o in &mut out {
            o.1 /= u32::try_from(self.args.reps).expect("reps");
        }
        out
    }

    /// Ratio row: target 0 is keyward, target 1 the baseline.
    fn ratio_row(
        &mut self,
        figure: &str,
        load: &str,
        kw: &(Samples, Duration),
        base: &(Samples, Duration),
        base_name: &str,
        target: Option<f64>,
    ) {
        let ratio = kw.0.median() / base.0.median();
        let target_text = match target {
            Some(t) => format!("≥ {t:.2}: {}", verdict(ratio >= t)),
            None => "—".to_owned(),
        };
        self.table.row(
            figure,
            load,
            format!("{}, {} CPU/call", kw.0.rate(), us(kw.1)),
            format!("{base_name} {}, {} CPU/call", base.0.rate(), us(base.1)),
            format!("{ratio:.2}"),
            &target_text,
        );
    }
}

fn all_allowed(name: &str, run: &h2gen::H2genRun) {
    assert!(
        run.denied == 0 && run.failed == 0,
        "{name}: every answer should be an allow: {run:?}"
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    if let (Some(target), Some(frames), Some(run_for)) =
        (args.flood_target, &args.flood_frames, args.flood_for)
    {
        scenario::flood::flood_main(target, frames, run_for).await;
        return;
    }
    if let (Some(target), Some(frames), Some(run_for)) =
        (args.load_target, &args.load_frames, args.load_for)
    {
        let frames = Arc::new(frames::read_frames(frames));
        let run = h2gen::run(
            target,
            Door::Envoy,
            frames,
            false,
            8,
            8,
            Duration::ZERO,
            run_for,
        )
        .await;
        println!("{run:?}");
        return;
    }
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if cores != 1 {
        eprintln!(
            "warning: the driver can use {cores} cores; run it through ./scripts/bench (taskset -c 1)"
        );
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = std::env::temp_dir().join(format!("keyward-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp dir");

    // A fresh database, migrated, with an admin key and N seeded keys.
    let url = db::fresh_database_url("keyward_bench");
    let config =
        Config::try_parse_from(["keyward", "--database-url", &url, "--log-filter", "warn"])
            .expect("config");
    Store::connect_and_migrate(&config.db())
        .await
        .expect("create the bench database");
    let (_, admin_key) = startup::bootstrap(&config, "bench", "bench admin")
        .await
        .expect("bootstrap");
    let admin_key = admin_key.expose_secret().to_owned();
    let secrets = seed::seed(&url, args.keys.max(HOT * 2)).await;
    let limited = seed::seed_limited(&url, HOT, Some(NEVER_REACHED), None).await;
    let prefix = KeyPrefix::parse("kw_live").expect("prefix");
    let unknown: Vec<String> = (0..HOT)
        .map(|_| ApiKey::generate(&prefix).expose_secret().to_owned())
        .collect();

    if let Some(dir) = &args.prepare {
        std::fs::create_dir_all(dir).expect("prepare dir");
        for door in [Door::Envoy, Door::Keyward] {
            let name = if door == Door::Envoy {
                "envoy"
            } else {
                "keyward"
            };
            for (what, key) in [
                ("hot", secrets[0].clone()),
                ("bad", bad_checksum(&secrets[1])),
                ("unknown", unknown[1].clone()),
            ] {
                std::fs::write(dir.join(format!("{name}-{what}.bin")), frame(door, &key))
                    .expect("frame");
            }
        }
        let hot: Vec<Bytes> = secrets[..HOT]
            .iter()
            .map(|k| frame(Door::Envoy, k))
            .collect();
        frames::write_frames(&dir.join("envoy-hot-10000.bin"), &hot);
        let limited: Vec<Bytes> = limited.iter().map(|k| frame(Door::Envoy, k)).collect();
        frames::write_frames(&dir.join("envoy-limited-10000.bin"), &limited);
        println!("{url}");
        return;
    }

    let kw = Server::keyward(&args.keyward, "keyward", &url, &[]).await;
    let kw_mt = Server::keyward(
        &args.keyward,
        "keyward multi-thread(1)",
        &url,
        &["--runtime", "multi-thread", "--worker-threads", "1"],
    )
    .await;
    let empty = Server::empty(&args.empty, "empty current_thread", "current-thread").await;
    let empty_mt = Server::empty(&args.empty, "empty multi_thread(1)", "multi-thread").await;
    let ctx = Ctx {
        kw,
        kw_mt,
        empty,
        empty_mt,
        url,
        secrets,
        unknown,
        limited,
        admin_key,
        repo,
    };
    let mut suite = Suite {
        args,
        table: Table::default(),
        tmp,
        empty_h2load: None,
        empty_h2gen: None,
    };

    // Preflight, and warming: every hot key allowed through both doors and
    // both keyward runtimes; bad and unknown keys refused.
    for server in [&ctx.kw, &ctx.kw_mt] {
        for door in [Door::Envoy, Door::Keyward] {
            let mut client = Client::connect(server.addr, door).await;
            for key in ctx.hot() {
                assert!(
                    client.allowed(key).await,
                    "{}: hot key refused",
                    server.name
                );
            }
            assert!(!client.allowed(&bad_checksum(&ctx.hot()[0])).await);
            assert!(!client.allowed(&ctx.unknown[0]).await);
        }
    }
    eprintln!(
        "preflight passed: {} hot keys allowed; bad and unknown keys refused",
        HOT
    );

    let run = |n: u8| suite.args.only.is_empty() || suite.args.only.contains(&n);
    let selected: Vec<u8> = (1..=10).filter(|n| run(*n)).collect();
    for n in selected {
        match n {
            1 => scenario::hits::run(&mut suite, &ctx).await,
            2 => scenario::misses::run(&mut suite, &ctx).await,
            3 => scenario::invalid::run(&mut suite, &ctx).await,
            4 => scenario::admin_plane::run(&mut suite, &ctx).await,
            5 => scenario::memory::run(&mut suite, &ctx).await,
            6 => scenario::end_to_end::run(&mut suite, &ctx).await,
            7 => scenario::flood::run(&mut suite, &ctx).await,
            8 => scenario::limits::run(&mut suite, &ctx).await,
            9 => scenario::revocation_under_load::run(&mut suite, &ctx).await,
            10 => scenario::telemetry::run(&mut suite, &ctx).await,
            _ => unreachable!("scenarios are 1-10"),
        }
    }
    let seeded = ctx.secrets.len();
    let url = ctx.url.clone();
    drop(ctx);

    println!();
    println!(
        "keyward benchmark suite: {seeded} keys seeded, {} reps x {:?} after {:?} warm-up, finished in {:.0?}",
        suite.args.reps,
        suite.args.duration,
        suite.args.warmup,
        started.elapsed()
    );
    println!();
    suite.table.print();

    let _ = std::fs::remove_dir_all(&suite.tmp);
    if let Err(err) = db::drop_database(&url).await {
        eprintln!("cannot drop the bench database: {err}");
    }
}
