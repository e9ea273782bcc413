use chrono::{DateTime, Utc};
use diesel::dsl::count_star;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use crate::enums::ExecutionStatus;
use crate::error::{Error, Result};
use crate::models::{Execution, ExecutionStep, MAX_PAGE_SIZE, Workflow};
use crate::schema::{execution_steps, executions, workflows};

/// Filters of [`list_executions`]; the default lists everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionFilter {
    /// Only executions of this workflow.
    pub workflow_id: Option<Uuid>,
    /// Only executions of a workflow of this name (any version).
    pub workflow_name: Option<String>,
    /// Only executions with one of these statuses (empty: any).
    pub statuses: Vec<ExecutionStatus>,
    /// Only executions started by this user.
    pub user_id: Option<String>,
    /// Only executions started at or after this time.
    pub started_from: Option<DateTime<Utc>>,
    /// Only executions started before this time.
    pub started_before: Option<DateTime<Utc>>,
    /// Only executions with a step on this queue (its `queue`, else its
    /// node type: `workflow_db_step_queue`).
    pub queue: Option<String>,
}

/// One page of [`list_executions`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionPage {
    /// The executions, newest (`started_at`, then id) first.
    pub executions: Vec<Execution>,
    /// Opaque cursor of the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

const CURSOR_LEN: usize = 16 + 32;

fn encode_cursor(e: &Execution) -> Option<String> {
    let started = e.started_at?.timestamp_micros();
    Some(format!("{:016x}{}", started as u64, e.id.simple()))
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid)> {
    let bad = |reason| Error::InvalidId {
        what: "cursor",
        input: cursor.to_owned(),
        reason,
    };
    if cursor.len() != CURSOR_LEN || !cursor.is_ascii() {
        return Err(bad("not a cursor returned by list_executions"));
    }
    let (time, id) = cursor.split_at(16);
    let micros = u64::from_str_radix(time, 16).map_err(|_| bad("bad time part"))? as i64;
    let time = DateTime::from_timestamp_micros(micros).ok_or_else(|| bad("time out of range"))?;
    let id = Uuid::try_parse(id).map_err(|_| bad("bad id part"))?;
    Ok((time, id))
}

/// Executions matching `filter`, newest first (`started_at DESC, id DESC`),
/// `limit` (at most [`MAX_PAGE_SIZE`]) per page, with keyset pagination:
/// pass the previous page's `next_cursor` to get the next one. Rows
/// inserted meanwhile never shift a page (no OFFSET). Executions whose
/// `started_at` was set to NULL by hand are not listed.
#[tracing::instrument(skip(conn, filter))]
pub fn list_executions(
    conn: &mut PgConnection,
    filter: &ExecutionFilter,
    cursor: Option<&str>,
    limit: i64,
) -> Result<ExecutionPage> {
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    let mut query = executions::table
        .select(Execution::as_select())
        .filter(executions::started_at.is_not_null())
        .into_boxed();
    if let Some(workflow_id) = filter.workflow_id {
        query = query.filter(executions::workflow_id.eq(workflow_id));
    }
    if let Some(name) = &filter.workflow_name {
        query = query.filter(
            executions::workflow_id.eq_any(
                workflows::table
                    .filter(workflows::name.eq(name.clone()))
                    .select(workflows::id),
            ),
        );
    }
    if !filter.statuses.is_empty() {
        query = query.filter(executions::status.eq_any(filter.statuses.clone()));
    }
    if let Some(user_id) = &filter.user_id {
        query = query.filter(executions::user_id.eq(user_id.clone()));
    }
    if let Some(from) = filter.started_from {
        query = query.filter(executions::started_at.ge(from));
    }
    if let Some(before) = filter.started_before {
        query = query.filter(executions::started_at.lt(before));
    }
    if let Some(queue) = &filter.queue {
        query = query.filter(
            diesel::dsl::sql::<diesel::sql_types::Bool>(
                "EXISTS (SELECT 1 FROM execution_steps s WHERE s.execution_id = executions.id \
                   AND workflow_db_step_queue(s.queue, s.node_type) = ",
            )
            .bind::<diesel::sql_types::Text, _>(queue.clone())
            .sql(")"),
        );
    }
    if let Some(cursor) = cursor {
        let (time, id) = decode_cursor(cursor)?;
        // (started_at, id) < (time, id), with a plain bound the index can use.
        query = query.filter(executions::started_at.le(time)).filter(
            executions::started_at
                .lt(time)
                .or(executions::started_at.eq(time).and(executions::id.lt(id))),
        );
    }
    let mut executions: Vec<Execution> = query
        .order((executions::started_at.desc(), executions::id.desc()))
        .limit(limit + 1)
        .load(conn)?;
    let more = executions.len() as i64 > limit;
    executions.truncate(limit as usize);
    let next_cursor = if more {
        executions.last().and_then(encode_cursor)
    } else {
        None
    };
    Ok(ExecutionPage {
        executions,
        next_cursor,
    })
}

