//! The maintenance loop of feature `runtime` against a real PostgreSQL:
//! one leader among several instances, failover when the leader's session
//! dies or it shuts down, expired leases reclaimed and old executions
//! pruned without anybody calling them, and options refused up front.
#![cfg(feature = "runtime")]

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use uuid::Uuid;
use workflow_db::engine::{self, ReclaimPolicy};
use workflow_db::runtime::{
    AsyncPool, MAINTENANCE_LOCK, Maintenance, MaintenanceHandle, MaintenanceOptions,
};
use workflow_db::schema::{execution_steps, executions};
use workflow_db::testing::TestDatabase;
use workflow_db::{Error, ExecutionStep, Lease, LeaseLostReason, StepStatus};

use common::{LEASE, workflow};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(15);
/// How long a failover may take ("a new leader within seconds"); the
/// instances run rounds every [`INTERVAL`].
const FAILOVER: Duration = Duration::from_secs(5);
const INTERVAL: Duration = Duration::from_millis(100);

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn async_pool(db: &TestDatabase, size: u32) -> AsyncPool {
    let mut config = db.config();
    config.pool_size = size;
    AsyncPool::new(workflow_db::build_pool(&config).unwrap())
}

fn options(application_name: &str) -> MaintenanceOptions {
    let mut o = MaintenanceOptions::default();
    o.interval = INTERVAL;
    o.application_name = application_name.to_owned();
    o
}

/// A maintenance instance on `db` with its own pool, named `name` in
/// `pg_stat_activity`.
fn spawn(db: &TestDatabase, options: MaintenanceOptions) -> MaintenanceHandle {
    Maintenance::new(async_pool(db, 2), db.url(), options)
        .unwrap()
        .spawn()
}

/// Polls `check` until it returns `Some`, failing the test after `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `application_name` of the session holding the maintenance lock of
/// the pool's database, if any.
async fn lock_holder(pool: &AsyncPool) -> Option<String> {
    let sql = format!(
        "SELECT a.application_name::text AS name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {}::oid AND l.objid = {}::oid \
           AND l.objsubid = 2 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        MAINTENANCE_LOCK.0, MAINTENANCE_LOCK.1
    );
    let mut holders = pool
        .run(move |c| Ok(diesel::sql_query(&sql).load::<Name>(c)?))
        .await
        .unwrap();
    assert!(holders.len() <= 1, "two sessions hold one lock?");
    holders.pop().map(|h| h.name)
}

/// Sessions of the pool's database named `name`.
async fn sessions_named(pool: &AsyncPool, name: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = '{name}'"
    );
    pool.run(move |c| Ok(diesel::sql_query(&sql).get_result::<Count>(c)?.n))
        .await
        .unwrap()
}

/// Indexes of the instances that say they lead.
fn leaders(instances: &[&MaintenanceHandle]) -> Vec<usize> {
    (0..instances.len())
        .filter(|&i| instances[i].is_leader())
        .collect()
}

/// Waits until exactly one instance leads, and PostgreSQL agrees (the lock
/// is held by that instance's session); its index.
async fn the_one_leader(
    observer: &AsyncPool,
    names: &[&str],
    instances: &[&MaintenanceHandle],
    limit: Duration,
) -> usize {
    eventually("exactly one leader, holding the lock", limit, || async {
        match leaders(instances).as_slice() {
            [one] => (lock_holder(observer).await.as_deref() == Some(names[*one])).then_some(*one),
            _ => None,
        }
    })
    .await
}

// ------------------------------------------------------------ election

/// Three instances on one database: one leads, holds the lock, and keeps
/// leading while the others compete every round without getting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_three_instances_leads() {
    let db = TestDatabase::new();
    let observer = async_pool(&db, 1);
    let names = ["maint-a", "maint-b", "maint-c"];
    let handles: Vec<MaintenanceHandle> = names.iter().map(|n| spawn(&db, options(n))).collect();
    let all: Vec<&MaintenanceHandle> = handles.iter().collect();

    let leader = the_one_leader(&observer, &names, &all, PATIENCE).await;
    // Every instance runs several more rounds (the followers each try the
    // lock at every one): never a second leader, never another holder.
    let start: Vec<u64> = all.iter().map(|h| h.stats().rounds).collect();
    eventually("five more rounds everywhere", PATIENCE, || async {
        assert_eq!(leaders(&all), [leader], "one leader at a time");
        assert_eq!(lock_holder(&observer).await.as_deref(), Some(names[leader]));
        all.iter()
            .zip(&start)
            .all(|(h, s)| h.stats().rounds >= s + 5)
            .then_some(())
    })
    .await;
    for (i, h) in all.iter().enumerate() {
        let stats = h.stats();
        assert_eq!(
            stats.terms,
            u64::from(i == leader),
            "{}: {stats:?}",
            names[i]
        );
        assert_eq!(
            stats.leader_rounds > 0,
            i == leader,
            "{}: {stats:?}",
            names[i]
        );
    }
    for h in handles {
        h.shutdown().await.unwrap();
    }
    assert_eq!(lock_holder(&observer).await, None);
}

