//! Starting (idempotency, sub-workflows) and querying executions.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use chrono::{TimeDelta, Utc};
use diesel::prelude::*;
use uuid::Uuid;
use workflow_db::engine::{self, ExecutionFilter};
use workflow_db::schema::{execution_events, execution_steps, executions};
use workflow_db::testing::TestDatabase;
use workflow_db::{Error, Execution, ExecutionStatus, NewExecution, NewWorkflow, Workflow};

use common::{graph, start, workflow};

#[test]
fn concurrent_starts_with_one_idempotency_key_create_one_execution() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[("a", "b")]);
    const RACERS: usize = 8;
    let barrier = Arc::new(Barrier::new(RACERS));
    let handles: Vec<_> = (0..RACERS)
        .map(|_| {
            let (barrier, mut conn) = (barrier.clone(), db.connect());
            std::thread::spawn(move || {
                barrier.wait();
                let new = NewExecution::new(wf.id).idempotency_key("order-42");
                engine::start_execution(&mut conn, &new).unwrap()
            })
        })
        .collect();
    let started: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(started.iter().filter(|s| s.created).count(), 1);
    let ids: HashSet<Uuid> = started.iter().map(|s| s.execution.id).collect();
    assert_eq!(ids.len(), 1, "every caller got the same execution");
    let count: i64 = executions::table.count().get_result(&mut conn).unwrap();
    assert_eq!(count, 1);
    let steps: i64 = execution_steps::table
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(steps, 2, "steps inserted once");

    // Same key, other workflow: a different execution.
    let other = workflow(&mut conn, &["a"], &[]);
    let s = engine::start_execution(
        &mut conn,
        &NewExecution::new(other.id).idempotency_key("order-42"),
    )
    .unwrap();
    assert!(s.created);
}

#[test]
fn invalid_or_missing_workflows_do_not_start() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let err = engine::start_execution(&mut conn, &NewExecution::new(Uuid::now_v7())).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotFound {
                entity: "workflow",
                ..
            }
        ),
        "{err}"
    );
    // A graph written around the crate is still checked at start.
    let wf = workflow(&mut conn, &["a"], &[]);
    diesel::sql_query(r#"UPDATE workflows SET edges = '[{"source": "a", "target": "nope"}]'"#)
        .execute(&mut conn)
        .unwrap();
    let err = engine::start_execution(&mut conn, &NewExecution::new(wf.id)).unwrap_err();
    assert!(matches!(err, Error::InvalidGraph { .. }), "{err}");
    let count: i64 = executions::table.count().get_result(&mut conn).unwrap();
    assert_eq!(count, 0, "nothing written");
    // An empty workflow completes at once.
    let empty = NewWorkflow::from_graph("empty", &graph(&[], &[]))
        .create(&mut conn)
        .unwrap();
    assert_eq!(start(&mut conn, &empty).status, ExecutionStatus::Completed);
}

