//! Bulk load with `COPY .. FROM STDIN (FORMAT binary)` through Diesel's
//! [`diesel::copy_from`] support, streaming.
//!
//! [`copy_executions`] and [`copy_steps`] take any iterator of rows and encode
//! each row into a small buffer as the server reads it, so loading a million
//! rows needs a few hundred kilobytes of client memory, not a `Vec` of a
//! million rows (Diesel's `from_insertable` wants the whole batch as a `Vec`).
//! The rows are written in PostgreSQL's binary `COPY` format: uuids and
//! timestamps travel as 16 and 8 bytes and the server does not parse them.
//!
//! `COPY` bypasses nothing a plain `INSERT` would check: constraints, foreign
//! keys and indexes apply; only row triggers (`updated_at`) fire on updates,
//! not here. Load executions before their steps, and wrap both calls in one
//! `conn.transaction(..)` if they must land together.
//!
//! ```no_run
//! use workflow_db::models::bulk::{self, CopyExecution, CopyStep};
//! use workflow_db::NewExecution;
//! # fn run(conn: &mut diesel::PgConnection, workflow_id: uuid::Uuid) -> diesel::QueryResult<()> {
//! let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
//! let executions = ids.iter().map(|&id| CopyExecution {
//!     id,
//!     ..CopyExecution::from(NewExecution::new(workflow_id))
//! });
//! assert_eq!(bulk::copy_executions(conn, executions)?, 3);
//! let steps = ids.iter().flat_map(|&id| (0..10).map(move |k| CopyStep::pending(id, format!("node-{k}"))));
//! assert_eq!(bulk::copy_steps(conn, steps)?, 30);
//! # Ok(())
//! # }
//! ```

use std::borrow::Borrow;
use std::cell::RefCell;
use std::io::{self, Write};

use chrono::{DateTime, Utc};
use diesel::pg::{CopyFormat, Pg};
use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use super::{Execution, NewExecution, NewExecutionStep};
use crate::enums::{ExecutionStatus, StepStatus};
use crate::prepared::{execution_columns, prepared};
use crate::schema::{execution_steps, executions};

/// Buffer in front of libpq's `PQputCopyData` (one call per buffer, not per field).
const BUFFER_BYTES: usize = 256 * 1024;
/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One execution row for [`copy_executions`]: every column a loader may set
/// (`created_at`/`updated_at` take their defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyExecution {
    /// Primary key.
    pub id: Uuid,
    /// The workflow it runs.
    pub workflow_id: Uuid,
    /// Lifecycle status.
    pub status: ExecutionStatus,
    /// Who started it.
    pub user_id: Option<String>,
    /// JSON input and state.
    pub data: Option<Value>,
    /// Error message.
    pub error: Option<String>,
    /// When it started (`None` stores NULL: COPY does not apply column defaults).
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub completed_at: Option<DateTime<Utc>>,
}

impl From<NewExecution> for CopyExecution {
    /// The execution as [`NewExecution::create`] would store it (`started_at` = now).
    fn from(e: NewExecution) -> Self {
        CopyExecution {
            id: e.id,
            workflow_id: e.workflow_id,
            status: e.status,
            user_id: e.user_id,
            data: e.data,
            error: None,
            started_at: Some(Utc::now()),
            completed_at: None,
        }
    }
}

/// One step row for [`copy_steps`].
#[derive(Debug, Clone, PartialEq)]
pub struct CopyStep {
    /// Primary key.
    pub id: Uuid,
    /// The execution it belongs to.
    pub execution_id: Uuid,
    /// The workflow node it runs.
    pub node_id: String,
    /// Lifecycle status.
    pub status: StepStatus,
    /// JSON input.
    pub input: Option<Value>,
    /// JSON output.
    pub output: Option<Value>,
    /// Error of the last failed attempt.
    pub error: Option<String>,
    /// Retries so far.
    pub retry_count: i32,
    /// When the current attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub completed_at: Option<DateTime<Utc>>,
}

impl CopyStep {
    /// A pending step of `execution_id` running `node_id`, with a fresh UUIDv7.
    pub fn pending(execution_id: Uuid, node_id: impl Into<String>) -> Self {
        NewExecutionStep::new(execution_id, node_id).into()
    }
}