/// The leader's lock session is killed (`pg_terminate_backend`, as when its
/// process or host dies): it reports at once that it no longer leads, and
/// another instance takes over within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_leader_session_hands_leadership_to_another_instance() {
    let db = TestDatabase::new();
    let observer = async_pool(&db, 1);
    let names = ["maint-a", "maint-b", "maint-c"];
    let handles: Vec<MaintenanceHandle> = names.iter().map(|n| spawn(&db, options(n))).collect();
    let all: Vec<&MaintenanceHandle> = handles.iter().collect();
    let old = the_one_leader(&observer, &names, &all, PATIENCE).await;

    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = '{}'",
        names[old]
    );
    let killed = observer
        .run(move |c| Ok(diesel::sql_query(&sql).get_result::<Count>(c)?.n))
        .await
        .unwrap();
    assert_eq!(killed, 1, "the leader's lock session");
    let t0 = Instant::now();

    // pg_terminate_backend only signals the backend: wait for the old
    // leader to see its session end, then for the new leader.
    eventually("the old leader steps down", FAILOVER, || async {
        (!all[old].is_leader()).then_some(())
    })
    .await;
    let new = the_one_leader(&observer, &names, &all, FAILOVER).await;
    assert_ne!(new, old, "another instance took over");
    eprintln!("failover took {:?}", t0.elapsed());
    let stats = all[old].stats();
    assert_eq!((stats.leader, stats.terms), (false, 1), "{stats:?}");
    // The old leader keeps running as a follower, on a new session.
    eventually("the old leader reconnected", PATIENCE, || async {
        (sessions_named(&observer, names[old]).await == 1).then_some(())
    })
    .await;
    assert_eq!(leaders(&all), [new]);
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

/// A leader that shuts down releases the lock before `shutdown` returns,
/// and the other instance takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_shuts_down_releases_the_lock_and_another_takes_over() {
    let db = TestDatabase::new();
    let observer = async_pool(&db, 1);
    let names = ["maint-a", "maint-b"];
    let mut handles: Vec<Option<MaintenanceHandle>> =
        names.iter().map(|n| Some(spawn(&db, options(n)))).collect();
    let old = {
        let all: Vec<&MaintenanceHandle> = handles.iter().flatten().collect();
        the_one_leader(&observer, &names, &all, PATIENCE).await
    };
    let other = 1 - old;

    let stats = handles[old].take().unwrap().shutdown().await.unwrap();
    assert_eq!((stats.leader, stats.terms), (false, 1), "{stats:?}");
    assert_ne!(
        lock_holder(&observer).await.as_deref(),
        Some(names[old]),
        "shutdown returned before the lock was released"
    );
    let survivor = handles[other].take().unwrap();
    the_one_leader(&observer, &names[other..=other], &[&survivor], FAILOVER).await;
    eventually("the old leader's session closed", PATIENCE, || async {
        (sessions_named(&observer, names[old]).await == 0).then_some(())
    })
    .await;
    survivor.shutdown().await.unwrap();
}

// ------------------------------------------------------------ the work

/// Starts a one-step execution and claims its step for `gone-worker` with
/// a 200 ms lease, which nobody will renew; the step's lease.
async fn walked_away(db: &TestDatabase, pool: &AsyncPool) -> Lease {
    let wf = workflow(&mut db.connect(), &["a"], &[]).id;
    let claimed = pool
        .run(move |c| {
            engine::start_execution(c, &workflow_db::NewExecution::new(wf))?;
            Ok(engine::claim_steps(
                c,
                "gone-worker",
                1,
                Duration::from_millis(200),
            )?)
        })
        .await
        .unwrap();
    let [step] = claimed.as_slice() else {
        panic!("claimed {claimed:?}")
    };
    step.lease().unwrap()
}