#[test]
fn ancestors_and_descendants_in_one_query_each() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let mut child_of = |parent: Option<Uuid>| {
        let mut new = NewExecution::new(wf.id);
        new.parent_execution_id = parent;
        engine::start_execution(&mut conn, &new)
            .unwrap()
            .execution
            .id
    };
    let root = child_of(None);
    let child = child_of(Some(root));
    let sibling = child_of(Some(root));
    let grandchild = child_of(Some(child));
    let unrelated = child_of(None);

    let ids = |v: Vec<Execution>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(
        ids(engine::ancestors(&mut conn, grandchild).unwrap()),
        [child, root]
    );
    assert!(engine::ancestors(&mut conn, root).unwrap().is_empty());
    let below = ids(engine::descendants(&mut conn, root).unwrap());
    assert_eq!(below.len(), 3);
    assert_eq!(below[2], grandchild, "level by level");
    assert_eq!(
        below[..2].iter().copied().collect::<HashSet<_>>(),
        HashSet::from([child, sibling])
    );
    assert!(
        engine::descendants(&mut conn, unrelated)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn keyset_pages_cover_every_row_exactly_once() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wfs: Vec<Workflow> = (0..3).map(|_| workflow(&mut conn, &["a"], &[])).collect();
    let mut all = Vec::new();
    for i in 0..60 {
        let new = NewExecution::new(wfs[i % 3].id).user_id(format!("u{}", i % 2));
        all.push(engine::start_execution(&mut conn, &new).unwrap().execution);
    }
    // Ties on started_at are broken by id.
    diesel::sql_query(
        "UPDATE executions SET started_at = timestamptz '2026-01-01' + (abs(hashtext(id::text)) % 7) * interval '1 hour'",
    )
    .execute(&mut conn)
    .unwrap();
    for ex in all.iter().take(10) {
        engine::cancel(&mut conn, ex.id).unwrap();
    }

    let collect = |conn: &mut PgConnection, filter: &ExecutionFilter, limit: i64| {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = engine::list_executions(conn, filter, cursor.as_deref(), limit).unwrap();
            assert!(page.executions.len() as i64 <= limit);
            seen.extend(page.executions);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return seen,
            }
        }
    };
    let seen = collect(&mut conn, &ExecutionFilter::default(), 7);
    assert_eq!(seen.len(), 60);
    assert_eq!(
        seen.iter().map(|e| e.id).collect::<HashSet<_>>().len(),
        60,
        "no duplicates"
    );
    assert!(
        seen.windows(2)
            .all(|w| (w[0].started_at, w[0].id) > (w[1].started_at, w[1].id)),
        "newest first"
    );
    let exact = collect(&mut conn, &ExecutionFilter::default(), 60);
    assert_eq!(exact.len(), 60);
    assert_eq!(
        engine::list_executions(&mut conn, &ExecutionFilter::default(), None, 60)
            .unwrap()
            .next_cursor,
        None
    );

    let filter = ExecutionFilter {
        workflow_id: Some(wfs[0].id),
        statuses: vec![ExecutionStatus::Running],
        user_id: Some("u0".into()),
        started_from: Some("2026-01-01T01:00:00Z".parse().unwrap()),
        started_before: Some("2026-01-01T06:00:00Z".parse().unwrap()),
        queue: None,
        workflow_name: None,
    };
    let filtered = collect(&mut conn, &filter, 3);
    let expected: HashSet<Uuid> = seen
        .iter()
        .filter(|e| {
            e.workflow_id == wfs[0].id
                && e.status == ExecutionStatus::Running
                && e.user_id.as_deref() == Some("u0")
                && e.started_at >= filter.started_from
                && e.started_at < filter.started_before
        })
        .map(|e| e.id)
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(
        filtered.iter().map(|e| e.id).collect::<HashSet<_>>(),
        expected
    );
    assert_eq!(filtered.len(), expected.len());

    let err = engine::list_executions(&mut conn, &ExecutionFilter::default(), Some("garbage"), 5)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidId { what: "cursor", .. }),
        "{err}"
    );

    assert_eq!(
        engine::count_by_status(&mut conn, None).unwrap(),
        [
            (ExecutionStatus::Running, 50),
            (ExecutionStatus::Cancelled, 10)
        ]
    );
    let per_wf: i64 = engine::count_by_status(&mut conn, Some(wfs[1].id))
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(per_wf, 20);
}

#[test]
fn short_ids_resolve_to_one_row_or_list_the_candidates() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let make = |conn: &mut PgConnection, id: &str| {
        let mut new = NewWorkflow::from_graph("w", &graph(&["a"], &[]));
        new.id = id.parse().unwrap();
        new.create(conn).unwrap()
    };
    let a = make(&mut conn, "01234567-89ab-7000-8000-000000000001");
    let b = make(&mut conn, "01234567-89ab-7000-8000-000000000002");
    let c = make(&mut conn, "01234568-0000-7000-8000-000000000000");

    assert_eq!(
        engine::find_workflow_by_short_id(&mut conn, "01234568")
            .unwrap()
            .id,
        c.id
    );
    assert_eq!(
        engine::find_workflow_by_short_id(&mut conn, "0123456789AB-7000-8000-000000000002")
            .unwrap()
            .id,
        b.id
    );
    match engine::find_workflow_by_short_id(&mut conn, "01234567").unwrap_err() {
        Error::AmbiguousId { prefix, candidates } => {
            assert_eq!(prefix, "01234567");
            assert_eq!(candidates, [a.id, b.id]);
        }
        other => panic!("expected AmbiguousId, got {other:?}"),
    }
    let err = engine::find_workflow_by_short_id(&mut conn, "01234569").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = engine::find_workflow_by_short_id(&mut conn, "0123").unwrap_err();
    assert!(err.to_string().contains("shorter than 8"), "{err}");

    let ex = start(&mut conn, &a);
    let short = &ex.id.simple().to_string()[..12];
    assert_eq!(
        engine::find_execution_by_short_id(&mut conn, short)
            .unwrap()
            .id,
        ex.id
    );
}