impl From<NewExecutionStep> for CopyStep {
    fn from(s: NewExecutionStep) -> Self {
        CopyStep {
            id: s.id,
            execution_id: s.execution_id,
            node_id: s.node_id,
            status: s.status,
            input: s.input,
            output: None,
            error: None,
            retry_count: 0,
            started_at: None,
            completed_at: None,
        }
    }
}

/// Loads `rows` into `executions` with one streaming binary `COPY`; returns
/// the number of rows. Rows are encoded one at a time as they are sent.
#[tracing::instrument(skip_all)]
pub fn copy_executions<I>(conn: &mut PgConnection, rows: I) -> QueryResult<usize>
where
    I: IntoIterator,
    I::Item: Borrow<CopyExecution>,
{
    use executions::dsl as e;
    let rows = RefCell::new(Some(rows.into_iter()));
    diesel::copy_from(executions::table)
        .from_raw_data(
            (
                e::id,
                e::workflow_id,
                e::status,
                e::user_id,
                e::data,
                e::error,
                e::started_at,
                e::completed_at,
            ),
            |sink| {
                let rows = rows.borrow_mut().take().ok_or_else(consumed)?;
                stream(sink, rows, |w, r| {
                    let r: &CopyExecution = r.borrow();
                    w.fields(8);
                    w.uuid(&r.id);
                    w.uuid(&r.workflow_id);
                    w.text(Some(r.status.as_str()));
                    w.text(r.user_id.as_deref());
                    w.jsonb(r.data.as_ref())?;
                    w.text(r.error.as_deref());
                    w.timestamptz(r.started_at);
                    w.timestamptz(r.completed_at);
                    Ok(())
                })
            },
        )
        .with_format(CopyFormat::Binary)
        .execute(conn)
}

/// Loads `rows` into `execution_steps` with one streaming binary `COPY`;
/// returns the number of rows. Their executions must exist (foreign key).
#[tracing::instrument(skip_all)]
pub fn copy_steps<I>(conn: &mut PgConnection, rows: I) -> QueryResult<usize>
where
    I: IntoIterator,
    I::Item: Borrow<CopyStep>,
{
    use execution_steps::dsl as s;
    let rows = RefCell::new(Some(rows.into_iter()));
    diesel::copy_from(execution_steps::table)
        .from_raw_data(
            (
                s::id,
                s::execution_id,
                s::node_id,
                s::status,
                s::input,
                s::output,
                s::error,
                s::retry_count,
                s::started_at,
                s::completed_at,
            ),
            |sink| {
                let rows = rows.borrow_mut().take().ok_or_else(consumed)?;
                stream(sink, rows, |w, r| {
                    let r: &CopyStep = r.borrow();
                    w.fields(10);
                    w.uuid(&r.id);
                    w.uuid(&r.execution_id);
                    w.text(Some(&r.node_id));
                    w.text(Some(r.status.as_str()));
                    w.jsonb(r.input.as_ref())?;
                    w.jsonb(r.output.as_ref())?;
                    w.text(r.error.as_deref());
                    w.int4(r.retry_count);
                    w.timestamptz(r.started_at);
                    w.timestamptz(r.completed_at);
                    Ok(())
                })
            },
        )
        .with_format(CopyFormat::Binary)
        .execute(conn)
}

/// Inserts an execution and its steps in ONE statement (a data-modifying
/// CTE over `unnest` of the step columns): one round trip instead of four for
/// `BEGIN; INSERT; INSERT; COMMIT`, and atomic all the same (one statement is
/// one transaction). Every column of [`NewExecution`] and
/// [`NewExecutionStep`] is written as given (dependency counters included);
/// the steps' `execution_id` is ignored and set to `execution.id`. This is a
/// model-level insert: no transition happens, so no event and no NOTIFY —
/// [`crate::engine::start_execution`] is the engine's start (it uses the same
/// statement with the start event and NOTIFY added). The SQL is static, so
/// it is kept prepared: PostgreSQL parses it once per connection.
#[tracing::instrument(skip_all, fields(execution.id = %execution.id, steps = steps.len()))]
pub fn insert_execution_with_steps(
    conn: &mut PgConnection,
    execution: &NewExecution,
    steps: &[NewExecutionStep],
) -> QueryResult<()> {
    prepared(with_steps_bound(
        INSERT_EXECUTION_WITH_STEPS,
        execution,
        steps,
    ))
    .execute(conn)
    .map(|_| ())
}

