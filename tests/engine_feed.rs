//! The event feed: gap-free order under concurrent commits, durable cursors,
//! at-least-once delivery.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use workflow_db::Lease;
use workflow_db::engine::feed::{self, FeedPosition};
use workflow_db::engine::{self};
use workflow_db::schema::execution_events;
use workflow_db::testing::TestDatabase;
use workflow_db::{Error, ExecutionEvent, NewExecution};

use common::{LEASE, start, workflow};

fn all_event_ids(conn: &mut PgConnection) -> Vec<i64> {
    execution_events::table
        .select(execution_events::id)
        .order(execution_events::id)
        .load(conn)
        .unwrap()
}

/// `next_events` once at least `n` events are readable. Transaction ids are
/// cluster-wide: a writing transaction of another test, in another
/// database, holds the feed back until it ends (the documented stall), so
/// the tests wait for it rather than read once.
fn wait_for(conn: &mut PgConnection, consumer: &str, n: usize) -> Vec<feed::FeedEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = feed::next_events(conn, consumer, 1000).unwrap();
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the whole feed for `consumer`, acknowledging as it goes.
fn drain(conn: &mut PgConnection, consumer: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    loop {
        let batch = feed::next_events(conn, consumer, 7).unwrap();
        let Some(last) = batch.last() else {
            return ids;
        };
        ids.extend(batch.iter().map(|e| e.event.id));
        feed::acknowledge(conn, consumer, last.position()).unwrap();
    }
}

/// Transaction A writes an event and stays open; B writes one later and
/// commits. An id cursor would read B's event, move past it and never see A's
/// (it has the lower id). The feed returns neither while A is open, then both,
/// A's first.
#[test]
fn an_event_committed_after_a_later_one_was_readable_is_still_delivered() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a"], &[]);
    feed::register_consumer(&mut conn, "reader").unwrap();

    let mut a = db.connect();
    a.batch_execute("BEGIN").unwrap();
    let x = engine::start_execution(&mut a, &NewExecution::new(wf.id))
        .unwrap()
        .execution;
    let y = start(&mut db.connect(), &wf);

    // What a reader by id alone would see now: only B's event, the higher id.
    let by_id = ExecutionEvent::for_execution(&mut conn, y.id).unwrap();
    assert_eq!(by_id.len(), 1);
    assert!(
        ExecutionEvent::for_execution(&mut conn, x.id)
            .unwrap()
            .is_empty()
    );
    // The feed holds B's event back while A, older, may still commit.
    assert!(
        feed::next_events(&mut conn, "reader", 100)
            .unwrap()
            .is_empty()
    );

    a.batch_execute("COMMIT").unwrap();
    let events = wait_for(&mut conn, "reader", 2);
    let executions: Vec<_> = events.iter().map(|e| e.event.execution_id).collect();
    assert_eq!(executions, vec![x.id, y.id], "A's event first, then B's");
    assert!(events[0].event.id < events[1].event.id || events[0].txid < events[1].txid);
    assert!(events[0].position() < events[1].position());
    feed::acknowledge(&mut conn, "reader", events[1].position()).unwrap();
    assert!(
        feed::next_events(&mut conn, "reader", 100)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_consumer_reads_at_least_once_until_it_acknowledges_and_never_moves_back() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[("a", "b")]);
    let execution = start(&mut conn, &wf);
    for _ in 0..2 {
        let step = engine::claim_steps(&mut conn, "w", 1, LEASE)
            .unwrap()
            .remove(0);
        engine::complete_step(&mut conn, &Lease::new(step.id, "w", step.attempt), None).unwrap();
    }
    let history: Vec<i64> = ExecutionEvent::for_execution(&mut conn, execution.id)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(history.len(), 6, "start, 2 x (claim, complete), completion");

    assert_eq!(
        feed::register_consumer(&mut conn, "c").unwrap(),
        FeedPosition::START
    );
    assert_eq!(wait_for(&mut conn, "c", history.len()).len(), history.len());
    let first = feed::next_events(&mut conn, "c", 2).unwrap();
    assert_eq!(first.len(), 2);
    // Not acknowledged: the same events again.
    assert_eq!(feed::next_events(&mut conn, "c", 2).unwrap(), first);
    let stored = feed::acknowledge(&mut conn, "c", first[1].position()).unwrap();
    assert_eq!(stored, first[1].position());
    // Registering again keeps the position; acknowledging an older one too.
    assert_eq!(feed::register_consumer(&mut conn, "c").unwrap(), stored);
    assert_eq!(
        feed::acknowledge(&mut conn, "c", first[0].position()).unwrap(),
        stored
    );
    let rest = feed::next_events(&mut conn, "c", 100).unwrap();
    let mut seen: Vec<i64> = first.iter().chain(&rest).map(|e| e.event.id).collect();
    seen.sort_unstable();
    assert_eq!(seen, history, "every event of the history, once");

    // A second consumer has its own position.
    feed::register_consumer(&mut conn, "other").unwrap();
    wait_for(&mut conn, "other", history.len());
    assert_eq!(drain(&mut conn, "other").len(), history.len());
    assert!(feed::drop_consumer(&mut conn, "other").unwrap());
    assert!(!feed::drop_consumer(&mut conn, "other").unwrap());
}

