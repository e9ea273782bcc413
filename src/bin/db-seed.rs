//! `db-seed`: insert the declarative seed data that is missing. Allowed in
//! every environment: it never updates or deletes.

#[allow(dead_code)]
mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use workflow_db::seed::{self, SeedSet};

/// Insert the seed data (embedded seeds/*.json, or --dir) that DATABASE_URL lacks; never updates or deletes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Database URL (overrides DATABASE_URL from the environment or .env).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Load the *.json files of this folder instead of the embedded seeds.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args: Args = common::parse();
    common::finish("db-seed", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let sources = match &args.dir {
        Some(dir) => seed::from_dir(dir)?,
        None => seed::embedded(),
    };
    // Every file is checked before connecting: a bad one writes nothing.
    let seeds = SeedSet::parse(&sources)?;
    let url = common::database_url(args.database_url.as_deref())?;
    println!("db-seed: target {}", url.target());
    let report = seeds.apply(&mut workflow_db::migrate::connect(&url)?)?;
    print!("{report}");
    let present: usize = report.tables.iter().map(|t| t.present).sum();
    println!(
        "{} row(s) inserted, {present} already present",
        report.inserted()
    );
    Ok(())
}