/// Waits until the step is no longer running; its row.
async fn no_longer_running(pool: &AsyncPool, step_id: Uuid) -> ExecutionStep {
    eventually("the step leaves running", PATIENCE, || {
        let pool = pool.clone();
        async move {
            let step = pool
                .run(move |c| {
                    Ok(execution_steps::table
                        .find(step_id)
                        .select(ExecutionStep::as_select())
                        .first(c)?)
                })
                .await
                .unwrap();
            (step.status != StepStatus::Running).then_some(step)
        }
    })
    .await
}

/// A step claimed with a short lease whose worker walks away is reclaimed
/// by the leader (back to pending, claimable again as a new attempt)
/// without anybody calling `reclaim_expired`; the follower reclaims
/// nothing. By default the crash does not spend one of the step's
/// retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_worker_walked_away_is_reclaimed_by_the_leader() {
    let db = TestDatabase::new();
    let pool = async_pool(&db, 2);
    let old_lease = walked_away(&db, &pool).await;
    let step_id = old_lease.step_id;

    let names = ["maint-a", "maint-b"];
    let handles: Vec<MaintenanceHandle> = names.iter().map(|n| spawn(&db, options(n))).collect();
    let all: Vec<&MaintenanceHandle> = handles.iter().collect();

    let step = no_longer_running(&pool, step_id).await;
    assert_eq!(
        (
            step.status,
            step.locked_by.as_deref(),
            step.retry_count,
            step.reclaims
        ),
        (StepStatus::Pending, None, 0, 1),
        "{step:?}"
    );
    let error = step.error.unwrap_or_default();
    assert!(
        error.contains("lease of worker gone-worker expired"),
        "{error}"
    );
    // The leader counted it; nobody else touched it.
    let leader = eventually("the leader counted the reclaim", PATIENCE, || async {
        all.iter().position(|h| h.stats().reclaimed == 1)
    })
    .await;
    assert!(all[leader].stats().terms >= 1);
    assert_eq!(
        all[1 - leader].stats().reclaimed,
        0,
        "only the leader reclaims"
    );

    // Claimable again, as a new attempt; the walked-away lease is dead.
    let again = pool
        .run(|c| Ok(engine::claim_steps(c, "w2", 1, LEASE)?))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].id, again[0].attempt),
        (step_id, old_lease.attempt + 1)
    );
    let err = pool
        .run(move |c| engine::complete_step(c, &old_lease, None).map(drop))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLostReason::Superseded,
                ..
            }
        ),
        "{err:?}"
    );
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

/// The service chooses what a reclaim costs: with
/// `ReclaimPolicy::CountAsFailure` the leader spends one of the step's
/// retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reclaim_policy_of_the_options_is_applied() {
    let db = TestDatabase::new();
    let pool = async_pool(&db, 2);
    let lease = walked_away(&db, &pool).await;
    let mut o = options("maint-a");
    o.reclaim_policy = ReclaimPolicy::CountAsFailure;
    let maintenance = spawn(&db, o);

    let step = no_longer_running(&pool, lease.step_id).await;
    assert_eq!(
        (step.status, step.retry_count, step.reclaims),
        (StepStatus::Pending, 1, 1),
        "{step:?}"
    );
    maintenance.shutdown().await.unwrap();
}

/// Creates old final executions, an old running one and a recently
/// finished one; their ids.
struct Executions {
    old_final: Vec<Uuid>,
    running: Uuid,
    recent: Uuid,
}

async fn executions_to_prune(db: &TestDatabase, pool: &AsyncPool) -> Executions {
    let wf = workflow(&mut db.connect(), &["a", "b"], &[("a", "b")]).id;
    pool.run(move |c| {
        let start = |c: &mut PgConnection| {
            engine::start_execution(c, &workflow_db::NewExecution::new(wf)).map(|s| s.execution.id)
        };
        let old_final: Vec<Uuid> = (0..3).map(|_| start(c)).collect::<Result<_, _>>()?;
        for id in &old_final {
            engine::cancel(c, *id)?;
        }
        let running = start(c)?;
        let recent = start(c)?;
        engine::cancel(c, recent)?;
        diesel::update(executions::table.filter(executions::id.eq_any(&old_final)))
            .set(executions::completed_at.eq(Utc::now() - TimeDelta::days(30)))
            .execute(c)?;
        diesel::update(executions::table.find(running))
            .set((
                executions::created_at.eq(Utc::now() - TimeDelta::days(30)),
                executions::started_at.eq(Utc::now() - TimeDelta::days(30)),
            ))
            .execute(c)?;
        Ok(Executions {
            old_final,
            running,
            recent,
        })
    })
    .await
    .unwrap()
}

