//! `db-migrate`: create the database if needed and apply pending migrations.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use workflow_db::Environment;
use workflow_db::admin::EXIT_CHECK_FAILED;
use workflow_db::cli::{self, CommonArgs, Reporter};
use workflow_db::migrate::Migrator;

/// Apply the embedded migrations to DATABASE_URL, creating the database if needed.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Change nothing; exit 5 on pending, out-of-order, edited or unknown migrations, or schema drift.
    #[arg(long, conflicts_with_all = ["status", "print_catalog"])]
    check: bool,
    /// List every migration: applied/pending, applied-at, duration. Changes nothing.
    #[arg(long, conflicts_with = "print_catalog")]
    status: bool,
    /// Print the live catalog snapshot (what --check compares). Changes nothing.
    #[arg(long)]
    print_catalog: bool,
    /// Seconds to wait for another migrator's lock before giving up.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    lock_timeout: u64,
    /// Apply pending migrations older than the newest applied one (branches merged).
    #[arg(long)]
    allow_out_of_order: bool,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    let out = args.common.reporter();
    out.finish("db-migrate", run(&args, out))
}

fn run(args: &Args, out: Reporter) -> anyhow::Result<ExitCode> {
    let url = args.common.url()?;
    let migrator = Migrator::new(url.clone())
        .environment(Environment::from_lookup(|v| std::env::var(v).ok()))
        .lock_timeout(Duration::from_secs(args.lock_timeout))
        .allow_out_of_order(args.allow_out_of_order);

    if args.print_catalog {
        for line in migrator.catalog()? {
            out.event("catalog", &line, json!({ "line": line }));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.status {
        let status = migrator.status()?;
        let applied = status.iter().filter(|s| s.applied).count();
        out.event(
            "status",
            format!(
                "{}: {applied} applied, {} pending",
                url.target(),
                status.len() - applied
            ),
            json!({ "target": url.target(), "applied": applied, "pending": status.len() - applied }),
        );
        for s in status {
            let human = format!(
                "{:<16} {:<8} {:<33} {:>8}  {}",
                s.version,
                if s.applied { "applied" } else { "pending" },
                s.applied_at.map_or_else(|| "-".into(), |t| t.to_rfc3339()),
                s.duration_ms
                    .map_or_else(|| "-".into(), |d| format!("{d} ms")),
                s.name.as_deref().unwrap_or("(unknown to this build)")
            );
            out.event("migration", human, serde_json::to_value(&s)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.check {
        let report = migrator.check()?;
        for v in &report.pending {
            out.event("pending", format!("pending: {v}"), json!({ "version": v }));
        }
        for v in &report.out_of_order {
            out.event(
                "out_of_order",
                format!("out of order: {v} is older than the newest applied migration"),
                json!({ "version": v }),
            );
        }
        for v in &report.edited {
            out.event(
                "edited",
                format!("edited after it was applied: {v}"),
                json!({ "version": v }),
            );
        }
        for v in &report.unknown_applied {
            out.event(
                "unknown_applied",
                format!("applied but unknown to this build: {v}"),
                json!({ "version": v }),
            );
        }
        for d in &report.drift {
            out.event("drift", format!("drift: {d}"), json!({ "difference": d }));
        }
        let clean = report.is_clean();
        out.event(
            "check",
            format!(
                "{}: {}",
                url.target(),
                if clean {
                    "up to date, no drift"
                } else {
                    "check failed"
                }
            ),
            json!({ "target": url.target(), "clean": clean }),
        );
        return Ok(if clean {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_CHECK_FAILED)
        });
    }

    cli::run_migrations(out, &migrator)?;
    Ok(ExitCode::SUCCESS)
}