#[test]
fn unknown_and_invalid_consumers_get_clear_errors_and_store_nothing() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let err = feed::next_events(&mut conn, "nobody", 10).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(err.to_string(), "event feed consumer nobody not found");
    let err = feed::acknowledge(&mut conn, "nobody", FeedPosition::START).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    for bad in [String::new(), "x".repeat(201)] {
        let err = feed::register_consumer(&mut conn, &bad).unwrap_err();
        assert!(matches!(err, Error::InvalidId { .. }), "{err:?}");
        assert!(err.to_string().contains("consumer name"), "{err}");
    }
    feed::register_consumer(&mut conn, &"é".repeat(200)).unwrap();
    let stored: i64 = diesel::sql_query("SELECT count(*) AS n FROM event_feed_cursors")
        .get_result::<Count>(&mut conn)
        .unwrap()
        .n;
    assert_eq!(stored, 1, "only the valid consumer was stored");
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Writers commit in every order while a reader follows the feed: it ends
/// with every event exactly once, in increasing positions.
#[test]
fn a_reader_following_concurrent_writers_gets_every_event_once_in_order() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b", "c"], &[("a", "c"), ("b", "c")]);
    feed::register_consumer(&mut conn, "follower").unwrap();
    let done = AtomicBool::new(false);
    let total = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let mut delivered = Vec::new();
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (db, wf) = (&db, &wf);
                s.spawn(move || {
                    let mut conn = db.connect();
                    let worker = format!("w{w}");
                    for _ in 0..25 {
                        start(&mut conn, wf);
                        for step in engine::claim_steps(&mut conn, &worker, 2, LEASE).unwrap() {
                            engine::complete_step(
                                &mut conn,
                                &Lease::new(step.id, &worker, step.attempt),
                                None,
                            )
                            .unwrap();
                        }
                    }
                })
            })
            .collect();
        let reader = s.spawn(|| {
            let mut conn = db.connect();
            let mut got = Vec::new();
            let mut deadline = None::<Instant>;
            loop {
                // Once the writers are done, read until every event arrived
                // (other tests' transactions may hold the feed back a while).
                let finished = done.load(Ordering::SeqCst)
                    && (got.len() >= total.load(Ordering::SeqCst)
                        || deadline.is_some_and(|d| Instant::now() > d));
                if done.load(Ordering::SeqCst) && deadline.is_none() {
                    deadline = Some(Instant::now() + Duration::from_secs(60));
                }
                let batch = feed::next_events(&mut conn, "follower", 50).unwrap();
                if let Some(last) = batch.last() {
                    feed::acknowledge(&mut conn, "follower", last.position()).unwrap();
                }
                let empty = batch.is_empty();
                got.extend(batch.into_iter().map(|e| e.position()));
                if finished && empty {
                    return got;
                }
                if empty {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        for w in writers {
            w.join().unwrap();
        }
        total.store(all_event_ids(&mut db.connect()).len(), Ordering::SeqCst);
        done.store(true, Ordering::SeqCst);
        delivered = reader.join().unwrap();
    });
    assert!(
        delivered.windows(2).all(|p| p[0] < p[1]),
        "positions increase"
    );
    let ids: Vec<i64> = delivered.iter().map(|p| p.event_id).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no duplicates"
    );
    let mut ids = ids;
    ids.sort_unstable();
    assert_eq!(ids, all_event_ids(&mut conn), "every event");
}
