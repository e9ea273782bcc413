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
    /// Claim/complete batch sizes of the batched figures (W2, W6, FANIN,
    /// DRAIN), each run in turn; `--batch`, default `[10]`.
    pub batches: Vec<i64>,
    /// `--peer`: run the graphile-worker peer, and fail when it cannot run.
    pub peer: bool,
    /// `--no-peer`: leave the peer out of `--limit`.
    pub no_peer: bool,
    /// Jobs queued per peer run (`--peer-jobs`, default 50000).
    pub peer_jobs: u64,
    /// PERF_PEERS_DIR (default ../shared/perf-peers beside the crate).
    pub peers_dir: PathBuf,
    /// STUDIO data scales in executions (`--studio-executions`, default
    /// 100000,1000000), each on its own throwaway database.
    pub studio_executions: Vec<u64>,
    /// Timed requests per STUDIO page (`--studio-requests`, default 200).
    pub studio_requests: usize,
}

/// Largest `--batch` ([`workflow_db::models::MAX_PAGE_SIZE`]: `claim_steps` clamps to it).
pub const MAX_BATCH: i64 = workflow_db::models::MAX_PAGE_SIZE;

pub const USAGE: &str = "\
usage: cargo bench --bench workload -- [options]
  --only W1,W3      run only these figure groups (W1..W6, ASYNC, WORKER, CLAIM,
                    FLOW, WAITS, R2D2, CANCEL, FANIN, DRAIN, STUDIO; default all;
                    STUDIO is the web dashboard's page times on databases
                    of --studio-executions executions; FLOW is the
                    claim latency with 1,000 concurrency keys, half at their
                    limit, against none; WAITS is 20k due timers run by
                    fire_due_waits against 20k ordinary steps claimed and
                    completed; ASYNC is W2 through
                    the async face, paired with W2 when both run; WORKER is W2
                    and W6 through runtime::Worker, paired with W2 and W6)
  --runs N          repetitions of every figure (default 3)
  --executions N    W5/W3/W4 data scale in executions (default 100000; steps = 10x)
  --duration SECS   length of each throughput measurement (default 8)
  --warmup SECS     warm-up before each throughput measurement (default 1)
  --queries N       sequential calls per latency figure (default 1000)
  --w6-executions N executions of the 10-node chain per W6 figure (default 200)
  --batch N[,N..]   claim/complete batch size of the batched figures (W2, W6,
                    FANIN, DRAIN; default 10, at most 1000); several run in turn
  --limit           also run the pgbench limit on the same database, print ratios;
                    with W2 also the graphile-worker peer when it can run
  --peer            run the graphile-worker peer (PERF_PEERS_DIR/graphile-worker/
                    bench.sh: node + npm, about 2 min) and print W2 vs its jobs/s;
                    an error when it cannot run
  --no-peer         leave the peer out of --limit
  --peer-jobs N     jobs queued per peer run (default 50000)
  --studio-executions N[,N..]  STUDIO data scales, each on its own throwaway
                    database built set-based (default 100000,1000000; 1M takes
                    several minutes and ~10 GB)
  --studio-requests N  timed sequential requests per STUDIO page (default 200)
  --keep            keep the throwaway database(s) afterwards and print their names
env: TEST_DATABASE_URL, else DATABASE_URL (the server; the benchmark runs on a
     fresh throwaway database workflow_db_tmp_bench_<time>_<pid>_<n> there),
     PERF_LIMIT_DIR (default ../shared/perf-limit), PERF_PEERS_DIR (default
     ../shared/perf-peers), PGBENCH, PSQL, PEER_WORKDIR (the peer's npm folder)";

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
        batches: vec![10],
        peer: false,
        no_peer: false,
        peer_jobs: 50_000,
        peers_dir: std::env::var_os("PERF_PEERS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("../shared/perf-peers")),
        studio_executions: vec![100_000, 1_000_000],
        studio_requests: 200,
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
            "--peer" => a.peer = true,
            "--no-peer" => a.no_peer = true,
            "--peer-jobs" => a.peer_jobs = value("--peer-jobs")?.parse()?,
            "--batch" => {
                let mut batches = Vec::new();
                for b in value("--batch")?.split(',').map(str::trim) {
                    let n: i64 = b.parse().map_err(|e| format!("--batch {b:?}: {e}"))?;
                    if !(1..=MAX_BATCH).contains(&n) {
                        return Err(format!("--batch {n}: must be 1..={MAX_BATCH}").into());
                    }
                    if !batches.contains(&n) {
                        batches.push(n);
                    }
                }
                a.batches = batches;
            }
            "--studio-executions" => {
                let mut sizes = Vec::new();
                for n in value("--studio-executions")?.split(',').map(str::trim) {
                    let n: u64 = n
                        .parse()
                        .map_err(|e| format!("--studio-executions {n:?}: {e}"))?;
                    if n < 1000 {
                        return Err(format!("--studio-executions {n}: at least 1000").into());
                    }
                    if !sizes.contains(&n) {
                        sizes.push(n);
                    }
                }
                a.studio_executions = sizes;
            }
            "--studio-requests" => a.studio_requests = value("--studio-requests")?.parse()?,
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
        || a.peer_jobs == 0
        || a.batches.is_empty()
        || a.studio_executions.is_empty()
        || a.studio_requests == 0
        || a.duration <= 0.0
    {
        return Err(
            "--runs, --executions, --queries, --w6-executions, --peer-jobs, --batch, --studio-executions, --studio-requests and --duration must be positive"
                .into(),
        );
    }
    if a.peer && a.no_peer {
        return Err("--peer and --no-peer contradict each other".into());
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
