//! W1 start: an execution with its 10 steps, three ways (Diesel models,
//! one bulk statement, the engine's start), 1 and 8 clients; with `--limit`
//! also w1.sql and w1_cte.sql.

use diesel::prelude::*;
use workflow_db::engine;
use workflow_db::models::bulk;
use workflow_db::schema::{execution_steps, executions};
use workflow_db::{NewExecution, NewExecutionStep};

use crate::Res;
use crate::data::{NODES, Rng, USERS, WORKFLOWS, execution_data, step_input, workflow_id};
use crate::db::Bench;
use crate::report::Better;

/// A random execution (workflow, user, data) as w1.sql makes it.
fn new_execution(rng: &mut Rng) -> NewExecution {
    let (w, u, n) = (
        rng.below(WORKFLOWS),
        rng.below(USERS),
        1 + rng.below(1_000_000_000),
    );
    NewExecution::new(workflow_id(w))
        .user_id(format!("user-{u}"))
        .data(execution_data(n))
}

/// A random execution and its 10 pending steps with input, as w1.sql.
fn new_start(rng: &mut Rng) -> (NewExecution, Vec<NewExecutionStep>) {
    let e = new_execution(rng);
    let steps = (0..NODES)
        .map(|k| NewExecutionStep::new(e.id, format!("node-{k}")).input(step_input(k)))
        .collect();
    (e, steps)
}

impl Bench {
    pub fn w1(&mut self, rep: usize) -> Res<()> {
        eprintln!("W1 start (rep {rep})");
        for clients in [1usize, 8] {
            let c = if clients == 1 {
                "1 client".to_owned()
            } else {
                format!("{clients} clients")
            };
            let models =
                format!("W1 start, {c} (models: BEGIN/INSERT/INSERT/COMMIT, no RETURNING)");
            let one = format!("W1 start, {c} (bulk::insert_execution_with_steps, 1 statement)");
            self.reset_runs()?;
            let v = self.throughput(
                clients,
                |_, _| Ok(()),
                |conn, _, rng| {
                    // The ids are the client's (UUIDv7): nothing to read back.
                    let (e, steps) = new_start(rng);
                    conn.transaction(|conn| {
                        diesel::insert_into(executions::table)
                            .values(&e)
                            .execute(conn)?;
                        diesel::insert_into(execution_steps::table)
                            .values(&steps)
                            .execute(conn)?;
                        diesel::QueryResult::Ok(())
                    })?;
                    Ok(1)
                },
            )?;
            self.report.ours(&models, "executions/s", Better::Higher, v);
            self.reset_runs()?;
            let v = self.throughput(
                clients,
                |_, _| Ok(()),
                |conn, _, rng| {
                    let (e, steps) = new_start(rng);
                    bulk::insert_execution_with_steps(conn, &e, &steps)?;
                    Ok(1)
                },
            )?;
            self.report.ours(&one, "executions/s", Better::Higher, v);
            // The engine's start: the execution, its steps from the graph
            // (dependency counters; no step input), pending -> running with
            // the start event and NOTIFY, in one transaction.
            let eng = format!(
                "W1 start, {c} (engine::start_execution: steps from the graph + event + NOTIFY)"
            );
            self.reset_runs()?;
            let v = self.throughput(
                clients,
                |_, _| Ok(()),
                |conn, _, rng| {
                    engine::start_execution(conn, &new_execution(rng))?;
                    Ok(1)
                },
            )?;
            self.report.ours(&eng, "executions/s", Better::Higher, v);
            if self.args.limit {
                let l1 = format!("W1 start, {c} (w1.sql: BEGIN/INSERT/INSERT/COMMIT)");
                let l2 = format!("W1 start, {c} (w1_cte.sql: one CTE statement)");
                self.reset_runs()?;
                let v = self.pgbench_tput("w1.sql", clients)?;
                self.report.lim(&l1, "executions/s", Better::Higher, v);
                self.reset_runs()?;
                let v = self.pgbench_tput("w1_cte.sql", clients)?;
                self.report.lim(&l2, "executions/s", Better::Higher, v);
                self.report.pair(&models, &l1);
                self.report.pair(&one, &l1);
                self.report.pair(&one, &l2);
                self.report.pair(&eng, &l1);
                self.report.pair(&eng, &l2);
            }
        }
        Ok(())
    }
}
