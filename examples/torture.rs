//! The engine's randomized concurrency torture, for long runs (the test
//! `tests/torture.rs` runs it for about a minute in CI):
//!
//! ```text
//! cargo run --release --example torture --features test-utils -- --seconds 600 --seed 42
//! ```
//!
//! Options: `--seconds N` (default 60), `--seed S` (default: from the clock,
//! printed), `--threads N` (default 4), `--cross-execution` (also run
//! transactions outside the engine's lock order; deadlocks are then counted,
//! not failed), `--keep` (keep the throwaway database to inspect it), `--quiet`. The server comes from `TEST_DATABASE_URL`, else
//! `DATABASE_URL`, else the local default (see `workflow_db::testing`). Exits
//! 0 when the run passed, 1 when it found something (or, in a run of 20 s or
//! more, did not exercise every kind of timer and signal activity), 2 on a
//! usage error.

use std::process::ExitCode;
use std::time::Duration;

use workflow_db::testing::TestDatabase;
use workflow_db::torture::{self, TortureConfig};

const USAGE: &str =
    "usage: torture [--seconds N] [--seed S] [--threads N] [--cross-execution] [--keep] [--quiet]";

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let mut config = TortureConfig::from_env();
    config.duration = Duration::from_secs(60);
    config.verbose = true;
    let mut keep = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Option<u64> {
            let value = args.next().and_then(|v| v.parse().ok());
            if value.is_none() {
                eprintln!("torture: {name} needs a number\n{USAGE}");
            }
            value
        };
        match arg.as_str() {
            "--seconds" => match number("--seconds") {
                Some(n) => config.duration = Duration::from_secs(n),
                None => return ExitCode::from(2),
            },
            "--seed" => match number("--seed") {
                Some(n) => config.seed = n,
                None => return ExitCode::from(2),
            },
            "--threads" => match number("--threads") {
                Some(n) => config.threads = (n as usize).max(1),
                None => return ExitCode::from(2),
            },
            "--keep" => keep = true,
            "--cross-execution" => config.cross_execution = true,
            "--quiet" => config.verbose = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("torture: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    println!(
        "torture: seed {} ({} threads, {} s); replay with --seed {}",
        config.seed,
        config.threads,
        config.duration.as_secs(),
        config.seed
    );
    let db = match TestDatabase::throwaway("torture") {
        Ok(db) => db,
        Err(e) => {
            eprintln!("torture: cannot create a database: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = torture::run(db.url(), &config);
    if keep {
        println!("torture: database kept: {}", db.keep());
    }
    match result {
        Ok(report) => {
            println!("{report}");
            let exercised =
                config.duration < Duration::from_secs(20) || report.waits.missing().is_empty();
            if report.passed() && exercised {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("torture: error: {e}");
            ExitCode::FAILURE
        }
    }
}