/// How many executions have each status (statuses with none are left out),
/// in status order; optionally for one workflow.
#[tracing::instrument(skip(conn))]
pub fn count_by_status(
    conn: &mut PgConnection,
    workflow_id: Option<Uuid>,
) -> QueryResult<Vec<(ExecutionStatus, i64)>> {
    let mut query = executions::table
        .group_by(executions::status)
        .select((executions::status, count_star()))
        .order(executions::status)
        .into_boxed();
    if let Some(workflow_id) = workflow_id {
        query = query.filter(executions::workflow_id.eq(workflow_id));
    }
    query.load(conn)
}

/// Shortest accepted short id.
const MIN_PREFIX: usize = 8;
/// Candidates listed in an ambiguity error.
const MAX_CANDIDATES: i64 = 10;

/// The smallest and largest uuid starting with the hex `prefix` (dashes
/// ignored), so a lookup is a range scan of the primary key.
fn prefix_bounds(prefix: &str) -> Result<(Uuid, Uuid)> {
    let hex: String = prefix
        .chars()
        .filter(|&c| c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let bad = |reason| Error::InvalidId {
        what: "id prefix",
        input: prefix.to_owned(),
        reason,
    };
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad("not hexadecimal"));
    }
    if hex.len() < MIN_PREFIX {
        return Err(bad("shorter than 8 hex digits"));
    }
    if hex.len() > 32 {
        return Err(bad("longer than a uuid"));
    }
    let pad = |c: char| {
        let mut s = hex.clone();
        s.extend(std::iter::repeat_n(c, 32 - hex.len()));
        Uuid::try_parse(&s).map_err(|_| bad("not a uuid prefix"))
    };
    Ok((pad('0')?, pad('f')?))
}

fn exactly_one<T>(
    prefix: &str,
    entity: &'static str,
    mut rows: Vec<T>,
    id: impl Fn(&T) -> Uuid,
) -> Result<T> {
    match rows.len() {
        0 => Err(Error::NotFound {
            entity,
            id: prefix.to_owned(),
        }),
        1 => Ok(rows.remove(0)),
        _ => Err(Error::AmbiguousId {
            prefix: prefix.to_owned(),
            candidates: rows.iter().map(id).collect(),
        }),
    }
}

/// Looks up the row of `$table` whose id starts with the prefix.
macro_rules! by_short_id {
    ($conn:expr, $prefix:expr, $table:ident, $row:ty, $entity:literal) => {{
        let (lo, hi) = prefix_bounds($prefix)?;
        let rows = $table::table
            .filter($table::id.between(lo, hi))
            .order($table::id)
            .limit(MAX_CANDIDATES)
            .select(<$row>::as_select())
            .load($conn)?;
        exactly_one($prefix, $entity, rows, |r: &$row| r.id)
    }};
}

/// The workflow whose id starts with `prefix` (at least 8 hex digits, dashes
/// ignored; a range scan of the primary key): [`Error::AmbiguousId`] listing
/// the candidates when several match, [`Error::NotFound`] when none does.
#[tracing::instrument(skip(conn))]
pub fn find_workflow_by_short_id(conn: &mut PgConnection, prefix: &str) -> Result<Workflow> {
    by_short_id!(conn, prefix, workflows, Workflow, "workflow")
}

/// The execution whose id starts with `prefix`, as [`find_workflow_by_short_id`].
#[tracing::instrument(skip(conn))]
pub fn find_execution_by_short_id(conn: &mut PgConnection, prefix: &str) -> Result<Execution> {
    by_short_id!(conn, prefix, executions, Execution, "execution")
}

