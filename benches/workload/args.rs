//! The command line: [`Args`], [`USAGE`] and [`parse`].

use std::path::PathBuf;

use crate::Res;

#[derive(Debug, Clone)]
pub struct Args {
    pub only: Option<Vec<String>>,
    pub runs: usize,
    pub executions: u64,
    pub duration: f64,
    pub warmup: f64,
    pub queries: usize,
    pub limit: bool,
    pub keep: bool,
    pub w6_executions: u64,
    pub limit_dir: PathBuf,
}

pub const USAGE: &str = "\
usage: cargo bench --bench workload -- [options]
  --only W1,W3      run only these workloads (W1..W6, CLAIM, R2D2)
  --runs N          repetitions of every figure (default 3)
  --executions N    W5/W3/W4 data scale in executions (default 100000; steps = 10x)
  --duration SECS   length of each throughput measurement (default 8)
  --warmup SECS     warm-up before each throughput measurement (default 1)
  --queries N       sequential calls per latency figure (default 1000)
  --w6-executions N executions of the 10-node chain per W6 figure (default 200)
  --limit           also run the pgbench limit on the same database, print ratios
  --keep            keep the throwaway database afterwards and print its name
env: TEST_DATABASE_URL, else DATABASE_URL (the server; the benchmark runs on a
     fresh throwaway database workflow_db_tmp_bench_<time>_<pid>_<n> there),
     PERF_LIMIT_DIR (default ../shared/perf-limit), PGBENCH, PSQL";

pub fn parse() -> Res<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        only: None,
        runs: 3,
        executions: 100_000,
        duration: 8.0,
        warmup: 1.0,
        queries: 1000,
        limit: false,
        keep: false,
        w6_executions: 200,
        limit_dir: std::env::var_os("PERF_LIMIT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("../shared/perf-limit")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Res<String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}").into())
        };
        match key.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--only" => {
                a.only = Some(
                    value("--only")?
                        .split(',')
                        .map(|s| s.trim().to_uppercase())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "--runs" => a.runs = value("--runs")?.parse()?,
            "--executions" => a.executions = value("--executions")?.parse()?,
            "--duration" => a.duration = value("--duration")?.parse()?,
            "--warmup" => a.warmup = value("--warmup")?.parse()?,
            "--queries" => a.queries = value("--queries")?.parse()?,
            "--limit" => a.limit = true,
            "--keep" => a.keep = true,
            "--w6-executions" => a.w6_executions = value("--w6-executions")?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if a.runs == 0
        || a.executions == 0
        || a.queries == 0
        || a.w6_executions == 0
        || a.duration <= 0.0
    {
        return Err("--runs, --executions, --queries and --duration must be positive".into());
    }
    Ok(a)
}

impl Args {
    /// Whether the figure group `w` (`W1`, `CLAIM`, ...) is asked for.
    pub fn wants(&self, w: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == w))
    }
}
