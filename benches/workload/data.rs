//! The data shapes, as the limit's SQL makes them: the 100 seeded workflows,
//! ids, JSON payloads, the deterministic W5 rows (= `w5_source.sql`) and the
//! PRNG behind the random choices.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use uuid::Uuid;
use workflow_db::models::bulk::{CopyExecution, CopyStep};
use workflow_db::{ExecutionStatus, StepStatus};

/// Seeded workflows (`wf-000` .. `wf-099`).
pub const WORKFLOWS: u64 = 100;
/// Nodes per workflow (a chain `node-0 -> .. -> node-9`), so steps per execution.
pub const NODES: usize = 10;
/// Distinct `user_id`s (`user-0` .. `user-99`).
pub const USERS: u64 = 100;

/// The id of seeded workflow `w`: `00000000-0000-4000-8000-0000000000WW`.
pub fn workflow_id(w: u64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-4000-8000-{w:012}")).expect("valid uuid")
}

/// The nodes and edges of every seeded workflow (as seed_workflows.sql).
pub fn workflow_graph() -> (Value, Value) {
    let nodes: Vec<Value> = (0..NODES)
        .map(|k| json!({"id": format!("node-{k}"), "type": "task", "config": {"timeoutMs": 30000}}))
        .collect();
    let edges: Vec<Value> = (0..NODES - 1)
        .map(|k| json!({"source": format!("node-{k}"), "target": format!("node-{}", k + 1)}))
        .collect();
    (Value::Array(nodes), Value::Array(edges))
}

/// `data` of an execution: the same JSON as w1.sql / w2_pool.sql / w5_source.sql.
pub fn execution_data(n: u64) -> Value {
    json!({
        "trigger": "api",
        "requestId": format!("req-{n}"),
        "input": {
            "orderId": format!("ord-{n}"),
            "amount": 1234.5,
            "currency": "EUR",
            "customer": {"id": format!("cus-{n}"), "email": format!("user{n}@example.com")}
        },
        "tags": ["bench", "workflow"],
        "priority": 3
    })
}

pub fn step_input(k: usize) -> Value {
    json!({
        "nodeId": format!("node-{k}"),
        "params": {"url": "https://api.example.com/v1/step", "method": "POST", "retries": 3}
    })
}

pub fn step_output(n: u64, k: usize) -> Value {
    json!({
        "ok": true,
        "statusCode": 200,
        "result": {"id": format!("res-{n}-{k}"), "items": 12, "message": "done"},
        "durationMs": 42
    })
}

/// Small deterministic PRNG (splitmix64) for the random choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Nanoseconds since the epoch, to seed an [`Rng`] differently every run.
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// A random-looking (version 4) uuid derived from `i`, like the limit's md5 ids.
fn hashed_uuid(salt: u64, i: u64) -> Uuid {
    let mut r = Rng(salt ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&r.next().to_le_bytes());
    b[8..].copy_from_slice(&r.next().to_le_bytes());
    uuid::Builder::from_random_bytes(b).into_uuid()
}

// ---------------------------------------------------------------- W5 rows (= w5_source.sql)

/// `started_at` of W5 execution `i` of `n`: spread over `n` x 25 s from 2025-01-01.
fn w5_started_at(i: u64, n: u64) -> DateTime<Utc> {
    let base = Utc
        .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    base + chrono::Duration::seconds(((i * 7919) % n) as i64 * 25)
}

/// Execution `i` of the W5 data set of `n` executions (statuses in turn).
pub fn w5_execution(i: u64, n: u64) -> CopyExecution {
    let status = ExecutionStatus::ALL[(i % 6) as usize];
    let ts = w5_started_at(i, n);
    CopyExecution {
        id: hashed_uuid(0xE1, i),
        workflow_id: workflow_id(i % WORKFLOWS),
        status,
        user_id: Some(format!("user-{}", (i / 6) % USERS)),
        data: Some(execution_data(i)),
        error: (status == ExecutionStatus::Failed)
            .then(|| "step node-9 failed: timeout".to_owned()),
        started_at: Some(ts),
        completed_at: matches!(
            status,
            ExecutionStatus::Completed | ExecutionStatus::Failed | ExecutionStatus::Cancelled
        )
        .then(|| ts + chrono::Duration::seconds(60)),
    }
}

/// Step `j` (node `j % 10` of execution `j / 10`) of the W5 data set of `n`
/// executions, its status consistent with its execution's.
pub fn w5_step(j: u64, n: u64) -> CopyStep {
    use ExecutionStatus as E;
    use StepStatus as S;
    let (i, k) = (j / 10, (j % 10) as usize);
    let st = ExecutionStatus::ALL[(i % 6) as usize];
    let ss = match st {
        E::Pending => S::Pending,
        E::Running if k < 5 => S::Completed,
        E::Running if k == 5 => S::Running,
        E::Running => S::Pending,
        E::Paused if k < 5 => S::Completed,
        E::Paused => S::Pending,
        E::Completed => S::Completed,
        E::Failed if k < 9 => S::Completed,
        E::Failed => S::Failed,
        E::Cancelled if k < 5 => S::Completed,
        E::Cancelled => S::Skipped,
    };
    let ts = w5_started_at(i, n);
    let start = ts + chrono::Duration::seconds(5 * k as i64);
    CopyStep {
        id: hashed_uuid(0x57, j),
        execution_id: hashed_uuid(0xE1, i),
        node_id: format!("node-{k}"),
        status: ss,
        input: Some(step_input(k)),
        output: (ss == S::Completed).then(|| step_output(i, k)),
        error: (ss == S::Failed).then(|| "timeout".to_owned()),
        retry_count: if ss == S::Failed { 3 } else { 0 },
        started_at: (!matches!(ss, S::Pending | S::Skipped)).then_some(start),
        completed_at: matches!(ss, S::Completed | S::Failed)
            .then(|| start + chrono::Duration::seconds(4)),
    }
}
