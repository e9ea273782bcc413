//! `db-seed`: insert the declarative seed data that is missing. Allowed in
//! every environment: it never updates or deletes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use workflow_db::cli::{self, CommonArgs};
use workflow_db::seed::{self, SeedSet};

/// Insert the seed data (embedded seeds/*.json, or --dir) that DATABASE_URL lacks; never updates or deletes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Load the *.json files of this folder instead of the embedded seeds.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    args.common.reporter().finish("db-seed", run(&args))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let out = args.common.reporter();
    let sources = match &args.dir {
        Some(dir) => seed::from_dir(dir)?,
        None => seed::embedded(),
    };
    // Every file is checked before connecting: a bad one writes nothing.
    let seeds = SeedSet::parse(&sources)?;
    let url = args.common.url()?;
    out.event(
        "target",
        format!("db-seed: target {}", url.target()),
        json!({ "target": url.target() }),
    );
    let report = seeds.apply(&mut workflow_db::pool::connect(&url)?)?;
    for t in &report.tables {
        out.event(
            "table",
            format!(
                "{:<16} {:>5} inserted {:>5} already present",
                t.table, t.inserted, t.present
            ),
            serde_json::to_value(t)?,
        );
    }
    let present: usize = report.tables.iter().map(|t| t.present).sum();
    out.event(
        "done",
        format!(
            "{} row(s) inserted, {present} already present",
            report.inserted()
        ),
        json!({ "inserted": report.inserted(), "present": present }),
    );
    Ok(ExitCode::SUCCESS)
}
