//! Cron schedules against a real PostgreSQL: refusals before anything is
//! written, fire times across DST changes, exactly one execution per tick
//! with four loops racing (and with four real maintenance instances),
//! the skip and bounded catch-up policies after a downtime, pause and
//! resume, and the idempotency key that refuses a duplicate whoever writes.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;
use workflow_db::engine::{self, MissedTicks, NewSchedule};
use workflow_db::error::sqlstate;
use workflow_db::schema::schedules;
use workflow_db::testing::TestDatabase;
use workflow_db::{Error, Schedule, Workflow};

use common::workflow;

#[derive(QueryableByName, Debug)]
struct KeyCount {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Executions started by the schedule, per idempotency key.
fn executions_per_key(conn: &mut PgConnection, schedule: Uuid) -> BTreeMap<String, i64> {
    diesel::sql_query(
        "SELECT idempotency_key AS key, count(*) AS n FROM executions \
         WHERE idempotency_key LIKE 'schedule:' || $1::text || ':%' GROUP BY 1",
    )
    .bind::<SqlUuid, _>(schedule)
    .load::<KeyCount>(conn)
    .unwrap()
    .into_iter()
    .map(|k| (k.key, k.n))
    .collect()
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

fn reload(conn: &mut PgConnection, id: Uuid) -> Schedule {
    engine::get_schedule(conn, id).unwrap()
}

fn setup() -> (TestDatabase, PgConnection, Workflow) {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let wf = workflow(&mut conn, &["a", "b"], &[("a", "b")]);
    (db, conn, wf)
}

/// Sets `next_fire_at` by hand (a schedule created long ago, or a writer
/// that bypasses the row lock).
fn set_next_fire_at(conn: &mut PgConnection, id: Uuid, at: DateTime<Utc>) {
    diesel::update(schedules::table.find(id))
        .set(schedules::next_fire_at.eq(at))
        .execute(conn)
        .unwrap();
}

#[test]
fn invalid_cron_time_zone_name_or_limit_is_refused_and_nothing_is_written() {
    let (_db, mut conn, wf) = setup();
    let cases: Vec<(&str, NewSchedule)> = vec![
        ("cron", NewSchedule::new("s", wf.id, "not a cron")),
        ("cron", NewSchedule::new("s", wf.id, "61 * * * *")),
        ("cron", NewSchedule::new("s", wf.id, "* * * * * * 2030")),
        ("cron", NewSchedule::new("s", wf.id, "")),
        // 30 February: parses, never fires.
        ("cron", NewSchedule::new("s", wf.id, "0 0 30 2 *")),
        (
            "time_zone",
            NewSchedule::new("s", wf.id, "* * * * *").time_zone("Europe/Berln"),
        ),
        (
            "time_zone",
            NewSchedule::new("s", wf.id, "* * * * *").time_zone("CEST"),
        ),
        ("name", NewSchedule::new("", wf.id, "* * * * *")),
        (
            "missed_ticks",
            NewSchedule::new("s", wf.id, "* * * * *").missed_ticks(MissedTicks::CatchUp { max: 0 }),
        ),
        (
            "missed_ticks",
            NewSchedule::new("s", wf.id, "* * * * *")
                .missed_ticks(MissedTicks::CatchUp { max: 101 }),
        ),
    ];
    for (field, new) in cases {
        for result in [new.create(&mut conn), new.upsert(&mut conn)] {
            match result {
                Err(Error::InvalidSchedule {
                    field: f,
                    value,
                    reason,
                }) => {
                    assert_eq!(f, field, "{value:?}: {reason}");
                    let message = result_message(f, &value, &reason);
                    assert!(message.contains(field), "{message}");
                }
                other => panic!("{field} of {new:?}: expected InvalidSchedule, got {other:?}"),
            }
        }
    }
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM schedules"), 0);

    // The database refuses an unknown zone from any writer.
    let err = diesel::sql_query(
        "INSERT INTO schedules (name, workflow_id, cron, time_zone, next_fire_at) \
         VALUES ('by-hand', $1, '* * * * *', 'Mars/Olympus_Mons', now())",
    )
    .bind::<SqlUuid, _>(wf.id)
    .execute(&mut conn)
    .unwrap_err();
    assert_eq!(
        Error::Query(err).sqlstate(),
        Some(sqlstate::CHECK_VIOLATION)
    );
    // ... and a policy that the CHECK constraints do not allow.
    let err = diesel::sql_query(
        "INSERT INTO schedules (name, workflow_id, cron, missed_ticks, next_fire_at) \
         VALUES ('by-hand', $1, '* * * * *', 'catch_up', now())",
    )
    .bind::<SqlUuid, _>(wf.id)
    .execute(&mut conn)
    .unwrap_err();
    assert_eq!(
        Error::Query(err).sqlstate(),
        Some(sqlstate::CHECK_VIOLATION)
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM schedules"), 0);

    // A valid one is written, and a second of the same name refused by create.
    let ok = NewSchedule::new("s", wf.id, "*/5 * * * *").time_zone("Europe/Berlin");
    ok.create(&mut conn).unwrap();
    let dup = NewSchedule::new("s", wf.id, "*/5 * * * *").create(&mut conn);
    assert_eq!(
        dup.unwrap_err().sqlstate(),
        Some(sqlstate::UNIQUE_VIOLATION)
    );
}

fn result_message(field: &'static str, value: &str, reason: &str) -> String {
    Error::InvalidSchedule {
        field,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
    .to_string()
}

#[test]
fn fire_times_follow_dst_changes_in_europe_berlin() {
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    // Spring forward on Sunday 28 March 2027: 02:00 CET becomes 03:00 CEST.
    let daily =
        engine::fire_times("30 2 * * *", "Europe/Berlin", utc(2027, 3, 26, 12, 0, 0), 4).unwrap();
    assert_eq!(
        daily,
        [
            utc(2027, 3, 27, 1, 30, 0), // 02:30 CET
            utc(2027, 3, 28, 1, 0, 0),  // 02:30 does not exist: 03:00 CEST
            utc(2027, 3, 29, 0, 30, 0), // 02:30 CEST
            utc(2027, 3, 30, 0, 30, 0),
        ]
    );
    let wall: Vec<String> = daily
        .iter()
        .map(|t| t.with_timezone(&berlin).format("%d %H:%M %Z").to_string())
        .collect();
    assert_eq!(
        wall,
        [
            "27 02:30 CET",
            "28 03:00 CEST",
            "29 02:30 CEST",
            "30 02:30 CEST"
        ]
    );
    // Hourly: the hour that does not exist is not invented.
    let hourly =
        engine::fire_times("0 * * * *", "Europe/Berlin", utc(2027, 3, 27, 23, 30, 0), 3).unwrap();
    assert_eq!(
        hourly,
        [
            utc(2027, 3, 28, 0, 0, 0), // 01:00 CET
            utc(2027, 3, 28, 1, 0, 0), // 03:00 CEST
            utc(2027, 3, 28, 2, 0, 0), // 04:00 CEST
        ]
    );
    // Fall back on Sunday 31 October 2027: 02:30 happens twice; a fixed
    // time fires once, at the first.
    let daily = engine::fire_times(
        "30 2 * * *",
        "Europe/Berlin",
        utc(2027, 10, 30, 12, 0, 0),
        2,
    )
    .unwrap();
    assert_eq!(
        daily,
        [utc(2027, 10, 31, 0, 30, 0), utc(2027, 11, 1, 1, 30, 0)]
    );
    // An interval fires at every instant, both 02:00 and both 02:30.
    let half_hourly = engine::fire_times(
        "*/30 * * * *",
        "Europe/Berlin",
        utc(2027, 10, 30, 23, 45, 0),
        5,
    )
    .unwrap();
    assert_eq!(
        half_hourly,
        [
            utc(2027, 10, 31, 0, 0, 0),  // 02:00 CEST
            utc(2027, 10, 31, 0, 30, 0), // 02:30 CEST
            utc(2027, 10, 31, 1, 0, 0),  // 02:00 CET
            utc(2027, 10, 31, 1, 30, 0), // 02:30 CET
            utc(2027, 10, 31, 2, 0, 0),  // 03:00 CET
        ]
    );

    // A stored schedule lists its next fire times from next_fire_at on.
    let (_db, mut conn, wf) = setup();
    let s = NewSchedule::new("nightly", wf.id, "30 2 * * *")
        .time_zone("Europe/Berlin")
        .create(&mut conn)
        .unwrap();
    set_next_fire_at(&mut conn, s.id, utc(2027, 3, 27, 1, 30, 0));
    let s = reload(&mut conn, s.id);
    assert_eq!(
        engine::next_fire_times(&s, 3).unwrap(),
        [
            utc(2027, 3, 27, 1, 30, 0),
            utc(2027, 3, 28, 1, 0, 0),
            utc(2027, 3, 29, 0, 30, 0),
        ]
    );
    // Firing at the gap's tick stores the next one, in the right offset.
    let report = engine::fire_due_schedules(&mut conn, utc(2027, 3, 28, 1, 0, 0)).unwrap();
    assert_eq!(
        report.fired.iter().map(|f| f.tick).collect::<Vec<_>>(),
        [utc(2027, 3, 28, 1, 0, 0)]
    );
    assert_eq!(report.skipped, 1, "27 March was missed and skipped");
    assert_eq!(
        reload(&mut conn, s.id).next_fire_at,
        utc(2027, 3, 29, 0, 30, 0)
    );
    // A paused schedule has no next fire time.
    let paused = engine::pause_schedule(&mut conn, s.id).unwrap();
    assert!(engine::next_fire_times(&paused, 3).unwrap().is_empty());
}

/// Four threads, each on its own connection, fire at the same `now` at
/// every step (a barrier between steps); every step makes exactly one new
/// tick due. Exactly one execution per tick, none missing.
#[test]
fn a_schedule_fires_once_per_tick_with_4_maintenance_loops_racing() {
    const LOOPS: usize = 4;
    const TICKS: i64 = 25;
    let (db, mut conn, wf) = setup();
    let s = NewSchedule::new("every-second", wf.id, "* * * * * *")
        .create(&mut conn)
        .unwrap();
    let t0 = s.next_fire_at;
    let barrier = Arc::new(Barrier::new(LOOPS));
    let per_thread: Vec<(usize, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..LOOPS)
            .map(|i| {
                let barrier = Arc::clone(&barrier);
                let db = &db;
                scope.spawn(move || {
                    let mut conn = db.connect();
                    let (mut created, mut deduplicated) = (0, 0);
                    for k in 0..TICKS {
                        barrier.wait();
                        // Each loop's clock is a little different, all
                        // within the same second.
                        let now =
                            t0 + TimeDelta::seconds(k) + TimeDelta::milliseconds(i as i64 * 200);
                        let report = engine::fire_due_schedules(&mut conn, now).unwrap();
                        for fired in &report.fired {
                            assert_eq!(fired.tick, t0 + TimeDelta::seconds(k));
                            if fired.created {
                                created += 1;
                            } else {
                                deduplicated += 1;
                            }
                        }
                        assert_eq!(report.skipped, 0);
                    }
                    (created, deduplicated)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let created: usize = per_thread.iter().map(|(c, _)| c).sum();
    let deduplicated: usize = per_thread.iter().map(|(_, d)| d).sum();
    assert_eq!(created, TICKS as usize, "{per_thread:?}");
    assert_eq!(deduplicated, 0, "the row lock let two loops fire one tick");

    let per_key = executions_per_key(&mut conn, s.id);
    let expected: BTreeMap<String, i64> = (0..TICKS)
        .map(|k| {
            (
                engine::schedule_tick_key(s.id, t0 + TimeDelta::seconds(k)),
                1,
            )
        })
        .collect();
    assert_eq!(per_key, expected, "one execution per tick, none missing");
    let s = reload(&mut conn, s.id);
    assert_eq!(s.next_fire_at, t0 + TimeDelta::seconds(TICKS));
    assert_eq!(s.last_fired_at, Some(t0 + TimeDelta::seconds(TICKS - 1)));
}

/// Four loops without a barrier, each with its own clock moving forward
/// by random steps, on a catch-up schedule: every tick up to the last
/// `now` fires exactly once, whichever loop fires it.
#[test]
fn four_loops_with_their_own_clocks_fire_every_tick_once_when_catching_up() {
    const LOOPS: u64 = 4;
    const SPAN: i64 = 40;
    let (db, mut conn, wf) = setup();
    let s = NewSchedule::new("catch-up", wf.id, "* * * * * *")
        .missed_ticks(MissedTicks::CatchUp { max: 100 })
        .create(&mut conn)
        .unwrap();
    let t0 = s.next_fire_at;
    let fired: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..LOOPS)
            .map(|i| {
                let db = &db;
                scope.spawn(move || {
                    let mut conn = db.connect();
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i + 1);
                    let mut offset_ms = 0i64;
                    let mut created = 0;
                    while offset_ms <= SPAN * 1000 {
                        let now = t0 + TimeDelta::milliseconds(offset_ms);
                        created += engine::fire_due_schedules(&mut conn, now)
                            .unwrap()
                            .fired
                            .iter()
                            .filter(|f| f.created)
                            .count();
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        offset_ms += 100 + (rng % 2500) as i64;
                    }
                    created
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let last = engine::fire_due_schedules(&mut conn, t0 + TimeDelta::seconds(SPAN)).unwrap();
    let total = fired + last.fired.len();
    let per_key = executions_per_key(&mut conn, s.id);
    let expected: BTreeMap<String, i64> = (0..=SPAN)
        .map(|k| {
            (
                engine::schedule_tick_key(s.id, t0 + TimeDelta::seconds(k)),
                1,
            )
        })
        .collect();
    assert_eq!(per_key, expected, "one execution per tick, none missing");
    assert_eq!(total, SPAN as usize + 1);
}

#[test]
fn after_a_downtime_skip_fires_the_latest_tick_once_and_catch_up_is_bounded() {
    let (_db, mut conn, wf) = setup();
    let skip = NewSchedule::new("skip", wf.id, "*/5 * * * *")
        .create(&mut conn)
        .unwrap();
    let catch_up = NewSchedule::new("catch-up", wf.id, "*/5 * * * *")
        .missed_ticks(MissedTicks::CatchUp { max: 3 })
        .create(&mut conn)
        .unwrap();
    assert_eq!(catch_up.policy(), MissedTicks::CatchUp { max: 3 });
    let n = skip.next_fire_at;
    assert_eq!(catch_up.next_fire_at, n);
    // Down for an hour and two minutes: 13 ticks are due (n, n+5, ..., n+60).
    let now = n + TimeDelta::minutes(62);
    let report = engine::fire_due_schedules(&mut conn, now).unwrap();
    assert_eq!(report.schedules, 2);
    let ticks_of = |id: Uuid| -> Vec<DateTime<Utc>> {
        report
            .fired
            .iter()
            .filter(|f| f.schedule_id == id)
            .map(|f| f.tick)
            .collect()
    };
    assert_eq!(ticks_of(skip.id), [n + TimeDelta::minutes(60)]);
    assert_eq!(
        ticks_of(catch_up.id),
        [
            n + TimeDelta::minutes(50),
            n + TimeDelta::minutes(55),
            n + TimeDelta::minutes(60),
        ],
        "the latest 3, oldest first"
    );
    assert_eq!(report.skipped, 12 + 10);
    assert!(report.fired.iter().all(|f| f.created));
    for id in [skip.id, catch_up.id] {
        let s = reload(&mut conn, id);
        assert_eq!(s.next_fire_at, n + TimeDelta::minutes(65));
        assert_eq!(s.last_fired_at, Some(n + TimeDelta::minutes(60)));
    }
    assert_eq!(executions_per_key(&mut conn, skip.id).len(), 1);
    assert_eq!(executions_per_key(&mut conn, catch_up.id).len(), 3);
    // The executions carry the schedule's data and user.
    let again = engine::fire_due_schedules(&mut conn, now).unwrap();
    assert_eq!(again.schedules, 0);
    assert!(again.fired.is_empty());
}

#[test]
fn the_executions_carry_the_schedule_data_and_user() {
    let (_db, mut conn, wf) = setup();
    let s = NewSchedule::new("report", wf.id, "0 3 * * *")
        .time_zone("America/New_York")
        .data(serde_json::json!({"report": "daily"}))
        .user_id("scheduler")
        .create(&mut conn)
        .unwrap();
    let report = engine::fire_due_schedules(&mut conn, s.next_fire_at).unwrap();
    let [fired] = report.fired.as_slice() else {
        panic!("{report:?}")
    };
    assert_eq!(
        fired.execution.data,
        Some(serde_json::json!({"report": "daily"}))
    );
    assert_eq!(fired.execution.user_id.as_deref(), Some("scheduler"));
    assert_eq!(fired.execution.workflow_id, wf.id);
    assert_eq!(
        fired.execution.idempotency_key.as_deref(),
        Some(engine::schedule_tick_key(s.id, s.next_fire_at).as_str())
    );
    assert_eq!(
        fired.execution.status,
        workflow_db::ExecutionStatus::Running
    );
}

#[test]
fn a_paused_schedule_does_not_fire_and_resuming_skips_the_ticks_missed_while_paused() {
    let (_db, mut conn, wf) = setup();
    let s = NewSchedule::new("minutely", wf.id, "* * * * *")
        .create(&mut conn)
        .unwrap();
    let paused = engine::pause_schedule(&mut conn, s.id).unwrap();
    assert!(paused.paused);
    // Paused an hour ago: 60 ticks fell while it was paused.
    let an_hour_ago = s.next_fire_at - TimeDelta::hours(1);
    set_next_fire_at(&mut conn, s.id, an_hour_ago);
    let report = engine::fire_due_schedules(&mut conn, Utc::now()).unwrap();
    assert_eq!(report.schedules, 0, "a paused schedule is not even locked");
    assert!(executions_per_key(&mut conn, s.id).is_empty());

    let before_resume = Utc::now();
    let resumed = engine::resume_schedule(&mut conn, s.id).unwrap();
    assert!(!resumed.paused);
    assert!(resumed.next_fire_at > before_resume - TimeDelta::seconds(1));
    // The missed ticks never fire: nothing is due now.
    let report = engine::fire_due_schedules(&mut conn, before_resume).unwrap();
    assert!(report.fired.is_empty(), "{report:?}");
    // The next tick fires once.
    let report = engine::fire_due_schedules(&mut conn, resumed.next_fire_at).unwrap();
    assert_eq!(report.fired.len(), 1);
    assert_eq!(report.fired[0].tick, resumed.next_fire_at);
    assert_eq!(report.skipped, 0);
    // Resuming a running schedule changes nothing (no due tick is lost).
    let s = reload(&mut conn, s.id);
    set_next_fire_at(&mut conn, s.id, s.next_fire_at - TimeDelta::minutes(1));
    let due = reload(&mut conn, s.id);
    assert_eq!(engine::resume_schedule(&mut conn, s.id).unwrap(), due);
    // Unknown ids.
    let nobody = Uuid::now_v7();
    assert!(matches!(
        engine::pause_schedule(&mut conn, nobody),
        Err(Error::NotFound {
            entity: "schedule",
            ..
        })
    ));
    assert!(matches!(
        engine::resume_schedule(&mut conn, nobody),
        Err(Error::NotFound {
            entity: "schedule",
            ..
        })
    ));
}

/// "Why is it not running?" for a schedule, in Rust and in SQL (by name
/// or id): its next tick, a due tick, a pause with its reason.
#[test]
fn why_a_schedule_has_not_fired_says_next_tick_due_or_paused() {
    let (_db, mut conn, wf) = setup();
    let s = NewSchedule::new("nightly", wf.id, "30 2 * * *")
        .time_zone("Europe/Berlin")
        .create(&mut conn)
        .unwrap();
    let why = |conn: &mut PgConnection| {
        let rows = engine::why_schedule_not_firing(conn, s.id).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].step_id, rows[0].node_id.as_deref()), (None, None));
        (rows[0].reason.clone(), rows[0].detail.clone())
    };
    let (reason, detail) = why(&mut conn);
    assert_eq!(reason, "schedule_next");
    assert!(
        detail.contains("fires next at") && detail.contains("Europe/Berlin"),
        "{detail}"
    );
    set_next_fire_at(&mut conn, s.id, Utc::now() - TimeDelta::minutes(1));
    let (reason, detail) = why(&mut conn);
    assert_eq!(reason, "schedule_due");
    assert!(detail.contains("maintenance loop"), "{detail}");
    engine::pause_schedule(&mut conn, s.id).unwrap();
    assert_eq!(why(&mut conn).0, "schedule_paused");
    // psql users ask by name.
    #[derive(QueryableByName)]
    struct Reason {
        #[diesel(sql_type = Text)]
        reason: String,
    }
    let by_name: Vec<Reason> =
        diesel::sql_query("SELECT reason FROM workflow_db_why_schedule('nightly')")
            .load(&mut conn)
            .unwrap();
    assert_eq!(by_name.len(), 1);
    assert_eq!(by_name[0].reason, "schedule_paused");
    let missing: Vec<Reason> =
        diesel::sql_query("SELECT reason FROM workflow_db_why_schedule('nope')")
            .load(&mut conn)
            .unwrap();
    assert_eq!(missing[0].reason, "not_found");
}

#[test]
fn a_duplicate_start_of_a_tick_is_refused_or_deduplicated_by_the_database() {
    let (_db, mut conn, wf) = setup();
    let s = NewSchedule::new("dedup", wf.id, "*/10 * * * *")
        .create(&mut conn)
        .unwrap();
    let tick = s.next_fire_at;
    let report = engine::fire_due_schedules(&mut conn, tick).unwrap();
    assert_eq!(report.fired.len(), 1);
    let first = report.fired[0].execution.id;
    let key = engine::schedule_tick_key(s.id, tick);

    // Plain SQL: a second execution with the tick's key is refused.
    let err =
        diesel::sql_query("INSERT INTO executions (workflow_id, idempotency_key) VALUES ($1, $2)")
            .bind::<SqlUuid, _>(wf.id)
            .bind::<Text, _>(&key)
            .execute(&mut conn)
            .unwrap_err();
    assert_eq!(
        Error::Query(err).sqlstate(),
        Some(sqlstate::UNIQUE_VIOLATION)
    );

    // A writer that bypasses the row lock (next_fire_at moved back by hand,
    // as a stale copy of the row would): the tick is not started again.
    set_next_fire_at(&mut conn, s.id, tick);
    let report = engine::fire_due_schedules(&mut conn, tick).unwrap();
    assert_eq!(report.fired.len(), 1);
    assert!(!report.fired[0].created);
    assert_eq!(report.fired[0].execution.id, first);
    assert_eq!(
        executions_per_key(&mut conn, s.id),
        BTreeMap::from([(key, 1)])
    );
}

#[test]
fn a_schedule_that_cannot_fire_is_paused_with_the_reason_and_the_others_fire() {
    let (_db, mut conn, wf) = setup();
    let broken = NewSchedule::new("broken", wf.id, "* * * * *")
        .create(&mut conn)
        .unwrap();
    let healthy = NewSchedule::new("healthy", wf.id, "* * * * *")
        .create(&mut conn)
        .unwrap();
    // Written by hand: the database cannot parse cron, the crate can.
    diesel::update(schedules::table.find(broken.id))
        .set(schedules::cron.eq("every tuesday"))
        .execute(&mut conn)
        .unwrap();
    // A workflow whose graph was broken by hand (an edge to no node).
    let other = workflow(&mut conn, &["x"], &[]);
    let orphan = NewSchedule::new("orphan", other.id, "* * * * *")
        .create(&mut conn)
        .unwrap();
    diesel::sql_query(
        "UPDATE workflows SET edges = '[{\"source\": \"x\", \"target\": \"nowhere\"}]' WHERE id = $1",
    )
    .bind::<SqlUuid, _>(other.id)
    .execute(&mut conn)
    .unwrap();
    let now = healthy.next_fire_at.max(orphan.next_fire_at);
    let report = engine::fire_due_schedules(&mut conn, now).unwrap();
    assert_eq!(report.schedules, 3);
    assert_eq!(report.fired.len(), 1);
    assert_eq!(report.fired[0].schedule_id, healthy.id);
    let mut paused: Vec<Uuid> = report.paused.iter().map(|p| p.schedule_id).collect();
    paused.sort();
    let mut expected = vec![broken.id, orphan.id];
    expected.sort();
    assert_eq!(paused, expected);
    let orphan = reload(&mut conn, orphan.id);
    assert!(orphan.paused);
    assert!(
        orphan.last_error.as_deref().unwrap().contains("nowhere"),
        "{:?}",
        orphan.last_error
    );
    assert!(executions_per_key(&mut conn, orphan.id).is_empty());
    let broken = reload(&mut conn, broken.id);
    assert!(broken.paused);
    let error = broken.last_error.clone().unwrap();
    assert!(error.contains("every tuesday"), "{error}");
    assert!(executions_per_key(&mut conn, broken.id).is_empty());
    // Resuming it is refused while the cron is broken; it stays paused.
    assert!(matches!(
        engine::resume_schedule(&mut conn, broken.id),
        Err(Error::InvalidSchedule { field: "cron", .. })
    ));
    assert!(reload(&mut conn, broken.id).paused);
}

/// An error that is not the schedule's (here: a caller's REPEATABLE READ
/// transaction, which the engine's triggers refuse) is returned, and the
/// schedule is neither paused nor advanced.
#[test]
fn an_error_that_is_not_the_schedules_is_returned_and_pauses_nothing() {
    let (_db, mut conn, wf) = setup();
    let s = NewSchedule::new("rr", wf.id, "* * * * *")
        .create(&mut conn)
        .unwrap();
    conn.build_transaction()
        .repeatable_read()
        .run(|c| {
            let result = engine::fire_due_schedules(c, s.next_fire_at);
            assert!(result.is_err(), "{result:?}");
            diesel::QueryResult::Ok(())
        })
        .unwrap();
    let after = reload(&mut conn, s.id);
    assert!(!after.paused);
    assert_eq!(after.last_error, None);
    assert_eq!(after.next_fire_at, s.next_fire_at);
    assert!(executions_per_key(&mut conn, s.id).is_empty());
    // In READ COMMITTED it fires.
    let report = engine::fire_due_schedules(&mut conn, s.next_fire_at).unwrap();
    assert_eq!(report.fired.len(), 1);
}

#[test]
fn upsert_keeps_the_next_tick_when_unchanged_and_recomputes_it_when_the_cron_changes() {
    let (_db, mut conn, wf) = setup();
    let first = NewSchedule::new("boot", wf.id, "0 * * * *")
        .upsert(&mut conn)
        .unwrap();
    // Due an hour ago (say the service was down): a redeploy that declares
    // the same schedule keeps the due tick.
    let due = first.next_fire_at - TimeDelta::hours(1);
    set_next_fire_at(&mut conn, first.id, due);
    engine::pause_schedule(&mut conn, first.id).unwrap();
    let again = NewSchedule::new("boot", wf.id, "0 * * * *")
        .data(serde_json::json!({"v": 2}))
        .upsert(&mut conn)
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.next_fire_at, due);
    assert!(again.paused, "an operator's pause survives a redeploy");
    assert_eq!(again.data, Some(serde_json::json!({"v": 2})));
    // A changed cron: due at its first tick after now.
    let changed = NewSchedule::new("boot", wf.id, "*/15 * * * *")
        .upsert(&mut conn)
        .unwrap();
    assert_eq!(changed.id, first.id);
    assert!(changed.next_fire_at > Utc::now() - TimeDelta::seconds(5));
    assert!(changed.next_fire_at <= Utc::now() + TimeDelta::minutes(15));
    assert_eq!(
        engine::list_schedules(&mut conn, Some(wf.id))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        engine::find_schedule(&mut conn, "boot")
            .unwrap()
            .map(|s| s.id),
        Some(first.id)
    );
    // Delete; deleting the workflow deletes its schedules too.
    assert!(engine::delete_schedule(&mut conn, first.id).unwrap());
    assert!(!engine::delete_schedule(&mut conn, first.id).unwrap());
    NewSchedule::new("cascade", wf.id, "* * * * *")
        .create(&mut conn)
        .unwrap();
    Workflow::delete(&mut conn, wf.id).unwrap();
    assert!(engine::list_schedules(&mut conn, None).unwrap().is_empty());
}

/// A due index the firing query uses: only unpaused schedules are in it.
#[test]
fn the_firing_query_reads_only_due_unpaused_schedules_through_the_partial_index() {
    let (_db, mut conn, _wf) = setup();
    #[derive(QueryableByName)]
    struct Plan {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }
    diesel::sql_query("SET enable_seqscan = off")
        .execute(&mut conn)
        .unwrap();
    let plan: Vec<Plan> = diesel::sql_query(
        "EXPLAIN SELECT id FROM schedules WHERE NOT paused AND next_fire_at <= $1 \
         ORDER BY next_fire_at, id LIMIT 100 FOR UPDATE SKIP LOCKED",
    )
    .bind::<Timestamptz, _>(Utc::now())
    .load(&mut conn)
    .unwrap();
    let plan: String = plan.into_iter().map(|p| p.line + "\n").collect();
    assert!(plan.contains("schedules_due_idx"), "{plan}");
}

#[cfg(feature = "runtime")]
mod maintenance {
    use std::time::{Duration, Instant};

    use super::*;
    use workflow_db::runtime::{AsyncPool, Maintenance, MaintenanceOptions};

    fn spawn(db: &TestDatabase, name: &str, fire: bool) -> workflow_db::runtime::MaintenanceHandle {
        let mut config = db.config();
        config.pool_size = 2;
        let pool = AsyncPool::new(workflow_db::build_pool(&config).unwrap());
        let mut options = MaintenanceOptions::default();
        options.interval = Duration::from_millis(100);
        options.application_name = name.to_owned();
        options.fire_schedules = fire;
        Maintenance::new(pool, db.url(), options).unwrap().spawn()
    }

    /// Four real maintenance instances on a one-second cron: one execution
    /// per tick, consecutive ticks, none twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_maintenance_instances_fire_a_one_second_cron_once_per_tick() {
        let (db, mut conn, wf) = setup();
        // Catch-up, so that a round delayed past a second on a busy machine
        // still fires every tick (the assertion is "none missing").
        let s = NewSchedule::new("every-second", wf.id, "* * * * * *")
            .missed_ticks(MissedTicks::CatchUp { max: 100 })
            .create(&mut conn)
            .unwrap();
        let t0 = s.next_fire_at;
        let instances: Vec<_> = (0..4)
            .map(|i| spawn(&db, &format!("sched-maint-{i}"), true))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while executions_per_key(&mut conn, s.id).len() < 4 {
            assert!(Instant::now() < deadline, "no 4 ticks fired in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut fired_by_instances = 0;
        for instance in instances {
            fired_by_instances += instance.shutdown().await.unwrap().schedule_ticks_fired;
        }
        let per_key = executions_per_key(&mut conn, s.id);
        assert!(per_key.values().all(|&n| n == 1), "{per_key:?}");
        let s = reload(&mut conn, s.id);
        let last = s.last_fired_at.unwrap();
        let first = last - TimeDelta::seconds(per_key.len() as i64 - 1);
        let expected: BTreeMap<String, i64> = (0..per_key.len() as i64)
            .map(|k| {
                (
                    engine::schedule_tick_key(s.id, first + TimeDelta::seconds(k)),
                    1,
                )
            })
            .collect();
        assert_eq!(per_key, expected, "consecutive ticks, none missing");
        assert_eq!(first, t0, "from the first tick after the creation on");
        assert_eq!(fired_by_instances, per_key.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn maintenance_with_fire_schedules_off_fires_nothing() {
        let (db, mut conn, wf) = setup();
        let s = NewSchedule::new("every-second", wf.id, "* * * * * *")
            .create(&mut conn)
            .unwrap();
        let instance = spawn(&db, "sched-maint-off", false);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let stats = instance.shutdown().await.unwrap();
        assert!(stats.leader_rounds > 0, "{stats:?}");
        assert_eq!(stats.schedule_ticks_fired, 0);
        assert!(executions_per_key(&mut conn, s.id).is_empty());
    }
}
