//! `db-reset`: empty every application table, keeping schema, migration
//! bookkeeping and environment stamp; `--seed` reseeds. Guarded: see
//! `docs/admin.md` for the rules and exit codes.

mod common;

use std::process::ExitCode;

use clap::Parser;
use workflow_db::admin::Operation;
use workflow_db::seed;

/// Delete all data of DATABASE_URL and keep the schema (refused in production; see docs/admin.md).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    guard: common::GuardArgs,
    /// Load the embedded seeds afterwards.
    #[arg(long)]
    seed: bool,
}

fn main() -> ExitCode {
    let args: Args = common::parse();
    common::finish("db-reset", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let seeds = if args.seed {
        Some(seed::SeedSet::parse(&seed::embedded())?)
    } else {
        None
    };
    let Some(plan) = common::run_guarded(Operation::Reset, &args.guard)? else {
        return Ok(());
    };
    let rows: i64 = plan.tables.iter().map(|t| t.rows).sum();
    println!(
        "emptied {} table(s), {rows} row(s) deleted; schema, migration bookkeeping and stamp kept",
        plan.tables.len()
    );
    if let Some(seeds) = seeds {
        let url = common::database_url(args.guard.database_url.as_deref())?;
        let report = seeds.apply(&mut workflow_db::migrate::connect(&url)?)?;
        print!("seeded:\n{report}");
    }
    Ok(())
}