/// [`insert_execution_with_steps`] for an execution inserted already past
/// `pending` (the engine's start): the same statement also appends the
/// `pending -> status` event and sends the NOTIFY the transition trigger
/// would have, and returns the stored execution.
pub(crate) fn insert_started_execution(
    conn: &mut PgConnection,
    execution: &NewExecution,
    steps: &[NewExecutionStep],
) -> QueryResult<Execution> {
    prepared(with_steps_bound(INSERT_STARTED_EXECUTION, execution, steps)).get_result(conn)
}

macro_rules! execution_with_steps_cte {
    () => {
        "WITH e AS (INSERT INTO executions \
           (id, workflow_id, status, user_id, data, workflow_version, idempotency_key, parent_execution_id, \
            priority, concurrency_key, start_after, dedup_key, dedup_until, rerun_of) \
         VALUES ($1, $2, $3::execution_status, $4, $5, $6, $7, $8, $17, $18, $19, $20, $21, $25) RETURNING *), \
         s AS (INSERT INTO execution_steps \
           (id, execution_id, node_id, status, input, upstream_pending, downstream, max_retries, parked, node_type, \
            priority, queue, concurrency_key) \
         SELECT s.id, $1, s.node_id, s.status::step_status, s.input, s.upstream, \
                ARRAY(SELECT jsonb_array_elements_text(s.downstream)), s.retries, \
                $3::execution_status <> 'running', s.node_type, s.priority, s.queue, s.concurrency_key \
         FROM unnest($9::uuid[], $10::text[], $11::text[], $12::jsonb[], $13::int4[], $14::jsonb[], $15::int4[], $16::text[], \
                     $22::int4[], $23::text[], $24::text[]) \
           AS s(id, node_id, status, input, upstream, downstream, retries, node_type, priority, queue, concurrency_key)) "
    };
}

const INSERT_EXECUTION_WITH_STEPS: &str = concat!(execution_with_steps_cte!(), "SELECT 1 FROM e");

const INSERT_STARTED_EXECUTION: &str = concat!(
    execution_with_steps_cte!(),
    ", ev AS (INSERT INTO execution_events (execution_id, from_status, to_status) \
        SELECT id, 'pending', status::text FROM e) \
     SELECT ",
    execution_columns!(),
    ", pg_notify('workflow_db_events', \
        json_build_object('execution_id', e.id, 'step_id', NULL, 'status', e.status)::text)::text AS notified \
     FROM e"
);

fn with_steps_bound<'a>(
    sql: &'static str,
    execution: &'a NewExecution,
    steps: &[NewExecutionStep],
) -> diesel::query_builder::BoxedSqlQuery<'a, Pg, diesel::query_builder::SqlQuery> {
    use diesel::sql_types::{Array, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    let ids: Vec<Uuid> = steps.iter().map(|s| s.id).collect();
    let nodes: Vec<String> = steps.iter().map(|s| s.node_id.clone()).collect();
    let statuses: Vec<&'static str> = steps.iter().map(|s| s.status.as_str()).collect();
    let inputs: Vec<Option<Value>> = steps.iter().map(|s| s.input.clone()).collect();
    let upstream: Vec<i32> = steps.iter().map(|s| s.upstream_pending).collect();
    let downstream: Vec<Value> = steps
        .iter()
        .map(|s| Value::from(s.downstream.clone()))
        .collect();
    let retries: Vec<i32> = steps.iter().map(|s| s.max_retries).collect();
    let node_types: Vec<Option<String>> = steps.iter().map(|s| s.node_type.clone()).collect();
    let priorities: Vec<i32> = steps.iter().map(|s| s.priority).collect();
    let queues: Vec<Option<String>> = steps.iter().map(|s| s.queue.clone()).collect();
    let keys: Vec<Option<String>> = steps.iter().map(|s| s.concurrency_key.clone()).collect();
    diesel::sql_query(sql)
        .into_boxed()
        .bind::<SqlUuid, _>(execution.id)
        .bind::<SqlUuid, _>(execution.workflow_id)
        .bind::<Text, _>(execution.status.as_str())
        .bind::<Nullable<Text>, _>(execution.user_id.as_deref())
        .bind::<Nullable<Jsonb>, _>(execution.data.as_ref())
        .bind::<Integer, _>(execution.workflow_version)
        .bind::<Nullable<Text>, _>(execution.idempotency_key.as_deref())
        .bind::<Nullable<SqlUuid>, _>(execution.parent_execution_id)
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Text>, _>(nodes)
        .bind::<Array<Text>, _>(statuses)
        .bind::<Array<Nullable<Jsonb>>, _>(inputs)
        .bind::<Array<Integer>, _>(upstream)
        .bind::<Array<Jsonb>, _>(downstream)
        .bind::<Array<Integer>, _>(retries)
        .bind::<Array<Nullable<Text>>, _>(node_types)
        .bind::<Integer, _>(execution.priority)
        .bind::<Nullable<Text>, _>(execution.concurrency_key.as_deref())
        .bind::<Nullable<Timestamptz>, _>(execution.start_after)
        .bind::<Nullable<Text>, _>(execution.dedup_key.as_deref())
        .bind::<Nullable<Timestamptz>, _>(execution.with_dedup_until().dedup_until)
        .bind::<Array<Integer>, _>(priorities)
        .bind::<Array<Nullable<Text>>, _>(queues)
        .bind::<Array<Nullable<Text>>, _>(keys)
        .bind::<Nullable<SqlUuid>, _>(execution.rerun_of)
}