/// The step whose id starts with `prefix`, as [`find_workflow_by_short_id`].
#[tracing::instrument(skip(conn))]
pub fn find_step_by_short_id(conn: &mut PgConnection, prefix: &str) -> Result<ExecutionStep> {
    by_short_id!(conn, prefix, execution_steps, ExecutionStep, "step")
}

/// Guard against a parent cycle written by hand.
const MAX_DEPTH: i64 = 10_000;

/// The chain of parents of an execution, nearest first (one recursive query).
#[tracing::instrument(skip(conn))]
pub fn ancestors(conn: &mut PgConnection, id: Uuid) -> QueryResult<Vec<Execution>> {
    diesel::sql_query(
        "WITH RECURSIVE up (id, depth) AS ( \
             SELECT parent_execution_id, 1 FROM executions WHERE id = $1 \
             UNION ALL \
             SELECT e.parent_execution_id, up.depth + 1 FROM executions e JOIN up ON e.id = up.id \
             WHERE up.depth < $2) \
         SELECT e.* FROM up JOIN executions e ON e.id = up.id ORDER BY up.depth",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<BigInt, _>(MAX_DEPTH)
    .load(conn)
}

/// Every execution below this one (children, their children, ...), level
/// by level, in one recursive query.
#[tracing::instrument(skip(conn))]
pub fn descendants(conn: &mut PgConnection, id: Uuid) -> QueryResult<Vec<Execution>> {
    diesel::sql_query(
        "WITH RECURSIVE down (id, depth) AS ( \
             SELECT id, 1 FROM executions WHERE parent_execution_id = $1 \
             UNION ALL \
             SELECT e.id, down.depth + 1 FROM executions e JOIN down ON e.parent_execution_id = down.id \
             WHERE down.depth < $2) \
         SELECT e.* FROM down JOIN executions e ON e.id = down.id ORDER BY down.depth, e.id",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<BigInt, _>(MAX_DEPTH)
    .load(conn)
}

/// "Nothing in `x`'s subtree is still in use": no step of `x` or of any
/// execution below it (at any depth) is pending or running (a step may still
/// run under a cancelled execution), and every execution below it is final
/// and completed before the cutoff `$1`. `$3` bounds the depth.
macro_rules! prunable {
    () => {
        "x.status IN ('completed', 'failed', 'cancelled') AND x.completed_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM execution_steps s \
                         WHERE s.execution_id = x.id AND s.status IN ('pending', 'running')) \
         AND NOT EXISTS ( \
             WITH RECURSIVE down (id, depth) AS ( \
                 SELECT c.id, 1 FROM executions c WHERE c.parent_execution_id = x.id \
                 UNION ALL \
                 SELECT c.id, down.depth + 1 FROM executions c \
                 JOIN down ON c.parent_execution_id = down.id WHERE down.depth < $3) \
             SELECT 1 FROM down JOIN executions d ON d.id = down.id \
             WHERE d.status NOT IN ('completed', 'failed', 'cancelled') \
                OR d.completed_at IS NULL OR d.completed_at >= $1 \
                OR EXISTS (SELECT 1 FROM execution_steps s \
                           WHERE s.execution_id = d.id AND s.status IN ('pending', 'running')))"
    };
}

#[derive(QueryableByName)]
struct TreeRow {
    /// The prune candidate at the top of the tree.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    root: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

/// Deletes final executions (completed, failed, cancelled) that completed
/// before `older_than`, with their steps and history, `batch` executions per
/// transaction (each short, skipping rows locked by others) until none is
/// left; returns how many were deleted (not counting the sub-executions
/// deleted with them). Deleting an execution deletes its whole subtree of
/// sub-executions (cascade), so an execution is kept while anything in its
/// subtree is in use: an execution below it, at any depth, that is not final
/// or completed at or after the cutoff, or a step (of it or below it) still
/// pending or running.
///
/// Each batch locks its candidates and every execution below them (`FOR
/// UPDATE`, skipping what others hold: a tree in which a sub-execution is
/// being inserted is left for a later call), then deletes them in a last
/// statement that checks their subtrees again with a fresh snapshot. A
/// sub-execution committed before the locks is seen and keeps its tree; one
/// inserted after them waits for the prune and then fails on its deleted
/// parent: nothing is deleted while in use. Run it outside a transaction so
/// each batch commits.
#[tracing::instrument(skip(conn))]
pub fn prune_executions(
    conn: &mut PgConnection,
    older_than: DateTime<Utc>,
    batch: i64,
) -> QueryResult<u64> {
    let batch = batch.max(1);
    let mut total = 0u64;
    // Candidates whose tree was busy, not tried again by this call.
    let mut busy_roots: Vec<Uuid> = Vec::new();
    loop {
        let (locked, deleted) = conn.transaction(|conn| {
            let ids: Vec<Uuid> = diesel::sql_query(concat!(
                "SELECT x.id FROM executions x WHERE x.id <> ALL($4) AND ",
                prunable!(),
                " ORDER BY x.completed_at LIMIT $2 FOR UPDATE OF x SKIP LOCKED"
            ))
            .bind::<Timestamptz, _>(older_than)
            .bind::<BigInt, _>(batch)
            .bind::<BigInt, _>(MAX_DEPTH)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&busy_roots)
            .load::<Id>(conn)?
            .into_iter()
            .map(|r| r.id)
            .collect();
            let locked_candidates = ids.len() as i64;
            if ids.is_empty() {
                return QueryResult::Ok((0, 0));
            }
            // Lock every execution below the candidates as well. A
            // sub-execution being inserted holds its parent (the foreign
            // key's FOR KEY SHARE) until it commits: such a parent cannot be
            // locked now, and its whole tree waits for a later prune (a
            // cascade would otherwise wait for the insert and then delete
            // the new execution). Once locked, a new insert below waits for
            // this transaction and then fails on its deleted parent.
            let tree: Vec<TreeRow> = diesel::sql_query(
                "WITH RECURSIVE down (root, id, depth) AS ( \
                     SELECT c.parent_execution_id, c.id, 1 FROM executions c \
                     WHERE c.parent_execution_id = ANY($1) \
                     UNION ALL \
                     SELECT down.root, c.id, down.depth + 1 FROM executions c \
                     JOIN down ON c.parent_execution_id = down.id WHERE down.depth < $2) \
                 SELECT root, id FROM down",
            )
            .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&ids)
            .bind::<BigInt, _>(MAX_DEPTH)
            .load(conn)?;
            let below: Vec<Uuid> = tree.iter().map(|r| r.id).collect();
            let locked: std::collections::HashSet<Uuid> = diesel::sql_query(
                "SELECT id FROM executions WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED",
            )
            .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&below)
            .load::<Id>(conn)?
            .into_iter()
            .map(|r| r.id)
            .collect();
            let busy: std::collections::HashSet<Uuid> = tree
                .iter()
                .filter(|r| !locked.contains(&r.id))
                .map(|r| r.root)
                .collect();
            busy_roots.extend(busy.iter().copied());
            let ids: Vec<Uuid> = ids
                .iter()
                .filter(|id| !busy.contains(id))
                .copied()
                .collect();
            let deleted = diesel::sql_query(concat!(
                "DELETE FROM executions x WHERE x.id = ANY($2) AND ",
                prunable!()
            ))
            .bind::<Timestamptz, _>(older_than)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&ids)
            .bind::<BigInt, _>(MAX_DEPTH)
            .execute(conn)?;
            Ok((locked_candidates, deleted as u64))
        })?;
        total += deleted;
        if locked < batch {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_bounds_cover_exactly_the_prefix() {
        let (lo, hi) = prefix_bounds("0192ABCD-ef").unwrap();
        assert_eq!(lo.to_string(), "0192abcd-ef00-0000-0000-000000000000");
        assert_eq!(hi.to_string(), "0192abcd-efff-ffff-ffff-ffffffffffff");
        assert!(matches!(
            prefix_bounds("0192abc"),
            Err(Error::InvalidId { .. })
        ));
        assert!(matches!(
            prefix_bounds("0192abcx"),
            Err(Error::InvalidId { .. })
        ));
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let id = Uuid::now_v7();
        let time = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        let cursor = format!("{:016x}{}", time.timestamp_micros() as u64, id.simple());
        assert_eq!(decode_cursor(&cursor).unwrap(), (time, id));
        assert!(decode_cursor("nope").is_err());
        assert!(decode_cursor(&"z".repeat(CURSOR_LEN)).is_err());
    }
}
