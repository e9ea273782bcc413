//! Reads on the W5 data set: W3 relational read (a workflow with its 10
//! latest executions and their steps) and W4 filtered list (status + user,
//! newest 50); with `--limit` also w3_*.sql and w4.sql.

use diesel::prelude::*;
use workflow_db::schema::executions;
use workflow_db::{Execution, ExecutionStatus, Workflow};

use crate::Res;
use crate::data::{USERS, WORKFLOWS, workflow_id};
use crate::db::Bench;
use crate::report::scale_label;

impl Bench {
    pub fn w3(&mut self, rep: usize) -> Res<()> {
        eprintln!("W3 relational read (rep {rep})");
        let scale = scale_label(self.args.executions);
        let ours =
            format!("W3 relational read {scale} (Workflow::with_recent_executions, 3 queries)");
        let lat = self.latency(|conn, rng| {
            let w = Workflow::with_recent_executions(conn, workflow_id(rng.below(WORKFLOWS)), 10)?;
            if w.executions.len() != 10 {
                return Err(format!("W3 read {} executions", w.executions.len()).into());
            }
            Ok(())
        })?;
        self.report.latency(&ours, lat, false);
        if self.args.limit {
            for (script, label) in [
                ("w3_three.sql", "3 queries"),
                ("w3_json.sql", "1 statement, json_agg"),
                ("w3_lateral.sql", "1 statement, lateral joins"),
            ] {
                let lim = format!("W3 relational read {scale} ({script}: {label})");
                let lat = self.pgbench_latency(script)?;
                self.report.latency(&lim, lat, true);
                self.report.pair_latency(&ours, &lim);
            }
        }
        Ok(())
    }

    pub fn w4(&mut self, rep: usize) -> Res<()> {
        eprintln!("W4 filtered list (rep {rep})");
        let scale = scale_label(self.args.executions);
        let ours = format!("W4 filtered list {scale} (Diesel query builder)");
        let lat = self.latency(|conn, rng| {
            let status = ExecutionStatus::ALL[rng.below(6) as usize];
            let user = format!("user-{}", rng.below(USERS));
            let rows: Vec<Execution> = executions::table
                .filter(executions::status.eq(status))
                .filter(executions::user_id.eq(user))
                .order(executions::started_at.desc())
                .limit(50)
                .select(Execution::as_select())
                .load(conn)?;
            std::hint::black_box(rows);
            Ok(())
        })?;
        self.report.latency(&ours, lat, false);
        if self.args.limit {
            let lim = format!("W4 filtered list {scale} (w4.sql)");
            let lat = self.pgbench_latency("w4.sql")?;
            self.report.latency(&lim, lat, true);
            self.report.pair_latency(&ours, &lim);
        }
        Ok(())
    }
}
