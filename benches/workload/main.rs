//! The engine workload (W1–W6) on this crate, optionally side by side with the
//! server-bound limit (pgbench `-M prepared` scripts of `PERF_LIMIT_DIR`), in
//! one process on one throwaway database. See `docs/benchmarks.md`.
//!
//! ```text
//! cargo bench --bench workload -- [--only W1,W3] [--runs 3] [--executions 100000]
//!     [--duration 8] [--warmup 1] [--queries 1000] [--batch 10] [--limit]
//!     [--peer | --no-peer] [--peer-jobs 50000] [--studio-executions 100000,1000000]
//!     [--studio-requests 200] [--keep]
//! ```
//!
//! Modules: [`args`] (options), [`db`] (the bench database and the
//! throughput/latency drivers), [`data`] (ids, payloads, the W5 rows),
//! [`report`] (figures, ratios, growth, targets, the printed tables and
//! `target/workload.json`), [`limit`] (pgbench/psql), [`peer`] (the
//! graphile-worker peer), and one module per figure group: [`start`] (W1),
//! [`claim`] (W2, W6, claim-latency growth), [`async_face`] (ASYNC: W2
//! through `workflow_db::runtime::AsyncPool`), [`worker`] (WORKER: W2 and
//! W6 through `workflow_db::runtime::Worker`), [`settle`] (CANCEL, FANIN,
//! DRAIN), [`load`] (W5), [`read`] (W3, W4), [`pool`] (r2d2 checkout),
//! [`studio`] (STUDIO: the web dashboard's page times at 100k and 1M
//! executions).

mod args;
mod async_face;
mod claim;
mod data;
mod db;
mod flow;
mod limit;
mod load;
mod peer;
mod pool;
mod read;
mod report;
mod settle;
mod start;
mod studio;
mod waits;
mod worker;

use chrono::Utc;

use crate::db::Bench;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

fn main() {
    if let Err(e) = run() {
        // The whole chain: the crate's errors do not repeat their cause.
        let mut text = format!("error: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("{text}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = args::parse()?;
    if args.limit {
        limit::check(&args)?;
    }
    let peer = peer::plan(&args, &workflow_db::testing::server_url()?)?;
    let started = Utc::now();
    eprintln!("creating a throwaway database (migrated), seeding 100 workflows");
    let mut b = Bench::new(args)?;
    eprintln!("  database {}", b.db.name());
    let result = run_peer(&mut b, peer)
        .and_then(|()| run_figures(&mut b))
        .and_then(|()| {
            let version = b.server_version();
            b.report.print_and_save(&b.args, &version, started)
        });
    // Kept also when the run failed (to look at what it left); else dropped.
    if b.args.keep {
        let name = b.db.keep();
        eprintln!("kept database {name} (drop it with: DROP DATABASE {name})");
    }
    result
}

/// The graphile-worker peer first (when it cannot run, that shows before
/// the long part). Asked for by `--limit` alone, a peer that cannot run or
/// fails is left out with a note; with `--peer` that is an error.
fn run_peer(b: &mut Bench, plan: peer::Plan) -> Res<()> {
    match plan {
        peer::Plan::Off => Ok(()),
        peer::Plan::Skipped(why) => {
            b.report
                .notes
                .push(format!("graphile-worker peer skipped: {why}"));
            Ok(())
        }
        peer::Plan::Run(p) => match b.peer(&p) {
            Err(e) if !b.args.peer => {
                eprintln!(
                    "graphile-worker peer failed (left out; --peer makes this an error): {e}"
                );
                b.report
                    .notes
                    .push(format!("graphile-worker peer failed, left out: {e}"));
                Ok(())
            }
            r => r,
        },
    }
}

/// Every asked-for figure group, `--runs` times, in the order that keeps the
/// data each one needs (W3/W4 read what W5 loaded).
fn run_figures(b: &mut Bench) -> Res<()> {
    if b.args.limit {
        b.ensure_views()?;
    }
    for rep in 1..=b.args.runs {
        if b.args.wants("W1") {
            b.w1(rep)?;
        }
        if b.args.wants("W2") {
            b.w2(rep)?;
        }
        if b.args.wants("ASYNC") {
            b.async_face(rep)?;
        }
        if b.args.wants("W6") {
            b.w6(rep)?;
        }
        if b.args.wants("WORKER") {
            b.worker_group(rep)?;
        }
        if b.args.wants("CANCEL") {
            b.cancel_group(rep)?;
        }
        if b.args.wants("FANIN") {
            b.fanin(rep)?;
        }
        if b.args.wants("DRAIN") {
            b.drain_one(rep)?;
        }
        let needs_data = ["W5", "W3", "W4"].iter().any(|w| b.args.wants(w));
        if needs_data {
            b.w5(rep)?;
        }
        if b.args.wants("W3") {
            b.w3(rep)?;
        }
        if b.args.wants("W4") {
            b.w4(rep)?;
        }
        if b.args.wants("CLAIM") {
            b.claim_growth(rep)?;
        }
        if b.args.wants("FLOW") {
            b.flow_group(rep)?;
        }
        if b.args.wants("WAITS") {
            b.waits_group(rep)?;
        }
        if b.args.wants("R2D2") {
            b.r2d2(rep)?;
        }
    }
    // Last, and once: it builds a database per scale (minutes at 1M) and
    // measures every page --runs times on it.
    if b.args.wants("STUDIO") {
        b.studio_group()?;
    }
    Ok(())
}