fn consumed() -> diesel::result::Error {
    diesel::result::Error::SerializationError("COPY callback called twice".into())
}

fn io_error(e: io::Error) -> diesel::result::Error {
    diesel::result::Error::SerializationError(Box::new(e))
}

/// Writes the binary COPY header, every row through `encode`, and the
/// trailer, flushing the buffer into `sink` whenever it fills up.
fn stream<T>(
    sink: &mut dyn Write,
    rows: impl Iterator<Item = T>,
    mut encode: impl FnMut(&mut RowWriter, &T) -> QueryResult<()>,
) -> QueryResult<()> {
    let mut w = RowWriter {
        buf: Vec::with_capacity(BUFFER_BYTES + 4096),
    };
    // Signature, flags (no OIDs), header extension length.
    w.buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    w.buf.extend_from_slice(&0i32.to_be_bytes());
    w.buf.extend_from_slice(&0i32.to_be_bytes());
    for row in rows {
        encode(&mut w, &row)?;
        if w.buf.len() >= BUFFER_BYTES {
            sink.write_all(&w.buf).map_err(io_error)?;
            w.buf.clear();
        }
    }
    w.buf.extend_from_slice(&(-1i16).to_be_bytes());
    sink.write_all(&w.buf).map_err(io_error)?;
    Ok(())
}

/// Encodes fields in PostgreSQL's binary COPY format (length-prefixed, -1 for NULL).
struct RowWriter {
    buf: Vec<u8>,
}

impl RowWriter {
    fn fields(&mut self, n: i16) {
        self.buf.extend_from_slice(&n.to_be_bytes());
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn len(&mut self, n: usize) {
        // Fields over 2 GiB cannot be stored by PostgreSQL anyway.
        let n = i32::try_from(n).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&n.to_be_bytes());
    }

    fn uuid(&mut self, id: &Uuid) {
        self.len(16);
        self.buf.extend_from_slice(id.as_bytes());
    }

    /// `text` and enum labels (an enum's binary form is its label).
    fn text(&mut self, value: Option<&str>) {
        match value {
            Some(s) => {
                self.len(s.len());
                self.buf.extend_from_slice(s.as_bytes());
            }
            None => self.null(),
        }
    }

    fn int4(&mut self, v: i32) {
        self.len(4);
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// `jsonb`: version byte 1, then the JSON text (written in place, then the
    /// length is patched in).
    fn jsonb(&mut self, value: Option<&Value>) -> QueryResult<()> {
        let Some(value) = value else {
            self.null();
            return Ok(());
        };
        let at = self.buf.len();
        self.buf.extend_from_slice(&0i32.to_be_bytes());
        self.buf.push(1);
        serde_json::to_writer(&mut self.buf, value)
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
        let n = i32::try_from(self.buf.len() - at - 4).unwrap_or(i32::MAX);
        self.buf[at..at + 4].copy_from_slice(&n.to_be_bytes());
        Ok(())
    }

    /// `timestamptz`: microseconds since 2000-01-01 UTC.
    fn timestamptz(&mut self, value: Option<DateTime<Utc>>) {
        match value {
            Some(t) => {
                self.len(8);
                let micros = t.timestamp_micros() - PG_EPOCH_OFFSET_MICROS;
                self.buf.extend_from_slice(&micros.to_be_bytes());
            }
            None => self.null(),
        }
    }
}