async fn existing(pool: &AsyncPool) -> Vec<Uuid> {
    pool.run(|c| Ok(executions::table.select(executions::id).load(c)?))
        .await
        .unwrap()
}

/// With a retention, final executions older than it are pruned by the
/// leader; the running one and the recently finished one are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_executions_past_the_retention_are_pruned_and_the_others_kept() {
    let db = TestDatabase::new();
    let pool = async_pool(&db, 2);
    let ex = executions_to_prune(&db, &pool).await;
    let mut o = options("maint-a");
    o.retention = Some(Duration::from_secs(7 * 24 * 3600));
    o.prune_every = INTERVAL;
    let maintenance = spawn(&db, o);

    let left = eventually("the old executions are pruned", PATIENCE, || async {
        let left = existing(&pool).await;
        (!ex.old_final.iter().any(|id| left.contains(id))).then_some(left)
    })
    .await;
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.contains(&ex.running) && left.contains(&ex.recent),
        "{left:?}"
    );
    eventually("the leader counted the prune", PATIENCE, || async {
        (maintenance.stats().pruned == 3).then_some(())
    })
    .await;
    let stats = maintenance.shutdown().await.unwrap();
    assert_eq!((stats.pruned, stats.reclaimed), (3, 0), "{stats:?}");
}

/// Without a retention (the default) nothing is ever pruned, however
/// many rounds the leader runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_retention_nothing_is_pruned() {
    let db = TestDatabase::new();
    let pool = async_pool(&db, 2);
    let ex = executions_to_prune(&db, &pool).await;
    let maintenance = spawn(&db, options("maint-a"));
    eventually("ten rounds as leader", PATIENCE, || async {
        (maintenance.stats().leader_rounds >= 10).then_some(())
    })
    .await;
    let left = existing(&pool).await;
    assert_eq!(left.len(), ex.old_final.len() + 2, "{left:?}");
    let stats = maintenance.shutdown().await.unwrap();
    assert_eq!(stats.pruned, 0);
}

// ------------------------------------------------------------ refusals

