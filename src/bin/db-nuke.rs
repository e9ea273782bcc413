//! `db-nuke`: drop everything in the `public` schema (tables, enums,
//! functions, migration bookkeeping); `db-migrate` rebuilds it from zero.
//! Guarded: see docs/admin.md for the rules and exit codes.

use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use workflow_db::admin::Operation;
use workflow_db::cli::{self, CommonArgs, GuardArgs};

/// Drop the whole schema of DATABASE_URL (refused in production).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    guard: GuardArgs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    args.common.reporter().finish("db-nuke", run(&args))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(plan) = cli::run_guarded(Operation::Nuke, &args.common, &args.guard)? {
        args.common.reporter().event(
            "nuked",
            format!(
                "dropped schema public ({} table(s), {} other object(s)) and recreated it empty; \
                 run db-migrate to rebuild",
                plan.tables.len(),
                plan.other_objects.len()
            ),
            json!({ "tables": plan.tables, "other_objects": plan.other_objects }),
        );
    }
    Ok(ExitCode::SUCCESS)
}
