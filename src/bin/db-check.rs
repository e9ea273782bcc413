//! `db-check`: report every broken engine invariant, read-only.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use diesel::connection::SimpleConnection;
use serde_json::json;
use workflow_db::admin::EXIT_INVARIANTS_BROKEN;
use workflow_db::cli::{self, CommonArgs, Reporter};
use workflow_db::engine::{self, CheckOptions, Severity};

/// Check the engine's invariants on DATABASE_URL and report, by execution and
/// step, every one that is broken. Reads only (read-only transactions), so it
/// is safe on a live production database. Exits 6 when an error-level
/// invariant is broken (warnings alone exit 0).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Executions per batch (one read-only transaction each).
    #[arg(long, default_value_t = 10_000, value_name = "N",
          value_parser = clap::value_parser!(i64).range(1..))]
    batch: i64,
    /// List at most this many violations of each kind (the counts stay complete).
    #[arg(long, default_value_t = 1_000, value_name = "N")]
    limit: usize,
    /// Warn about running steps whose lease expired more than SECS ago and
    /// were not reclaimed, and about delayed starts and timer and signal
    /// waits due more than SECS ago that nothing ran.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    lease_grace: u64,
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    let out = args.common.reporter();
    out.finish("db-check", run(&args, out))
}

fn run(args: &Args, out: Reporter) -> anyhow::Result<ExitCode> {
    let url = args.common.url()?;
    out.event(
        "target",
        format!("db-check: target {}", url.target()),
        json!({ "target": url.target() }),
    );
    let mut conn = workflow_db::pool::connect_as(&url, "workflow-db-check")?;
    // Belt and braces: the checker opens read-only transactions itself.
    conn.batch_execute("SET default_transaction_read_only = on")?;
    let mut options = CheckOptions::default();
    options.batch_size = args.batch;
    options.max_per_kind = args.limit;
    options.expired_lease_grace = Some(Duration::from_secs(args.lease_grace));

    let started = Instant::now();
    let show_progress = !args.common.json && std::io::stderr().is_terminal();
    let report = engine::check_invariants_with_progress(&mut conn, &options, |p| {
        if show_progress {
            eprint!(
                "\r{} executions, {} steps checked, {} violations",
                p.executions, p.steps, p.violations
            );
        }
    })?;
    if show_progress {
        eprintln!();
    }
    let elapsed = started.elapsed();

    for v in &report.violations {
        let severity = v.kind.severity();
        // Warnings print as "warning: ..." on their own (Reporter::warn).
        let human = match severity {
            Severity::Warning => v.to_string(),
            _ => format!("{} {v}", severity.as_str()),
        };
        let fields = json!({
            "kind": v.kind,
            "severity": severity,
            "execution_id": v.execution_id,
            "step_id": v.step_id,
            "detail": v.detail,
        });
        match severity {
            Severity::Warning => out.warn("violation", human, fields),
            _ => out.event("violation", human, fields),
        }
    }
    for (kind, count) in &report.counts {
        out.event(
            "count",
            format!("{kind}: {count} ({})", kind.explanation()),
            json!({
                "kind": kind,
                "severity": kind.severity(),
                "count": count,
                "explanation": kind.explanation(),
            }),
        );
    }
    let clean = report.is_clean();
    let verdict = if clean && report.warnings() == 0 {
        "clean".to_owned()
    } else if clean {
        format!("clean, {} warning(s)", report.warnings())
    } else {
        format!(
            "INVARIANTS BROKEN: {} error(s), {} warning(s){}",
            report.errors(),
            report.warnings(),
            if report.truncated() {
                format!(" ({} listed)", report.violations.len())
            } else {
                String::new()
            }
        )
    };
    out.event(
        "check",
        format!(
            "{}: {} executions, {} steps checked in {} batch(es), {} ms: {verdict}",
            url.target(),
            report.executions,
            report.steps,
            report.batches,
            elapsed.as_millis()
        ),
        json!({
            "target": url.target(),
            "clean": clean,
            "executions": report.executions,
            "steps": report.steps,
            "batches": report.batches,
            "errors": report.errors(),
            "warnings": report.warnings(),
            "listed": report.violations.len(),
            "truncated": report.truncated(),
            "parked_checked": report.parked_checked,
            "duration_ms": elapsed.as_millis() as u64,
        }),
    );
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVARIANTS_BROKEN)
    })
}
