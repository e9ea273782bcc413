//! The server-bound limit (`--limit`): the pgbench `-M prepared` scripts and
//! SQL of `PERF_LIMIT_DIR`, run with pgbench and psql against the benchmark's
//! own throwaway database.

use std::path::Path;
use std::process::Command;

use crate::Res;
use crate::args::Args;
use crate::db::Bench;
use crate::report::{percentiles, target_dir};

/// The files of `PERF_LIMIT_DIR` that `--limit` runs.
const SCRIPTS: &[&str] = &[
    "w1.sql",
    "w1_cte.sql",
    "w2.sql",
    "w2_single.sql",
    "w3_three.sql",
    "w3_json.sql",
    "w3_lateral.sql",
    "w4.sql",
    "sql/w2_pool.sql",
    "sql/w5_source.sql",
];

/// pgbench: `PGBENCH`, else PostgreSQL 15's.
fn pgbench() -> String {
    std::env::var("PGBENCH").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pgbench".into())
}

/// psql: `PSQL`, else PostgreSQL 15's, else the one on the `PATH`.
fn psql() -> String {
    std::env::var("PSQL").unwrap_or_else(|_| {
        let p = "/usr/lib/postgresql/15/bin/psql";
        if Path::new(p).exists() { p } else { "psql" }.to_owned()
    })
}

/// Before anything runs: the scripts are there and pgbench starts.
pub fn check(args: &Args) -> Res<()> {
    let missing: Vec<&str> = SCRIPTS
        .iter()
        .copied()
        .filter(|f| !args.limit_dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "--limit: the pgbench limit scripts are not in {} (missing {}); \
             set PERF_LIMIT_DIR to the perf-limit directory",
            args.limit_dir.display(),
            missing.join(", ")
        )
        .into());
    }
    let pgbench = pgbench();
    if Command::new(&pgbench).arg("--version").output().is_err() {
        return Err(format!("--limit: pgbench not found at {pgbench}; set PGBENCH").into());
    }
    Ok(())
}

