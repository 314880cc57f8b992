use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use keyward::{
    config::{Command, Config},
    startup::{self, Application},
    telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log_format, &config.log_filter)
        .map_err(|e| anyhow::anyhow!(e))
        .context("invalid log settings")?;
    match config.command.clone().unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(&config).await?;
            app.run_until_stopped(startup::shutdown_signal()).await?;
        }
        Command::Migrate => startup::migrate(&config).await?,
        Command::Bootstrap { owner, name } => {
            let (record, secret) = startup::bootstrap(&config, &owner, &name).await?;
            eprintln!(
                "admin key {} for owner {owner}; it is shown once, store it now:",
                record.id
            );
            writeln!(std::io::stdout().lock(), "{}", secret.expose_secret())?;
        }
    }
    Ok(())
}
