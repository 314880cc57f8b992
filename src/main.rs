// The library forbids unsafe code; the binary allows exactly one call, to
// configure its allocator (see `keep_freed_pages`).
#![deny(unsafe_code)]

// mimalloc rather than the system allocator: with a million cached keys
// glibc's malloc held 2.8 KiB of RSS per key (fragmentation from the
// allocations of each miss), mimalloc 0.6 KiB. See BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use keyward::{
    config::{Command, Config},
    startup::{self, Application},
    telemetry,
};

fn main() -> anyhow::Result<()> {
    keep_freed_pages();
    let config = Config::parse();
    let runtime = config
        .build_runtime()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        // In the runtime: the trace exporter's channel lives on it.
        let telemetry = telemetry::init(config.log_format, &config.log_filter)
            .map_err(|e| anyhow::anyhow!(e))
            .context("invalid log or trace settings")?;
        let result = run(config).await;
        telemetry.shutdown().await;
        result
    })
}

async fn run(config: Config) -> anyhow::Result<()> {
    match config.command.clone().unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(&config).await?;
            app.run_until_stopped(startup::shutdown_signal()).await?;
        }
        Command::Migrate => startup::migrate(&config).await?,
        Command::Bootstrap { owner, name } => {
            let (record, secret) = startup::bootstrap(&config, &owner, &name).await?;
            writeln!(
                std::io::stderr().lock(),
                "admin key {} for owner {owner}; it is shown once, store it now:",
                record.id
            )?;
            writeln!(std::io::stdout().lock(), "{}", secret.expose_secret())?;
        }
    }
    Ok(())
}

/// Tells mimalloc never to return freed pages to the OS. By default it does so
/// a second after they empty, and faulting them back in on the next burst of
/// requests put the one-stream p99 at 3.3 times the baseline's on the
/// project's VMs, against 1.07 without purging (BENCHMARKS.md). A cache
/// server's working set is stable; the cost is that RSS stays at its peak.
#[allow(unsafe_code)]
fn keep_freed_pages() {
    /// `mi_option_purge_delay` in mimalloc.h (v3). mimalloc keeps this enum's
    /// numbering stable (retired options keep their slots); Cargo.lock pins
    /// the version. -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set stores one integer in mimalloc's option table.
    // It has no memory-safety preconditions; it is documented as not thread
    // safe, and this runs first thing in main, before any thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
