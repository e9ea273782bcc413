//! `db-reset`: empty every application table, keeping schema, migration
//! bookkeeping and environment stamp; `--seed` reseeds. Guarded: see the
//! README for the rules and exit codes.

use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use workflow_db::admin::Operation;
use workflow_db::cli::{self, CommonArgs, GuardArgs};
use workflow_db::seed;

/// Delete all data of DATABASE_URL and keep the schema (refused in production).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    guard: GuardArgs,
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
    if let Some(seeds) = seeds {
        let report = seeds.apply(&mut workflow_db::pool::connect(&args.common.url()?)?)?;
        out.event(
            "seeded",
            format!("seeded:\n{}", report.to_string().trim_end()),
            serde_json::to_value(&report)?,
        );
    }
    Ok(ExitCode::SUCCESS)
}