/// Options out of range are refused by `Maintenance::new` with an error
/// that names the option and the range, before anything connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_options_are_refused_with_a_clear_error_before_connecting() {
    let db = TestDatabase::new();
    let observer = async_pool(&db, 1);
    type Spoil = fn(&mut MaintenanceOptions);
    let cases: [(&str, &str, Spoil); 7] = [
        ("interval", "0ns is out of range", |o| {
            o.interval = Duration::ZERO
        }),
        ("reclaim_batch", "0 is out of range", |o| {
            o.reclaim_batch = 0
        }),
        ("prune_batch", "-5 is out of range", |o| o.prune_batch = -5),
        ("wait_batch", "0 is out of range", |o| o.wait_batch = 0),
        ("retention", "0ns is out of range", |o| {
            o.retention = Some(Duration::ZERO)
        }),
        ("prune_every", "more than zero", |o| {
            o.prune_every = Duration::ZERO
        }),
        ("application_name", "must not be empty", |o| {
            o.application_name = String::new()
        }),
    ];
    for (field, says, spoil) in cases {
        let mut o = options("maint-refused");
        spoil(&mut o);
        let err = Maintenance::new(async_pool(&db, 1), db.url(), o).unwrap_err();
        let Error::InvalidOption { option, .. } = &err else {
            panic!("{field}: {err:?}")
        };
        assert_eq!(*option, format!("MaintenanceOptions::{field}"));
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("invalid MaintenanceOptions::{field}: "))
                && text.contains(says),
            "{text}"
        );
    }
    // A lock connection the notifier's settings cannot open is refused too,
    // without the password.
    let tls = workflow_db::DatabaseUrl::parse(&format!(
        "{}?sslmode=require",
        common::url_with(&db, None, None)
    ))
    .unwrap();
    let err = Maintenance::new(async_pool(&db, 1), &tls, options("maint-refused")).unwrap_err();
    assert!(matches!(err, Error::InvalidDatabaseUrl { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains(common::PASSWORD));
    // Nothing connected, nothing holds the lock.
    assert_eq!(sessions_named(&observer, "maint-refused").await, 0);
    assert_eq!(lock_holder(&observer).await, None);
}

// ------------------------------------------------------------ waits

/// Timers and signal waits run with nobody calling `fire_due_waits`: the
/// leader fires a due timer, delivers a signal that came before its step
/// was reached, and fails a wait past its timeout; with `fire_waits` off,
/// an instance leaves them alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_fires_timers_and_delivers_kept_signals_every_round() {
    use serde_json::json;
    use workflow_db::{Edge, NewExecution, NewWorkflow, Node, WorkflowGraph};
    let db = TestDatabase::new();
    let pool = async_pool(&db, 2);
    let (timer, kept, timed_out) = pool
        .run(|c| {
            let graph = WorkflowGraph {
                nodes: vec![
                    Node::timer("t", Duration::from_millis(300)),
                    Node::signal("s", "go"),
                ],
                edges: vec![Edge::new("t", "s")],
            };
            let wf = NewWorkflow::from_graph("waits", &graph).create(c)?;
            let e = engine::start_execution(c, &NewExecution::new(wf.id))?.execution;
            // Sent before "s" is reached (it waits for the timer): kept.
            let sent = engine::send_signal(c, e.id, "go", Some(&json!({"ok": true})))?;
            assert_eq!(sent.signal.delivered_to, None);
            let graph = WorkflowGraph {
                nodes: vec![Node::signal("late", "never").with_timeout(Duration::from_millis(300))],
                edges: vec![],
            };
            let wf = NewWorkflow::from_graph("timeout", &graph).create(c)?;
            let other = engine::start_execution(c, &NewExecution::new(wf.id))?.execution;
            let mut steps = ExecutionStep::list_for_execution(c, e.id)?;
            steps.extend(ExecutionStep::list_for_execution(c, other.id)?);
            let id = |n: &str| steps.iter().find(|s| s.node_id == n).unwrap().id;
            Ok((id("t"), id("s"), id("late")))
        })
        .await
        .unwrap();

    let mut off = options("maint-off");
    off.fire_waits = false;
    let idle = spawn(&db, off);
    eventually("the instance without waits leads", PATIENCE, || async {
        idle.is_leader().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stats = idle.shutdown().await.unwrap();
    assert!(stats.leader_rounds > 0);
    assert_eq!(
        (
            stats.timers_fired,
            stats.signals_delivered,
            stats.signals_timed_out
        ),
        (0, 0, 0)
    );

    let leader = spawn(&db, options("maint-waits"));
    for (step, status) in [
        (timer, StepStatus::Completed),
        (kept, StepStatus::Completed),
        (timed_out, StepStatus::Failed),
    ] {
        let got = eventually("the wait ran", PATIENCE, || async {
            let s = pool
                .run(move |c| Ok(ExecutionStep::find(c, step)?))
                .await
                .unwrap();
            (s.status != StepStatus::Pending).then_some(s)
        })
        .await;
        assert_eq!(got.status, status, "{got:?}");
        if step == kept {
            assert_eq!(got.output, Some(json!({"ok": true})));
        }
    }
    let stats = eventually("the leader counted them", PATIENCE, || async {
        let s = leader.stats();
        (s.timers_fired + s.signals_delivered + s.signals_timed_out == 3).then_some(s)
    })
    .await;
    assert_eq!(
        (
            stats.timers_fired,
            stats.signals_delivered,
            stats.signals_timed_out
        ),
        (1, 1, 1)
    );
    leader.shutdown().await.unwrap();
}

/// A pool on one database and a URL naming another would elect the
/// leader of one database to maintain the other: the loop stops with an
/// error at its first round instead, without leading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_and_a_url_on_different_databases_are_refused() {
    let pooled = TestDatabase::new();
    let named = TestDatabase::new();
    let maintenance = Maintenance::new(
        async_pool(&pooled, 1),
        named.url(),
        options("maint-mismatch"),
    )
    .unwrap();
    let err = tokio::time::timeout(PATIENCE, maintenance.run(std::future::pending()))
        .await
        .expect("the loop stops by itself")
        .unwrap_err();
    let Error::InvalidOption { option, reason } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*option, "Maintenance::new");
    assert!(
        reason.contains(pooled.name()) && reason.contains(named.name()),
        "{reason}"
    );
    assert_eq!(lock_holder(&async_pool(&named, 1)).await, None);
}
