//! W5 bulk load: the deterministic data set of w5_source.sql (`--executions`
//! executions x 10 steps) streamed with binary COPY; with `--limit` also
//! psql's `\copy` of the same rows, and a check that both load equal rows.
//! W3 and W4 read this data set, so it is loaded (untimed) for them too.

use std::time::Instant;

use diesel::connection::SimpleConnection;
use workflow_db::models::bulk;

use crate::Res;
use crate::data::{NODES, w5_execution, w5_step};
use crate::db::{Bench, count_on};
use crate::report::{Better, scale_label};

/// The peak resident set of this process (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

impl Bench {
    pub fn w5(&mut self, rep: usize) -> Res<()> {
        eprintln!("W5 bulk load (rep {rep})");
        let n = self.args.executions;
        let scale = scale_label(n);
        let ours = format!("W5 bulk load {scale} (bulk::copy_*, binary COPY, streamed)");
        let lim = format!("W5 bulk load {scale} (\\copy FROM CSV)");
        // W3/W4 need the data even when W5 itself is not asked for.
        let timed = self.args.wants("W5");
        if self.args.limit && timed {
            self.reset_runs()?;
            let v = self.limit_copy()?;
            self.report.lim(&lim, "s", Better::Lower, v);
            self.report.pair(&ours, &lim);
        }
        self.reset_runs()?;
        let mut conn = self.conn()?;
        let t0 = Instant::now();
        let e = bulk::copy_executions(&mut conn, (0..n).map(|i| w5_execution(i, n)))?;
        let s = bulk::copy_steps(&mut conn, (0..n * NODES as u64).map(|j| w5_step(j, n)))?;
        let secs = t0.elapsed().as_secs_f64();
        if e as u64 != n || s as u64 != n * NODES as u64 {
            return Err(format!("W5 loaded {e}/{s} rows, expected {n}/{}", n * 10).into());
        }
        if timed {
            self.report.ours(&ours, "s", Better::Lower, secs);
            let hwm = peak_rss_mb();
            self.report.ours(
                "W5 peak RSS of the bench process (VmHWM)",
                "MB",
                Better::Lower,
                hwm,
            );
        }
        if self.args.limit && rep == 1 && n <= 100_000 && timed {
            self.verify_w5()?;
        }
        self.sql("VACUUM ANALYZE")?;
        self.sql("CHECKPOINT")
    }

    /// Checks that the crate loaded exactly the rows of w5_source.sql (ids aside).
    fn verify_w5(&mut self) -> Res<()> {
        let mut conn = self.conn()?;
        // The views compute their timestamps in the session's time zone.
        conn.batch_execute("SET TimeZone = 'UTC'")?;
        let e = count_on(
            &mut conn,
            "(SELECT workflow_id, status, user_id, data, error, started_at, completed_at FROM executions
               EXCEPT ALL
               SELECT workflow_id, status, user_id, data, error, started_at, completed_at FROM w5_exec_src) x",
        )?;
        let s = count_on(
            &mut conn,
            "(SELECT e.data->>'requestId', s.node_id, s.status, s.input, s.output, s.error,
                      s.retry_count, s.started_at, s.completed_at
               FROM execution_steps s JOIN executions e ON e.id = s.execution_id
               EXCEPT ALL
               SELECT x.data->>'requestId', v.node_id, v.status, v.input, v.output, v.error,
                      v.retry_count, v.started_at, v.completed_at
               FROM w5_step_src v JOIN w5_exec_src x ON x.id = v.execution_id) y",
        )?;
        if e != 0 || s != 0 {
            return Err(
                format!("W5 rows differ from w5_source.sql: {e} executions, {s} steps").into(),
            );
        }
        eprintln!("  W5 rows verified equal to w5_source.sql (ids aside)");
        self.report.notes.push(
            "W5: the crate's rows were verified equal to w5_source.sql (EXCEPT ALL, ids aside)"
                .into(),
        );
        Ok(())
    }
}
