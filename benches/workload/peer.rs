//! The graphile-worker peer: `PERF_PEERS_DIR/graphile-worker/bench.sh` (a
//! no-op Node.js job queue on the same server, 4 processes x 24 concurrent
//! jobs), run in the same invocation so that W2 at 4 workers prints its
//! ratio to it. Runs with `--peer` (an error when it cannot), and with
//! `--limit` when W2 is asked for (skipped with a note when it cannot, or
//! with `--no-peer`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use workflow_db::DatabaseUrl;
use workflow_db::config::Host;

use crate::Res;
use crate::args::Args;
use crate::claim::{w2_batched_name, w2_single_name};
use crate::db::Bench;
use crate::report::Better;

/// graphile-worker processes and concurrent jobs per process (the issue's
/// 4 x 24, its README's command).
const PROCS: usize = 4;
const CONC: usize = 24;
/// W2 workers compared with the peer.
const W2_WORKERS: usize = 4;

/// How the peer runs: its script and the server it talks to.
#[derive(Debug)]
pub struct Peer {
    script: PathBuf,
    host: String,
    user: String,
    password: Option<String>,
}

/// What [`plan`] decided.
pub enum Plan {
    /// Not asked for.
    Off,
    /// Asked for by `--limit` but it cannot run: why.
    Skipped(String),
    Run(Peer),
}

/// Whether `program --version` runs.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Decides, before anything runs, whether the peer runs: `--peer` wants it
/// (and fails here when it cannot run), `--limit` with W2 wants it unless
/// `--no-peer` (and skips it when it cannot).
pub fn plan(args: &Args, server: &DatabaseUrl) -> Res<Plan> {
    let explicit = args.peer;
    let with_limit = args.limit && !args.no_peer && args.wants("W2");
    if !explicit && !with_limit {
        return Ok(Plan::Off);
    }
    match check(args, server) {
        Ok(peer) => Ok(Plan::Run(peer)),
        Err(why) if explicit => Err(format!("--peer: {why}").into()),
        Err(why) => {
            eprintln!("graphile-worker peer skipped: {why}");
            Ok(Plan::Skipped(why))
        }
    }
}

fn check(args: &Args, server: &DatabaseUrl) -> Result<Peer, String> {
    let script = args.peers_dir.join("graphile-worker/bench.sh");
    if !script.is_file() {
        return Err(format!(
            "{} is missing; set PERF_PEERS_DIR to the perf-peers directory",
            script.display()
        ));
    }
    let missing: Vec<&str> = ["node", "npm", "psql", "python3"]
        .into_iter()
        .filter(|p| !runs(p))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "bench.sh needs {} on the PATH (Node.js with npm, psql, python3)",
            missing.join(", ")
        ));
    }
    // bench.sh connects to postgres://$PGUSER@$PGHOST:5432/..
    let host = match server.host() {
        Host::Tcp(h) => h,
        other => {
            return Err(format!(
                "bench.sh needs a TCP server (PGHOST); the bench's server is at {other}"
            ));
        }
    };
    if server.port() != 5432 {
        return Err(format!(
            "bench.sh connects to port 5432; the bench's server listens on {}",
            server.port()
        ));
    }
    let parsed = url::Url::parse(server.expose()).map_err(|e| e.to_string())?;
    let password = parsed.password().map(percent_decode).or_else(|| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == "password")
            .map(|(_, v)| v.into_owned())
    });
    Ok(Peer {
        script,
        host,
        user: server.user().unwrap_or_else(|| "postgres".into()),
        password,
    })
}

/// `%XX` escapes of a URL's user info, decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) if bytes[i] == b'%' => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One result line of bench.sh.
#[derive(Debug, PartialEq)]
struct Rep<'a> {
    mode: &'a str,
    jobs: u64,
    ms: f64,
    startup_ms: f64,
    left: u64,
    jobs_s: f64,
}

impl Rep<'_> {
    /// Jobs per second over the jobs that ran: bench.sh's figure when the
    /// queue was drained; when `--once` workers exited with jobs `left` in
    /// the queue, those are not counted.
    fn done_per_s(&self) -> f64 {
        if self.left == 0 {
            self.jobs_s
        } else {
            (self.jobs - self.left.min(self.jobs)) as f64 * 1000.0
                / (self.ms - self.startup_ms).max(1.0)
        }
    }
}