#[test]
fn prune_deletes_old_final_executions_in_batches() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[]);
    let old: Vec<Execution> = (0..5).map(|_| start(&mut conn, &wf)).collect();
    for ex in &old {
        engine::cancel(&mut conn, ex.id).unwrap();
    }
    let running = start(&mut conn, &wf);
    let recent = start(&mut conn, &wf);
    engine::cancel(&mut conn, recent.id).unwrap();
    // A final parent whose child still runs is kept.
    let parent = start(&mut conn, &wf);
    let mut new = NewExecution::new(wf.id);
    new.parent_execution_id = Some(parent.id);
    engine::start_execution(&mut conn, &new).unwrap();
    engine::cancel(&mut conn, parent.id).unwrap();
    diesel::update(executions::table.filter(executions::id.ne(recent.id)))
        .set(executions::completed_at.eq(Utc::now() - TimeDelta::days(30)))
        .execute(&mut conn)
        .unwrap();

    let removed = engine::prune_executions(&mut conn, Utc::now() - TimeDelta::days(7), 2).unwrap();
    assert_eq!(removed, 5);
    let left: Vec<Uuid> = executions::table
        .select(executions::id)
        .load(&mut conn)
        .unwrap();
    assert_eq!(left.len(), 4);
    assert!(left.contains(&running.id) && left.contains(&recent.id) && left.contains(&parent.id));
    let orphans: i64 = execution_events::table
        .filter(execution_events::execution_id.eq_any(old.iter().map(|e| e.id).collect::<Vec<_>>()))
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(orphans, 0, "history goes with its execution");
    assert_eq!(
        engine::prune_executions(&mut conn, Utc::now() - TimeDelta::days(7), 2).unwrap(),
        0
    );
}

#[test]
fn prune_keeps_executions_with_an_unfinished_or_recent_execution_anywhere_below() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    let child_of = |conn: &mut PgConnection, parent: &Execution| {
        let mut new = NewExecution::new(wf.id);
        new.parent_execution_id = Some(parent.id);
        engine::start_execution(conn, &new).unwrap().execution
    };
    // parent (final, old) -> child (final, old) -> grandchild (running).
    let parent = start(&mut conn, &wf);
    let child = child_of(&mut conn, &parent);
    let grandchild = child_of(&mut conn, &child);
    // parent2 (final, old) -> child2 (final, old) -> grandchild2 (final, recent).
    let parent2 = start(&mut conn, &wf);
    let child2 = child_of(&mut conn, &parent2);
    let grandchild2 = child_of(&mut conn, &child2);
    // parent3 -> child3 -> grandchild3, all final and old: pruned together.
    let parent3 = start(&mut conn, &wf);
    let child3 = child_of(&mut conn, &parent3);
    let grandchild3 = child_of(&mut conn, &child3);
    for ex in [
        &parent,
        &child,
        &parent2,
        &child2,
        &grandchild2,
        &parent3,
        &child3,
        &grandchild3,
    ] {
        engine::cancel(&mut conn, ex.id).unwrap();
    }
    diesel::update(executions::table.filter(executions::id.ne(grandchild2.id)))
        .set(executions::completed_at.eq(Utc::now() - TimeDelta::days(30)))
        .execute(&mut conn)
        .unwrap();

    let removed = engine::prune_executions(&mut conn, Utc::now() - TimeDelta::days(7), 10).unwrap();
    let left: HashSet<Uuid> = executions::table
        .select(executions::id)
        .load(&mut conn)
        .unwrap()
        .into_iter()
        .collect();
    let kept: HashSet<Uuid> = [
        &parent,
        &child,
        &grandchild,
        &parent2,
        &child2,
        &grandchild2,
    ]
    .iter()
    .map(|e| e.id)
    .collect();
    assert_eq!(
        left, kept,
        "the running and the recent subtrees survive whole"
    );
    // parent3 (its subtree goes with it by cascade; child3 may also have been
    // picked in the same batch, before the cascade reached it).
    assert!((1..=3).contains(&removed), "{removed}");
    assert_eq!(
        Execution::find(&mut conn, grandchild.id).unwrap().status,
        ExecutionStatus::Running
    );
}
