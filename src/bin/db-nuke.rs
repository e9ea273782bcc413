//! `db-nuke`: drop everything in the `public` schema (tables, enums,
//! functions, migration bookkeeping); `db-migrate` rebuilds it from zero.
//! Guarded: see `docs/admin.md` for the rules and exit codes.

mod common;

use std::process::ExitCode;

use clap::Parser;
use workflow_db::admin::Operation;

/// Drop the whole schema of DATABASE_URL (refused in production; see docs/admin.md).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    guard: common::GuardArgs,
}

fn main() -> ExitCode {
    let args: Args = common::parse();
    common::finish("db-nuke", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(plan) = common::run_guarded(Operation::Nuke, &args.guard)? {
        println!(
            "dropped schema public ({} table(s), {} other object(s)) and recreated it empty; \
             run db-migrate to rebuild",
            plan.tables.len(),
            plan.other_objects.len()
        );
    }
    Ok(())
}
