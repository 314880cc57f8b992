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
use sqlx::{Connection as _, PgConnection};

use crate::{
    frames::{Door, bad_checksum, frame},
    latency::{Client, Latency},
    servers::Server,
};

#[derive(clap::Parser)]
struct Args {
    /// keyward's release binary.
    #[arg(long)]
    keyward: PathBuf,
    /// The empty baseline server (examples/empty_authz.rs), release build.
    #[arg(long)]
    empty: PathBuf,
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
    /// Run only these scenarios (1-6, comma-separated); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Only seed a database and write request frames into this directory
    /// (hot, bad checksum, unknown; both doors), print the database URL and
    /// exit: for profiling a server by hand (BENCHMARKS.md).
    #[arg(long)]
    prepare: Option<PathBuf>,
    // Passed by cargo bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const HOT: usize = 10_000;

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
    let hot = &secrets[..HOT];
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
                ("hot", hot[0].clone()),
                ("bad", bad_checksum(&hot[1])),
                ("unknown", unknown[1].clone()),
            ] {
                std::fs::write(dir.join(format!("{name}-{what}.bin")), frame(door, &key))
                    .expect("frame");
            }
        }
        println!("{url}");
        return;
    }

    let mut suite = Suite {
        args,
        table: Table::default(),
        tmp,
        empty_h2load: None,
        empty_h2gen: None,
    };
    let a = &suite.args;
    let kw = Server::keyward(&a.keyward, "keyward", &url, &[]).await;
    let kw_mt = Server::keyward(
        &a.keyward,
        "keyward multi-thread(1)",
        &url,
        &["--runtime", "multi-thread", "--worker-threads", "1"],
    )
    .await;
    let empty = Server::empty(&a.empty, "empty current_thread", "current-thread").await;
    let empty_mt = Server::empty(&a.empty, "empty multi_thread(1)", "multi-thread").await;
    let run = |n: u8| a.only.is_empty() || a.only.contains(&n);
    let (run1, run2, run3, run4, run5, run6) = (run(1), run(2), run(3), run(4), run(5), run(6));

    // Preflight, and warming: every hot key allowed through both doors and
    // both keyward runtimes; bad and unknown keys refused.
    for server in [&kw, &kw_mt] {
        for door in [Door::Envoy, Door::Keyward] {
            let mut client = Client::connect(server.addr, door).await;
            for key in hot {
                assert!(
                    client.allowed(key).await,
                    "{}: hot key refused",
                    server.name
                );
            }
            assert!(!client.allowed(&bad_checksum(&hot[0])).await);
            assert!(!client.allowed(&unknown[0]).await);
        }
    }
    eprintln!(
        "preflight passed: {} hot keys allowed; bad and unknown keys refused",
        HOT
    );

    // 1. Cache hits.
    if run1 {
        eprintln!("1. cache-hit checks");
        let one_key = suite.write_frame("hot", &frame(Door::Envoy, &hot[0]));
        let r = suite
            .h2load(
                &[&kw, &empty, &kw_mt, &empty_mt],
                Door::Envoy,
                &one_key,
                8,
                8,
            )
            .await;
        suite.ratio_row(
            "cache hit, Authorization.Check, 1 key",
            "h2load c8m8",
            &r[0],
            &r[1],
            "empty current_thread",
            Some(0.90),
        );
        suite.ratio_row(
            "runtime: keyward multi_thread(1) / current_thread",
            "h2load c8m8",
            &r[2],
            &r[0],
            "keyward current_thread",
            None,
        );
        suite.ratio_row(
            "runtime: empty multi_thread(1) / current_thread",
            "h2load c8m8",
            &r[3],
            &r[1],
            "empty current_thread",
            None,
        );
        let h2load_empty = r[1].clone();
        suite.empty_h2load = Some(r[1].clone());
        let r = suite
            .h2load(&[&kw, &empty], Door::Envoy, &one_key, 1, 64)
            .await;
        suite.ratio_row(
            "cache hit, Authorization.Check, 1 key",
            "h2load c1m64",
            &r[0],
            &r[1],
            "empty current_thread",
            None,
        );

        let hot_envoy = Arc::new(
            hot.iter()
                .map(|k| frame(Door::Envoy, k))
                .collect::<Vec<_>>(),
        );
        let r = suite
            .h2gen(&[&kw, &empty], Door::Envoy, &hot_envoy, 8, 8, all_allowed)
            .await;
        suite.ratio_row(
            "cache hit, Authorization.Check, 10,000 keys",
            "h2gen c8m8",
            &r[0],
            &r[1],
            "empty current_thread",
            Some(0.90),
        );
        suite.empty_h2gen = Some(r[1].clone());
        suite.ratio_row(
            "load generator check: h2gen / h2load on the empty server",
            "c8m8",
            &r[1],
            &h2load_empty,
            "h2load",
            None,
        );
        let hot_keyward = Arc::new(
            hot.iter()
                .map(|k| frame(Door::Keyward, k))
                .collect::<Vec<_>>(),
        );
        let r = suite
            .h2gen(
                &[&kw, &empty],
                Door::Keyward,
                &hot_keyward,
                8,
                8,
                all_allowed,
            )
            .await;
        suite.ratio_row(
            "cache hit, CheckService.Check, 10,000 keys",
            "h2gen c8m8",
            &r[0],
            &r[1],
            "empty current_thread",
            None,
        );

        let a = &suite.args;
        let mut lat_kw = Vec::new();
        let mut lat_empty = Vec::new();
        for _ in 0..a.reps {
            for (server, out) in [(&kw, &mut lat_kw), (&empty, &mut lat_empty)] {
                let mut client = Client::connect(server.addr, Door::Envoy).await;
                out.push(client.measure(hot, false, true, a.warmup, a.duration).await);
            }
        }
        let median_p = |v: &[Latency], f: fn(&Latency) -> Duration| {
            let mut d: Vec<Duration> = v.iter().map(f).collect();
            d.sort();
            d[d.len() / 2]
        };
        let (kw_p99, empty_p99) = (
            median_p(&lat_kw, |l| l.p99),
            median_p(&lat_empty, |l| l.p99),
        );
        let ratio = kw_p99.as_secs_f64() / empty_p99.as_secs_f64();
        let show = |v: &[Latency]| {
            format!(
                "p50 {} · p99 {} · p99.9 {}",
                us(median_p(v, |l| l.p50)),
                us(median_p(v, |l| l.p99)),
                us(median_p(v, |l| l.p999))
            )
        };
        suite.table.row(
            "cache hit latency, Authorization.Check, 10,000 keys",
            "tonic c1m1",
            show(&lat_kw),
            format!("empty current_thread {}", show(&lat_empty)),
            format!("p99 {ratio:.2}"),
            &format!("p99 ≤ 1.10: {}", verdict(ratio <= 1.10)),
        );
    }

    // 2. Cache misses: keys this keyward has never seen, each used once.
    if run2 {
        eprintln!("2. cache-miss checks");
        let a = &suite.args;
        let cold = &secrets[HOT..];
        let (cold_lat, cold_rest) = cold.split_at(cold.len().min(100_000) / 2);
        let (cold_lat, cold_quiet) = cold_lat.split_at(cold_lat.len() / 2);
        let mut client = Client::connect(kw.addr, Door::Keyward).await;
        let miss = client
            .measure(cold_lat, true, true, Duration::ZERO, a.duration * 2)
            .await;
        // The same, on a keyward that writes no usage: every cold key's
        // first use is a row to write; do those writes slow the lookups?
        let quiet = Server::keyward(
            &a.keyward,
            "keyward, usage writes off",
            &url,
            &["--usage-flush-interval", "1h"],
        )
        .await;
        let mut client = Client::connect(quiet.addr, Door::Keyward).await;
        let miss_quiet = client
            .measure(cold_quiet, true, true, Duration::ZERO, a.duration * 2)
            .await;
        drop(quiet);
        suite.table.row(
            "cache miss latency (one indexed SELECT), CheckService.Check",
            &format!("tonic c1m1, {} cold keys", miss.calls),
            lat(&miss),
            "—".into(),
            "—".into(),
            &format!(
                "p99 ≤ 2 ms: {}",
                verdict(miss.p99 <= Duration::from_millis(2))
            ),
        );
        suite.table.row(
            "… the same with usage writes off (--usage-flush-interval 1h)",
            &format!("tonic c1m1, {} cold keys", miss_quiet.calls),
            lat(&miss_quiet),
            "—".into(),
            "—".into(),
            "—",
        );
        let miss_frames = Arc::new(
            cold_rest
                .iter()
                .map(|k| frame(Door::Keyward, k))
                .collect::<Vec<_>>(),
        );
        let cpu0 = kw.cpu_time();
        let run = h2gen::run(
            kw.addr,
            Door::Keyward,
            miss_frames,
            true,
            8,
            8,
            Duration::ZERO,
            a.duration * 2,
        )
        .await;
        all_allowed("keyward", &run);
        let calls = run.allowed;
        suite.table.row(
            "cache miss throughput, CheckService.Check",
            &format!("h2gen c8m8, {calls} cold keys"),
            format!(
                "{}, {} CPU/call",
                k(run.rps),
                us((kw.cpu_time() - cpu0).div_f64(calls.max(1) as f64))
            ),
            "—".into(),
            "—".into(),
            "—",
        );
    }

    // 3. Invalid keys.
    if run3 {
        eprintln!("3. invalid keys");
        let bad = suite.write_frame("bad", &frame(Door::Envoy, &bad_checksum(&hot[1])));
        let unk = suite.write_frame("unknown", &frame(Door::Envoy, &unknown[1]));
        let baseline = match suite.empty_h2load.clone() {
            Some(b) => b,
            None => {
                let hot_frame = suite.write_frame("hot", &frame(Door::Envoy, &hot[0]));
                suite
                    .h2load(&[&empty], Door::Envoy, &hot_frame, 8, 8)
                    .await
                    .remove(0)
            }
        };
        for (figure, file) in [
            ("bad checksum (refused before any lookup)", &bad),
            ("unknown well-formed key (negative cache)", &unk),
        ] {
            let r = suite.h2load(&[&kw], Door::Envoy, file, 8, 8).await;
            suite.ratio_row(
                figure,
                "h2load c8m8",
                &r[0],
                &baseline,
                "empty current_thread (row 1)",
                None,
            );
        }
        let mix = Arc::new(
            (0..HOT)
                .map(|i| match i % 3 {
                    0 => frame(Door::Envoy, &hot[i]),
                    1 => frame(Door::Envoy, &bad_checksum(&hot[i])),
                    _ => frame(Door::Envoy, &unknown[i]),
                })
                .collect::<Vec<_>>(),
        );
        let r = suite
            .h2gen(&[&kw], Door::Envoy, &mix, 8, 8, |name, run| {
                assert_eq!(run.failed, 0, "{name}: failures");
                let share = run.allowed as f64 / (run.allowed + run.denied).max(1) as f64;
                assert!(
                    (0.30..0.37).contains(&share),
                    "keyward allowed {share:.2} of the mix, not a third"
                );
            })
            .await;
        let baseline = match suite.empty_h2gen.clone() {
            Some(b) => b,
            None => suite
                .h2gen(&[&empty], Door::Envoy, &mix, 8, 8, all_allowed)
                .await
                .remove(0),
        };
        suite.ratio_row(
            "mix: ⅓ valid, ⅓ bad checksum, ⅓ unknown",
            "h2gen c8m8",
            &r[0],
            &baseline,
            "empty current_thread (10,000 keys row)",
            None,
        );
    }

    // 4. The admin plane.
    if run4 {
        eprintln!("4. admin plane");
        let a = &suite.args;
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM keys")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        let tokens: Vec<String> = sqlx::query_scalar(
            "SELECT replace(id::text, '-', '') FROM keys ORDER BY random() LIMIT 2000",
        )
        .fetch_all(&mut conn)
        .await
        .expect("tokens");
        let l = admin::list_latency(kw.addr, &admin_key, None, &tokens, a.duration).await;
        suite.table.row(
            &format!("List page of 100, whole table ({total} keys), random positions"),
            "tonic c1m1",
            lat(&l),
            "—".into(),
            "—".into(),
            &format!("p99 ≤ 5 ms: {}", verdict(l.p99 <= Duration::from_millis(5))),
        );
        let l =
            admin::list_latency(kw.addr, &admin_key, Some("owner-500"), &tokens, a.duration).await;
        suite.table.row(
            "List page of 100, one owner's keys, paging",
            "tonic c1m1",
            lat(&l),
            "—".into(),
            "—".into(),
            &format!("p99 ≤ 5 ms: {}", verdict(l.p99 <= Duration::from_millis(5))),
        );
        // Mint last: its burst of inserts leaves Postgres busy (autovacuum,
        // checkpoint) for a while, which would weigh on the List figures.
        let mint = admin::mint_rate(kw.addr, &admin_key, 32, a.duration * 2).await;
        suite.table.row(
            "Mint sustained",
            "tonic, 32 in flight",
            k(mint),
            "—".into(),
            "—".into(),
            &format!("≥ 2,000/s: {}", verdict(mint >= 2000.0)),
        );
    }
    drop((kw_mt, empty_mt));

    // 5. Memory: a fresh keyward, warmed with every seeded key.
    if run5 {
        eprintln!("5. memory");
        let a = &suite.args;
        let n = secrets.len();
        let capacity = (n * 2).to_string();
        // Both cores: only its memory is measured here, and warming a million
        // keys through one core would take minutes.
        let mem = Server::keyward_on(
            &a.keyward,
            "0,1",
            "keyward (memory)",
            &url,
            &[
                "--cache-capacity",
                &capacity,
                "--db-max-connections",
                "16",
                // Usage writes are measured elsewhere; here they would only
                // slow the warm-up (every key's first use is written).
                "--usage-flush-interval",
                "1h",
            ],
        )
        .await;
        let mut client = Client::connect(mem.addr, Door::Keyward).await;
        assert!(client.allowed(&hot[0]).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = mem.rss();
        let frames_all = Arc::new(
            secrets
                .iter()
                .map(|k| frame(Door::Keyward, k))
                .collect::<Vec<_>>(),
        );
        let warm_started = Instant::now();
        let run = h2gen::run(
            mem.addr,
            Door::Keyward,
            frames_all,
            true,
            8,
            16,
            Duration::ZERO,
            Duration::from_secs(600),
        )
        .await;
        all_allowed("keyward (memory)", &run);
        let warm_time = warm_started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = mem.rss();
        let per_key = after.saturating_sub(before) as f64 / n as f64;
        suite.table.row(
            &format!("RSS per cached key ({n} keys warmed in {warm_time:.0?})"),
            "h2gen, each key once",
            format!(
                "{per_key:.0} B/key ({} MiB → {} MiB)",
                before >> 20,
                after >> 20
            ),
            "—".into(),
            "—".into(),
            &format!("≤ 1 KiB: {}", verdict(per_key <= 1024.0)),
        );
        drop(mem);
    }

    // 6. End to end through Envoy.
    if run6 {
        eprintln!("6. end to end through Envoy");
        let a = &suite.args;
        let shaped = Server::empty_with(
            &a.empty,
            "empty, keyward-shaped answer",
            "current-thread",
            &["--answer", "keyward-shaped"],
        )
        .await;
        let kw_bare = Server::keyward(
            &a.keyward,
            "keyward, no dynamic metadata",
            &url,
            &["--envoy-dynamic-metadata", "false"],
        )
        .await;
        let envoy_kw = e2e::Envoy::start(&a.envoy, &repo, kw.addr.port()).await;
        let envoy_empty = e2e::Envoy::start(&a.envoy, &repo, empty.addr.port()).await;
        let envoy_shaped = e2e::Envoy::start(&a.envoy, &repo, shaped.addr.port()).await;
        let envoy_bare = e2e::Envoy::start(&a.envoy, &repo, kw_bare.addr.port()).await;
        let keys_file = suite.tmp.join("hot-keys.txt");
        std::fs::write(&keys_file, hot.join("\n")).expect("keys file");
        let script = e2e::write_script(&suite.tmp, &keys_file);
        // c32: keyward, the empty baseline, the baseline answering with
        // keyward's allow shape, and keyward without dynamic metadata; c1:
        // keyward and the baseline.
        for (conns, targets) in [
            (
                32,
                vec![&envoy_kw, &envoy_empty, &envoy_shaped, &envoy_bare],
            ),
            (1, vec![&envoy_kw, &envoy_empty]),
        ] {
            let servers = [&kw, &empty, &shaped, &kw_bare];
            let mut samples = vec![Samples::default(); targets.len()];
            let mut p99 = vec![Duration::ZERO; targets.len()];
            // CPU per request: (Envoy, authorization server), summed over reps.
            let mut cpu = vec![(Duration::ZERO, Duration::ZERO, 0u64); targets.len()];
            for _ in 0..a.reps {
                for (i, envoy) in targets.iter().enumerate() {
                    let url = format!("http://127.0.0.1:{}/billing/invoices", envoy.port);
                    let _ = e2e::wrk(&a.wrk, &url, Some(&script), conns, a.warmup).await;
                    let (envoy0, authz0) = (envoy.cpu_time(), servers[i].cpu_time());
                    let run = e2e::wrk(&a.wrk, &url, Some(&script), conns, a.duration).await;
                    cpu[i].0 += envoy.cpu_time() - envoy0;
                    cpu[i].1 += servers[i].cpu_time() - authz0;
                    cpu[i].2 += run.requests;
                    assert_eq!(run.non_2xx, 0, "every request should reach the upstream");
                    samples[i].0.push(run.rps);
                    p99[i] = p99[i].max(run.p99);
                }
            }
            let split = |i: usize| {
                let n = cpu[i].2.max(1) as f64;
                format!(
                    "CPU/req Envoy {} + authz {}",
                    us(cpu[i].0.div_f64(n)),
                    us(cpu[i].1.div_f64(n))
                )
            };
            let ratio = |i: usize| samples[i].median() / samples[1].median();
            suite.table.row(
                "Envoy → keyward vs Envoy → empty, 10,000 keys",
                &format!("wrk c{conns}"),
                format!("{}, p99 {}, {}", samples[0].rate(), us(p99[0]), split(0)),
                format!("{}, p99 {}, {}", samples[1].rate(), us(p99[1]), split(1)),
                format!("{:.2}", ratio(0)),
                &if conns == 32 {
                    format!("≥ 0.97: {}", verdict(ratio(0) >= 0.97))
                } else {
                    "—".to_owned()
                },
            );
            if targets.len() == 4 {
                suite.table.row(
                    "… Envoy → empty answering with keyward's allow shape",
                    &format!("wrk c{conns}"),
                    "—".into(),
                    format!("{}, p99 {}, {}", samples[2].rate(), us(p99[2]), split(2)),
                    format!("{:.2}", ratio(2)),
                    "—",
                );
                suite.table.row(
                    "… Envoy → keyward --envoy-dynamic-metadata false",
                    &format!("wrk c{conns}"),
                    format!("{}, p99 {}, {}", samples[3].rate(), us(p99[3]), split(3)),
                    "(as above)".into(),
                    format!("{:.2}", ratio(3)),
                    "—",
                );
            }
        }
        let public = e2e::wrk(
            &a.wrk,
            &format!("http://127.0.0.1:{}/public/status", envoy_kw.port),
            None,
            32,
            a.duration,
        )
        .await;
        suite.table.row(
            "reference: Envoy without ext_authz (/public)",
            "wrk c32",
            "—".into(),
            k(public.rps),
            "—".into(),
            "—",
        );
        drop((
            envoy_kw,
            envoy_empty,
            envoy_shaped,
            envoy_bare,
            shaped,
            kw_bare,
        ));
    }
    drop((kw, empty));

    println!();
    println!(
        "keyward benchmark suite: {} keys seeded, {} reps x {:?} after {:?} warm-up, finished in {:.0?}",
        secrets.len(),
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