/// Runs a tool as run.sh does (no TLS, UTC, quiet); its stdout, or an error
/// with its output.
fn run_tool(mut cmd: Command) -> Res<String> {
    cmd.env("PGSSLMODE", "disable")
        .env("PGTZ", "UTC")
        .env("PGOPTIONS", "-c client_min_messages=warning");
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed: {}{}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whole seconds for pgbench `-T` (at least 1).
fn fmt_secs(s: f64) -> String {
    format!("{}", s.ceil().max(1.0) as u64)
}

impl Bench {
    fn pgbench_cmd(&self, script: &str, clients: usize) -> Command {
        let mut cmd = Command::new(pgbench());
        cmd.args(["-n", "-M", "prepared", "-c", &clients.to_string()])
            .args(["-j", if clients > 1 { "2" } else { "1" }])
            .arg("-f")
            .arg(self.args.limit_dir.join(script));
        cmd
    }

    fn psql_cmd(&self) -> Command {
        let mut cmd = Command::new(psql());
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url.expose()]);
        cmd
    }

    /// Transactions per second of `script` on `clients` connections (after
    /// the warm-up), as run.sh measures it.
    pub fn pgbench_tput(&self, script: &str, clients: usize) -> Res<f64> {
        let mut warm = self.pgbench_cmd(script, clients);
        warm.args(["-T", &fmt_secs(self.args.warmup)])
            .arg(self.url.expose());
        run_tool(warm)?;
        let mut cmd = self.pgbench_cmd(script, clients);
        cmd.args(["-T", &fmt_secs(self.args.duration)])
            .arg(self.url.expose());
        let out = run_tool(cmd)?;
        let tps = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .ok_or_else(|| format!("no tps in pgbench output:\n{out}"))?;
        Ok(tps.parse()?)
    }

    /// `queries` sequential runs of `script` after 50 warm-up runs, from
    /// pgbench's per-transaction log; (p50, p99, mean) in ms.
    pub fn pgbench_latency(&self, script: &str) -> Res<(f64, f64, f64)> {
        let dir = target_dir().join("workload-pgbench");
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)? {
            std::fs::remove_file(e?.path())?;
        }
        let mut warm = self.pgbench_cmd(script, 1);
        warm.args(["-t", "50"]).arg(self.url.expose());
        run_tool(warm)?;
        let prefix = dir.join("lat");
        let mut cmd = self.pgbench_cmd(script, 1);
        cmd.args(["-t", &self.args.queries.to_string(), "-l"])
            .arg(format!("--log-prefix={}", prefix.display()))
            .arg(self.url.expose());
        run_tool(cmd)?;
        let mut lat = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let text = std::fs::read_to_string(e?.path())?;
            for line in text.lines() {
                if let Some(us) = line.split_whitespace().nth(2) {
                    lat.push(us.parse::<f64>()? / 1000.0);
                }
            }
        }
        if lat.is_empty() {
            return Err(format!("pgbench wrote no latency log for {script}").into());
        }
        Ok(percentiles(lat))
    }

    /// The limit's W2 queue: sql/w2_pool.sql, statement by statement.
    pub fn w2_pool(&self) -> Res<()> {
        let pool = std::fs::read_to_string(self.args.limit_dir.join("sql/w2_pool.sql"))?;
        for stmt in pool.split(';').filter(|s| {
            !s.trim()
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with("--"))
        }) {
            self.sql(stmt)?;
        }
        self.sql("VACUUM ANALYZE executions, execution_steps")?;
        self.sql("CHECKPOINT")
    }

    /// The limit's W5: `\copy` of the CSV files generated from w5_source.sql
    /// (generated once per scale into target/workload-data, not timed);
    /// returns the seconds of the load.
    pub fn limit_copy(&self) -> Res<f64> {
        let dir = target_dir().join("workload-data");
        let n = self.args.executions;
        let (ecsv, scsv) = (
            dir.join(format!("executions-{n}.csv")),
            dir.join(format!("execution_steps-{n}.csv")),
        );
        if !ecsv.exists() || !scsv.exists() {
            eprintln!("  generating the W5 CSV files from w5_source.sql (not timed)");
            std::fs::create_dir_all(&dir)?;
            self.ensure_views()?;
            let mut cmd = self.psql_cmd();
            cmd.arg("-c")
                .arg(format!(
                    "\\copy (SELECT * FROM w5_exec_src) TO '{}' CSV",
                    ecsv.display()
                ))
                .arg("-c")
                .arg(format!(
                    "\\copy (SELECT * FROM w5_step_src) TO '{}' CSV",
                    scsv.display()
                ));
            run_tool(cmd)?;
        }
        let mut cmd = self.psql_cmd();
        cmd.arg("-c")
            .arg(format!(
                "\\copy executions (id, workflow_id, status, user_id, data, error, started_at, completed_at) FROM '{}' CSV",
                ecsv.display()
            ))
            .arg("-c")
            .arg(format!(
                "\\copy execution_steps (execution_id, node_id, status, input, output, error, retry_count, started_at, completed_at) FROM '{}' CSV",
                scsv.display()
            ));
        let t0 = std::time::Instant::now();
        run_tool(cmd)?;
        let secs = t0.elapsed().as_secs_f64();
        let (e, s) = (self.count("executions")?, self.count("execution_steps")?);
        if e as u64 != n || s as u64 != n * 10 {
            return Err(format!("limit W5 loaded {e}/{s} rows").into());
        }
        Ok(secs)
    }

    /// The deterministic W5 views of w5_source.sql (`w5_exec_src`,
    /// `w5_step_src`), scaled when --executions is not 100000.
    pub fn ensure_views(&self) -> Res<()> {
        let n = self.args.executions;
        let src = std::fs::read_to_string(self.args.limit_dir.join("sql/w5_source.sql"))?
            .replace(
                "generate_series(0, 99999)",
                &format!("generate_series(0, {})", n - 1),
            )
            .replace(
                "generate_series(0, 999999)",
                &format!("generate_series(0, {})", n * 10 - 1),
            )
            .replace("% 100000)", &format!("% {n})"));
        self.sql(&src)
    }
}
