//! `db-reset`: empty every application table, keeping schema, migration
//! bookkeeping and environment stamp; `--migrate` then applies pending
//! migrations and `--seed` reseeds, both only after the guard and the
//! confirmation. Guarded: see docs/admin.md for the rules and exit codes.

use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use workflow_db::Environment;
use workflow_db::admin::Operation;
use workflow_db::cli::{self, CommonArgs, GuardArgs};
use workflow_db::migrate::Migrator;
use workflow_db::seed;

// Flags may be repeated: `bin/reset` passes `--migrate --seed` and its
// caller may pass them again.
/// Delete all data of DATABASE_URL and keep the schema (refused in production).
#[derive(Parser, Debug)]
#[command(version, about, args_override_self = true)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    guard: GuardArgs,
    /// Apply pending migrations after emptying (after the guard and the confirmation).
    #[arg(long)]
    migrate: bool,
    /// Load the embedded seeds afterwards.
    #[arg(long)]
    seed: bool,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    args.common.reporter().finish("db-reset", run(&args))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let out = args.common.reporter();
    let seeds = if args.seed {
        Some(seed::SeedSet::parse(&seed::embedded())?)
    } else {
        None
    };
    let Some(plan) = cli::run_guarded(Operation::Reset, &args.common, &args.guard)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let rows: i64 = plan.tables.iter().map(|t| t.rows).sum();
    out.event(
        "reset",
        format!(
            "emptied {} table(s), {rows} row(s) deleted; schema, migration bookkeeping and stamp kept",
            plan.tables.len()
        ),
        json!({ "tables": plan.tables, "rows_deleted": rows }),
    );
    let url = args.common.url()?;
    if args.migrate {
        let environment = Environment::from_lookup(|v| std::env::var(v).ok());
        cli::run_migrations(out, &Migrator::new(url.clone()).environment(environment))?;
    }
    if let Some(seeds) = seeds {
        let report = seeds.apply(&mut workflow_db::pool::connect(&url)?)?;
        out.event(
            "seeded",
            format!("seeded:\n{}", report.to_string().trim_end()),
            serde_json::to_value(&report)?,
        );
    }
    Ok(ExitCode::SUCCESS)
}
