//! A text snapshot of the schema's catalog, for drift detection.
//!
//! [`snapshot`] lists, one line each and sorted, every table, column (type,
//! nullability, default), index, constraint, enum (labels in order), function
//! (signature and a hash of its body), trigger and comment of the `public`
//! schema, leaving out the migration bookkeeping (tables starting with `__`).
//! Two databases with equal snapshots have the same schema for every purpose
//! this crate cares about. `bin/schema` commits the snapshot of a freshly
//! migrated database as `src/catalog.snapshot`; `db-migrate --check` compares
//! a live database against it.

use std::collections::BTreeSet;

use diesel::prelude::*;
use diesel::sql_types::Text;

use crate::error::Result;

/// The snapshot of a freshly migrated database, as committed by `bin/schema`.
pub const EXPECTED: &str = include_str!("catalog.snapshot");

const CATALOG_SQL: &str = r#"
WITH rel AS (
    SELECT c.oid, c.relname, c.relkind
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relname NOT LIKE '\_\_%'
)
SELECT line FROM (
    SELECT format('table %s (%s)', relname, relkind) AS line FROM rel WHERE relkind IN ('r', 'p', 'v', 'm', 'S')
    UNION ALL
    SELECT format('column %s.%s %s%s%s', r.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attnotnull THEN ' not null' ELSE '' END,
                  coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''))
    FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE r.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT format('index %s%s', pg_get_indexdef(i.indexrelid), CASE WHEN i.indisvalid THEN '' ELSE ' (INVALID)' END)
    FROM pg_index i JOIN rel r ON r.oid = i.indrelid
    UNION ALL
    SELECT format('constraint %s.%s %s', r.relname, co.conname, pg_get_constraintdef(co.oid))
    FROM pg_constraint co JOIN rel r ON r.oid = co.conrelid
    UNION ALL
    SELECT format('enum %s (%s)', t.typname, string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder))
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid
    WHERE n.nspname = 'public' GROUP BY t.typname
    UNION ALL
    SELECT format('function %s(%s) returns %s, body md5 %s', p.proname, pg_get_function_identity_arguments(p.oid),
                  pg_get_function_result(p.oid), md5(p.prosrc))
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
    UNION ALL
    SELECT format('trigger %s', pg_get_triggerdef(t.oid))
    FROM pg_trigger t JOIN rel r ON r.oid = t.tgrelid WHERE NOT t.tgisinternal
    UNION ALL
    SELECT format('comment on %s: %s', r.relname, obj_description(r.oid, 'pg_class'))
    FROM rel r WHERE obj_description(r.oid, 'pg_class') IS NOT NULL AND r.relkind IN ('r', 'p', 'v', 'm')
    UNION ALL
    SELECT format('comment on %s.%s: %s', r.relname, a.attname, col_description(r.oid, a.attnum))
    FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid
    WHERE a.attnum > 0 AND NOT a.attisdropped AND col_description(r.oid, a.attnum) IS NOT NULL
    UNION ALL
    SELECT format('comment on type %s: %s', t.typname, obj_description(t.oid, 'pg_type'))
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = 'public' AND t.typtype = 'e' AND obj_description(t.oid, 'pg_type') IS NOT NULL
) lines
ORDER BY line COLLATE "C"
"#;

#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = Text)]
    line: String,
}

/// The catalog of the connected database, one sorted line per object.
pub fn snapshot(conn: &mut PgConnection) -> Result<Vec<String>> {
    Ok(diesel::sql_query(CATALOG_SQL)
        .load::<Line>(conn)?
        .into_iter()
        .map(|l| l.line.replace('\n', " "))
        .collect())
}

/// The differences between an expected and an actual snapshot: lines only in
/// the database are prefixed `+`, lines missing from it `-`.
pub fn diff(expected: &[String], actual: &[String]) -> Vec<String> {
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let actual: BTreeSet<&str> = actual.iter().map(String::as_str).collect();
    let mut out: Vec<String> = expected
        .difference(&actual)
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(actual.difference(&expected).map(|l| format!("+ {l}")));
    out.sort_by(|a, b| a[2..].cmp(&b[2..]));
    out
}

/// The committed snapshot of a freshly migrated database, as lines.
pub fn expected() -> Vec<String> {
    EXPECTED
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}