/// `<mode> rep <n>: <jobs> jobs in <ms> ms (startup <ms> ms), left <n>, jobs/s <x>`.
fn parse_line(line: &str) -> Option<Rep<'_>> {
    let (mode, rest) = line.split_once(" rep ")?;
    if mode != "batched" && mode != "unbatched" {
        return None;
    }
    let after = |key: &str| -> Option<f64> {
        rest.split_once(key)?
            .1
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    };
    let jobs = rest.split_once(": ")?.1.split(' ').next()?.parse().ok()?;
    Some(Rep {
        mode,
        jobs,
        ms: after(" jobs in ")?,
        startup_ms: after("(startup ")?,
        left: after(", left ")? as u64,
        jobs_s: after("jobs/s ")?,
    })
}

fn peer_name(mode: &str, jobs: u64) -> String {
    match mode {
        "batched" => format!(
            "graphile-worker batched, {PROCS} procs x {CONC} (local queue 500, batched completion; {jobs} no-op jobs)"
        ),
        _ => format!(
            "graphile-worker unbatched, {PROCS} procs x {CONC} (no local queue, no batched completion; {jobs} no-op jobs)"
        ),
    }
}

impl Bench {
    /// Runs bench.sh once (`REPS` = `--runs`) on a database of its own
    /// (a throwaway name, so a crashed run is swept like the others),
    /// records each rep's jobs/s as limit-side figures and pairs them with
    /// W2 at 4 workers: batched with batched, unbatched with unbatched.
    pub fn peer(&mut self, peer: &Peer) -> Res<()> {
        let jobs = self.args.peer_jobs;
        let db = workflow_db::testing::throwaway_name("peer");
        let script = std::fs::canonicalize(&peer.script).unwrap_or_else(|_| peer.script.clone());
        eprintln!(
            "graphile-worker peer: {} (JOBS={jobs} PROCS={PROCS} CONC={CONC} REPS={}, database {db}; \
             the first run installs its npm packages)",
            script.display(),
            self.args.runs
        );
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .env("JOBS", jobs.to_string())
            .env("PROCS", PROCS.to_string())
            .env("CONC", CONC.to_string())
            .env("REPS", self.args.runs.to_string())
            .env("PEER_DB", &db)
            .env("PGHOST", &peer.host)
            .env("PGUSER", &peer.user)
            .env("PGPORT", "5432")
            .stdout(Stdio::piped());
        if let Some(p) = &peer.password {
            cmd.env("PGPASSWORD", p);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", script.display()))?;
        let stdout = child.stdout.take().ok_or("bench.sh: no stdout")?;
        let mut version = None;
        let mut left = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            eprintln!("  peer: {line}");
            if line.starts_with("graphile-worker ") {
                version = line.split([' ', ',']).nth(1).map(str::to_owned);
            }
            if let Some(rep) = parse_line(&line) {
                let name = peer_name(rep.mode, jobs);
                self.report
                    .lim(&name, "jobs/s", Better::Higher, rep.done_per_s());
                if rep.left > 0 {
                    left.push(format!("{} jobs left after \"{line}\"", rep.left));
                }
            }
        }
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("{} failed ({status})", script.display()).into());
        }
        if !left.is_empty() {
            self.report.notes.push(format!(
                "graphile-worker peer: its --once workers exited with jobs still queued, so \
                 those reps count only the jobs that ran: {}",
                left.join("; ")
            ));
        }
        let (batched, single) = (peer_name("batched", jobs), peer_name("unbatched", jobs));
        for b in self.args.batches.clone() {
            self.report.pair(&w2_batched_name(W2_WORKERS, b), &batched);
        }
        self.report.pair(&w2_single_name(W2_WORKERS), &single);
        self.report.notes.push(format!(
            "graphile-worker {} peer (bench.sh of PERF_PEERS_DIR, same server, same invocation): \
             jobs/s = {jobs} no-op jobs / (drain time - startup), {PROCS} processes x {CONC} \
             concurrent jobs; its jobs keep no history and have no dependencies",
            version.as_deref().unwrap_or("?")
        ));
        Ok(())
    }
}
