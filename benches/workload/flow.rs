//! FLOW (issue 12): what concurrency keys cost a claim. The same 100,000
//! ready steps (10,000 running executions of 10 independent steps), once
//! without keys and once spread over 1,000 keys of which 500 are limited to
//! 2 and so at their limit (their other steps throttled, out of the claim
//! index); `engine::claim_steps` of one step, latency p50/p99, paired.

use workflow_db::engine;

use crate::Res;
use crate::claim::LEASE;
use crate::db::Bench;

/// Ready steps in both figures.
const READY: u64 = 100_000;
/// Keys the steps are spread over (by execution), and how many are limited.
const KEYS: u64 = 1_000;
const LIMITED: u64 = 500;

pub const FLOW_BASE: &str = "FLOW claim latency, 100k ready steps, no keys (engine::claim_steps 1)";
pub const FLOW_KEYS: &str = "FLOW claim latency, 100k ready steps over 1,000 keys, 500 at their limit (engine::claim_steps 1)";

impl Bench {
    pub fn flow_group(&mut self, rep: usize) -> Res<()> {
        eprintln!("FLOW claim latency with concurrency keys (rep {rep})");
        for (name, keys) in [(FLOW_BASE, false), (FLOW_KEYS, true)] {
            self.flow_data(keys)?;
            let lat = self.latency(|conn, _| {
                if engine::claim_steps(conn, "flow", 1, LEASE)?.len() != 1 {
                    return Err("claim found nothing".into());
                }
                Ok(())
            })?;
            self.report.latency(name, lat, false);
        }
        self.report.pair_latency(FLOW_KEYS, FLOW_BASE);
        Ok(())
    }

    /// 100k ready steps; with `keys`, each execution's steps carry one of
    /// 1,000 keys and 500 keys get a limit of 2 (the limit's trigger
    /// throttles all but 2 ready steps of each).
    fn flow_data(&self, keys: bool) -> Res<()> {
        self.load_ready_steps(READY)?;
        self.sql("DELETE FROM concurrency_limits")?;
        if keys {
            self.sql(&format!(
                "UPDATE execution_steps SET concurrency_key = \
                 'tenant-' || (abs(hashtext(execution_id::text)) % {KEYS})"
            ))?;
            self.sql(&format!(
                "INSERT INTO concurrency_limits (key, max_running) \
                 SELECT 'tenant-' || k, 2 FROM generate_series(0, {}) AS k",
                LIMITED - 1
            ))?;
        }
        self.sql("VACUUM ANALYZE executions, execution_steps")?;
        self.sql("CHECKPOINT")
    }
}
