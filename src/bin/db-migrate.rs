//! `db-migrate`: create the database if needed and apply pending migrations.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use workflow_db::migrate::{self, MigrationEvent, Migrator};
use workflow_db::{Config, DatabaseUrl};

/// Apply the embedded migrations to DATABASE_URL (creating the database if needed).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Database URL (overrides DATABASE_URL from the environment or .env).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Change nothing; exit 1 when migrations are pending or an applied one was edited.
    #[arg(long, conflicts_with = "status")]
    check: bool,
    /// List every migration with applied/pending, applied-at and duration; change nothing.
    #[arg(long)]
    status: bool,
    /// Seconds to wait for another migrator's lock before giving up.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    lock_timeout: u64,
    /// Apply pending migrations older than the newest applied one (branches merged).
    #[arg(long)]
    allow_out_of_order: bool,
}

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("db-migrate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let url = match &args.database_url {
        Some(url) => DatabaseUrl::parse(url)?,
        None => Config::from_env()?.database_url,
    };
    let environment = workflow_db::Environment::from_lookup(|v| std::env::var(v).ok());
    let migrator = Migrator::new(url.clone())
        .environment(environment)
        .lock_timeout(Duration::from_secs(args.lock_timeout))
        .allow_out_of_order(args.allow_out_of_order);

    if args.status || args.check {
        let statuses = migrator.status()?;
        let pending: Vec<_> = statuses.iter().filter(|s| !s.applied).collect();
        let edited: Vec<_> = statuses
            .iter()
            .filter(|s| s.checksum_ok == Some(false))
            .collect();
        if args.status {
            for s in &statuses {
                println!(
                    "{:<16} {:<8} {:<28} {:>8} {}",
                    s.version,
                    if s.applied { "applied" } else { "pending" },
                    s.applied_at.map_or_else(|| "-".into(), |t| t.to_rfc3339()),
                    s.duration_ms
                        .map_or_else(|| "-".into(), |d| format!("{d} ms")),
                    s.name.as_deref().unwrap_or("(unknown to this build)")
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        for s in &pending {
            println!("pending: {}", s.name.as_deref().unwrap_or(&s.version));
        }
        for s in &edited {
            println!("edited after it was applied: {}", s.version);
        }
        if pending.is_empty() && edited.is_empty() {
            println!("{}: up to date", url.target());
            return Ok(ExitCode::SUCCESS);
        }
        return Ok(ExitCode::FAILURE);
    }

    if migrate::create_database_if_missing(&url)? {
        println!("created database {}", url.database());
    }
    let applied = migrator.run(|event| match event {
        MigrationEvent::WaitingForLock { holder } => {
            eprintln!("waiting for the migration lock held by {holder}")
        }
        MigrationEvent::Applied(m) => {
            println!("applied {} ({} ms)", m.name, m.duration.as_millis())
        }
        MigrationEvent::UnknownApplied { version } => {
            eprintln!("warning: applied migration {version} is unknown to this build")
        }
        MigrationEvent::Stamped { from, to } => {
            println!(
                "environment stamp: {} -> {to}",
                from.as_deref().unwrap_or("none")
            )
        }
        MigrationEvent::StampKept { stamp, ours } => {
            println!("environment stamp {stamp} kept (this process runs as {ours})")
        }
        _ => {}
    })?;
    if applied.is_empty() {
        println!("{}: nothing to migrate, up to date", url.target());
    } else {
        println!("{}: {} migration(s) applied", url.target(), applied.len());
    }
    Ok(ExitCode::SUCCESS)
}
