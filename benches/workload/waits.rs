//! WAITS (issue 12): what running a durable timer costs against running an
//! ordinary step. The same 20,000 ready steps (2,000 running executions of
//! 10 independent steps), once drained by a worker loop
//! (`engine::claim_steps` of 100 + `engine::complete_steps`), once turned
//! into due timers and drained by `engine::fire_due_waits` of 100 (what the
//! maintenance leader runs every round). One connection each; steps per
//! second, paired.

use std::time::Instant;

use workflow_db::engine;

use crate::Res;
use crate::claim::complete_batch;
use crate::data::{Rng, now_nanos};
use crate::db::{Bench, count_on};
use crate::report::Better;

const STEPS: u64 = 20_000;
const BATCH: i64 = 100;

pub const WAITS_BASE: &str =
    "WAITS 20k ready steps, claim_steps 100 + complete_steps (1 connection)";
pub const WAITS_TIMERS: &str = "WAITS 20k due timers, fire_due_waits 100 (1 connection)";

impl Bench {
    pub fn waits_group(&mut self, rep: usize) -> Res<()> {
        eprintln!("WAITS timers against ordinary steps (rep {rep})");
        for (name, timers) in [(WAITS_BASE, false), (WAITS_TIMERS, true)] {
            self.waits_data(timers)?;
            let mut conn = self.conn()?;
            let mut rng = Rng(now_nanos());
            let started = Instant::now();
            let mut done = 0u64;
            loop {
                let n = if timers {
                    engine::fire_due_waits(&mut conn, BATCH)?.timers_fired
                } else {
                    complete_batch(&mut conn, "waits", BATCH, &mut rng)?
                };
                if n == 0 {
                    break;
                }
                done += n;
            }
            let secs = started.elapsed().as_secs_f64();
            if done != STEPS {
                return Err(format!("{name}: ran {done} of {STEPS} steps").into());
            }
            let left = count_on(&mut conn, "execution_steps WHERE status <> 'completed'")?;
            if left != 0 {
                return Err(format!("{name}: {left} steps not completed").into());
            }
            self.report
                .ours(name, "steps/s", Better::Higher, done as f64 / secs);
        }
        self.report.pair(WAITS_TIMERS, WAITS_BASE);
        Ok(())
    }

    /// 20k ready steps; with `timers`, each one a timer due now (the columns
    /// the database arms, written directly: the steps were loaded by COPY
    /// as ordinary ones).
    fn waits_data(&self, timers: bool) -> Res<()> {
        self.load_ready_steps(STEPS)?;
        if timers {
            self.sql(
                "UPDATE execution_steps SET node_type = 'workflow_db.timer', wait_seconds = 0, \
                 wake_at = statement_timestamp() - interval '1 second'",
            )?;
        }
        self.sql("VACUUM ANALYZE executions, execution_steps")?;
        self.sql("CHECKPOINT")
    }
}
