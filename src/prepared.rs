//! Hand-written SQL that Diesel keeps prepared.
//!
//! Diesel never caches a [`diesel::sql_query`] statement: every call sends
//! it as an unnamed statement, so PostgreSQL parses, analyses and plans the
//! whole text again each time. For the engine's hot statements (claim,
//! complete, fail, heartbeat, start) that was a fifth of the server's CPU
//! under load. [`prepared`] marks such a statement as safe to cache: Diesel
//! then prepares it once per connection under a name (keyed by its SQL text
//! and bind types) and PostgreSQL reuses the parsed statement and, after its
//! first five runs, a generic plan when that costs no more than a custom one.
//!
//! A statement is safe to cache when its text is one of a bounded set
//! (literals such as a batch size are fine, values are not) and its result
//! columns are listed by name: a prepared `SELECT *` or `RETURNING *` fails
//! with "cached plan must not change result type" as soon as a migration adds
//! a column under a running service. `step_columns!` and
//! `execution_columns!` are the lists the models load.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::{QueryResult, RunQueryDsl};

/// The columns [`crate::ExecutionStep`] loads by name, for `RETURNING`
/// clauses of prepared statements (a test checks it against the schema).
macro_rules! step_columns {
    () => {
        "id, execution_id, node_id, status, input, output, validation, retry_count, error, \
         started_at, completed_at, created_at, updated_at, upstream_pending, downstream, \
         max_retries, run_after, locked_by, locked_until, parked, attempt, node_type, reclaims, \
         priority, queue, concurrency_key, throttled, wait_seconds, wait_until, wait_signal, wake_at"
    };
}
pub(crate) use step_columns;

/// The columns [`crate::Execution`] loads by name (a test checks it against
/// the schema).
macro_rules! execution_columns {
    () => {
        "id, workflow_id, status, user_id, data, error, started_at, completed_at, created_at, \
         updated_at, workflow_version, idempotency_key, parent_execution_id, priority, concurrency_key, \
         start_after, dedup_key, dedup_until, rerun_of"
    };
}
pub(crate) use execution_columns;

/// `query`, kept prepared per connection (see the module documentation).
pub(crate) fn prepared<Q>(query: Q) -> Prepared<Q> {
    Prepared(query)
}

/// A query Diesel may cache as a prepared statement; made by [`prepared`].
#[derive(Debug, Clone)]
pub(crate) struct Prepared<Q>(Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    // `sql_query` marks itself unsafe to cache because its text may be built
    // from values; the statements wrapped here are not (module docs).
    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    // No static id: Diesel keys the cache by the SQL text and bind types.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}

impl<Q, Conn> RunQueryDsl<Conn> for Prepared<Q> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{execution_steps, executions};
    use diesel::QuerySource;

    /// The column names of a Diesel `SELECT` of every column, in order.
    fn columns_of<T: QueryFragment<Pg>>(select: T) -> String {
        let sql = diesel::debug_query::<Pg, _>(&select).to_string();
        let list = sql
            .strip_prefix("SELECT ")
            .and_then(|s| s.split(" FROM ").next())
            .expect("a SELECT");
        list.split(", ")
            .map(|c| c.rsplit('.').next().unwrap().trim_matches('"'))
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[test]
    fn column_lists_are_the_tables_columns() {
        use diesel::QueryDsl;
        let steps = execution_steps::table.select(execution_steps::table.default_selection());
        assert_eq!(
            step_columns!()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            columns_of(steps)
        );
        let executions = executions::table.select(executions::table.default_selection());
        assert_eq!(
            execution_columns!()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            columns_of(executions)
        );
    }
}
